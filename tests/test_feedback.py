"""Feedback set: GSM8K loading and its errors, synthetic records, encoding, iterator, loss."""

from __future__ import annotations

import json
import os
import re

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vpt.language import config_lib, losses
from vpt.language.data import feedback as fb, pipeline, synthetic_math as sm, tokenizer as tok_lib

from conftest import GSM8K_DIR, assert_batches_equal

GSM8K_TRAIN = os.path.join(GSM8K_DIR, "train.jsonl")


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
  return tok_lib.load_or_train_tokenizer(config_lib.data_config(),
                                         str(tmp_path_factory.mktemp("tok")))


@pytest.fixture(scope="module")
def gsm8k():
  return fb.load_gsm8k_jsonl(GSM8K_TRAIN)


def _fb_cfg(**overrides):
  c = config_lib.feedback_config()
  c.update(overrides)
  return c


def _take(it, n):
  return [next(it) for _ in range(n)]


def _rows(batches):
  """Each row's inputs as a hashable key."""
  return [tuple(r) for b in batches for r in b["inputs"]]


# --- GSM8K -----------------------------------------------------------------------------


def test_load_real_gsm8k_train(gsm8k):
  assert len(gsm8k) == 7473
  assert all(r.keys() == {"question", "answer", "final"} for r in gsm8k)
  assert not any("<<" in r["answer"] or ">>" in r["answer"] for r in gsm8k)
  with open(GSM8K_TRAIN, encoding="utf-8") as f:
    raw = [json.loads(line) for line in f]
  for r, w in zip(gsm8k, raw):
    assert r["question"] == w["question"]
    assert r["final"] == re.sub(r"[,$\s]", "", w["answer"].split("####")[-1])
    assert r["final"] and r["answer"].rstrip().endswith(w["answer"].split("####")[-1].strip())
  # The annotation is removed, the text around it kept.
  assert gsm8k[0]["answer"].startswith("Natalia sold 48/2 = 24 clips in May.\n")
  assert "<<48/2=24>>" in fb.load_gsm8k_jsonl(GSM8K_TRAIN, strip_calculator=False)[0]["answer"]


def test_gsm8k_sampling():
  make = lambda **kw: fb.make_feedback_records(_fb_cfg(source="gsm8k_jsonl", path=GSM8K_TRAIN,
                                                       **kw))
  a, b, c = make(seed=0), make(seed=0), make(seed=1)
  assert len(a) == 1024 and a == b  # The paper's default: 1,024 training solutions.
  qs = [r["question"] for r in a]
  assert len(set(qs)) == 1024  # Without replacement.
  assert set(qs) != {r["question"] for r in c}
  # Asking for more than the file has: all of it, in a seeded order.
  everything = make(num_examples=10_000, seed=3)
  assert len(everything) == 7473 and everything != fb.load_gsm8k_jsonl(GSM8K_TRAIN)
  assert sorted(r["question"] for r in everything) == sorted(
      r["question"] for r in fb.load_gsm8k_jsonl(GSM8K_TRAIN))


def _write(path, lines):
  path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
  return str(path)


_GOOD = json.dumps({"question": "What is 1 + 1?", "answer": "1 + 1 = <<1+1=2>>2\n#### 2"})


@pytest.mark.parametrize("lines,line,reason", [
    ([_GOOD, "{not json"], 2, "invalid JSON"),
    ([_GOOD, "", "[1, 2]"], 3, "expected a JSON object, got list"),
    ([json.dumps({"answer": "#### 1"})], 1, "missing field 'question'"),
    ([_GOOD, json.dumps({"question": "q"})], 2, "missing field 'answer'"),
    ([json.dumps({"question": 3, "answer": "#### 1"})], 1, "field 'question' should be a string"),
    ([_GOOD, _GOOD, json.dumps({"question": "q", "answer": ["#### 1"]})], 3,
     "field 'answer' should be a string"),
    ([_GOOD, json.dumps({"question": "q", "answer": "It is 4."})], 2, "no #### line"),
    ([json.dumps({"question": "q", "answer": "It is 4.\n#### $ "})], 1, "no #### line"),
])
def test_gsm8k_errors_name_file_line_and_reason(tmp_path, lines, line, reason):
  path = _write(tmp_path / "bad.jsonl", lines)
  with pytest.raises(ValueError) as e:
    fb.load_gsm8k_jsonl(path)
  assert f"{path}:{line}:" in str(e.value) and reason in str(e.value)


