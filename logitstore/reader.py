"""Reading a cache: ``logitstore.open(path)`` -> ``Cache``.

Decoding is vectorised per Parquet row group: a ``Block`` holds every position of
a row group's sequences as flat or padded ``[P, K]`` numpy arrays (token ids,
float32 logprobs with -inf padding, entry counts), and ``Sequence`` objects are
views into it. Scalar (per-sequence) columns can be read alone, without touching
the list columns. Reading needs numpy and pyarrow only, never torch.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterable, Iterator
from collections.abc import Sequence as Seq
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from logitstore import codec as C
from logitstore import format as F
from logitstore import remote
from logitstore.blocks import Block, Sequence
from logitstore.errors import CorruptCacheError, InvalidInputError
from logitstore.idmap import read_id_map
from logitstore.manifest import load_manifest
from logitstore.rules import rule_from_dict
from logitstore.selection import Selection, check_fingerprint, check_known, is_selection_file, load_selection

__all__ = ["Block", "Cache", "Sequence", "open"]

#: a remote cache keeps at most this many shards open (and pinned in the disk cache), and prefetches this many ahead
MAX_OPEN_REMOTE, PREFETCH = 2, 1

# What pyarrow raises on a damaged file: its own errors, OS errors, and undecodable footers.
_READ_ERRORS = (OSError, pa.ArrowException, UnicodeDecodeError, ValueError)


class Cache:
    """A cache on disk, read through its last committed manifest."""

    def __init__(self, path, *, check_totals: bool = True, allow_missing: bool = False):
        """``path``: a cache directory, a selection file, or a ``Selection`` (opened on its cache).
        ``check_totals=False`` (for ``verify``, which reports it) accepts a manifest whose totals disagree with
        its shard list; a reader refuses it, since a dropped shard entry would make sequences vanish. A selection
        file's seq ids must all be in the cache, unless ``allow_missing`` (then those that are are used)."""
        self.selection = None  # a Selection when opened through one
        self._subset: frozenset[str] | None = None
        self.url: str | None = None  # an object-store cache: its URL (``path`` is then its local mirror)
        self.mirror = None
        self._pins: dict[int, int] = {}  # shard -> file descriptor holding its disk-cache pin (remote caches)
        if remote.is_remote(path):
            path = self._open_remote(str(path))
        if isinstance(path, Selection) or is_selection_file(path):
            self.selection = path if isinstance(path, Selection) else load_selection(path)
            if remote.is_remote(self.selection.cache):  # a selection of a cache in an object store
                self.path = self._open_remote(self.selection.cache)
            else:
                self.path = Path(path.cache) if isinstance(path, Selection) else \
                    self.selection.cache_path(Path(path))
            self.manifest = load_manifest(self.path)
            check_fingerprint(self.selection, self.manifest, "the selection" if isinstance(path, Selection)
                              else Path(path), self.path)
            self._subset = frozenset(self.selection.seq_ids)
        else:
            self.path = Path(path)
            self.manifest = load_manifest(self.path)
        if check_totals and self.manifest.totals_problem():
            raise CorruptCacheError(f"{self.path / F.MANIFEST_NAME}: {self.manifest.totals_problem()}")
        self.codec = C.Codec.from_dict(self.manifest.codec)
        self.rule = rule_from_dict(self.manifest.rule)
        self.k = self.rule.k
        self.policy = self.manifest.has_policy  # responses from another model: the policy's per-position fields
        self.schema = F.shard_schema(rule=self.rule.name, value_codec=self.codec.values, id_codec=self.codec.ids,
                                     scalar_dtype=self.codec.scalars, tempered=self.rule.tempered, policy=self.policy)
        self.id_map = read_id_map(self.path, self.manifest) if self.manifest.id_map else None
        self._index: dict[str, tuple[int, int]] | None = None  # seq_id -> (shard, row)
        self._files: dict[int, pq.ParquetFile] = {}
        self._shard_numbers: list[int] | None = None
        if self.selection is not None and not isinstance(path, Selection):  # a file may be edited by hand
            self.selection = check_known(self.selection, self.index, path, self.path, allow_missing=allow_missing)
            self._subset = frozenset(self.selection.seq_ids)
        if self._subset is not None:
            self._subset_values = pa.array(sorted(self._subset), pa.string())  # for filtering, built once

    def _open_remote(self, url: str) -> Path:
        """A cache in an object store: its mirror (``logitstore.remote``), opened; returns the local directory."""
        self.url, self.mirror = url.rstrip("/"), remote.Mirror(url)
        return self.mirror.open()

    # ------------------------------------------------------------ summary
    def __len__(self) -> int:
        return self.manifest.sequences if self._subset is None else len(self._subset)

    @property
    def num_positions(self) -> int:
        if self._subset is None:
            return self.manifest.positions
        return int(sum(self.scalars(["n_positions"]).column(0).to_pylist()))

    @property
    def source(self) -> Path | Selection:
        """What opens this same view again (the loader, its DataLoader workers): the cache directory, or the
        selection (already checked) with its cache's absolute path."""
        if self.selection is None:
            return self.url or self.path.resolve()
        return dataclasses.replace(self.selection, cache=self.url or str(self.path.resolve()))

    @property
    def weights(self) -> dict[str, float] | None:
        """Per-sequence weights of a selection that has them (seq_id -> weight), else None."""
        return None if self.selection is None else self.selection.weight_map()

    def _restrict(self, table: pa.Table) -> pa.Table:
        """Only the selected sequences' rows (all rows when this is not a selection)."""
        if self._subset is None:
            return table
        return table.filter(pc.is_in(table.column("seq_id"), value_set=self._subset_values))

    @property
    def shard_paths(self) -> list[Path]:
        """Local shard files (for a remote cache, where they are or will be in the disk cache)."""
        if self.mirror is not None:
            return [self.mirror.local_path(s.file, s.sha256) for s in self.manifest.shards]
        return [self.path / s.file for s in self.manifest.shards]

    @property
    def location(self) -> str:
        """What names this cache in messages: its URL, or its directory."""
        return self.url or str(self.path)

    def prefetch(self, shards: Iterable[int]) -> None:
        """Start downloading these shards of a remote cache in the background (a no-op for a local one)."""
        if self.mirror is not None:
            self.mirror.prefetch((s.file, s.sha256, s.bytes) for s in (self.manifest.shards[i] for i in shards))

    def close(self) -> None:
        """Close the shard files and give back the disk-cache pins (a reader may be used again after)."""
        for shard in list(self._files):
            self._drop(shard)
        if self.mirror is not None:
            self.mirror.close()

    def _drop(self, shard: int) -> None:
        f = self._files.pop(shard, None)
        if f is not None:
            f.close()
        fd = self._pins.pop(shard, None)
        if fd is not None:
            self.mirror.release(fd)

    def __repr__(self) -> str:
        return (f"Cache({self.location!r}, sequences={len(self)}, positions={self.num_positions}, "
                f"rule={self.manifest.rule})")

    def sql(self, query: str):
        """Run DuckDB SQL over this cache's views (``sequences``, ``tokens``, ``manifest``; see
        ``logitstore.views``) and return the DuckDB relation (``.fetchall()``, ``.df()``, ``.arrow()``)."""
        from logitstore import views  # DuckDB loads on first use: reading needs numpy and pyarrow only

        if getattr(self, "_con", None) is None:
            self._con = views.connect(self)
        return self._con.sql(query)

    # ------------------------------------------------------------ raw access (the loader's seam)
    @property
    def num_shards(self) -> int:
        return len(self.manifest.shards)

    def row_group_rows(self, shard: int) -> list[int]:
        """The number of rows (sequences) of each row group of ``shard``, from its footer (after the reader's
        checks of that shard against the manifest)."""
        md = self._file(shard).metadata
        return [md.row_group(i).num_rows for i in range(md.num_row_groups)]

    def read(self, shard: int, row_group: int | None = None, columns: Seq[str] | None = None, *,
             restrict: bool = True) -> pa.Table:
        """The raw (encoded) rows of one row group of ``shard`` (``row_group=None``: the whole shard), only
        ``columns`` when given, checked against the manifest and page CRCs. Opened on a selection, only the
        selected sequences' rows unless ``restrict=False`` (then ``seq_id`` is read too when filtering).
        ``decode`` turns such a table into a ``Block``."""
        if not (0 <= shard < self.num_shards):
            raise InvalidInputError(f"shard {shard} is not in [0, {self.num_shards})")
        cols = None if columns is None else list(columns)
        if not restrict or self._subset is None or cols is None or "seq_id" in cols:
            t = self._read(shard, row_group, cols)
            return t if not restrict else self._restrict(t)
        return self._restrict(self._read(shard, row_group, ["seq_id", *cols])).select(cols)

    def _file(self, shard: int) -> pq.ParquetFile:
        f = self._files.get(shard)
        if f is None:
            path, info = self.shard_paths[shard], self.manifest.shards[shard]
            if self.mirror is not None:
                while len(self._pins) >= MAX_OPEN_REMOTE:  # bounded: the disk cache may evict what is not open
                    self._drop(next(iter(self._pins)))
                path, self._pins[shard] = self.mirror.acquire(info.file, info.sha256, info.bytes)
                self.prefetch(range(shard + 1, min(shard + 1 + PREFETCH, self.num_shards)))
            try:
                size = path.stat().st_size
                f = pq.ParquetFile(path, page_checksum_verification=True)
                meta = json.loads(f.schema_arrow.metadata[F.PARQUET_META_KEY])
            except _READ_ERRORS + (KeyError, TypeError) as exc:  # no logitstore metadata: not our shard
                raise CorruptCacheError(f"{path}: cannot open shard ({type(exc).__name__}: {exc})") from exc
            if size != info.bytes:  # the footer has no checksum: a truncated or rewritten file is refused
                raise CorruptCacheError(f"{path}: {size} bytes, the manifest says {info.bytes} (truncated or "
                                        "rewritten)")
            if f.schema_arrow.remove_metadata() != self.schema:
                raise CorruptCacheError(f"{path}: schema does not match the manifest's rule and codec")
            if f.metadata.num_rows != info.sequences:
                raise CorruptCacheError(f"{path}: {f.metadata.num_rows} sequences, the manifest says {info.sequences}")
            _check_layout(path, f.metadata, size)
            if self._shard_numbers is None:
                self._shard_numbers = self.manifest.shard_numbers()
            want = {"format_version": self.manifest.format_version, "shard": self._shard_numbers[shard],
                    "vocab_size": self.manifest.vocab_size, "rule": self.manifest.rule, "codec": self.manifest.codec,
                    "id_map_sha256": (self.manifest.id_map or {}).get("sha256")}
            got = {k: meta.get(k) for k in want} if isinstance(meta, dict) else None
            if got != want:  # an edited manifest (codec step, rule) or a shard of another cache: never misread
                raise CorruptCacheError(f"{path}: its self-description {got} disagrees with the manifest ({want})")
            self._files[shard] = f
        return f

    def scalars(self, columns: Seq[str] | None = None) -> pa.Table:
        """The per-sequence scalar columns of every sequence (only these columns are read)."""
        cols = list(columns or F.SCALAR_COLUMNS)
        bad = [c for c in cols if c not in F.SCALAR_COLUMNS]
        if bad:
            raise InvalidInputError(f"{bad} are not scalar columns; choose from {list(F.SCALAR_COLUMNS)}")
        read = cols if self._subset is None or "seq_id" in cols else ["seq_id"] + cols
        tables = [self._restrict(self._read(i, None, read)).select(cols) for i in range(len(self.shard_paths))]
        return pa.concat_tables(tables) if tables else self.schema.empty_table().select(cols)

    # ------------------------------------------------------------ decoded access
    def iter_blocks(self, shards: Iterable[int] | None = None) -> Iterator[Block]:
        """Decoded row groups, in storage order."""
        for s in range(len(self.shard_paths)) if shards is None else shards:
            f = self._file(s)
            for rg in range(f.num_row_groups):
                table = self._restrict(self._read(s, rg))
                if len(table):
                    yield self.decode(table)

    def __iter__(self) -> Iterator[Sequence]:
        return self.iter_sequences()

    def iter_sequences(self, seq_ids: Iterable[str] | None = None) -> Iterator[Sequence]:
        """Every sequence in storage order, or those in ``seq_ids`` (grouped by row group)."""
        if seq_ids is None:
            for block in self.iter_blocks():
                for i in range(len(block)):
                    yield block.sequence(i)
            return
        if self._subset is not None:
            seq_ids = list(seq_ids)
            outside = [sid for sid in seq_ids if sid not in self._subset]
            if outside:
                raise KeyError(f"seq_id {outside[0]!r} is not in the selection")
        wanted = self._locate(seq_ids)
        for (shard, rg), rows in sorted(wanted.items()):
            block = self.decode(self._read(shard, rg).take(pa.array(sorted(rows))))
            for i in range(len(block)):
                yield block.sequence(i)

    def __getitem__(self, seq_id: str) -> Sequence:
        return next(self.iter_sequences([seq_id]))

    def __contains__(self, seq_id: str) -> bool:
        return seq_id in self.index and (self._subset is None or seq_id in self._subset)

    @property
    def index(self) -> dict[str, tuple[int, int]]:
        """seq_id -> (shard, row in shard); built on first use from the ``seq_id`` column only."""
        if self._index is None:
            idx: dict[str, tuple[int, int]] = {}
            for s in range(len(self.shard_paths)):
                for row, sid in enumerate(self._read(s, None, ["seq_id"]).column(0).to_pylist()):
                    idx[sid] = (s, row)
            self._index = idx
        return self._index

    def _locate(self, seq_ids: Iterable[str]) -> dict[tuple[int, int], list[int]]:
        out: dict[tuple[int, int], list[int]] = {}
        bounds: dict[int, np.ndarray] = {}
        for sid in seq_ids:
            if sid not in self.index:
                raise KeyError(f"seq_id {sid!r} is not in {self.path}")
            s, row = self.index[sid]
            if s not in bounds:
                md = self._file(s).metadata
                bounds[s] = np.cumsum([0] + [md.row_group(i).num_rows for i in range(md.num_row_groups)])
            rg = int(np.searchsorted(bounds[s], row, side="right") - 1)
            out.setdefault((s, rg), []).append(row - int(bounds[s][rg]))
        return out

    def _read(self, shard: int, rg: int | None, columns: list[str] | None = None) -> pa.Table:
        """Row group ``rg`` of a shard (``None``: the whole shard), optionally only ``columns``."""
        f = self._file(shard)
        where = "" if rg is None else f" row group {rg}"
        try:
            table = f.read(columns=columns) if rg is None else f.read_row_group(rg, columns=columns)
        except _READ_ERRORS as exc:
            raise CorruptCacheError(f"{self.shard_paths[shard]}:{where} cannot be read ({exc})") from exc
        rows = f.metadata.num_rows if rg is None else f.metadata.row_group(rg).num_rows
        if table.num_rows != rows:  # a damaged value count in the footer makes pyarrow return fewer rows
            raise CorruptCacheError(f"{self.shard_paths[shard]}:{where} read {table.num_rows} rows of {rows}")
        return table

    def decode(self, table: pa.Table) -> Block:
        """A shard table (or a slice of one) -> a ``Block`` of decoded numpy arrays."""
        col = lambda name: table.column(name).combine_chunks()  # noqa: E731
        scal = {}
        for name in F.SCALAR_COLUMNS:
            a = col(name)
            scal[name] = np.array(a.to_pylist(), dtype=object) if name in ("seq_id", "correct") or a.null_count \
                else a.to_numpy(zero_copy_only=False)
        tok_off, input_ids = _flat(col("input_ids"))
        pos_off, pos = _flat(col("pos"))
        rows = np.repeat(np.arange(len(table)), np.diff(pos_off))
        if pos.size and ((pos < 1) | (pos >= np.diff(tok_off)[rows])).any():
            raise CorruptCacheError(f"{self.path}: cached positions outside [1, n_tokens) of their sequence")
        labels = input_ids[tok_off[:-1][rows] + pos]
        ent_pos_off, ids_flat = _flat2(col(F.id_column(self.codec.ids)))
        n_ent = np.diff(ent_pos_off).astype(np.int32)
        k = max(self.k, int(n_ent.max(initial=1)))
        if self.id_map is not None:
            if ids_flat.size and (ids_flat.min() < 0 or ids_flat.max() >= self.id_map.size):
                raise CorruptCacheError(f"{self.path}: entry code outside the id map")
            ids_flat = np.take(self.id_map, ids_flat)
        vname = F.value_column(self.codec.values)[0]
        n_pos, mask = n_ent.size, C.valid_mask(n_ent, k)
        ids = C.pad_flat(ids_flat, mask, n_pos, k, -1)
        lps = None
        if vname is not None:
            vals = _flat2(col(vname))[1]
            if self.codec.values == "qdelta":
                vals = C.dequantise_flat(vals, ent_pos_off[:-1], self.codec.logprob_step)
            lps = C.pad_flat(vals.astype(np.float32, copy=False), mask, n_pos, k, -np.inf)
        counts = None
        if self.rule.name == "sample":
            counts = C.pad_flat(_flat2(col("sample_counts"))[1], mask, n_pos, k, 0)
        f32 = lambda name: _flat(col(name))[1].astype(np.float32, copy=False)  # noqa: E731
        extra = self._decode_tail(col, n_pos) if self.rule.name == "topk_tail" else {}  # the optional fields
        if self.rule.tempered:
            extra["proposal_log_norm"] = f32("proposal_log_norm")
        if self.policy:
            extra.update({name: f32(name) for name in F.POLICY_FIELDS})
        return Block(
            scalars=scal, token_offsets=tok_off, input_ids=input_ids, pos_offsets=pos_off, pos=pos, labels=labels,
            loss_mask=_flat(col("loss_mask"))[1], label_logprob=f32("label_logprob"), entropy=f32("entropy"),
            tail_mass=f32("tail_mass"), ids=ids, logprobs=lps, n_entries=n_ent, counts=counts, **extra,
        )

    def _decode_tail(self, col, n_pos: int) -> dict[str, np.ndarray | None]:
        """The tail draws of rule topk_tail, padded to ``[P, U]`` (U = the widest position, at least 1)."""
        off, ids_flat = _flat2(col(F.id_column(self.codec.ids, "tail")))
        n = np.diff(off).astype(np.int32)
        u = max(1, int(n.max(initial=1)))
        if self.id_map is not None:
            if ids_flat.size and (ids_flat.min() < 0 or ids_flat.max() >= self.id_map.size):
                raise CorruptCacheError(f"{self.path}: tail code outside the id map")
            ids_flat = np.take(self.id_map, ids_flat)
        mask = C.valid_mask(n, u)
        lps = None
        vname = F.tail_value_column(self.codec.values)
        if vname is not None:
            vals = _flat2(col(vname))[1]
            if self.codec.values == "qdelta":
                vals = C.dequantise_flat(vals, off[:-1][n > 0], self.codec.logprob_step)
            lps = C.pad_flat(vals.astype(np.float32, copy=False), mask, n_pos, u, -np.inf)
        return {"tail_ids": C.pad_flat(ids_flat.astype(np.int32, copy=False), mask, n_pos, u, -1),
                "tail_logprobs": lps, "tail_counts": C.pad_flat(_flat2(col("tail_counts"))[1], mask, n_pos, u, 0),
                "n_tail": n}


