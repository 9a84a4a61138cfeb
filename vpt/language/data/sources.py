"""Random-access record sources for training and evaluation.

Every source has `__len__`, `__getitem__(i) -> dict` and `describe(i) -> str`
(where record i comes from, for error messages), and yields normalised records:

  {"prompt": str, "answer": str}  the loss is on the answer tokens only, or
  {"text": str}                   the loss is on every token.

A source may also have `domain_of(i, record) -> int`, the stream domain of record i (the LM batch's
`domain_ids`; see stream_domains); a source without it is one domain, 0.

Sources check their input at construction (missing files, empty corpora, missing
columns, bad lines) so that a broken config fails before training starts.

Formats (data.source):
  jsonl         JSON lines; plain files are line-indexed and every line checked on
                every construction. `.jsonl.gz` / `.jsonl.zst` (and any jsonl when
                data.cache_dir is set) are decompressed and checked ONCE into an
                Arrow IPC file keyed by the source's path, size and mtime, built by
                process 0 and memory-mapped by every process afterwards.
  parquet       random access by row group (pyarrow.parquet): lengths come from
                the file footers, a record read decodes its row group's wanted
                columns (a few row groups are kept decoded).
  arrow         a `datasets.save_to_disk` directory (state.json lists its Arrow IPC
                *stream* files; a DatasetDict directory picks data.train_split /
                data.eval_split) or .arrow files (stream or file format),
                memory-mapped; lengths are the record batches' lengths.
  array_record  raw array_record files of UTF-8 JSON objects (grain's
                ArrayRecordDataSource); lengths from the file footers.
  text, tfds, synthetic_math  as before; `mixture` mixes any of these by weight.

Columns/fields are mapped by data.text_field or data.prompt_field + data.answer_field
(string columns; chat `messages` lists are not supported). Start-up reads file
metadata only: STATS["records_decoded"] counts normalised records, and building a
parquet / arrow / array_record / cached-jsonl source decodes at most one record.
"""

from __future__ import annotations

import collections
import dataclasses
import glob
import hashlib
import json
import logging
import os
import threading
import time
import uuid
import zlib
from collections.abc import Mapping, Sequence

import numpy as np
from etils import epath

from vpt.core import paths
from vpt.language.data import synthetic_math

# Virtual size of the synthetic training stream (records are generated on demand).
SYNTHETIC_TRAIN_SIZE = 10**9
# The eval split uses the 'eval' hash partition and this seed offset, so it is
# disjoint from the training questions whatever data.synthetic.seed is.
_SYNTHETIC_EVAL_SEED_OFFSET = 1_000_003

SOURCES = ("synthetic_math", "jsonl", "text", "tfds", "parquet", "arrow", "array_record",
           "mixture")
# Sources read from data.train_path / data.eval_path (and so have an eval split only
# when data.eval_path is set).
PATH_SOURCES = ("jsonl", "text", "parquet", "arrow", "array_record")
# Keys a data.mixture entry may set (the rest are inherited from data.*).
MIXTURE_KEYS = ("weight", "source", "train_path", "eval_path", "text_field", "prompt_field",
                "answer_field", "tfds_name", "tfds_data_dir", "train_split", "eval_split", "feedback_set")
# The synthetic stream's domains (LM batch `domain_ids`): math records, and the off-domain filler
# (data.synthetic.irrelevant_fraction). A mixture's domain is its component index k.
SYNTHETIC_DOMAINS = ("math", "filler")
DOMAIN_MATH, DOMAIN_FILLER = 0, 1
COMPRESSED_SUFFIXES = (".gz", ".zst", ".zstd")

# Records normalised so far in this process (construction must not decode every one).
STATS = {"records_decoded": 0}


def record_text(record: dict) -> str:
  """The full text of a normalised record (prompt, separator and answer)."""
  if "text" in record:
    return record["text"]
  return record["prompt"] + answer_separator(record["prompt"], record["answer"]) + record["answer"]


def answer_separator(prompt: str, answer: str) -> str:
  """' ' between prompt and answer unless either side already has whitespace."""
  if not prompt or not answer or prompt[-1].isspace() or answer[0].isspace():
    return ""
  return synthetic_math.ANSWER_SEP


def _glob(pattern: str) -> list[str]:
  """Sorted matches of a local or URL (gs://...) glob."""
  if not paths.is_remote(pattern):
    return sorted(glob.glob(os.path.expanduser(pattern)))
  if not any(c in pattern for c in "*?["):
    return [pattern] if epath.Path(pattern).exists() else []
  scheme, rest = pattern.split("://", 1)
  parts = rest.split("/")
  first = next(i for i, p in enumerate(parts) if any(c in p for c in "*?["))
  base = epath.Path(scheme + "://" + "/".join(parts[:first]))
  return sorted(str(p) for p in base.glob("/".join(parts[first:])))


def resolve_paths(spec: str, field: str, allow_dirs: bool = False) -> list[str]:
  """Files (and directories if allowed) for a path, a glob, or a comma-separated list of them
  (sorted per glob). Local paths and URLs (gs://...) through etils.epath."""
  files = []
  for part in [p.strip() for p in spec.split(",") if p.strip()]:
    matches = [m for m in _glob(part)
               if epath.Path(m).is_file() or (allow_dirs and epath.Path(m).is_dir())]
    if not matches:
      raise FileNotFoundError(f"{field}={spec!r}: no file matches {part!r}")
    files.extend(matches)
  if not files:
    raise FileNotFoundError(f"{field}={spec!r}: no file matches")
  return files


