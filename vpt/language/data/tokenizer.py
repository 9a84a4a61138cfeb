"""Tokenizer interface, a SentencePiece implementation trained on the corpus, and Hugging Face
`tokenizer.json` tokenizers (for learners imported from HF checkpoints).

Trained models use id 0 for padding, 1 unk, 2 bos, 3 eos, identity
normalisation (newlines and repeated spaces survive, so decode(encode(s)) == s),
no dummy prefix (a word after a space carries the space: 'a b' -> ['a', '▁b']),
byte fallback (no unknown characters) and one token per digit, which keeps the
arithmetic in the synthetic data learnable token by token.
"""

from __future__ import annotations

import abc
import io
import json
import logging
import os
from collections.abc import Sequence

import sentencepiece as spm
from etils import epath

from vpt.core import paths, run_dir as run_dir_lib
from vpt.language.data import sources as sources_lib

# Where a run keeps its tokenizer (vpt.core.run_dir's layout): WORKDIR/tokenizer/{spm.model,tokenizer.json}.
CACHE_SUBDIR = run_dir_lib.TOKENIZER_SUBDIR
CACHE_NAME = run_dir_lib.SPM_NAME
HF_TOKENIZER_NAME = run_dir_lib.HF_TOKENIZER_NAME


class Tokenizer(abc.ABC):
  """The minimal interface the pipeline and the evals need."""

  vocab_size: int
  bos_id: int
  eos_id: int
  pad_id: int

  @abc.abstractmethod
  def encode(self, text: str) -> list[int]:
    """Token ids of `text`, without bos/eos."""

  @abc.abstractmethod
  def decode(self, ids: Sequence[int]) -> str:
    """Text of `ids`; bos/eos/pad are dropped."""


class SentencePieceTokenizer(Tokenizer):
  """A sentencepiece model file (any path etils.epath can read)."""

  def __init__(self, model_path: str | None = None, *, model_proto: bytes | None = None):
    if model_proto is None:
      path = epath.Path(model_path)
      if not path.exists():
        raise FileNotFoundError(f"tokenizer model {model_path!r}: no such file "
                                "(expected a sentencepiece .model file)")
      model_proto = path.read_bytes()
    self.model_path = model_path
    self._proto = model_proto
    self._init()

  def _init(self):
    try:
      self.sp = spm.SentencePieceProcessor(model_proto=self._proto)
    except Exception as e:  # sentencepiece raises RuntimeError/OSError variants.
      raise ValueError(f"tokenizer model {self.model_path!r} is not a valid sentencepiece "
                       f"model: {e}") from e
    self.vocab_size = self.sp.vocab_size()
    self.bos_id, self.eos_id = self.sp.bos_id(), self.sp.eos_id()
    self.pad_id = self.sp.pad_id()
    if min(self.bos_id, self.eos_id) < 0:
      raise ValueError(f"tokenizer model {self.model_path!r} defines no bos/eos token")
    if self.pad_id < 0:  # Models without a pad piece: pad with eos (masked anyway).
      self.pad_id = self.eos_id

  def encode(self, text: str) -> list[int]:
    return self.sp.encode(text)

  def encode_batch(self, texts: list[str]) -> list[list[int]]:
    return self.sp.encode(texts)

  def decode(self, ids: Sequence[int]) -> str:
    return self.sp.decode([int(i) for i in ids])

  def id_to_piece(self, i: int) -> str:
    return self.sp.id_to_piece(int(i))

  @property
  def proto(self) -> bytes:
    return self._proto

  # The processor itself does not pickle; grain worker processes need copies.
  def __getstate__(self):
    return {"model_path": self.model_path, "_proto": self._proto}

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._init()