def test_gsm8k_missing_and_empty_files(tmp_path):
  missing = str(tmp_path / "nope.jsonl")
  with pytest.raises(FileNotFoundError, match=re.escape(missing) + ".*no such file"):
    fb.load_gsm8k_jsonl(missing)
  empty = _write(tmp_path / "empty.jsonl", ["", "  "])
  with pytest.raises(ValueError, match=re.escape(empty) + ".*empty, no records"):
    fb.load_gsm8k_jsonl(empty)
  with pytest.raises(ValueError, match="feedback.path is empty"):
    fb.make_feedback_records(_fb_cfg(source="gsm8k_jsonl"))
  with pytest.raises(ValueError, match="feedback.source='nope'"):
    fb.make_feedback_records(_fb_cfg(source="nope"))
  # The config check names the field before anything is read.
  cfg = config_lib.base_config()
  cfg.feedback.source = "gsm8k_jsonl"
  with pytest.raises(ValueError, match=r"config.feedback.path=''"):
    config_lib.validate(cfg)


# --- synthetic -------------------------------------------------------------------------


def test_synthetic_feedback_records():
  a = fb.make_feedback_records(_fb_cfg(num_examples=300))
  assert a == fb.make_feedback_records(_fb_cfg(num_examples=300))
  assert len(a) == 300 and len({r["question"] for r in a}) > 290
  for r in a:
    assert r.keys() == {"question", "answer", "final"}
    assert r["final"] == str(sm.final_answer(r["answer"]))
    assert r["answer"].splitlines()[-1] == f"#### {r['final']}"
  assert a != fb.make_feedback_records(_fb_cfg(num_examples=300, seed=1))
  # Never a held-out test problem, whatever seed the eval set is drawn with.
  held_out = set()
  for seed in (0, 1, 1_000_003, fb._SYNTHETIC_SEED_OFFSET):
    held_out |= {r["question"] for r in sm.SyntheticMath(seed, 500, partition="eval")}
  assert not held_out & {r["question"] for r in a}
  # Not the LM stream's own records (data.synthetic.seed = 0).
  stream = sm.SyntheticMath(0, 300, partition="train")
  assert not any(r["question"] == stream[i]["question"] for i, r in enumerate(a))


# --- encoding --------------------------------------------------------------------------


def _prompt_len(tokenizer, record):
  return 1 + len(tokenizer.encode(sm.format_prompt(record["question"])))


def test_encoding_masks_exactly_the_solution(tokenizer, gsm8k):
  rec = gsm8k[0]
  seq_len = 300
  tokens, mask = fb.encode_feedback_example(tokenizer, rec, seq_len)
  assert tokens.shape == (seq_len + 1,) and tokens.dtype == np.int32
  assert mask.shape == (seq_len,) and mask.dtype == np.float32
  # The same tokens as the LM stream's encoding of this prompt/answer record.
  lm, _ = pipeline.encode_example(tokenizer, {"prompt": sm.format_prompt(rec["question"]),
                                              "answer": rec["answer"]})
  n = len(lm)
  assert np.array_equal(tokens[:n], lm) and (tokens[n:] == tokenizer.pad_id).all()
  targets, p = tokens[1:], _prompt_len(tokenizer, rec)
  assert tokens[0] == tokenizer.bos_id
  assert tokenizer.decode(tokens[1:p]) == sm.format_prompt(rec["question"])
  # Ones exactly on solution tokens and eos: targets p-1 .. n-2.
  assert set(np.unique(mask)) == {0.0, 1.0}
  assert np.array_equal(np.flatnonzero(mask), np.arange(p - 1, n - 1))
  answer = targets[mask == 1]
  assert answer[-1] == tokenizer.eos_id
  assert tokenizer.decode(answer[:-1]) == sm.ANSWER_SEP + rec["answer"]


