"""The release's version, in a module of its own so that any layer can read it without
importing the package's facade (``otmdr/__init__.py`` imports the optimizers). The one place the
version is written: pyproject.toml reads it (``[tool.setuptools.dynamic]``); CHANGELOG.md says what
each version changed."""

__version__ = "0.2.0.dev0"
