"""Editing methods; each module registers itself with `@register(name)`."""

from . import finetune, grace, locate, repair, sola, wise  # noqa: F401  (registration)
from .base import METHODS, EditFailed, EditItem, EditNotWritten, Method, Route, get_method, register

__all__ = ["METHODS", "EditFailed", "EditItem", "EditNotWritten", "Method", "Route", "get_method", "register"]