def _stamp(path: str) -> tuple[int, int]:
  """(size, mtime in ns) of a file: what cached derivatives of it are keyed by."""
  if not paths.is_remote(path):
    st = os.stat(path)
    return st.st_size, st.st_mtime_ns
  st = epath.Path(path).stat()
  return int(st.length), int(st.mtime * 10**9)


class SyntheticMathSource:
  """SyntheticMath records as prompt/answer (math) or text (filler) records."""

  def __init__(self, seed: int, size: int, irrelevant_fraction: float = 0.0,
               partition: str = "all", style: synthetic_math.StreamStyle = synthetic_math.StreamStyle()):
    self.data = synthetic_math.SyntheticMath(seed, size, irrelevant_fraction, partition, style)

  def __len__(self) -> int:
    return len(self.data)

  def __getitem__(self, i: int) -> dict[str, str]:
    r = self.data[i]
    if "text" in r:
      return {"text": r["text"]}
    return {"prompt": synthetic_math.format_prompt(r["question"]), "answer": r["answer"]}

  def describe(self, i: int) -> str:
    d = self.data
    return f"synthetic_math(seed={d.seed}, partition={d.partition!r})[{i}]"

  @staticmethod
  def domain_of(i: int, record: dict) -> int:
    """Record i's stream domain (`record` is self[i]): filler text or math."""
    del i
    return DOMAIN_FILLER if "text" in record else DOMAIN_MATH


class _Fields:
  """Maps raw records to normalised ones per data.{text,prompt,answer}_field."""

  def __init__(self, text_field: str, prompt_field: str, answer_field: str,
               prefix: str = "data"):
    if bool(prompt_field) != bool(answer_field):
      raise ValueError(f"{prefix}.prompt_field and {prefix}.answer_field must be set together "
                       f"(got {prompt_field!r} and {answer_field!r})")
    if prompt_field:
      self.wanted = [(prompt_field, f"{prefix}.prompt_field", "prompt"),
                     (answer_field, f"{prefix}.answer_field", "answer")]
    else:
      if not text_field:
        raise ValueError(f"{prefix}.text_field is empty and {prefix}.prompt_field is not set: "
                         "nothing to read from the records")
      self.wanted = [(text_field, f"{prefix}.text_field", "text")]

  @property
  def columns(self) -> list[str]:
    return [field for field, _, _ in self.wanted]

  def check_schema(self, schema, where: str):
    """Every wanted column exists in an Arrow schema and holds strings (or UTF-8 bytes)."""
    import pyarrow as pa
    for field, cfg_name, _ in self.wanted:
      if field not in schema.names:
        raise ValueError(f"{where}: missing column {field!r} ({cfg_name}); the file has "
                         f"columns {sorted(schema.names)}")
      t = schema.field(field).type
      if not (pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_binary(t)
              or pa.types.is_large_binary(t)):
        raise ValueError(f"{where}: column {field!r} ({cfg_name}) has type {t}, expected a "
                         "string column (chat/message lists are not supported: use a text "
                         "column, or prompt and answer columns)")

  def __call__(self, raw, where: str) -> dict[str, str]:
    STATS["records_decoded"] += 1
    if not isinstance(raw, dict):
      raise ValueError(f"{where}: expected a JSON object, got {type(raw).__name__}")
    out = {}
    for field, cfg_name, key in self.wanted:
      if field not in raw:
        raise ValueError(f"{where}: missing field {field!r} ({cfg_name}); the record "
                         f"has fields {sorted(raw)}")
      value = raw[field]
      if isinstance(value, np.ndarray) and value.ndim == 0:
        value = value.item()
      if isinstance(value, bytes):
        try:
          value = value.decode("utf-8")
        except UnicodeDecodeError as e:
          raise ValueError(f"{where}: field {field!r} is not valid UTF-8 ({e})") from e
      if not isinstance(value, str):
        raise ValueError(f"{where}: field {field!r} ({cfg_name}) should be a string, "
                         f"got {type(value).__name__}")
      out[key] = value
    return out


class _PerProcess:
  """Lazily opened per-process handles (file readers are not shared across a fork or
  pickled to grain's worker processes); `_open()` builds them, `_handles()` returns them."""

  def _handles(self):
    if self.__dict__.get("_pid") != os.getpid():
      with self._lock:
        if self.__dict__.get("_pid") != os.getpid():
          self._h = self._open()
          self._pid = os.getpid()
    return self._h

  def __getstate__(self):
    state = self.__dict__.copy()
    state.update(_h=None, _pid=None, _lock=None)
    return state

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._lock = threading.Lock()


