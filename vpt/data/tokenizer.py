"""Tokenizer interface and a SentencePiece implementation trained on the corpus.

Trained models use id 0 for padding, 1 unk, 2 bos, 3 eos, identity
normalisation (newlines and repeated spaces survive, so decode(encode(s)) == s),
no dummy prefix (a word after a space carries the space: 'a b' -> ['a', '▁b']),
byte fallback (no unknown characters) and one token per digit, which keeps the
arithmetic in the synthetic data learnable token by token.
"""

from __future__ import annotations

import abc
import io
import logging
import os
from collections.abc import Sequence

import sentencepiece as spm
from etils import epath

from vpt.data import sources as sources_lib

CACHE_SUBDIR = "tokenizer"
CACHE_NAME = "spm.model"


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


def trained_vocab_size(model_proto: bytes) -> int:
  """The vocab_size the model was trained with (its real size may be smaller)."""
  from sentencepiece import sentencepiece_model_pb2  # pylint: disable=g-import-not-at-top

  m = sentencepiece_model_pb2.ModelProto()
  m.ParseFromString(model_proto)
  return m.trainer_spec.vocab_size


def train_sentencepiece(texts: Sequence[str], vocab_size: int) -> bytes:
  """Trains a BPE model on `texts` (in order) and returns the serialized model."""
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


def _write_atomic(path: str, data: bytes) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = f"{path}.tmp.{os.getpid()}"
  with open(tmp, "wb") as f:
    f.write(data)
  os.replace(tmp, path)  # Concurrent writers (several hosts) each publish a whole file.


def load_or_train_tokenizer(data_cfg, workdir: str) -> SentencePieceTokenizer:
  """data.tokenizer_path if set; else the model cached in workdir, trained on first use.

  Training uses the first data.tokenizer_train_examples records of the training
  source, in order, so every host (and every rerun) trains the identical model.
  """
  if data_cfg.tokenizer_path:
    if not epath.Path(data_cfg.tokenizer_path).exists():
      raise FileNotFoundError(f"data.tokenizer_path={data_cfg.tokenizer_path!r}: no such file "
                              "(expected a sentencepiece .model file)")
    return SentencePieceTokenizer(data_cfg.tokenizer_path)

  path = os.path.join(workdir, CACHE_SUBDIR, CACHE_NAME)
  if os.path.exists(path):
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
  _write_atomic(path, proto)
  return SentencePieceTokenizer(path)
