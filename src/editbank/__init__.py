"""editbank: lifelong, reversible knowledge editing of language models."""

from ._version import __version__
from .data import load_requests
from .editor import Editor
from .methods import METHODS, EditFailed, EditNotWritten, Method, register
from .models.loading import load_model
from .requests import EditRequest
from .store import Edit, EditStore
from .world import World

__all__ = [
    "METHODS",
    "Edit",
    "EditFailed",
    "EditNotWritten",
    "EditRequest",
    "EditStore",
    "Editor",
    "Method",
    "World",
    "__version__",
    "load_model",
    "load_requests",
    "register",
]
