"""The grain input pipeline: records -> tokens -> packed, batched LM examples.

  range(len(source)) -> [process_index::process_count] -> shuffle (train) -> repeat
  -> tokenize -> to_iter_dataset -> first-fit packing -> batch (local batch size)

Each example is tokenized as [bos] + prompt + answer + [eos] (or [bos] + text +
[eos]) and turned into (inputs, targets, loss_mask) = (toks[:-1], toks[1:],
flags[1:]) *before* packing, so no target ever crosses into the next packed
example. Batches are dicts of numpy arrays, all [local_batch, seq_len]:

  inputs, targets  int32   targets[t] is the token after inputs[t] in its example
  loss_mask        float32 1 on answer (or text) tokens and eos, 0 on prompt/padding
  segment_ids      int32   1, 2, ... per packed example in a row, 0 on padding
  positions        int32   position within the example (restarts at 0)
  domain_ids       int32   the stream domain of the token's example (sources.stream_domains: the
                           synthetic stream's math 0 / filler 1, a mixture's component k), -1 on padding

The returned grain DatasetIterator is checkpointable: `get_state()` is a small
JSON-serialisable dict and `set_state` on a fresh iterator built with the same
arguments resumes bit-identically (also via grain.checkpoint.CheckpointSave /
CheckpointRestore in orbax).
"""

from __future__ import annotations

import atexit
import weakref

import grain
import numpy as np
from absl import flags as absl_flags
from grain import experimental as grain_exp

from vpt.language.data import sources as sources_lib
from vpt.language.data.tokenizer import Tokenizer

# Read-ahead buffer of tokenized records when data.read_threads > 0. Reading and
# tokenizing mostly hold the GIL, so threads rarely help (measured: 0 threads is
# ~1.6x faster than 2 on the synthetic data); they are for slow storage.
_PREFETCH = 256


def encode_example(tokenizer: Tokenizer, record: dict) -> tuple[np.ndarray, np.ndarray]:
  """[bos] + prompt + answer + [eos] tokens and their loss flags (int32 each).

  Flags are 1 on answer tokens and eos (on every text token for text records)
  and 0 on bos and prompt. Prompt and answer are encoded separately so the
  boundary is exact; the answer carries its separator (' ', see
  sources.answer_separator), so the tokens decode to sources.record_text(record).
  To sample an answer, feed [bos] + encode(prompt): the continuation the model
  learned starts with the separator, so strip the decoded text.
  """
  if "text" in record:
    prompt, body = [], tokenizer.encode(record["text"])
  else:
    sep = sources_lib.answer_separator(record["prompt"], record["answer"])
    prompt, body = tokenizer.encode(record["prompt"]), tokenizer.encode(sep + record["answer"])
  n = len(prompt) + len(body) + 2
  toks = np.empty(n, np.int32)
  toks[0] = tokenizer.bos_id
  toks[1:1 + len(prompt)] = prompt
  toks[1 + len(prompt):n - 1] = body
  toks[n - 1] = tokenizer.eos_id
  flags = np.ones(n, np.int32)
  flags[:1 + len(prompt)] = 0
  return toks, flags


class _Tokenize(grain.transforms.Map):
  """Source index -> {"ex": [n-1, 4] int32 (input, target, loss flag, domain + 1) rows}.

  The domain is `domain` if given (a mixture component's index), else the source's
  domain_of(index, record), else 0. It is stored + 1 so that the packer's zero padding reads -1.
  """

  def __init__(self, source, tokenizer, seq_len: int, truncate: bool, split: str, domain: int | None = None):
    self.source, self.tokenizer = source, tokenizer
    self.seq_len, self.truncate, self.split, self.domain = seq_len, truncate, split, domain

  def map(self, index):
    index = int(index)
    record = self.source[index]
    domain = self.domain
    if domain is None:
      domain = self.source.domain_of(index, record) if hasattr(self.source, "domain_of") else 0
    toks, flags = encode_example(self.tokenizer, record)
    if len(toks) > self.seq_len + 1:
      if not self.truncate:
        raise ValueError(
            f"{self.split} example {index} ({_describe(self.source, index)}) has {len(toks)} "
            f"tokens with bos/eos, more than data.seq_len + 1 = {self.seq_len + 1}: the "
            f"sequence length is smaller than one example. Raise data.seq_len="
            f"{self.seq_len} or set data.truncate_long_examples=True.")
      toks, flags = toks[:self.seq_len + 1], flags[:self.seq_len + 1]
    ex = np.stack([toks[:-1], toks[1:], flags[1:], np.full(len(toks) - 1, domain + 1, np.int32)], axis=1)
    return {"ex": ex}


def _describe(source, index: int) -> str:
  return source.describe(index) if hasattr(source, "describe") else f"record {index}"


class _MakeBatch:
  """Stacks packed rows into model arrays; pads a short last batch with empty rows."""

  def __init__(self, batch_size: int, seq_len: int):
    self.batch_size, self.seq_len = batch_size, seq_len

  def __call__(self, rows):
    b = self.batch_size
    ex = np.zeros((b, self.seq_len, 4), np.int32)
    seg = np.zeros((b, self.seq_len), np.int32)
    pos = np.zeros((b, self.seq_len), np.int32)
    for k, r in enumerate(rows):
      ex[k], seg[k], pos[k] = r["ex"], r["ex_segment_ids"], r["ex_positions"]
    return {
        "inputs": np.ascontiguousarray(ex[..., 0]),
        "targets": np.ascontiguousarray(ex[..., 1]),
        "loss_mask": ex[..., 2].astype(np.float32),
        "segment_ids": seg,
        "positions": pos,
        "domain_ids": ex[..., 3] - 1,
    }