class _LineIndexedFiles(_PerProcess):
  """Byte offsets of the non-empty lines of some files, read back with pread.

  pread has no shared file position, so grain's reader threads can read
  concurrently from one descriptor; descriptors are reopened after a fork or
  unpickling (grain worker processes).
  """

  def __init__(self, files: Sequence[str], check_line):
    self._h, self._pid = None, None  # Set first: __del__ runs even if indexing fails.
    self.files = list(files)
    file_idx, starts, lengths, lines = [], [], [], []
    for k, path in enumerate(self.files):
      offset = 0
      with paths.path(path).open("rb") as f:
        for lineno, line in enumerate(f, 1):
          if line.strip():
            check_line(line, path, lineno)
            file_idx.append(k)
            starts.append(offset)
            lengths.append(len(line))
            lines.append(lineno)
          offset += len(line)
    self.file_idx = np.asarray(file_idx, np.int32)
    self.starts = np.asarray(starts, np.int64)
    self.lengths = np.asarray(lengths, np.int64)
    self.lines = np.asarray(lines, np.int64)
    self._lock = threading.Lock()

  def __len__(self) -> int:
    return len(self.starts)

  def where(self, i: int) -> str:
    return f"{self.files[self.file_idx[i]]}:{self.lines[i]}"

  def read(self, i: int) -> bytes:
    fd = self._handles()[self.file_idx[i]]
    if isinstance(fd, str):  # an object store has no pread: a ranged read of the record's bytes.
      with paths.path(fd).open("rb") as f:
        f.seek(int(self.starts[i]))
        return f.read(int(self.lengths[i]))
    return os.pread(fd, int(self.lengths[i]), int(self.starts[i]))

  def _open(self):
    return [p if paths.is_remote(p) else os.open(p, os.O_RDONLY) for p in self.files]

  def __del__(self):
    if self.__dict__.get("_h") and self.__dict__.get("_pid") == os.getpid():
      for fd in self._h:
        if isinstance(fd, str):
          continue
        try:
          os.close(fd)
        except OSError:
          pass


def _decode_line(line: bytes, where: str) -> str:
  try:
    return line.decode("utf-8")
  except UnicodeDecodeError as e:
    raise ValueError(f"{where}: not valid UTF-8 ({e})") from e


def _parse_json(data: bytes, where: str, fields: _Fields,
                what: str = "one JSON object per line") -> dict[str, str]:
  try:
    raw = json.loads(_decode_line(data, where))
  except json.JSONDecodeError as e:
    raise ValueError(f"{where}: invalid JSON ({e.msg} at column {e.colno}); expected "
                     f"{what}") from None
  return fields(raw, where)


class JsonlSource:
  """JSON-lines files; blank lines are skipped. Every line is checked up front."""

  def __init__(self, path_spec: str, fields: _Fields, field: str = "data.train_path"):
    self.path_spec, self.fields = path_spec, fields
    files = resolve_paths(path_spec, field)
    self.index = _LineIndexedFiles(files, self._check)
    if not len(self.index):
      raise ValueError(f"{field}={path_spec!r}: empty corpus, no records in {files} "
                       "(expected one JSON object per line)")

  def _parse(self, line: bytes, where: str) -> dict[str, str]:
    return _parse_json(line, where, self.fields)

  def _check(self, line: bytes, path: str, lineno: int):
    self._parse(line, f"{path}:{lineno}")

  def __len__(self) -> int:
    return len(self.index)

  def __getitem__(self, i: int) -> dict[str, str]:
    return self._parse(self.index.read(i), self.index.where(i))

  def describe(self, i: int) -> str:
    return self.index.where(i)


class TextSource:
  """Plain UTF-8 text files: one document per non-empty line ("\\n" or "\\r\\n")."""

  def __init__(self, path_spec: str, field: str = "data.train_path"):
    self.path_spec = path_spec
    files = resolve_paths(path_spec, field)
    self.index = _LineIndexedFiles(
        files, lambda line, path, lineno: _decode_line(line, f"{path}:{lineno}"))
    if not len(self.index):
      raise ValueError(f"{field}={path_spec!r}: empty corpus, no non-empty line in {files}")

  def __len__(self) -> int:
    return len(self.index)

  def __getitem__(self, i: int) -> dict[str, str]:
    line = _decode_line(self.index.read(i), self.index.where(i))
    return {"text": line.rstrip("\r\n")}

  def describe(self, i: int) -> str:
    return self.index.where(i)


class TfdsSource:
  """A prepared TFDS dataset read with `tfds.data_source` (array_record, no TF).

  Nothing is downloaded: prepare the dataset first (e.g. `tfds build
  --file_format=array_record`) into data.tfds_data_dir.
  """

  def __init__(self, name: str, split: str, data_dir: str, fields: _Fields):
    import tensorflow_datasets as tfds  # Heavy import: only when used.

    self.name, self.split, self.fields = name, split, fields
    where = f"data.tfds_name={name!r} (split={split!r}, data_dir={data_dir or None!r})"
    try:
      self.source = tfds.data_source(name, split=split, data_dir=data_dir or None,
                                     download=False)
    except Exception as e:  # tfds raises many types; report them uniformly.
      msg = str(e).split("\nAvailable datasets:")[0]  # Drop the 1000-name catalogue.
      raise ValueError(f"{where}: cannot open the TFDS data source: {type(e).__name__}: "
                       f"{msg}") from e
    if not len(self.source):
      raise ValueError(f"{where}: empty corpus (split has no records)")
    self[0]  # Fails now, naming the field, if the features do not match the config.

  def __len__(self) -> int:
    return len(self.source)

  def __getitem__(self, i: int) -> dict[str, str]:
    return self.fields(self.source[i], self.describe(i))

  def describe(self, i: int) -> str:
    return f"tfds {self.name}[{self.split}] record {i}"


def _arrow_error(path: str, e: Exception, field: str) -> ValueError:
  return ValueError(f"{field}: {path}: not a readable Arrow IPC file ({type(e).__name__}: {e})")


