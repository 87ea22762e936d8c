"""editbank: lifelong, reversible knowledge editing of language models."""

__version__ = "0.1.0"

from .data import load_requests  # noqa: E402
from .editor import Editor  # noqa: E402
from .methods import METHODS, EditFailed, EditNotWritten, Method, register  # noqa: E402
from .models.loading import load_model  # noqa: E402
from .requests import EditRequest  # noqa: E402
from .store import Edit, EditStore  # noqa: E402
from .world import World  # noqa: E402

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