class HFTokenizer(Tokenizer):
  """A Hugging Face `tokenizer.json` (the `tokenizers` library), e.g. a Qwen2 or Llama checkpoint's.

  Special tokens come from the files beside it, first found wins: tokenizer_config.json,
  special_tokens_map.json, generation_config.json, config.json. eos is the tokenizer's eos token
  (Qwen2.5 base: <|endoftext|>, instruct: <|im_end|>); `eos_ids` adds generation_config's other
  stop ids. A model without a bos token (Qwen) gets eos as bos, the document separator it was
  pretrained with, and pad falls back to eos. Special tokens written in the text (chat markers such
  as <|im_start|>) encode to their single ids.
  """

  def __init__(self, path: str):
    file = _hf_tokenizer_file(path)
    if not file.is_file():
      raise FileNotFoundError(f"tokenizer {os.fspath(file)!r}: no such file (expected a Hugging Face tokenizer.json; "
                              "set data.tokenizer_path to one)")
    self.path = os.fspath(file)
    self._json = file.read_text()
    self._special = _hf_special_tokens(file.parent)
    self._init()

  def _init(self):
    import tokenizers  # pylint: disable=g-import-not-at-top

    try:
      self.tok = tokenizers.Tokenizer.from_str(self._json)
    except Exception as e:  # tokenizers raises its own exception types.
      raise ValueError(f"tokenizer {self.path!r} is not a valid tokenizer.json: {e}") from e
    self.vocab_size = max(self.tok.get_vocab(with_added_tokens=True).values()) + 1

    def resolve(key):
      value, source = self._special.get(key, (None, None))
      if value is None or isinstance(value, int):
        return value
      i = self.tok.token_to_id(value)
      if i is None:
        raise ValueError(f"{source}: {key}_token={value!r} is not a token of {self.path}")
      return i

    eos = resolve("eos")
    if eos is None:
      raise ValueError(f"tokenizer {self.path!r}: no eos token in tokenizer_config.json, special_tokens_map.json, "
                       "generation_config.json or config.json beside it")
    self.eos_id = eos
    bos, pad = resolve("bos"), resolve("pad")
    self.bos_id = eos if bos is None else bos
    self.pad_id = eos if pad is None else pad
    self.eos_ids = tuple(dict.fromkeys([eos, *self._special.get("eos_ids", ((), None))[0]]))

  def encode(self, text: str) -> list[int]:
    return self.tok.encode(text, add_special_tokens=False).ids

  def encode_batch(self, texts: list[str]) -> list[list[int]]:
    return [e.ids for e in self.tok.encode_batch(texts, add_special_tokens=False)]

  def decode(self, ids: Sequence[int]) -> str:
    drop = {self.bos_id, self.eos_id, self.pad_id}
    return self.tok.decode([int(i) for i in ids if int(i) not in drop], skip_special_tokens=False)

  def id_to_piece(self, i: int) -> str:
    return self.tok.id_to_token(int(i)) or ""

  def __getstate__(self):
    return {"path": self.path, "_json": self._json, "_special": self._special}

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._init()


def _hf_tokenizer_file(path: str) -> epath.Path:
  """The tokenizer.json that `path` names: itself, or the one in the directory `path`."""
  p = paths.path(path)
  return p / HF_TOKENIZER_NAME if p.is_dir() else p


def _hf_special_tokens(directory) -> dict:
  """{'bos'|'eos'|'pad': (token string or id, source file), 'eos_ids': (ids, file)}, first file wins."""
  found: dict = {}

  def read(name):
    file = paths.path(directory) / name
    path = os.fspath(file)
    if not file.is_file():
      return {}, path
    try:
      data = json.loads(file.read_text())
    except ValueError as e:
      raise ValueError(f"{path}: not valid JSON ({e})") from e
    return (data if isinstance(data, dict) else {}), path

  for name in ("tokenizer_config.json", "special_tokens_map.json"):
    data, path = read(name)
    for key in ("bos", "eos", "pad"):
      value = data.get(f"{key}_token")
      if isinstance(value, dict):  # AddedToken form: {"content": "<s>", ...}
        value = value.get("content")
      if isinstance(value, str) and key not in found:
        found[key] = (value, path)
  for name in ("generation_config.json", "config.json"):
    data, path = read(name)
    for key in ("bos", "eos", "pad"):
      value = data.get(f"{key}_token_id")
      ids = [value] if isinstance(value, int) else [v for v in value if isinstance(v, int)] if isinstance(value, list) else []
      if ids and key not in found:
        found[key] = (ids[0], path)
      if key == "eos" and ids and "eos_ids" not in found:
        found["eos_ids"] = (tuple(ids), path)
  return found


