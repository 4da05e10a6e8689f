"""logitstore: a sparse teacher-logit store for offline knowledge distillation.

The store (this package): ``CacheWriter`` writes sparse per-token teacher
distributions (``SequenceRecord`` of ``Scored`` positions) into zstd-compressed
Parquet shards with a manifest; ``open`` reads them back as numpy arrays;
``verify`` checks a cache against its manifest and the spec (FORMAT.md);
``Cache.sql`` / ``logitstore.query`` put DuckDB views over it. The store needs no
torch (only ``logitstore.head``, the LM head shared by builders and trainers, does).
"""

from logitstore.codec import Codec
from logitstore.errors import (
    CacheExistsError,
    CacheLockedError,
    CacheNotFoundError,
    CacheWriteError,
    CorruptCacheError,
    FormatVersionError,
    InvalidInputError,
    LogitstoreError,
    TokenizerMismatchError,
)
from logitstore.format import FORMAT_VERSION
from logitstore.reader import Block, Cache, Sequence, open  # noqa: A004
from logitstore.records import Scored, SequenceRecord
from logitstore.rules import MassTopK, Sampled, TopK, TopKTail, sparsify
from logitstore.version import __version__
from logitstore.writer import CacheWriter, sequence_id

__all__ = [
    "FORMAT_VERSION", "Block", "Cache", "CacheExistsError", "CacheLockedError", "CacheNotFoundError",
    "CacheWriteError", "CacheWriter", "Codec", "CorruptCacheError", "FormatVersionError", "InvalidInputError",
    "LogitstoreError", "MassTopK", "Sampled", "Scored", "Sequence", "SequenceRecord", "TokenizerMismatchError",
    "TopK", "TopKTail", "__version__", "open", "sequence_id", "sparsify",
]
