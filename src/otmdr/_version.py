"""The release's version, in a module of its own so that any layer can read it without
importing the package's facade (``otmdr/__init__.py`` imports the optimizers). Keep it equal to
``version`` in pyproject.toml."""

__version__ = "0.1.0"
