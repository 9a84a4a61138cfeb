"""The labeled feedback set D_fb behind the downstream gradient g_down.

V-Pretraining scores a task designer by how well a learner step aligns with the
gradient of a downstream loss on a small labeled set (the paper: 1,024 GSM8K
training solutions). This module builds that set and its batches:

  make_feedback_records      records {"question", "answer", "final"} (GSM8K
                             jsonl, or the embedded synthetic generator)
  feedback_set_records       the records of every feedback set (multitask
                             feedback: config.feedback and feedback.sets)
  encode_feedback_example    one example per row, loss mask on the solution + eos
  make_feedback_iterator     infinite, reshuffled, process-sharded, checkpointable
                             grain iterator of [local_batch, seq_len] batches

The downstream loss on these batches is vpt.language.losses.downstream_nll.

Several feedback sets (config_lib.feedback_sets): a *set* is a list of distinct problems
and no problem is in two sets. Sets are built in order (config.feedback first, which is
built exactly as a lone set is), each skipping the questions of the sets before it:
two synthetic sets draw from their own seeds (distinct by default) and are disjoint as
long as the generator has problems left, and two sets from one file take disjoint
records of it.

Examples are tokenized exactly as the LM stream tokenizes a prompt/answer record
(`pipeline.encode_example`), so "the same text" means the same tokens in both.
Batches have the LM batch layout (inputs, targets, loss_mask, segment_ids,
positions), but are not packed: one example per row, right-padded.
"""

from __future__ import annotations

import json
import re

import grain
import numpy as np

from vpt.core import paths
from vpt.language.data import pipeline, synthetic_math
from vpt.language.data.tokenizer import Tokenizer

SOURCES = ("synthetic", "gsm8k_jsonl")

# GSM8K's calculator annotations, e.g. "48/2 = <<48/2=24>>24".
_CALCULATOR_RE = re.compile(r"<<[^>]*>>")
# Characters dropped from the text after '####' ("1,000", "$5", "- 3").
_FINAL_JUNK_RE = re.compile(r"[,$\s]")
# The synthetic feedback set draws SyntheticMath(seed=offset + feedback.seed). The
# LM stream uses data.synthetic.seed and its eval split data.synthetic.seed +
# 1_000_003, so with this (different, large) offset the feedback problems are not
# the stream's own records for any small seed.
_SYNTHETIC_SEED_OFFSET = 2_000_029


# --- records ---------------------------------------------------------------------------


def _final_of(answer: str) -> str | None:
  """The normalised final answer of a GSM8K solution (its last line, '#### x'), or None."""
  lines = answer.rstrip().splitlines()
  if not lines or not lines[-1].lstrip().startswith("####"):
    return None
  final = _FINAL_JUNK_RE.sub("", lines[-1].lstrip()[4:])
  return final or None


def load_gsm8k_jsonl(path: str, *, strip_calculator: bool = True) -> list[dict]:
  """GSM8K-format jsonl -> [{"question", "answer", "final"}], every line checked now.

  Blank lines are skipped. `final` is the text after the last line's '####' without
  commas, '$' and spaces. Errors name the file, the 1-based line and the reason.
  """
  if not paths.path(path).is_file():
    raise FileNotFoundError(f"feedback file {path!r}: no such file (expected GSM8K-format "
                            'jsonl: one {"question": ..., "answer": ...} object per line)')
  records = []
  with paths.path(path).open("rb") as f:
    for lineno, raw in enumerate(f, 1):
      where = f"{path}:{lineno}"
      try:
        line = raw.decode("utf-8")
      except UnicodeDecodeError as e:
        raise ValueError(f"{where}: not valid UTF-8 ({e})") from None
      if not line.strip():
        continue
      try:
        obj = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f"{where}: invalid JSON ({e.msg} at column {e.colno}); expected one "
                         "JSON object per line") from None
      if not isinstance(obj, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(obj).__name__}")
      for field in ("question", "answer"):
        if field not in obj:
          raise ValueError(f"{where}: missing field {field!r}; the record has fields "
                           f"{sorted(obj)}")
        if not isinstance(obj[field], str):
          raise ValueError(f"{where}: field {field!r} should be a string, got "
                           f"{type(obj[field]).__name__}")
      answer = obj["answer"]
      final = _final_of(answer)
      if final is None:
        raise ValueError(f"{where}: the answer does not end with a '#### <final answer>' line "
                         f"(no #### line): {answer[-80:]!r}")
      if strip_calculator:
        answer = _CALCULATOR_RE.sub("", answer)
      records.append({"question": obj["question"], "answer": answer, "final": final})
  if not records:
    raise ValueError(f"feedback file {path!r}: empty, no records (expected one JSON object "
                     "per line)")
  return records


