"""logitstore: a sparse teacher-logit store for offline knowledge distillation.

The store (this package): ``CacheWriter`` writes sparse per-token teacher
distributions into zstd-compressed Parquet shards with a manifest; ``open``
reads them back as numpy arrays; ``verify`` checks a cache against its
manifest and the spec (FORMAT.md).
"""

__version__ = "0.1.0"

from logitstore.codec import Codec  # noqa: E402
from logitstore.errors import (  # noqa: E402
    CacheExistsError,
    CacheLockedError,
    CacheNotFoundError,
    CacheWriteError,
    CorruptCacheError,
    FormatVersionError,
    InvalidInputError,
    LogitstoreError,
)
from logitstore.format import FORMAT_VERSION  # noqa: E402
from logitstore.reader import Block, Cache, Sequence, open  # noqa: E402,A004
from logitstore.rules import MassTopK, Sampled, TopK, sparsify  # noqa: E402
from logitstore.writer import CacheWriter, sequence_id  # noqa: E402

__all__ = [
    "FORMAT_VERSION", "Block", "Cache", "CacheExistsError", "CacheLockedError", "CacheNotFoundError",
    "CacheWriteError", "CacheWriter", "Codec",
    "CorruptCacheError", "FormatVersionError", "InvalidInputError", "LogitstoreError", "MassTopK", "Sampled",
    "Sequence", "TopK", "open", "sequence_id", "sparsify",
]