def _open_arrow(path: str):
  """The record batches of an Arrow IPC file (file or stream format), memory-mapped when local.

  Listing the batches of a memory-mapped file reads their metadata only, no record data."""
  import pyarrow as pa

  def source():
    if not paths.is_remote(path):
      return pa.memory_map(path)
    return pa.BufferReader(epath.Path(path).read_bytes())  # No mmap for remote files.

  try:
    reader = pa.ipc.open_file(source())
    return reader.schema, [reader.get_batch(j) for j in range(reader.num_record_batches)]
  except pa.ArrowInvalid:
    reader = pa.ipc.open_stream(source())  # datasets.save_to_disk writes the stream format.
    return reader.schema, list(reader)


class _ArrowFiles(_PerProcess):
  """Global row i of some Arrow IPC files -> (file index, record batch, row in batch, row in file)."""

  def __init__(self, files: Sequence[str], field: str):
    import pyarrow as pa
    self.files, self._lock = list(files), threading.Lock()
    self.schemas, batch_rows, batch_file = [], [], []
    handles = []
    for k, path in enumerate(self.files):
      try:
        schema, batches = _open_arrow(path)
      except (pa.ArrowException, OSError) as e:
        raise _arrow_error(path, e, field) from e
      self.schemas.append(schema)
      handles.append(batches)
      batch_rows += [b.num_rows for b in batches]
      batch_file += [k] * len(batches)
    self.batch_start = np.concatenate([[0], np.cumsum(batch_rows, dtype=np.int64)])
    self.batch_file = np.asarray(batch_file, np.int64)
    file_rows = np.bincount(self.batch_file, weights=batch_rows, minlength=len(self.files))
    self.file_start = np.concatenate([[0], np.cumsum(file_rows.astype(np.int64))])
    self._h, self._pid = [b for bs in handles for b in bs], os.getpid()

  def _open(self):
    return [b for path in self.files for b in _open_arrow(path)[1]]

  def __len__(self) -> int:
    return int(self.batch_start[-1])

  def locate(self, i: int):
    if not 0 <= i < len(self):
      raise IndexError(f"record {i} out of range [0, {len(self)})")
    b = int(np.searchsorted(self.batch_start, i, side="right")) - 1
    k = int(self.batch_file[b])
    return k, self._handles()[b], i - int(self.batch_start[b]), i - int(self.file_start[k])


class ArrowSource:
  """A `datasets.save_to_disk` directory (or .arrow files): string columns by data.*_field."""

  def __init__(self, files: Sequence[str], fields: _Fields, field: str, spec: str):
    self.fields = fields
    self.arrow = _ArrowFiles(files, field)
    for path, schema in zip(files, self.arrow.schemas):
      fields.check_schema(schema, path)
    if not len(self.arrow):
      raise ValueError(f"{field}={spec!r}: empty corpus, no records in {list(files)}")

  def __len__(self) -> int:
    return len(self.arrow)

  def __getitem__(self, i: int) -> dict[str, str]:
    k, batch, row, _ = self.arrow.locate(i)
    raw = {c: batch.column(c)[row].as_py() for c in self.fields.columns}
    return self.fields(raw, self.describe(i))

  def describe(self, i: int) -> str:
    k, _, _, row = self.arrow.locate(i)
    return f"{self.arrow.files[k]} row {row}"


def arrow_files(path: str, split_name: str, field: str) -> list[str]:
  """The Arrow files of one resolved path: a save_to_disk Dataset directory (its state.json
  order), a DatasetDict directory (the split's subdirectory) or an .arrow file."""
  p = epath.Path(path)
  if not p.is_dir():
    return [path]
  if (p / "dataset_dict.json").exists():
    splits = json.loads((p / "dataset_dict.json").read_text()).get("splits", [])
    if split_name not in splits:
      raise ValueError(f"{field}={path!r} is a DatasetDict without split {split_name!r} "
                       f"(data.train_split / data.eval_split); it has splits {splits}")
    p = p / split_name
  state = p / "state.json"
  if not state.exists():
    raise ValueError(f"{field}={path!r}: a directory without state.json or dataset_dict.json; "
                     "expected a datasets.save_to_disk directory or .arrow files")
  try:
    names = [f["filename"] for f in json.loads(state.read_text())["_data_files"]]
  except (ValueError, KeyError, TypeError) as e:
    raise ValueError(f"{field}: {state}: expected datasets' state.json with a '_data_files' "
                     f"list ({type(e).__name__}: {e})") from e
  for name in names:  # state.json names files inside its directory, nothing else.
    if "/" in name or "\\" in name or name in ("", ".", ".."):
      raise ValueError(f"{field}: {state}: data file name {name!r} is not a file in {p}")
  return [str(p / name) for name in names]