def make_feedback_records(fb_cfg, exclude: frozenset[str] | set[str] = frozenset()) -> list[dict]:
  """The feedback set of a feedback_config(): num_examples {"question", "answer", "final"}.

  `exclude`: questions the set must not contain (earlier sets'); they are skipped, and the set
  takes the next records instead (synthetic: the next indices of its generator; a file: the next
  records of its seeded order, the set is smaller if the file runs out).
  """
  n = int(fb_cfg.num_examples)
  if n <= 0:
    raise ValueError(f"feedback.num_examples={n}: expected > 0")
  if fb_cfg.seed < 0:
    raise ValueError(f"feedback.seed={fb_cfg.seed}: expected >= 0")
  if fb_cfg.source == "gsm8k_jsonl":
    if not fb_cfg.path:
      raise ValueError("feedback.path is empty: feedback.source='gsm8k_jsonl' needs a file")
    records = load_gsm8k_jsonl(fb_cfg.path, strip_calculator=bool(fb_cfg.strip_calculator))
    # A prefix of one seeded permutation: a larger num_examples extends the set, and
    # a file with fewer records is used whole, in a seeded order.
    order = np.random.default_rng(int(fb_cfg.seed)).permutation(len(records))
    kept = [records[i] for i in order if records[i]["question"] not in exclude][:n]
    if not kept:
      raise ValueError(f"feedback file {fb_cfg.path!r}: every record is in an earlier feedback set")
    return kept
  if fb_cfg.source == "synthetic":
    # 'train' partition: the 'eval' hash bucket is reserved for the held-out test
    # problems of later evaluation, which the feedback set must not contain. Record i
    # depends on (seed, i) only, so the size is just an upper bound on the draws.
    limit = n + len(exclude) + 100_000
    data = synthetic_math.SyntheticMath(_SYNTHETIC_SEED_OFFSET + int(fb_cfg.seed), limit,
                                        partition="train")
    out = []
    for i in range(limit):
      if len(out) == n:
        return out
      r = data[i]
      if r["question"] not in exclude:
        out.append({"question": r["question"], "answer": r["answer"],
                    "final": _final_of(r["answer"])})
    raise ValueError(f"feedback.seed={fb_cfg.seed}: only {len(out)} of num_examples={n} synthetic problems "
                     f"in {limit} draws are not in an earlier feedback set")
  raise ValueError(f"feedback.source={fb_cfg.source!r}: expected one of {SOURCES}")


def feedback_set_records(fb_sets) -> dict[str, list[dict]]:
  """{name: records} of config_lib.feedback_sets(...) in order, each set without the questions of the
  sets before it (the first set is exactly make_feedback_records of its block)."""
  out, seen = {}, set()
  for fb_set in fb_sets:
    try:
      records = make_feedback_records(fb_set.config, exclude=seen)
    except ValueError as e:
      raise ValueError(f"config.{fb_set.field} (feedback set {fb_set.name!r}): {e}") from None
    out[fb_set.name] = records
    seen.update(r["question"] for r in records)
  return out


# --- tokenization ----------------------------------------------------------------------


def encode_feedback_example(tokenizer: Tokenizer, record: dict, seq_len: int, *,
                            index: int | None = None) -> tuple[np.ndarray, np.ndarray]:
  """(tokens [seq_len + 1] int32, answer_mask [seq_len] float32) of one record.

  tokens = [bos] + prompt + answer + [eos], right-padded with pad_id; the model
  reads tokens[:-1] and predicts tokens[1:], and answer_mask[t] = 1 where
  tokens[t + 1] is a solution token or eos. A solution that does not fit is
  truncated (the prompt is kept); a prompt leaving no room for one answer token
  is an error. `index` names the example in that error.
  """
  tokens, mask, _ = _encode(tokenizer, record, seq_len, index)
  return tokens, mask


def _encode(tokenizer, record, seq_len, index):
  """encode_feedback_example plus the number of unpadded tokens (pad_id may equal eos)."""
  prompt = synthetic_math.format_prompt(record["question"])
  # The LM stream's own encoding: same separator rule, prompt and answer encoded apart.
  toks, flags = pipeline.encode_example(tokenizer, {"prompt": prompt, "answer": record["answer"]})
  prompt_len = int(np.argmax(flags))  # bos + prompt (flags are 0 there, then all 1)
  if prompt_len > seq_len:
    # The first answer token is target prompt_len - 1 of seq_len: bos + prompt must fit.
    what = "feedback example" + (f" {index}" if index is not None else "")
    raise ValueError(f"{what}: bos + prompt are {prompt_len} tokens, which leaves no room for an "
                     f"answer token within feedback.seq_len={seq_len}; raise feedback.seq_len "
                     f"(question: {record['question'][:80]!r})")
  toks, flags = toks[:seq_len + 1], flags[:seq_len + 1]
  tokens = np.full(seq_len + 1, tokenizer.pad_id, np.int32)
  tokens[:len(toks)] = toks
  mask = np.zeros(seq_len, np.float32)
  mask[:len(toks) - 1] = flags[1:]
  return tokens, mask, len(toks)