def make_lm_dataset(data_cfg, tokenizer: Tokenizer, *, split: str, global_batch_size: int,
                    seq_len: int, seed: int, process_index: int = 0, process_count: int = 1,
                    num_epochs: int | None = None, source=None) -> grain.IterDataset:
  """The grain IterDataset behind make_lm_iterator (same arguments)."""
  if split not in ("train", "eval"):
    raise ValueError(f"split={split!r}: expected 'train' or 'eval'")
  if process_count < 1 or not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index}, process_count={process_count}: expected "
                     "0 <= process_index < process_count")
  if global_batch_size <= 0 or global_batch_size % process_count:
    raise ValueError(f"batch_size={global_batch_size} (global) is not a positive multiple of "
                     f"the process count {process_count}")
  if seq_len < 1:
    raise ValueError(f"data.seq_len={seq_len}: expected >= 1")
  if num_epochs is not None and num_epochs < 1:
    raise ValueError(f"num_epochs={num_epochs}: expected >= 1 or None")
  local_batch = global_batch_size // process_count
  train = split == "train"
  if source is None:
    source = sources_lib.make_source(data_cfg, split)

  # None: forever for train, one pass for eval (the last batch is padded).
  epochs = num_epochs if num_epochs is not None else (None if train else 1)
  truncate = bool(data_cfg.get("truncate_long_examples", False))

  def stream(src, name, extra_seed=(), domain=None):
    # Indices, not records, go through shard/shuffle/repeat: the record index then
    # names the example in errors, and index shuffling is free.
    ds = grain.MapDataset.range(len(src))[process_index::process_count]
    if not len(ds):
      raise ValueError(f"{name} has {len(src)} records, fewer than the "
                       f"{process_count} processes: process {process_index} gets none")
    if train:
      # Both the run seed and data.shuffle_seed change the order. grain reshuffles
      # every epoch (it seeds each epoch's permutation with shuffle seed + epoch).
      shuffle_seed = np.random.SeedSequence([int(seed), int(data_cfg.get("shuffle_seed", 0)),
                                             *extra_seed])
      ds = ds.shuffle(seed=int(shuffle_seed.generate_state(1)[0]))
    return ds.repeat(epochs).map(_Tokenize(src, tokenizer, seq_len, truncate, split, domain))

  if train and isinstance(source, sources_lib.MixtureSource):
    # Each component is sharded, shuffled (its own seed) and repeated on its own, then
    # grain interleaves them deterministically in proportion to the weights. The mixture
    # is still a MapDataset, so the iterator state is one index: resume is exact. With
    # num_epochs, the stream ends when the first component runs out.
    ds = grain.MapDataset.mix(
        [stream(c, f"{split} data {name}", (k + 1,), domain=domain)
         for k, (c, name, domain) in enumerate(zip(source.components, source.names, source.domains))],
        source.weights)
  else:
    ds = stream(source, f"{split} data")
  threads = int(data_cfg.get("read_threads", 0))
  it = ds.to_iter_dataset(grain.ReadOptions(num_threads=threads,
                                            prefetch_buffer_size=_PREFETCH if threads else 0))
  bins = int(data_cfg.get("packing_bins", 0)) or max(32, local_batch)
  it = grain_exp.FirstFitPackIterDataset(
      it, length_struct={"ex": seq_len}, num_packing_bins=bins, shuffle_bins=False)
  it = it.batch(local_batch, drop_remainder=False, batch_fn=_MakeBatch(local_batch, seq_len))
  # Eval iterators are short-lived (one per evaluation): worker start-up would dominate.
  if train and data_cfg.get("worker_count", 0) > 0:
    # grain's workers read absl flags; outside an absl app they are unparsed.
    if not absl_flags.FLAGS.is_parsed():
      absl_flags.FLAGS.mark_as_parsed()
    # Batches are small: pickling them beats grain's shared-memory arrays, which
    # leak (and print tracebacks at exit) while any batch is still referenced.
    it = grain_exp.WithOptionsIterDataset(it, grain_exp.DatasetOptions(min_shm_size=1 << 40))
    it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=int(data_cfg.worker_count)))
  return it


def make_lm_iterator(data_cfg, tokenizer: Tokenizer, *, split: str, global_batch_size: int,
                     seq_len: int, seed: int, process_index: int = 0, process_count: int = 1,
                     num_epochs: int | None = None, source=None) -> grain.DatasetIterator:
  """A checkpointable iterator of packed LM batches for this process.

  split: 'train' (shuffled by `seed` and data.shuffle_seed, reshuffled every epoch) or 'eval' (source
  order). num_epochs=None repeats train forever and reads eval once, ending with
  StopIteration after a last batch padded with empty rows (all-zero loss_mask).
  Each process reads records process_index::process_count and yields batches of
  global_batch_size // process_count rows. `source` overrides the configured one.
  """
  it = iter(make_lm_dataset(data_cfg, tokenizer, split=split,
                            global_batch_size=global_batch_size, seq_len=seq_len, seed=seed,
                            process_index=process_index, process_count=process_count,
                            num_epochs=num_epochs, source=source))
  _LIVE_ITERATORS.add(it)
  return it


# Iterators with worker processes or threads still open at interpreter exit get
# closed by their __del__ after module teardown, which spams tracebacks; closing
# them in an atexit hook (before teardown) is clean.
_LIVE_ITERATORS: weakref.WeakSet = weakref.WeakSet()


@atexit.register
def _close_live_iterators():
  for it in list(_LIVE_ITERATORS):
    try:
      it.close()
    except Exception:  # noqa: BLE001 — best effort at exit.
      pass