def is_hf_tokenizer_path(path: str) -> bool:
  """A tokenizer.json, or a directory (an HF checkpoint's, which must hold one)."""
  return os.fspath(path).endswith(".json") or paths.path(path).is_dir()


def load_tokenizer(path: str) -> Tokenizer:
  """A sentencepiece .model file, or a Hugging Face tokenizer.json (or a directory holding one)."""
  if is_hf_tokenizer_path(path):
    return HFTokenizer(path)
  return SentencePieceTokenizer(path)


# Files beside a tokenizer.json that HFTokenizer reads its special tokens from.
HF_TOKENIZER_SIDE_FILES = ("tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
                           "config.json")


def run_tokenizer(workdir: str, data_cfg) -> Tokenizer:
  """The tokenizer a vpt run trained with: its own copy in the run directory (`run_dir.tokenizer_file`),
  else data.tokenizer_path (runs from before the run directory kept a copy)."""
  own = run_dir_lib.tokenizer_file(workdir)
  if own:
    return load_tokenizer(own)
  if data_cfg.get("tokenizer_path"):
    return load_tokenizer(data_cfg.tokenizer_path)
  return SentencePieceTokenizer(os.fspath(paths.path(workdir) / CACHE_SUBDIR / CACHE_NAME))


def adopt_tokenizer(source: str | None, workdir: str, *, what: str) -> str | None:
  """The path of the run's own copy of the tokenizer at `source`, so that a restart needs nothing
  outside the run directory (`source` may be on a VM that is gone, or deleted).

  The first start copies `source` (a sentencepiece .model, or an HF tokenizer.json or its
  directory, with the side files that name its special tokens) into WORKDIR/tokenizer/; a restart
  uses that copy, and refuses to go on if `source` still exists but differs from it. Every host
  may call this: each publishes identical bytes atomically. None when `source` is None (the run
  trains its own sentencepiece model). `what` names the setting `source` came from, for errors.
  """
  if not source:
    return None
  hf = is_hf_tokenizer_path(source) if paths.path(source).exists() else os.fspath(source).endswith(".json")
  src = _hf_tokenizer_file(source) if hf else paths.path(source)
  dst_dir = paths.path(workdir) / CACHE_SUBDIR
  dst = dst_dir / (HF_TOKENIZER_NAME if hf else CACHE_NAME)
  own = run_dir_lib.tokenizer_file(workdir)
  own = paths.path(own) if own and paths.path(own).parent == dst_dir else None
  if not src.is_file():
    if own is not None:
      return os.fspath(own)  # a restart: the run's copy stands in for a source that is gone.
    raise FileNotFoundError(f"{what}: {os.fspath(src)!r}: no such file (expected a sentencepiece .model file, "
                            f"or an HF tokenizer.json or its directory), and {os.fspath(dst_dir)} holds no copy")
  if own is not None:
    if own != dst or own.read_bytes() != src.read_bytes():
      raise ValueError(f"{what}: {os.fspath(src)!r} differs from the tokenizer this run started with "
                       f"({os.fspath(own)}); resume with the same tokenizer, or start a new workdir")
    return os.fspath(own)
  if hf:
    for name in HF_TOKENIZER_SIDE_FILES:
      side = src.parent / name
      if side.is_file():
        paths.copy_file(side, dst_dir / name)
  paths.copy_file(src, dst)  # last: its presence marks a complete copy.
  return os.fspath(dst)