def test_encoding_truncates_the_solution_and_keeps_the_prompt(tokenizer, gsm8k):
  rec = gsm8k[0]
  p = _prompt_len(tokenizer, rec)
  full, _ = fb.encode_feedback_example(tokenizer, rec, 400)
  for keep in (3, 1):  # prompt + 3 answer tokens; the prompt exactly fits (1 answer token).
    tokens, mask = fb.encode_feedback_example(tokenizer, rec, p - 1 + keep)
    assert np.array_equal(tokens, full[:p + keep])  # No padding, no eos: cut mid-solution.
    assert mask.sum() == keep and np.array_equal(np.flatnonzero(mask), np.arange(p - 1, p - 1 + keep))
    assert (sm.ANSWER_SEP + rec["answer"]).startswith(tokenizer.decode(tokens[p:]))
  with pytest.raises(ValueError, match=r"feedback example 7: .*feedback.seq_len=" + str(p - 1)):
    fb.encode_feedback_example(tokenizer, rec, p - 1, index=7)


def test_iterator_names_the_example_whose_prompt_does_not_fit(tokenizer):
  records = fb.make_feedback_records(_fb_cfg(num_examples=64))
  lens = [_prompt_len(tokenizer, r) for r in records]
  i = int(np.argmax(lens))  # The first of the longest prompts: the first that does not fit.
  seq_len = lens[i] - 1
  with pytest.raises(ValueError, match=rf"feedback example {i}: .*feedback.seq_len={seq_len}"):
    fb.make_feedback_iterator(_fb_cfg(num_examples=64, seq_len=seq_len), tokenizer, seed=0)


# --- iterator --------------------------------------------------------------------------


def test_iterator_batches(tokenizer):
  cfg = _fb_cfg(num_examples=64, batch_size=8, seq_len=128)
  b = next(fb.make_feedback_iterator(cfg, tokenizer, seed=0))
  dtypes = {"inputs": np.int32, "targets": np.int32, "loss_mask": np.float32,
            "segment_ids": np.int32, "positions": np.int32}
  assert b.keys() == dtypes.keys()
  for k, dt in dtypes.items():
    assert b[k].shape == (8, 128) and b[k].dtype == dt, k
  for inp, tgt, mask, seg, pos in zip(*(b[k] for k in dtypes)):
    n = int(seg.sum())
    assert 0 < n < 128 and (seg[:n] == 1).all()  # Real tokens, then padding.
    assert np.array_equal(pos[:n], np.arange(n)) and (pos[n:] == 0).all()
    assert inp[0] == tokenizer.bos_id and tgt[n - 1] == tokenizer.eos_id
    assert np.array_equal(inp[1:n], tgt[:n - 1])
    assert (inp[n:] == tokenizer.pad_id).all() and (tgt[n:] == tokenizer.pad_id).all()
    assert mask[n - 1] == 1 and (mask[n:] == 0).all() and mask[0] == 0


def test_iterator_on_gsm8k(tokenizer):
  cfg = _fb_cfg(source="gsm8k_jsonl", path=GSM8K_TRAIN, seq_len=512, batch_size=4)
  b = next(fb.make_feedback_iterator(cfg, tokenizer, seed=0))
  assert b["inputs"].shape == (4, 512) and b["loss_mask"].sum() > 0


def test_iterator_state_round_trip_and_reshuffle(tokenizer):
  cfg = _fb_cfg(num_examples=10, batch_size=5, seq_len=128)
  make = lambda seed=0: fb.make_feedback_iterator(cfg, tokenizer, seed=seed)
  it = make()
  first = _take(it, 2)
  state = json.loads(json.dumps(it.get_state()))  # JSON-serialisable.
  after = _take(it, 2)
  assert_batches_equal(_take(make(), 2), first)
  restored = make()
  restored.set_state(state)
  assert_batches_equal(_take(restored, 2), after)
  # Infinite; every epoch (2 batches) is a new permutation of the 10 examples.
  epochs = [_rows(b) for b in (first, after, _take(it, 2))]
  assert sorted(epochs[0]) == sorted(epochs[1]) == sorted(epochs[2]) and len(set(epochs[0])) == 10
  assert epochs[0] != epochs[1] and epochs[1] != epochs[2]
  assert _rows(_take(make(seed=1), 2)) != epochs[0]


