"""The exception hierarchy of logitstore.

Every error logitstore raises on purpose derives from ``LogitstoreError``; the
subclasses also inherit the matching builtin (``FileNotFoundError``,
``ValueError``) so callers can catch either.
"""


class LogitstoreError(Exception):
    """Base class of all logitstore errors."""


class CacheNotFoundError(LogitstoreError, FileNotFoundError):
    """The path is not a cache directory (no manifest)."""


class FormatVersionError(LogitstoreError, ValueError):
    """The cache was written with a format version this code cannot read."""


class CorruptCacheError(LogitstoreError, ValueError):
    """A shard or the manifest does not match the spec or the recorded checksums."""


class InvalidInputError(LogitstoreError, ValueError):
    """Arguments or arrays given to the writer/reader break the data contract."""


class CacheExistsError(LogitstoreError, FileExistsError):
    """A writer was pointed at a directory that already holds a cache."""


class CacheLockedError(LogitstoreError, RuntimeError):
    """Another writer holds the cache's build lock (a live process, or a process on another host)."""


class CacheWriteError(LogitstoreError, OSError):
    """Writing the cache failed (disk full, I/O error); the cache stays at its last committed manifest."""


class TokenizerMismatchError(InvalidInputError):
    """A model's tokenizer or vocabulary does not match the one a cache was built with."""