def trained_vocab_size(model_proto: bytes) -> int:
  """The vocab_size the model was trained with (its real size may be smaller)."""
  from sentencepiece import sentencepiece_model_pb2  # pylint: disable=g-import-not-at-top

  m = sentencepiece_model_pb2.ModelProto()
  m.ParseFromString(model_proto)
  return m.trainer_spec.vocab_size


# Final-answer markers (GSM8K's '####', NuminaMath-CoT's '$\boxed{'), each one piece that never merges
# with its neighbours: BPE would otherwise learn '.\n####', putting the "end the solution here, in this
# format" decision into the line break that ends every step — where a task designer cannot move target
# mass to the format without also moving it at every line end.
ANSWER_MARKERS = ("####", "$\\boxed{")


def train_sentencepiece(texts: Sequence[str], vocab_size: int) -> bytes:
  """Trains a BPE model on `texts` (in order) and returns the serialized model; `ANSWER_MARKERS` are
  pieces of their own."""
  out = io.BytesIO()
  try:
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts),
        model_writer=out,
        model_type="bpe",
        vocab_size=vocab_size,
        # A small corpus may not support vocab_size merges: stop early instead of failing.
        hard_vocab_limit=False,
        character_coverage=1.0,
        byte_fallback=True,
        split_digits=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=False,
        allow_whitespace_only_pieces=True,
        pad_id=0, unk_id=1, bos_id=2, eos_id=3,
        user_defined_symbols=list(ANSWER_MARKERS),
        max_sentence_length=1 << 16,
        input_sentence_size=0,
        shuffle_input_sentence=False,
        num_threads=1,  # Deterministic merges.
        minloglevel=2,
    )
  except RuntimeError as e:
    raise ValueError(f"sentencepiece training failed (data.vocab_size={vocab_size}; byte "
                     f"fallback needs >= 260 + the number of distinct characters): {e}") from e
  return out.getvalue()


def load_or_train_tokenizer(data_cfg, workdir: str) -> Tokenizer:
  """data.tokenizer_path if set (sentencepiece .model, or an HF tokenizer.json or the directory
  holding one); else the sentencepiece model cached in workdir, trained on first use.

  Training uses the first data.tokenizer_train_examples records of the training
  source, in order, so every host (and every rerun) trains the identical model.
  """
  if data_cfg.tokenizer_path:
    if not epath.Path(data_cfg.tokenizer_path).exists():
      raise FileNotFoundError(f"data.tokenizer_path={data_cfg.tokenizer_path!r}: no such file "
                              "(expected a sentencepiece .model file, or an HF tokenizer.json or its directory)")
    if is_hf_tokenizer_path(data_cfg.tokenizer_path):
      return HFTokenizer(data_cfg.tokenizer_path)
    return SentencePieceTokenizer(data_cfg.tokenizer_path)

  path = os.fspath(paths.path(workdir) / CACHE_SUBDIR / CACHE_NAME)
  if paths.path(path).exists():
    tok = SentencePieceTokenizer(path)
    trained = trained_vocab_size(tok.proto)
    if trained != data_cfg.vocab_size:
      raise ValueError(f"cached tokenizer {path} was trained with vocab_size={trained} but "
                       f"data.vocab_size={data_cfg.vocab_size}: delete it (or the workdir) to "
                       "retrain, or set data.vocab_size to match")
    return tok

  source = sources_lib.make_source(data_cfg, "train")
  n = min(int(data_cfg.tokenizer_train_examples), len(source))
  if n <= 0:
    raise ValueError(f"data.tokenizer_train_examples={data_cfg.tokenizer_train_examples}: "
                     "expected > 0 to train a tokenizer")
  texts = [sources_lib.record_text(source[i]) for i in range(n)]
  logging.info("Training a %d-piece sentencepiece model on %d records", data_cfg.vocab_size, n)
  proto = train_sentencepiece(texts, data_cfg.vocab_size)
  paths.write_atomic(path, proto)  # concurrent writers (several hosts) each publish a whole file.
  return SentencePieceTokenizer(path)