def test_iterator_orbax_checkpoint(tmp_path, tokenizer):
  import orbax.checkpoint as ocp

  make = lambda: fb.make_feedback_iterator(_fb_cfg(num_examples=20, batch_size=4, seq_len=128),
                                           tokenizer, seed=0)
  it = make()
  _take(it, 3)
  with ocp.CheckpointManager(str(tmp_path / "ckpt"), item_names=("feedback",)) as mgr:
    mgr.save(3, args=ocp.args.Composite(feedback=grain.checkpoint.CheckpointSave(it)))
    mgr.wait_until_finished()
    after = _take(it, 3)
    fresh = make()
    mgr.restore(3, args=ocp.args.Composite(feedback=grain.checkpoint.CheckpointRestore(fresh)))
  assert_batches_equal(_take(fresh, 3), after)


def test_process_sharding(tokenizer):
  cfg = _fb_cfg(num_examples=12, batch_size=4, seq_len=128)
  single = _take(fb.make_feedback_iterator(cfg, tokenizer, seed=0), 6)  # 2 epochs
  local = [_take(fb.make_feedback_iterator(cfg, tokenizer, seed=0, process_index=p,
                                           process_count=2), 6) for p in range(2)]
  assert all(b["inputs"].shape == (2, 128) for b in local[0] + local[1])
  for epoch in (slice(0, 3), slice(3, 6)):
    rows0, rows1 = _rows(local[0][epoch]), _rows(local[1][epoch])
    assert not set(rows0) & set(rows1) and len(set(rows0 + rows1)) == 12
  # Together the local batches of a step are the single-process batch (interleaved).
  for k in range(6):
    both = [r for pair in zip(_rows([local[0][k]]), _rows([local[1][k]])) for r in pair]
    assert both == _rows([single[k]])
  with pytest.raises(ValueError, match=r"feedback.batch_size=4 .*multiple of the process count 3"):
    fb.make_feedback_iterator(cfg, tokenizer, seed=0, process_index=0, process_count=3)


# --- downstream loss -------------------------------------------------------------------


def _reference_nll(logits, targets, mask):
  per_example = []
  for i in range(logits.shape[0]):
    nlls = []
    for t in range(logits.shape[1]):
      if mask[i, t]:
        z = logits[i, t] - logits[i, t].max()
        nlls.append(-(z[targets[i, t]] - np.log(np.exp(z).sum())))
    if nlls:
      per_example.append(sum(nlls) / len(nlls))
  return sum(per_example) / len(per_example)


def test_downstream_nll_matches_float64_reference(x64):
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(4, 6, 11)) * 3
  targets = rng.integers(0, 11, size=(4, 6))
  mask = np.zeros((4, 6))
  mask[0, 2:5] = 1
  mask[1, 5] = 1  # One answer token: weighs as much as row 0's three.
  mask[3, 1:] = 1  # Row 2 has no answer tokens: excluded, not a zero in the mean.
  logits[2, 0, targets[2, 0]] = -np.inf  # ...and a -inf there must not leak a NaN.
  loss = jax.jit(losses.downstream_nll)(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(mask))
  assert loss.dtype == jnp.float64
  np.testing.assert_allclose(float(loss), _reference_nll(logits, targets, mask), rtol=1e-12)
  grad = jax.grad(losses.downstream_nll)(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(mask))
  assert np.isfinite(np.asarray(grad)).all() and not np.asarray(grad[2]).any()
  # No answer tokens at all: 0, not NaN.
  assert float(losses.downstream_nll(jnp.asarray(logits), jnp.asarray(targets),
                                 jnp.zeros((4, 6)))) == 0.0


def test_downstream_nll_float32_and_bfloat16():
  rng = np.random.default_rng(1)
  logits = rng.normal(size=(3, 5, 7)).astype(np.float32)
  targets = rng.integers(0, 7, size=(3, 5))
  mask = (rng.random((3, 5)) < 0.6).astype(np.float32)
  ref = _reference_nll(logits.astype(np.float64), targets, mask)
  loss = losses.downstream_nll(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(mask))
  assert loss.dtype == jnp.float32
  np.testing.assert_allclose(float(loss), ref, rtol=1e-5)
  loss16 = losses.downstream_nll(jnp.asarray(logits, jnp.bfloat16), jnp.asarray(targets),
                             jnp.asarray(mask))
  assert loss16.dtype == jnp.float32  # Upcast: the loss itself is never bfloat16.
  np.testing.assert_allclose(float(loss16), ref, rtol=2e-2)