class ParquetSource(_PerProcess):
  """Parquet files read by row group; lengths come from the footers (no record is decoded).

  A read decodes the wanted columns of its row group; recently decoded groups are kept (per
  process) up to `cache_bytes`, so reads close in a file are cheap. A shuffled read costs
  about one row group's decode: files written with small row groups (datasets and the hub
  use ~100-1000 rows) read fast; one huge row group per file does not (rewrite it, or
  save it with datasets.save_to_disk and use data.source='arrow').
  """

  def __init__(self, files: Sequence[str], fields: _Fields, field: str, spec: str,
               cache_bytes: int = 256 << 20):
    import pyarrow as pa
    self.files, self.fields, self._lock = list(files), fields, threading.Lock()
    self.cache_bytes = cache_bytes
    self.rg_start = []  # per file: first row of each row group, then the file's row count
    handles = []
    for path in self.files:
      try:
        pf = self._open_one(path)
        schema = pf.schema_arrow
        rows = [pf.metadata.row_group(g).num_rows for g in range(pf.num_row_groups)]
      except (pa.ArrowException, OSError) as e:
        raise ValueError(f"{field}: {path}: not a readable parquet file "
                         f"({type(e).__name__}: {e})") from e
      fields.check_schema(schema, path)
      handles.append(pf)
      self.rg_start.append(np.concatenate([[0], np.cumsum(rows, dtype=np.int64)]))
    self.file_start = np.concatenate([[0], np.cumsum([s[-1] for s in self.rg_start])]).astype(
        np.int64)
    if not len(self):
      raise ValueError(f"{field}={spec!r}: empty corpus, no rows in {self.files}")
    self._h, self._pid = (handles, collections.OrderedDict()), os.getpid()

  @staticmethod
  def _open_one(path: str):
    import pyarrow.parquet as pq
    if not paths.is_remote(path):
      return pq.ParquetFile(path, memory_map=True)
    return pq.ParquetFile(epath.Path(path).open("rb"))

  def _open(self):
    return [self._open_one(p) for p in self.files], collections.OrderedDict()

  def __len__(self) -> int:
    return int(self.file_start[-1])

  def _locate(self, i: int):
    if not 0 <= i < len(self):
      raise IndexError(f"record {i} out of range [0, {len(self)})")
    k = int(np.searchsorted(self.file_start, i, side="right")) - 1
    row = i - int(self.file_start[k])
    g = int(np.searchsorted(self.rg_start[k], row, side="right")) - 1
    return k, g, row, row - int(self.rg_start[k][g])

  def __getitem__(self, i: int) -> dict[str, str]:
    k, g, row, r = self._locate(i)
    files, cache = self._handles()
    with self._lock:  # ParquetFile readers are not thread-safe; the cache is shared.
      table = cache.get((k, g))
      if table is None:
        table = files[k].read_row_group(g, columns=self.fields.columns)
        cache[(k, g)] = table
        while len(cache) > 1 and sum(t.nbytes for t in cache.values()) > self.cache_bytes:
          cache.popitem(last=False)
      else:
        cache.move_to_end((k, g))
    raw = {c: table.column(c)[r].as_py() for c in self.fields.columns}
    return self.fields(raw, f"{self.files[k]} row {row}")

  def describe(self, i: int) -> str:
    k, _, row, _ = self._locate(i)
    return f"{self.files[k]} row {row}"


class ArrayRecordSource:
  """Raw array_record files whose records are UTF-8 JSON objects (grain's ArrayRecordDataSource)."""

  def __init__(self, files: Sequence[str], fields: _Fields, field: str, spec: str):
    import grain
    self.files, self.fields = list(files), fields
    self.sources = []
    for path in self.files:
      try:
        self.sources.append(grain.sources.ArrayRecordDataSource([path]))
      except Exception as e:  # array_record raises RuntimeError / ValueError / OSError.
        raise ValueError(f"{field}: {path}: not a readable array_record file "
                         f"({type(e).__name__}: {e})") from e
    self.file_start = np.concatenate([[0], np.cumsum([len(s) for s in self.sources])]).astype(
        np.int64)
    if not len(self):
      raise ValueError(f"{field}={spec!r}: empty corpus, no records in {self.files}")
    self[0]  # One record: a wrong field name fails now, naming the field.

  def __len__(self) -> int:
    return int(self.file_start[-1])

  def _locate(self, i: int):
    if not 0 <= i < len(self):
      raise IndexError(f"record {i} out of range [0, {len(self)})")
    k = int(np.searchsorted(self.file_start, i, side="right")) - 1
    return k, i - int(self.file_start[k])

  def __getitem__(self, i: int) -> dict[str, str]:
    k, r = self._locate(i)
    where = f"{self.files[k]} record {r}"
    try:
      data = self.sources[k][r]
    except Exception as e:  # A corrupt chunk surfaces on read.
      raise ValueError(f"{where}: cannot read the record ({type(e).__name__}: {e})") from e
    return _parse_json(data, where, self.fields, "a JSON object per record")

  def describe(self, i: int) -> str:
    k, r = self._locate(i)
    return f"{self.files[k]} record {r}"


# --- jsonl decompressed (and checked) once into an Arrow file -----------------------------

# How long a process other than 0 waits for process 0 to build a cache file before it
# builds its own (the cache directory is then not shared between hosts).
CACHE_WAIT_SECONDS = 600.0
_CACHE_POLL_SECONDS = 1.0
_CACHE_BATCH_ROWS = 8192


def _process_index() -> int:
  import jax
  return jax.process_index()