# --- batches ---------------------------------------------------------------------------


class _Rows(grain.transforms.Map):
  """Example index -> its row of each pre-built [num_examples, seq_len] array."""

  def __init__(self, arrays: dict[str, np.ndarray]):
    self.arrays = arrays

  def map(self, index):
    return {k: v[int(index)] for k, v in self.arrays.items()}


def heldout_records(fb_cfg, split: str = "test") -> list[dict] | None:
  """Held-out downstream problems in the feedback format (never in the feedback set), or None.

  Synthetic: `feedback.num_eval` problems of the generator's `split` partition — 'test' (reported
  results) or 'validation' (choosing settings), the two disjoint halves of its held-out 'eval'
  bucket. GSM8K-format files: the first `feedback.num_eval` records of `feedback.eval_path`, when one
  is given (its own split; `split` does not apply).
  """
  n = int(fb_cfg.num_eval)
  if fb_cfg.source == "synthetic":
    data = synthetic_math.SyntheticMath(_SYNTHETIC_SEED_OFFSET + int(fb_cfg.seed), n, partition=split)
    return [{"question": r["question"], "answer": r["answer"], "final": _final_of(r["answer"])}
            for r in (data[i] for i in range(n))]
  if fb_cfg.eval_path:
    return load_gsm8k_jsonl(fb_cfg.eval_path, strip_calculator=bool(fb_cfg.strip_calculator))[:n]
  return None


def make_feedback_iterator(fb_cfg, tokenizer: Tokenizer, *, seed: int, process_index: int = 0,
                           process_count: int = 1, records: list[dict] | None = None) -> grain.DatasetIterator:
  """An infinite, checkpointable iterator of feedback batches for this process.

  Every epoch is a new seeded permutation of the feedback set (seeded by `seed` and
  feedback.seed). Process p takes elements p, p + P, ... of that global stream, in
  batches of feedback.batch_size // P rows, so the P local batches of a step
  together are exactly the batch a single process would read: the feedback data
  does not depend on the process count. Batches: dicts of numpy arrays
  [local_batch, feedback.seq_len] (inputs, targets int32; loss_mask float32;
  segment_ids 1 on real tokens, 0 on padding; positions 0.. on real tokens, 0 on
  padding). get_state()/set_state() and grain.checkpoint work as for the LM iterator.
  `records` replaces the feedback set (e.g. `heldout_records` for evaluation).
  """
  if process_count < 1 or not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index}, process_count={process_count}: expected "
                     "0 <= process_index < process_count")
  batch_size, seq_len = int(fb_cfg.batch_size), int(fb_cfg.seq_len)
  if batch_size <= 0 or batch_size % process_count:
    raise ValueError(f"feedback.batch_size={batch_size} (global) is not a positive multiple of "
                     f"the process count {process_count}")
  if seq_len < 2:
    raise ValueError(f"feedback.seq_len={seq_len}: expected >= 2")
  records = make_feedback_records(fb_cfg) if records is None else records
  # Tokenize the whole (small) set once: a too-long prompt fails here, before training,
  # and each batch is then a cheap lookup.
  tokens = np.empty((len(records), seq_len + 1), np.int32)
  masks = np.empty((len(records), seq_len), np.float32)
  lengths = np.empty(len(records), np.int64)
  for i, r in enumerate(records):
    tokens[i], masks[i], lengths[i] = _encode(tokenizer, r, seq_len, i)
  # Input position t is real when its target tokens[t + 1] is (padding is never a target).
  real = np.arange(seq_len)[None, :] < (lengths[:, None] - 1)
  arrays = {
      # The eos as an input predicts nothing: padding, like the rest of the row's tail.
      "inputs": np.where(real, tokens[:, :-1], tokenizer.pad_id).astype(np.int32),
      "targets": tokens[:, 1:].copy(),
      "loss_mask": masks,
      "segment_ids": real.astype(np.int32),
      "positions": np.where(real, np.arange(seq_len, dtype=np.int32), 0).astype(np.int32),
  }
  shuffle_seed = np.random.SeedSequence([int(seed), int(fb_cfg.seed)]).generate_state(1)[0]
  # Shuffle before repeat: grain then seeds each epoch's permutation anew (seed + epoch).
  ds = grain.MapDataset.range(len(records)).shuffle(seed=int(shuffle_seed)).repeat()
  ds = ds[process_index::process_count]
  ds = ds.map(_Rows(arrays))
  ds = ds.batch(batch_size // process_count, drop_remainder=True)
  # A lookup per row is cheap: reader threads would only add overhead and read-ahead.
  return iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)))


# --- the downstream loss ---------------------------------------------------------------
