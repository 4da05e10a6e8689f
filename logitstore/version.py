"""The library version, in one place (the manifest's ``created_by`` and ``logitstore.__version__`` read it)."""

__version__ = "0.3.0"
