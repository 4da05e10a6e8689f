"""Input files of a build, read as raw records: the allowed forms, streamed, each record with its location.

``iter_records`` streams the records of a file (forms: ``ALLOWED_FORMS``; compressed jsonl is
decompressed as a stream, Parquet and saved datasets read batch by batch), each with a location
(``data.jsonl:12``, ``data.json[3]``, ``DIR row 7``). Everything that makes a file unreadable (a
missing path, another form, a damaged Parquet file or saved dataset, undecodable JSON) is one
``DataFormatError`` or ``DataNotFoundError``; an undecodable jsonl line is a ``BadRecordError`` in
place of its record, for the caller's bad-record policy. ``data_fingerprint`` lets a resume refuse
other data. ``builders.data`` turns the records into token sequences.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import zstandard

from logitstore.errors import LogitstoreError
from logitstore.jsonfile import decode_problem

ALLOWED_FORMS = ('.jsonl, .jsonl.gz, .jsonl.zst, .json (a list of records or {"data": [...]}), .parquet, '
                 "or a directory written by datasets' save_to_disk")
_BATCH_ROWS = 1024


class DataNotFoundError(LogitstoreError, FileNotFoundError):
    """The data path does not exist."""


class DataFormatError(LogitstoreError, ValueError):
    """The data path is not a readable input of an allowed form, or the tokenizer cannot render it."""


class BadRecordError(LogitstoreError, ValueError):
    """One record cannot be used. ``reason`` is its ``SkipReport`` key, ``location`` e.g. ``data.jsonl:12``."""

    def __init__(self, message: str, *, location: str, reason: str, field: str | None = None):
        super().__init__(message)
        self.location, self.reason, self.field = location, reason, field


# ---------------------------------------------------------------- reading records


def detect_format(path: str | os.PathLike) -> str:
    """``"jsonl"``, ``"jsonl.gz"``, ``"jsonl.zst"``, ``"json"``, ``"parquet"`` or ``"dataset"``."""
    p = Path(path)
    if not p.exists():
        raise DataNotFoundError(f"data path {str(p)!r} does not exist; expected {ALLOWED_FORMS}")
    if p.is_dir():
        if (p / "dataset_dict.json").is_file() or (p / "state.json").is_file():
            return "dataset"
        raise DataFormatError(f"{p} is a directory but not a saved dataset (no state.json or dataset_dict.json); "
                              f"allowed inputs: {ALLOWED_FORMS}")
    for suffix in (".jsonl.gz", ".jsonl.zst", ".jsonl", ".json", ".parquet"):
        if p.name.lower().endswith(suffix):
            return suffix[1:]
    raise DataFormatError(f"cannot tell the format of {p} from its name; allowed inputs: {ALLOWED_FORMS}")


def iter_records(path: str | os.PathLike) -> Iterator[tuple[int, str, Any]]:
    """``(record index, location, raw record)`` for every record of ``path``, streamed.

    Locations: ``data.jsonl:12`` (1-based line), ``data.json[3]`` (0-based element), ``data.parquet
    row 7`` / ``DIR row 7`` / ``DIR[split] row 7`` (0-based row, as ``ds[7]``). Blank jsonl lines are
    not yielded (but keep their index); an undecodable jsonl line is yielded as a ``BadRecordError``
    in place of the record, to raise or count. A bad path, form, Parquet footer or DatasetDict fails
    now; the records are read lazily.
    """
    fmt, p = detect_format(path), Path(path)
    if fmt.startswith("jsonl"):
        return _jsonl_records(p, fmt)
    return {"json": _json_records, "parquet": _parquet_records, "dataset": _dataset_records}[fmt](p)


def _jsonl_records(p: Path, fmt: str) -> Iterator[tuple[int, str, Any]]:
    if fmt == "jsonl.zst":
        stream = zstandard.ZstdDecompressor().stream_reader(open(p, "rb"), read_across_frames=True, closefd=True)
        f = io.BufferedReader(stream)
    else:
        f = gzip.open(p, "rb") if fmt == "jsonl.gz" else open(p, "rb")
    i = -1
    try:  # only reading the stream can raise these here: the decoding errors are caught per line
        with f:
            for i, raw in enumerate(f):
                raw = raw[3:] if i == 0 and raw.startswith(b"\xef\xbb\xbf") else raw  # a UTF-8 byte order mark
                if not raw.strip():
                    continue
                loc = f"{p.name}:{i + 1}"
                try:
                    yield i, loc, json.loads(raw.decode("utf-8"))
                except UnicodeDecodeError as exc:
                    yield i, loc, BadRecordError(f"{loc}: the line is not valid UTF-8 (byte 0x{raw[exc.start]:02x} "
                                                 f"at column {exc.start + 1}); jsonl input must be UTF-8 text",
                                                 location=loc, reason="invalid_utf8")
                except json.JSONDecodeError as exc:
                    yield i, loc, BadRecordError(f"{loc}: the line is not valid JSON ({exc.msg} at column "
                                                 f"{exc.colno}); jsonl input holds one JSON object per line",
                                                 location=loc, reason="invalid_json")
                except (RecursionError, ValueError) as exc:  # nested too deeply; an integer of > 4300 digits
                    yield i, loc, BadRecordError(f"{loc}: the line cannot be decoded as JSON ({decode_problem(exc)}); "
                                                 "jsonl input holds one JSON object per line",
                                                 location=loc, reason="invalid_json")
    except (OSError, EOFError, zstandard.ZstdError) as exc:
        raise DataFormatError(f"{p}: cannot read the {fmt} stream after line {i + 1}: {exc}") from exc


def _json_records(p: Path) -> Iterator[tuple[int, str, Any]]:
    try:
        text = p.read_bytes().decode("utf-8-sig")
        doc = json.loads(text) if text.strip() else []
    except UnicodeDecodeError as exc:
        raise DataFormatError(f"{p.name}: the file is not valid UTF-8 ({exc}); JSON input must be UTF-8") from exc
    except json.JSONDecodeError as exc:
        raise DataFormatError(f"{p.name}:{exc.lineno}:{exc.colno}: the file is not valid JSON ({exc.msg}); a .json "
                              "input is one JSON document (name a file with one record per line .jsonl)") from exc
    except (RecursionError, ValueError) as exc:
        raise DataFormatError(f"{p.name}: the file cannot be decoded as JSON ({decode_problem(exc)})") from exc
    records = doc.get("data") if isinstance(doc, dict) else doc
    if not isinstance(records, list):
        what = "an object without a 'data' list" if isinstance(doc, dict) else f"a JSON {type(doc).__name__}"
        raise DataFormatError(f'{p} holds {what}; a .json input must be a list of records or {{"data": [...]}}')
    for i, rec in enumerate(records):
        yield i, f"{p.name}[{i}]", rec


def _parquet_records(p: Path) -> Iterator[tuple[int, str, Any]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        batches = pq.ParquetFile(p).iter_batches(batch_size=_BATCH_ROWS)
    except (pa.ArrowException, OSError) as exc:
        raise DataFormatError(f"{p} is not a readable Parquet file: {exc}") from exc
    return _table_rows(batches, p.name)


#: what reading a damaged Parquet file or saved dataset raises (a missing .arrow file, a junk state.json or
#: dataset_dict.json, values of the wrong type in them, garbage bytes), besides pyarrow's own errors
_TABLE_ERRORS = (OSError, ValueError, TypeError, KeyError, RecursionError)


def _dataset_records(p: Path) -> Iterator[tuple[int, str, Any]]:
    import datasets
    import pyarrow as pa

    try:
        ds, label = datasets.load_from_disk(str(p)), p.name
    except _TABLE_ERRORS + (pa.ArrowException,) as exc:
        raise DataFormatError(f"{p} is not a readable saved dataset ({type(exc).__name__}: "
                              f"{' '.join(str(exc).split())[:200]}); allowed inputs: {ALLOWED_FORMS}") from None
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds and len(ds) != 1:
            raise DataFormatError(f"{p} is a DatasetDict with splits {list(ds)} and none named 'train'; "
                                  "give one with a 'train' split or a single split")
        split = "train" if "train" in ds else next(iter(ds))
        ds, label = ds[split], f"{p.name}[{split}]"
    return _table_rows(ds.with_format("arrow").iter(batch_size=_BATCH_ROWS), label)


def _table_rows(batches, label: str) -> Iterator[tuple[int, str, Any]]:
    """The rows of record batches read lazily; a batch that cannot be read (a damaged page or file) is one
    ``DataFormatError`` naming the input and the row it stopped at."""
    import pyarrow as pa

    i = 0
    it = iter(batches)
    while True:
        try:
            batch = next(it)
        except StopIteration:
            return
        except _TABLE_ERRORS + (pa.ArrowException,) as exc:
            raise DataFormatError(f"{label}: cannot read the rows after row {i} ({type(exc).__name__}: "
                                  f"{' '.join(str(exc).split())[:200]})") from None
        for rec in batch.to_pylist():
            yield i, f"{label} row {i}", rec
            i += 1


def data_fingerprint(path: str | os.PathLike) -> str:
    """sha256 (first 16 hex) of a file's bytes; of a saved dataset: of its files' relative paths, sizes and bytes.
    Raises as ``detect_format`` does for a missing path or a form that cannot be read."""
    detect_format(path)
    p, h = Path(path), hashlib.sha256()
    files = [p] if p.is_file() else sorted((f for f in p.rglob("*") if f.is_file()),
                                           key=lambda f: f.relative_to(p).as_posix())
    for f in files:
        if f != p:
            rel = f.relative_to(p).as_posix().encode("utf-8")
            h.update(len(rel).to_bytes(8, "little") + rel + f.stat().st_size.to_bytes(8, "little"))
        with open(f, "rb") as fh:
            while chunk := fh.read(1 << 20):
                h.update(chunk)
    return h.hexdigest()[:16]
