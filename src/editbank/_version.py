"""The package version (its own module, so that modules inside the package need not import its __init__)."""

__version__ = "0.1.0"
