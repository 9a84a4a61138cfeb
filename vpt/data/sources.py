"""Random-access record sources for training and evaluation.

Every source has `__len__`, `__getitem__(i) -> dict` and `describe(i) -> str`
(where record i comes from, for error messages), and yields normalised records:

  {"prompt": str, "answer": str}  the loss is on the answer tokens only, or
  {"text": str}                   the loss is on every token.

Sources check their input at construction (missing files, empty corpora, bad
lines, missing fields) so that a broken config fails before training starts.
"""

from __future__ import annotations

import glob
import json
import os
import threading
from collections.abc import Sequence

import numpy as np

from vpt import paths
from vpt.data import synthetic_math

# Virtual size of the synthetic training stream (records are generated on demand).
SYNTHETIC_TRAIN_SIZE = 10**9
# The eval split uses the 'eval' hash partition and this seed offset, so it is
# disjoint from the training questions whatever data.synthetic.seed is.
_SYNTHETIC_EVAL_SEED_OFFSET = 1_000_003


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


def resolve_paths(spec: str, field: str) -> list[str]:
  """Files for a path, a glob, or a comma-separated list of them (sorted per glob)."""
  files = []
  for part in [p.strip() for p in spec.split(",") if p.strip()]:
    if paths.is_remote(part):  # gs://bucket/dir/*.jsonl: the object store's listing, through etils.epath.
      first = min([part.index(c) for c in "*?[" if c in part], default=len(part))
      root = part[:part.rindex("/", 0, first)] if first < len(part) else None
      matches = sorted(os.fspath(m) for m in paths.path(root).glob(part[len(root) + 1:])) if root else [part]
      matches = [m for m in matches if paths.path(m).is_file()]
    else:
      matches = sorted(glob.glob(os.path.expanduser(part)))
      matches = [m for m in matches if os.path.isfile(m)]
    if not matches:
      raise FileNotFoundError(f"{field}={spec!r}: no file matches {part!r}")
    files.extend(matches)
  if not files:
    raise FileNotFoundError(f"{field}={spec!r}: no file matches")
  return files


class SyntheticMathSource:
  """SyntheticMath records as prompt/answer (math) or text (filler) records."""

  def __init__(self, seed: int, size: int, irrelevant_fraction: float = 0.0,
               partition: str = "all"):
    self.data = synthetic_math.SyntheticMath(seed, size, irrelevant_fraction, partition)

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


class _Fields:
  """Maps raw records to normalised ones per data.{text,prompt,answer}_field."""

  def __init__(self, text_field: str, prompt_field: str, answer_field: str):
    if bool(prompt_field) != bool(answer_field):
      raise ValueError("data.prompt_field and data.answer_field must be set together "
                       f"(got {prompt_field!r} and {answer_field!r})")
    if prompt_field:
      self.wanted = [(prompt_field, "data.prompt_field", "prompt"),
                     (answer_field, "data.answer_field", "answer")]
    else:
      if not text_field:
        raise ValueError("data.text_field is empty and data.prompt_field is not set: "
                         "nothing to read from the records")
      self.wanted = [(text_field, "data.text_field", "text")]

  def __call__(self, raw, where: str) -> dict[str, str]:
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