def _decompressed_chunks(path: str):
  """The bytes of a plain, gzip or zstd file in chunks; a truncated stream raises EOFError
  (the streaming readers of both libraries end silently at a cut inside a frame)."""
  with epath.Path(path).open("rb") as f:
    raw = iter(lambda: f.read(1 << 20), b"")
    if path.endswith(".gz"):
      new = lambda: zlib.decompressobj(wbits=31)  # noqa: E731 — gzip; one per member.
    elif path.endswith((".zst", ".zstd")):
      import zstandard
      new = zstandard.ZstdDecompressor().decompressobj  # One per frame.
    else:
      yield from raw
      return
    obj, open_frame = new(), False
    for chunk in raw:
      while chunk:
        yield obj.decompress(chunk)
        open_frame = True
        if obj.eof:  # Concatenated members / frames: start the next on what is left.
          chunk, obj, open_frame = obj.unused_data, new(), False
        else:
          chunk = b""
    if open_frame:
      raise EOFError("the compressed stream ends inside a frame")


def _jsonl_lines(path: str, field: str):
  """(line number, raw line) of a plain, gzip or zstd jsonl file; decompression errors name it."""
  lineno, rest = 0, b""
  chunks = _decompressed_chunks(path)
  while True:
    try:
      chunk = next(chunks, None)
    except Exception as e:  # zlib.error, zstandard.ZstdError, EOFError.
      if isinstance(e, (EOFError, zlib.error)) or type(e).__name__ == "ZstdError":
        raise ValueError(f"{field}: {path}: cannot decompress after line {lineno} "
                         f"({type(e).__name__}: {e}); the file is corrupt or truncated") from e
      raise
    if chunk is None:
      if rest:
        yield lineno + 1, rest
      return
    lines = (rest + chunk).split(b"\n")
    rest = lines.pop()
    for line in lines:
      lineno += 1
      yield lineno, line + b"\n"


def _jsonl_cache_path(path: str, cache_dir: str) -> epath.Path:
  size, mtime = _stamp(path)
  name = epath.Path(path).name
  digest = hashlib.sha1(str(path).encode()).hexdigest()[:10]
  base = epath.Path(cache_dir) if cache_dir else epath.Path(path).parent / ".vpt_cache"
  return base / f"{name}.{digest}.{size}-{mtime}.arrow"


def _build_jsonl_cache(path: str, dest: epath.Path, fields: _Fields, field: str):
  """Checks every line of `path` and writes (line number, raw JSON) rows to `dest` atomically."""
  import pyarrow as pa
  try:
    dest.parent.mkdir(parents=True, exist_ok=True)
  except OSError as e:
    raise ValueError(f"data.cache_dir: cannot create {dest.parent} for the decompressed copy of "
                     f"{path} ({e}); set data.cache_dir to a writable directory") from e
  tmp = dest.parent / f"{dest.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
  schema = pa.schema([("line", pa.int64()), ("json", pa.large_binary())])
  logging.info("Decompressing and checking %s into %s (once)", path, dest)
  try:
    with tmp.open("wb") as out:
      writer = pa.ipc.new_file(out, schema)
      lines, data = [], []

      def flush():
        writer.write_batch(pa.record_batch([pa.array(lines, pa.int64()),
                                            pa.array(data, pa.large_binary())], schema=schema))
        lines.clear()
        data.clear()

      for lineno, line in _jsonl_lines(path, field):
        if line.strip():
          _parse_json(line, f"{path}:{lineno}", fields)
          lines.append(lineno)
          data.append(line)
          if len(lines) >= _CACHE_BATCH_ROWS:
            flush()
      if lines:
        flush()
      writer.close()
    tmp.replace(dest)
  finally:
    if tmp.exists():
      tmp.unlink()


def jsonl_cache(path: str, cache_dir: str, fields: _Fields, field: str) -> epath.Path:
  """The Arrow copy of a jsonl file, built by process 0 (others wait for it, then read it)."""
  dest = _jsonl_cache_path(path, cache_dir)
  if dest.exists():
    return dest
  if _process_index() != 0:
    deadline = time.monotonic() + CACHE_WAIT_SECONDS
    while time.monotonic() < deadline:
      time.sleep(_CACHE_POLL_SECONDS)
      if dest.exists():
        return dest
    logging.warning("%s did not appear within %.0f s (is data.cache_dir shared by all hosts?); "
                    "building it in this process", dest, CACHE_WAIT_SECONDS)
  _build_jsonl_cache(path, dest, fields, field)
  return dest


class CachedJsonlSource:
  """jsonl (plain, .gz or .zst) read through its Arrow copy (see jsonl_cache)."""

  def __init__(self, files: Sequence[str], fields: _Fields, field: str, spec: str,
               cache_dir: str):
    self.files, self.fields = list(files), fields
    caches = [str(jsonl_cache(f, cache_dir, fields, field)) for f in self.files]
    self.arrow = _ArrowFiles(caches, "data.cache_dir")
    if not len(self.arrow):
      raise ValueError(f"{field}={spec!r}: empty corpus, no records in {self.files} "
                       "(expected one JSON object per line)")
    self[0]  # One record: a wrong field name fails now (the cache may predate the config).

  def __len__(self) -> int:
    return len(self.arrow)

  def _row(self, i: int):
    k, batch, row, _ = self.arrow.locate(i)
    return k, batch.column(0)[row].as_py(), batch.column(1)[row].as_py()

  def __getitem__(self, i: int) -> dict[str, str]:
    k, line, data = self._row(i)
    return _parse_json(data, f"{self.files[k]}:{line}", self.fields)

  def describe(self, i: int) -> str:
    k, line, _ = self._row(i)
    return f"{self.files[k]}:{line}"


