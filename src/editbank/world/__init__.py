"""The built-in world: a seeded offline fact world and a small Llama trained to know it."""

from .core import World
from .spec import Fact, Relation, WorldSpec, parse_spec
from .specs import SIZES, builtin_spec

__all__ = ["World", "Fact", "Relation", "WorldSpec", "parse_spec", "builtin_spec", "SIZES"]