class _LineIndexedFiles:
  """Byte offsets of the non-empty lines of some files, read back with pread.

  pread has no shared file position, so grain's reader threads can read
  concurrently from one descriptor; descriptors are reopened after a fork or
  unpickling (grain worker processes).
  """

  def __init__(self, files: Sequence[str], check_line):
    self._fds, self._pid = None, None  # Set first: __del__ runs even if indexing fails.
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
    if self._pid != os.getpid():
      with self._lock:
        if self._pid != os.getpid():
          self._fds = [p if paths.is_remote(p) else os.open(p, os.O_RDONLY) for p in self.files]
          self._pid = os.getpid()
    fd = self._fds[self.file_idx[i]]
    if isinstance(fd, str):  # an object store has no pread: a ranged read of the record's bytes.
      with paths.path(fd).open("rb") as f:
        f.seek(int(self.starts[i]))
        return f.read(int(self.lengths[i]))
    return os.pread(fd, int(self.lengths[i]), int(self.starts[i]))

  def __getstate__(self):
    state = self.__dict__.copy()
    state.update(_fds=None, _pid=None, _lock=None)
    return state

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._lock = threading.Lock()

  def __del__(self):
    if self._fds and self._pid == os.getpid():
      for fd in self._fds:
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
    try:
      raw = json.loads(_decode_line(line, where))
    except json.JSONDecodeError as e:
      raise ValueError(f"{where}: invalid JSON ({e.msg} at column {e.colno}); expected "
                       "one JSON object per line") from None
    return self.fields(raw, where)

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


# Built sources by configuration (and file size/mtime), so that re-creating an
# eval iterator at every evaluation does not re-index and re-check the files.
_CACHE: dict = {}
_CACHE_MAX = 8


def _cache_key(data_cfg, split: str):
  fields = (data_cfg.source, split, data_cfg.text_field, data_cfg.prompt_field,
            data_cfg.answer_field)
  if data_cfg.source == "tfds":
    return fields + (data_cfg.tfds_name, data_cfg.tfds_data_dir,
                     data_cfg.train_split if split == "train" else data_cfg.eval_split)
  if data_cfg.source in ("jsonl", "text"):
    spec = data_cfg.train_path if split == "train" else data_cfg.eval_path
    field = "data.train_path" if split == "train" else "data.eval_path"
    try:
      files = resolve_paths(spec, field) if spec else []
      stats = tuple((f, os.stat(f).st_mtime_ns, os.stat(f).st_size) for f in files)
    except OSError:
      return None  # Let construction report the problem.
    return fields + (spec, stats)
  return None  # Synthetic sources cost nothing to build.


def make_source(data_cfg, split: str):
  """The record source of `split` ('train' | 'eval') for a data_config()."""
  if split not in ("train", "eval"):
    raise ValueError(f"split={split!r}: expected 'train' or 'eval'")
  key = _cache_key(data_cfg, split)
  if key is not None and key in _CACHE:
    return _CACHE[key]
  source = _make_source(data_cfg, split)
  if key is not None:
    if len(_CACHE) >= _CACHE_MAX:
      _CACHE.pop(next(iter(_CACHE)))
    _CACHE[key] = source
  return source


def _make_source(data_cfg, split: str):
  kind = data_cfg.source
  if kind == "synthetic_math":
    syn = data_cfg.synthetic
    if split == "train":
      size = syn.get("num_train", 0) or SYNTHETIC_TRAIN_SIZE
      return SyntheticMathSource(syn.seed, size, syn.irrelevant_fraction, partition="train")
    # Eval is pure math: it measures the target domain, not the filler.
    return SyntheticMathSource(syn.seed + _SYNTHETIC_EVAL_SEED_OFFSET, syn.num_eval,
                               partition="eval")
  fields = (_Fields(data_cfg.text_field, data_cfg.prompt_field, data_cfg.answer_field)
            if kind in ("jsonl", "tfds") else None)
  if kind in ("jsonl", "text"):
    field = "data.train_path" if split == "train" else "data.eval_path"
    spec = data_cfg.train_path if split == "train" else data_cfg.eval_path
    if not spec:
      raise ValueError(f"{field} is empty: data.source={kind!r} needs a file or glob "
                       f"for the {split} split")
    if kind == "jsonl":
      return JsonlSource(spec, fields, field)
    return TextSource(spec, field)
  if kind == "tfds":
    tfds_split = data_cfg.train_split if split == "train" else data_cfg.eval_split
    return TfdsSource(data_cfg.tfds_name, tfds_split, data_cfg.tfds_data_dir, fields)
  raise ValueError(f"data.source={kind!r}: expected one of 'synthetic_math', 'jsonl', "
                   "'text', 'tfds'")