class MixtureSource:
  """Components by weight (`mode='mix'`: grain's deterministic weighted interleave, as the
  training pipeline mixes them) or one after another (`mode='concat'`, eval)."""

  def __init__(self, components: Sequence, weights: Sequence[float], names: Sequence[str],
               mode: str, domains: Sequence[int] | None = None):
    import grain
    self.components, self.weights, self.names, self.mode = (
        list(components), list(weights), list(names), mode)
    # Each component's stream domain: its index k in data.mixture (eval leaves some components out).
    self.domains = list(domains) if domains is not None else list(range(len(self.components)))
    tagged = [grain.MapDataset.range(len(c)).map(_Tag(k)) for k, c in enumerate(components)]
    self.keys = (grain.MapDataset.mix(tagged, self.weights) if mode == "mix"
                 else grain.MapDataset.concatenate(tagged))

  def __len__(self) -> int:
    return len(self.keys)

  def __getitem__(self, i: int) -> dict[str, str]:
    k, j = self.keys[i]
    return self.components[k][j]

  def describe(self, i: int) -> str:
    k, j = self.keys[i]
    c = self.components[k]
    inner = c.describe(j) if hasattr(c, "describe") else f"record {j}"
    return f"{self.names[k]}: {inner}"

  def domain_of(self, i: int, record: dict) -> int:
    """Record i's stream domain: the index k of its component's data.mixture[k] entry."""
    del record
    return self.domains[self.keys[i][0]]


class _Tag:
  def __init__(self, k: int):
    self.k = k

  def __call__(self, j):
    return self.k, int(j)


# Built sources by configuration (and file size/mtime), so that re-creating an
# eval iterator at every evaluation does not re-index and re-check the files.
_CACHE: dict = {}
_CACHE_MAX = 8


def _path_stats(spec: str, field: str, allow_dirs: bool):
  stats = []
  for path in resolve_paths(spec, field, allow_dirs):
    files = [path]
    if allow_dirs and epath.Path(path).is_dir():  # A Dataset(Dict) directory: two levels.
      entries = list(epath.Path(path).iterdir())
      entries += [f for d in entries if d.is_dir() for f in d.iterdir()]
      files = sorted(str(f) for f in entries if f.is_file())
    stats += [(f,) + _stamp(f) for f in files]
  return tuple(stats)


def _cache_key(data_cfg, split: str):
  if data_cfg.source == "mixture":
    parts = [_cache_key(c, split) for c, _, _ in mixture_components(data_cfg)]
    return None if None in parts else ("mixture", split, tuple(parts), _mixture_weights(data_cfg))
  fields = (data_cfg.source, split, data_cfg.text_field, data_cfg.prompt_field,
            data_cfg.answer_field)
  if data_cfg.source == "tfds":
    return fields + (data_cfg.tfds_name, data_cfg.tfds_data_dir,
                     data_cfg.train_split if split == "train" else data_cfg.eval_split)
  if data_cfg.source in PATH_SOURCES:
    spec = data_cfg.train_path if split == "train" else data_cfg.eval_path
    field = "data.train_path" if split == "train" else "data.eval_path"
    try:
      stats = _path_stats(spec, field, data_cfg.source == "arrow") if spec else ()
    except OSError:
      return None  # Let construction report the problem.
    return fields + (spec, stats, data_cfg.get("cache_dir", ""),
                     data_cfg.train_split if split == "train" else data_cfg.eval_split)
  return None  # Synthetic sources cost nothing to build.


def make_source(data_cfg, split: str):
  """The record source of `split` ('train' | 'eval') for a data_config()."""
  if split not in ("train", "eval"):
    raise ValueError(f"split={split!r}: expected 'train' or 'eval'")
  return make_source_component(data_cfg, split, "data")


def has_eval_split(data_cfg) -> bool:
  """Whether make_source(data_cfg, 'eval') has records to read: path sources only with
  data.eval_path, a mixture when one of its components has an eval split."""
  if data_cfg.source == "mixture":
    return any(has_eval_split(c) for c, _, _ in mixture_components(data_cfg))
  return data_cfg.source not in PATH_SOURCES or bool(data_cfg.eval_path)


def _mixture_weights(data_cfg) -> tuple:
  return tuple(float(e["weight"]) for e in data_cfg.mixture)


def mixture_components(data_cfg):
  """(component data config, weight, field prefix) of each data.mixture entry: a copy of
  data.* (mixture cleared) with the entry's keys set."""
  import copy
  entries = data_cfg.get("mixture", ())
  if not entries:
    raise ValueError("data.source='mixture' needs data.mixture: a list of entries like "
                     "{'source': 'parquet', 'train_path': ..., 'weight': 0.7}")
  out = []
  for k, entry in enumerate(entries):
    prefix = f"data.mixture[{k}]"
    if not isinstance(entry, Mapping) and not hasattr(entry, "items"):
      raise ValueError(f"{prefix}={entry!r}: expected a dict with 'weight' and source keys")
    entry = dict(entry.items())
    unknown = sorted(set(entry) - set(MIXTURE_KEYS))
    if unknown:
      raise ValueError(f"{prefix} has unknown keys {unknown}; expected some of {MIXTURE_KEYS}")
    weight = entry.pop("weight", None)
    entry.pop("feedback_set", None)  # pairs the component with a feedback set (stream_domains)
    if not isinstance(weight, (int, float)) or isinstance(weight, bool) or not weight > 0:
      raise ValueError(f"{prefix}.weight={weight!r}: expected a number > 0")
    if entry.get("source", data_cfg.source) == "mixture":
      raise ValueError(f"{prefix}.source='mixture': mixtures do not nest; name a record source")
    cfg = copy.deepcopy(data_cfg)
    with cfg.unlocked():
      cfg.mixture = ()
      for key, value in entry.items():
        cfg[key] = value
    out.append((cfg, float(weight), prefix))
  return out


