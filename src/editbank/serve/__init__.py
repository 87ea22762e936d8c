"""`editbank serve`: an HTTP service answering with an edited model and taking edits and undos live."""

from .app import ServeConfig, create_app

__all__ = ["ServeConfig", "create_app"]