def _check_layout(path: Path, md: pq.FileMetaData, size: int) -> None:
    """The footer carries no checksum: refuse one whose row group sizes disagree with its total, or whose column
    chunks overlap or leave the data area, which a damaged size or offset does (a row group counted empty
    would be skipped, a chunk pointing at another chunk's pages would decode, CRCs and all, as the wrong rows)."""
    if sum(md.row_group(r).num_rows for r in range(md.num_row_groups)) != md.num_rows:
        raise CorruptCacheError(f"{path}: the footer's row group sizes do not add up to its {md.num_rows} rows")
    spans = []
    for r in range(md.num_row_groups):
        rg = md.row_group(r)
        for c in range(rg.num_columns):
            cc = rg.column(c)
            start = cc.data_page_offset
            if cc.has_dictionary_page and cc.dictionary_page_offset is not None:
                start = min(start, cc.dictionary_page_offset)
            spans.append((start, start + cc.total_compressed_size))
    spans.sort()
    footer = size - 8 - md.serialized_size
    prev = 4  # after the leading magic "PAR1"
    for a, z in spans:
        if a < prev or z > footer or z <= a:
            raise CorruptCacheError(f"{path}: the footer's column chunk offsets are damaged (a chunk at bytes "
                                    f"{a}..{z} overlaps another or leaves the data area)")
        prev = z


def _flat(a: pa.ListArray) -> tuple[np.ndarray, np.ndarray]:
    """list<x> -> (offsets rebased to 0 [n+1], values [m])."""
    off = a.offsets.to_numpy().astype(np.int64)
    values = a.values.to_numpy(zero_copy_only=False)[off[0]:off[-1]]
    return off - off[0], values


def _flat2(a: pa.ListArray) -> tuple[np.ndarray, np.ndarray]:
    """list<list<x>> -> (entry offsets per position [P+1], flat values)."""
    outer = a.offsets.to_numpy().astype(np.int64)
    inner = a.values.offsets.to_numpy().astype(np.int64)[outer[0]:outer[-1] + 1]
    values = a.values.values.to_numpy(zero_copy_only=False)[inner[0]:inner[-1]]
    return inner - inner[0], values


def open(path: str | os.PathLike, *, allow_missing: bool = False) -> Cache:  # noqa: A001 - as in logitstore.open
    """Open the cache at ``path`` (a directory with ``manifest.json``), or a selection file of one (whose seq ids
    must all be in its cache unless ``allow_missing``)."""
    return Cache(path, allow_missing=allow_missing)