@dataclasses.dataclass(frozen=True)
class StreamDomain:
  """A domain of the training stream: its id in the LM batch's `domain_ids`, its name, the feedback set
  it is paired with (None: none, its tokens are left out of domain-matched alignment) and the config
  field that pairs it."""
  id: int
  name: str
  feedback_set: str | None
  field: str


def stream_domains(data_cfg, main_set: str) -> list[StreamDomain]:
  """The domains of a data_config()'s training stream and their feedback sets.

  synthetic_math: 'math' (paired with the main feedback set, `main_set`) and 'filler' (none). A
  mixture: component k is domain k, paired with data.mixture[k].feedback_set (unset or '': none).
  Any other source is one domain, 'data', paired with the main set.
  """
  if data_cfg.source == "synthetic_math":
    return [StreamDomain(DOMAIN_MATH, "math", main_set, "data.source"),
            StreamDomain(DOMAIN_FILLER, "filler", None, "data.synthetic.irrelevant_fraction")]
  if data_cfg.source != "mixture":
    return [StreamDomain(0, "data", main_set, "data.source")]
  out = []
  for k, entry in enumerate(data_cfg.get("mixture", ()) or ()):
    field = f"data.mixture[{k}].feedback_set"
    name = entry.get("feedback_set", None) if hasattr(entry, "get") else None
    if name is not None and not isinstance(name, str):
      raise ValueError(f"config.{field}={name!r}: expected the name of a feedback set (a string)")
    out.append(StreamDomain(k, f"data.mixture[{k}]", name or None, field))
  return out


def _make_source(data_cfg, split: str, prefix: str = "data"):
  kind = data_cfg.source
  if kind == "mixture":
    comps, weights, names, domains = [], [], [], []
    for k, (cfg, weight, cprefix) in enumerate(mixture_components(data_cfg)):
      if split == "eval" and not has_eval_split(cfg):
        continue  # Eval reads the components that have a held-out split.
      comps.append(make_source_component(cfg, split, cprefix))
      weights.append(weight)
      names.append(cprefix)
      domains.append(k)
    if not comps:
      raise ValueError("data.mixture: no entry has an eval split (set eval_path on one)")
    return MixtureSource(comps, weights, names, "mix" if split == "train" else "concat", domains)
  if kind == "synthetic_math":
    syn = data_cfg.synthetic
    if split == "train":
      size = syn.get("num_train", 0) or SYNTHETIC_TRAIN_SIZE
      return SyntheticMathSource(syn.seed, size, syn.irrelevant_fraction, partition="train",
                                 style=synthetic_math.StreamStyle.from_config(syn))
    # Eval is pure math: it measures the target domain, not the filler.
    return SyntheticMathSource(syn.seed + _SYNTHETIC_EVAL_SEED_OFFSET, syn.num_eval,
                               partition="eval")
  fields = (_Fields(data_cfg.text_field, data_cfg.prompt_field, data_cfg.answer_field, prefix)
            if kind != "text" else None)
  if kind in PATH_SOURCES:
    field = f"{prefix}.train_path" if split == "train" else f"{prefix}.eval_path"
    spec = data_cfg.train_path if split == "train" else data_cfg.eval_path
    if not spec:
      raise ValueError(f"{field} is empty: data.source={kind!r} needs a file or glob "
                       f"for the {split} split")
    if kind == "text":
      return TextSource(spec, field)
    if kind == "arrow":
      split_name = data_cfg.train_split if split == "train" else data_cfg.eval_split
      files = [f for p in resolve_paths(spec, field, allow_dirs=True)
               for f in arrow_files(p, split_name, field)]
      return ArrowSource(files, fields, field, spec)
    files = resolve_paths(spec, field)
    if kind == "parquet":
      return ParquetSource(files, fields, field, spec)
    if kind == "array_record":
      return ArrayRecordSource(files, fields, field, spec)
    cache_dir = data_cfg.get("cache_dir", "")
    if cache_dir or any(f.endswith(COMPRESSED_SUFFIXES) for f in files):
      return CachedJsonlSource(files, fields, field, spec, cache_dir)
    return JsonlSource(spec, fields, field)
  if kind == "tfds":
    tfds_split = data_cfg.train_split if split == "train" else data_cfg.eval_split
    return TfdsSource(data_cfg.tfds_name, tfds_split, data_cfg.tfds_data_dir, fields)
  raise ValueError(f"{prefix}.source={kind!r}: expected one of "
                   + ", ".join(repr(k) for k in SOURCES))


def make_source_component(cfg, split: str, prefix: str):
  """make_source with errors naming `prefix` (data, or data.mixture[k] for a component)."""
  key = _cache_key(cfg, split)
  if key is not None and key in _CACHE:
    return _CACHE[key]
  source = _make_source(cfg, split, prefix)
  if key is not None:
    if len(_CACHE) >= _CACHE_MAX:
      _CACHE.pop(next(iter(_CACHE)))
    _CACHE[key] = source
  return source
