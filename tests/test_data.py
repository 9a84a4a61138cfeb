"""Data pipeline: synthetic generator, sources and their errors, tokenizer, packing, state."""

from __future__ import annotations

import json
import os

import grain
import numpy as np
import pytest

from conftest import assert_batches_equal, packed_segments
from vpt.language import config_lib
from vpt.language.data import pipeline, sources, synthetic_math as sm, tokenizer as tok_lib


def _cfg(**overrides):
  c = config_lib.data_config()
  for k, v in overrides.items():
    node = c
    *parents, leaf = k.split("__")
    for p in parents:
      node = node[p]
    node[leaf] = v
  return c


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
  # Small and fast; byte fallback still covers every character of the test corpora.
  cfg = _cfg(vocab_size=400, tokenizer_train_examples=1000)
  return tok_lib.load_or_train_tokenizer(cfg, str(tmp_path_factory.mktemp("tok")))


def _write_jsonl(path, rows):
  with open(path, "w", encoding="utf-8") as f:
    for r in rows:
      f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
  return str(path)


@pytest.fixture
def qa_corpus(tmp_path):
  """40 distinct prompt/answer records of varied length (and a blank line)."""
  rng = np.random.default_rng(0)
  rows = []
  for i in range(40):
    words = " ".join(["apple", "pear", "plum"][j % 3] for j in range(int(rng.integers(1, 8))))
    rows.append({"q": f"Question: what is {i} plus {words}?\nAnswer:",
                 "a": f"It is {i + 1}.\n#### {i + 1}", "id": i})
  path = tmp_path / "qa.jsonl"
  _write_jsonl(path, rows[:20] + [""] + rows[20:])
  return str(path), rows


def _take(it, n):
  return [next(it) for _ in range(n)]


def _all(it):
  return list(it)


# --- synthetic generator ---------------------------------------------------------------


def test_synthetic_is_deterministic_and_random_access():
  a, b = sm.SyntheticMath(3, 10**9), sm.SyntheticMath(3, 10**9)
  idx = [5, 0, 123_456_789, 7, 5]
  assert [a[i] for i in idx] == [b[i] for i in reversed(idx)][::-1]
  assert [a[i] for i in range(50)] == [b[i] for i in range(50)]
  assert [a[i] for i in range(50)] != [sm.SyntheticMath(4, 10**9)[i] for i in range(50)]
  with pytest.raises(IndexError):
    sm.SyntheticMath(0, 10)[10]


def test_synthetic_format_and_arithmetic():
  ds = sm.SyntheticMath(0, 3000)
  ops, n_steps, answers = set(), set(), set()
  for i in range(len(ds)):
    r = ds[i]
    assert set(r) == {"question", "answer"}
    assert r["question"].endswith("?")
    lines = r["answer"].split("\n")
    assert lines[-1].startswith("#### ")
    final = sm.final_answer(r["answer"])
    assert final is not None and lines[-1] == f"#### {final}"
    eqs = sm.extract_equations(r["answer"])
    assert len(eqs) == len(lines) - 1  # One fact per reasoning line.
    for a, op, b, c in eqs:
      assert sm.evaluate(a, op, b) == c, (i, a, op, b, c)
      assert max(a, b, c) < 1000  # Small numbers a tiny LM can learn.
      ops.add(op)
    assert eqs[-1][3] == final
    n_steps.add(len(eqs))
    answers.add(final)
  assert ops == {"+", "-", "*", "/"}
  assert n_steps == {1, 2, 3, 4}
  assert len(sm.TEMPLATES) >= 8 and len(answers) > 100
  prompt = sm.format_prompt("How many?")
  assert prompt == "Question: How many?\nAnswer:"
  assert sm.final_answer("x\n#### 1,234") == 1234 and sm.final_answer("no answer") is None


def test_synthetic_irrelevant_filler():
  ds = sm.SyntheticMath(0, 2000, irrelevant_fraction=0.25)
  recs = [ds[i] for i in range(len(ds))]
  text = [r for r in recs if "text" in r]
  assert 0.2 < len(text) / len(recs) < 0.3
  assert all(set(r) == {"text"} and r["text"] and "####" not in r["text"] for r in text)
  assert all("####" in r["answer"] for r in recs if "answer" in r)


def test_synthetic_validation_and_test_split_the_eval_partition():
  val = {sm.SyntheticMath(s, 300, partition="validation")[i]["question"] for s in (0, 1) for i in range(300)}
  test = {sm.SyntheticMath(s, 300, partition="test")[i]["question"] for s in (0, 1) for i in range(300)}
  heldout = {sm.SyntheticMath(0, 2000, partition="eval")[i]["question"] for i in range(2000)}
  train = {sm.SyntheticMath(0, 3000, partition="train")[i]["question"] for i in range(3000)}
  assert len(val) > 400 and len(test) > 400 and not val & test and not (val | test) & train
  # both halves are drawn from the eval bucket (a sample of it overlaps each)
  assert val & heldout and test & heldout


def test_synthetic_train_and_eval_partitions_are_disjoint():
  train = sm.SyntheticMath(0, 3000, partition="train")
  ev = sm.SyntheticMath(0, 400, partition="eval")
  train_q = {train[i]["question"] for i in range(len(train))}
  eval_q = {ev[i]["question"] for i in range(len(ev))}
  assert len(eval_q) > 390 and not train_q & eval_q
  # The configured eval split is that partition (pure math, own seed).
  cfg = _cfg(synthetic__irrelevant_fraction=0.5)
  src = sources.make_source(cfg, "eval")
  assert len(src) == cfg.synthetic.num_eval
  assert all(src[i]["prompt"].startswith("Question: ") for i in range(50))


def test_write_gsm8k_jsonl(tmp_path):
  path = sm.write_gsm8k_jsonl(str(tmp_path / "sub" / "fb.jsonl"), seed=1, size=30)
  rows = [json.loads(line) for line in open(path, encoding="utf-8")]
  assert rows == [sm.SyntheticMath(1, 30)[i] for i in range(30)]
  src = sources.make_source(_cfg(source="jsonl", train_path=path, prompt_field="question",
                                 answer_field="answer"), "train")
  assert len(src) == 30 and src[0] == {"prompt": rows[0]["question"], "answer": rows[0]["answer"]}


# --- sources and their errors ------------------------------------------------------------


def test_jsonl_and_text_sources(tmp_path, qa_corpus):
  path, rows = qa_corpus
  src = sources.make_source(_cfg(source="jsonl", train_path=path, prompt_field="q",
                                 answer_field="a"), "train")
  assert len(src) == 40
  assert src[25] == {"prompt": rows[25]["q"], "answer": rows[25]["a"]}
  assert src.describe(25) == f"{path}:27"  # The blank line 21 is skipped, not counted.
  # Globs and comma lists, in sorted order; text_field mode.
  for k in range(2):
    _write_jsonl(tmp_path / f"t{k}.jsonl", [{"text": f"doc {k}.{j}"} for j in range(3)])
  src = sources.make_source(_cfg(source="jsonl", train_path=str(tmp_path / "t*.jsonl")), "train")
  assert [src[i]["text"] for i in range(6)] == [f"doc {k}.{j}" for k in range(2) for j in range(3)]
  # Sources are cached by config and file state: an eval iterator per evaluation is cheap.
  cfg = _cfg(source="jsonl", train_path=str(tmp_path / "t*.jsonl"))
  assert sources.make_source(cfg, "train") is src
  _write_jsonl(tmp_path / "t1.jsonl", [{"text": "changed"}])
  assert [sources.make_source(cfg, "train")[i]["text"] for i in range(4)] == [
      "doc 0.0", "doc 0.1", "doc 0.2", "changed"]
  (tmp_path / "a.txt").write_text("first doc\n\n  \nsecond doc\r\nthird ünï doc\n", "utf-8")
  src = sources.make_source(_cfg(source="text", train_path=str(tmp_path / "a.txt"),
                                 eval_path=str(tmp_path / "a.txt")), "eval")
  assert [src[i] for i in range(len(src))] == [
      {"text": "first doc"}, {"text": "second doc"}, {"text": "third ünï doc"}]


def test_source_errors_name_file_line_and_field(tmp_path):
  missing = str(tmp_path / "nope.jsonl")
  with pytest.raises(FileNotFoundError, match=r"data.train_path='.*nope.jsonl': no file matches"):
    sources.make_source(_cfg(source="jsonl", train_path=missing), "train")
  with pytest.raises(FileNotFoundError, match=r"data.eval_path=.*no file matches"):
    sources.make_source(_cfg(source="text", train_path=missing,
                             eval_path=str(tmp_path / "*.txt")), "eval")
  with pytest.raises(ValueError, match=r"data.eval_path is empty"):
    sources.make_source(_cfg(source="jsonl", train_path=missing), "eval")

  empty = _write_jsonl(tmp_path / "empty.jsonl", ["", "   "])
  with pytest.raises(ValueError, match=r"empty\.jsonl.*empty corpus"):
    sources.make_source(_cfg(source="jsonl", train_path=empty), "train")
  (tmp_path / "empty.txt").write_text("\n\n", "utf-8")
  with pytest.raises(ValueError, match=r"empty corpus"):
    sources.make_source(_cfg(source="text", train_path=str(tmp_path / "empty.txt")), "train")

  bad = _write_jsonl(tmp_path / "bad.jsonl", [{"text": "ok"}, {"text": "ok"}, '{"text": "x",}'])
  with pytest.raises(ValueError, match=rf"{bad}:3: invalid JSON"):
    sources.make_source(_cfg(source="jsonl", train_path=bad), "train")
  not_obj = _write_jsonl(tmp_path / "list.jsonl", [{"text": "ok"}, "[1, 2]"])
  with pytest.raises(ValueError, match=rf"{not_obj}:2: expected a JSON object, got list"):
    sources.make_source(_cfg(source="jsonl", train_path=not_obj), "train")
  no_field = _write_jsonl(tmp_path / "nf.jsonl", [{"text": "ok"}, {"body": "x"}])
  with pytest.raises(ValueError, match=rf"{no_field}:2: missing field 'text' \(data.text_field\)"):
    sources.make_source(_cfg(source="jsonl", train_path=no_field), "train")
  qa = _write_jsonl(tmp_path / "qa.jsonl", [{"q": "a", "a": "b"}, {"q": "a", "ans": "b"}])
  with pytest.raises(ValueError, match=rf"{qa}:2: missing field 'a' \(data.answer_field\)"):
    sources.make_source(_cfg(source="jsonl", train_path=qa, prompt_field="q", answer_field="a"),
                        "train")
  wrong_type = _write_jsonl(tmp_path / "wt.jsonl", [{"text": 3}])
  with pytest.raises(ValueError, match=rf"{wrong_type}:1: field 'text' .*should be a string"):
    sources.make_source(_cfg(source="jsonl", train_path=wrong_type), "train")


# --- tokenizer ------------------------------------------------------------------------------


def test_tokenizer_is_cached_and_deterministic(tmp_path, monkeypatch):
  cfg = _cfg(vocab_size=350, tokenizer_train_examples=500)
  t1 = tok_lib.load_or_train_tokenizer(cfg, str(tmp_path / "a"))
  t2 = tok_lib.load_or_train_tokenizer(cfg, str(tmp_path / "b"))
  pieces = lambda t: [t.id_to_piece(i) for i in range(t.vocab_size)]
  assert pieces(t1) == pieces(t2) and t1.proto == t2.proto
  cached = tmp_path / "a" / "tokenizer" / "spm.model"
  assert cached.exists() and not list(cached.parent.glob("*.tmp*"))

  def no_training(*a, **k):
    raise AssertionError("retrained although a cached model exists")

  monkeypatch.setattr(tok_lib, "train_sentencepiece", no_training)
  t3 = tok_lib.load_or_train_tokenizer(cfg, str(tmp_path / "a"))
  assert t3.proto == t1.proto
  with pytest.raises(ValueError, match=r"trained with vocab_size=350 but data.vocab_size=300"):
    tok_lib.load_or_train_tokenizer(_cfg(vocab_size=300), str(tmp_path / "a"))
  # An explicit tokenizer_path is loaded as is; a missing one is a clear error.
  assert tok_lib.load_or_train_tokenizer(_cfg(tokenizer_path=str(cached)), "/unused").proto == t1.proto
  with pytest.raises(FileNotFoundError, match=r"data.tokenizer_path='.*missing.model': no such"):
    tok_lib.load_or_train_tokenizer(_cfg(tokenizer_path=str(tmp_path / "missing.model")), "/x")


def test_tokenizer_round_trip_and_digits(tokenizer):
  assert (tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id) == (0, 2, 3)
  text = "Question: Tom has 1234 pens.\nAnswer:  12 * 3 = 36\n#### 36 — ünïcödé 漢"
  ids = tokenizer.encode(text)
  assert tokenizer.decode(ids) == text
  digit_pieces = [tokenizer.id_to_piece(i) for i in tokenizer.encode("98765")]
  assert digit_pieces == list("98765")
  import pickle
  assert pickle.loads(pickle.dumps(tokenizer)).encode(text) == ids


# --- packing --------------------------------------------------------------------------------


def test_packing_invariants(qa_corpus, tokenizer):
  path, rows = qa_corpus
  cfg = _cfg(source="jsonl", train_path=path, eval_path=path, prompt_field="q", answer_field="a")
  seq_len, batch = 96, 4
  batches = _all(pipeline.make_lm_iterator(cfg, tokenizer, split="eval", global_batch_size=batch,
                                           seq_len=seq_len, seed=0))
  for b in batches:
    assert set(b) == {"inputs", "targets", "loss_mask", "segment_ids", "positions", "domain_ids"}
    for k, dt in [("inputs", np.int32), ("targets", np.int32), ("loss_mask", np.float32),
                  ("segment_ids", np.int32), ("positions", np.int32), ("domain_ids", np.int32)]:
      assert b[k].shape == (batch, seq_len) and b[k].dtype == dt, k
    for r in range(batch):
      seg, pos = b["segment_ids"][r], b["positions"][r]
      n = int((seg > 0).sum())
      assert (seg[n:] == 0).all()  # Padding only at the end of a row...
      assert (b["domain_ids"][r][n:] == -1).all() and (b["domain_ids"][r][:n] == 0).all()  # one domain, 0
      assert (b["loss_mask"][r][n:] == 0).all() and (b["inputs"][r][n:] == 0).all()
      ids = seg[:n]
      assert ids[0] == 1 if n else True
      assert set(np.diff(ids)) <= {0, 1}  # ...segments numbered 1, 2, 3, ...
      for s in range(1, seg.max() + 1):
        m = np.flatnonzero(seg == s)
        assert np.array_equal(pos[m], np.arange(len(m)))  # Positions restart per example.
        # Within a segment, targets are the inputs shifted by one.
        assert np.array_equal(b["targets"][r][m[:-1]], b["inputs"][r][m[1:]])
  # Every example appears exactly once, whole and in order, with the loss on its
  # answer tokens and eos only (bos/prompt and the example boundary are masked).
  expected = {}
  for row in rows:
    rec = {"prompt": row["q"], "answer": row["a"]}
    toks, flags = pipeline.encode_example(tokenizer, rec)
    assert tokenizer.decode(toks) == sources.record_text(rec)
    expected[tuple(toks)] = flags
  seen = []
  for inp, tgt, mask in packed_segments(batches):
    toks = tuple(np.concatenate([inp, tgt[-1:]]))
    assert toks[0] == tokenizer.bos_id and toks[-1] == tokenizer.eos_id
    assert np.array_equal(mask, expected[toks][1:])
    n_prompt = len(tokenizer.encode(tokenizer.decode(toks).split("\nAnswer:")[0] + "\nAnswer:"))
    assert (mask[:n_prompt] == 0).all() and (mask[n_prompt:] == 1).all()
    seen.append(toks)
  assert sorted(seen) == sorted(expected)
  assert max(b["segment_ids"].max() for b in batches) >= 2  # Rows really hold several examples.
  # The padded last batch exists only once, then the single eval pass ends.
  assert len(batches) >= 40 * 20 // (batch * seq_len)


def test_text_records_have_loss_everywhere(tmp_path, tokenizer):
  docs = [f"document number {i} " + "word " * (i % 7) for i in range(20)]
  (tmp_path / "d.txt").write_text("\n".join(docs) + "\n", "utf-8")
  cfg = _cfg(source="text", train_path=str(tmp_path / "d.txt"), eval_path=str(tmp_path / "d.txt"))
  batches = _all(pipeline.make_lm_iterator(cfg, tokenizer, split="eval", global_batch_size=2,
                                           seq_len=64, seed=0))
  segs = packed_segments(batches)
  assert sorted(tokenizer.decode(np.concatenate([i, t[-1:]])) for i, t, _ in segs) == sorted(docs)
  assert all((m == 1).all() for _, _, m in segs)
  for b in batches:
    assert np.array_equal(b["loss_mask"] > 0, b["segment_ids"] > 0)


def test_too_long_example(tmp_path, tokenizer):
  rows = [{"text": "short"}, {"text": "also short"}, {"text": "much longer text " * 20}]
  path = _write_jsonl(tmp_path / "long.jsonl", rows)
  cfg = _cfg(source="jsonl", train_path=path, eval_path=path)
  n_tok = len(tokenizer.encode(rows[2]["text"])) + 2
  it = pipeline.make_lm_iterator(cfg, tokenizer, split="eval", global_batch_size=2, seq_len=16,
                                 seed=0)
  with pytest.raises(ValueError, match=(rf"example 2 \({path}:3\) has {n_tok} tokens.*"
                                        r"data.seq_len \+ 1 = 17.*truncate_long_examples")):
    _all(it)
  cfg.truncate_long_examples = True
  batches = _all(pipeline.make_lm_iterator(cfg, tokenizer, split="eval", global_batch_size=2,
                                           seq_len=16, seed=0))
  lengths = sorted(len(i) for i, _, _ in packed_segments(batches))
  assert lengths[-1] == 16 and len(lengths) == 3


# --- state, sharding, epochs -----------------------------------------------------------


def test_iterator_state_round_trip(tokenizer):
  cfg = _cfg(synthetic__irrelevant_fraction=0.3)
  make = lambda: pipeline.make_lm_iterator(cfg, tokenizer, split="train", global_batch_size=8,
                                           seq_len=256, seed=0)
  it = make()
  first = _take(it, 3)
  state = json.loads(json.dumps(it.get_state()))  # JSON-serialisable.
  after = _take(it, 3)
  fresh = make()
  assert_batches_equal(_take(fresh, 3), first)  # Deterministic from the start too.
  restored = make()
  restored.set_state(state)
  assert_batches_equal(_take(restored, 3), after)
  # Another seed gives another order.
  other = pipeline.make_lm_iterator(cfg, tokenizer, split="train", global_batch_size=8,
                                    seq_len=256, seed=1)
  assert not np.array_equal(next(other)["inputs"], first[0]["inputs"])


def test_state_round_trip_across_epochs_and_reshuffle(qa_corpus, tokenizer):
  path, _ = qa_corpus
  cfg = _cfg(source="jsonl", train_path=path, prompt_field="q", answer_field="a")
  make = lambda: pipeline.make_lm_iterator(cfg, tokenizer, split="train", global_batch_size=2,
                                           seq_len=64, seed=3)
  it = make()
  _take(it, 9)
  state = it.get_state()
  after = _take(it, 12)  # Crosses into the next epochs (40 short records per epoch).
  restored = make()
  restored.set_state(state)
  assert_batches_equal(_take(restored, 12), after)
  # Each epoch is a new permutation of the same records.
  ds = pipeline.make_lm_dataset(cfg, tokenizer, split="train", global_batch_size=2, seq_len=64,
                                seed=3, num_epochs=2)
  segs = [tuple(np.concatenate([i, t[-1:]])) for i, t, _ in packed_segments(list(ds))]
  assert len(segs) == 80
  assert sorted(segs[:40]) == sorted(segs[40:]) and segs[:40] != segs[40:]


def test_orbax_checkpoint_of_iterator(tmp_path, tokenizer):
  import jax.numpy as jnp
  import orbax.checkpoint as ocp

  make = lambda: pipeline.make_lm_iterator(_cfg(), tokenizer, split="train", global_batch_size=4,
                                           seq_len=256, seed=0)
  mgr = ocp.CheckpointManager(
      str(tmp_path / "ckpt"), item_names=("state", "data"),
      options=ocp.CheckpointManagerOptions(max_to_keep=2, enable_async_checkpointing=True))
  it = make()
  _take(it, 2)
  mgr.save(2, args=ocp.args.Composite(state=ocp.args.StandardSave({"w": jnp.ones(3)}),
                                      data=grain.checkpoint.CheckpointSave(it)))
  after = _take(it, 3)  # Advancing during the async save must not change what was saved.
  mgr.wait_until_finished()
  fresh = make()
  out = mgr.restore(2, args=ocp.args.Composite(state=ocp.args.StandardRestore({"w": jnp.zeros(3)}),
                                               data=grain.checkpoint.CheckpointRestore(fresh)))
  assert out["data"] is fresh
  assert_batches_equal(_take(fresh, 3), after)
  assert os.path.exists(tmp_path / "ckpt" / "2" / "data" / "process_0-of-1.json")
  mgr.close()


def test_process_sharding(qa_corpus, tokenizer):
  path, rows = qa_corpus
  cfg = _cfg(source="jsonl", train_path=path, eval_path=path, prompt_field="q", answer_field="a")
  per_process = []
  for p in range(2):
    batches = _all(pipeline.make_lm_iterator(cfg, tokenizer, split="eval", global_batch_size=6,
                                             seq_len=96, seed=0, process_index=p,
                                             process_count=2))
    assert all(b["inputs"].shape == (3, 96) for b in batches)
    per_process.append({tokenizer.decode(np.concatenate([i, t[-1:]]))
                        for i, t, _ in packed_segments(batches)})
  assert not per_process[0] & per_process[1]
  assert per_process[0] | per_process[1] == {r["q"] + " " + r["a"] for r in rows}
  train = pipeline.make_lm_iterator(cfg, tokenizer, split="train", global_batch_size=6, seq_len=96,
                                    seed=0, process_index=1, process_count=2)
  assert next(train)["inputs"].shape == (3, 96)
  with pytest.raises(ValueError, match=r"batch_size=5 .*multiple of the process count 2"):
    pipeline.make_lm_iterator(cfg, tokenizer, split="train", global_batch_size=5, seq_len=96,
                              seed=0, process_index=0, process_count=2)


def test_synthetic_eval_is_one_padded_pass(tokenizer):
  cfg = _cfg(synthetic__num_eval=37)
  batches = _all(pipeline.make_lm_iterator(cfg, tokenizer, split="eval", global_batch_size=4,
                                           seq_len=256, seed=0))
  segs = packed_segments(batches)
  assert len(segs) == 37
  src = sources.make_source(cfg, "eval")
  assert sorted(tokenizer.decode(np.concatenate([i, t[-1:]])) for i, t, _ in segs) == sorted(
      sources.record_text(src[k]) for k in range(37))
  assert batches[-1]["inputs"].shape == (4, 256)


def test_default_config_fits_default_seq_len(tmp_path):
  """The embedded default (synthetic math, 1024-piece tokenizer) needs no truncation at 128."""
  cfg = _cfg()
  tok = tok_lib.load_or_train_tokenizer(cfg, str(tmp_path))
  assert tok.vocab_size == cfg.vocab_size
  src = sources.make_source(cfg, "train")
  longest = max(len(pipeline.encode_example(tok, src[i])[0]) for i in range(3000))
  assert longest <= cfg.seq_len + 1 - 4  # Some headroom for rarer, longer draws.
  it = pipeline.make_lm_iterator(cfg, tok, split="train", global_batch_size=16,
                                 seq_len=cfg.seq_len, seed=0)
  b = next(it)
  assert b["inputs"].shape == (16, cfg.seq_len)
  assert 0.6 < (b["segment_ids"] > 0).mean() and 0.3 < b["loss_mask"].mean()


def test_worker_processes(tokenizer):
  cfg = _cfg(worker_count=2)
  make = lambda: pipeline.make_lm_iterator(cfg, tokenizer, split="train", global_batch_size=4,
                                           seq_len=256, seed=0)
  it = make()
  first = _take(it, 2)
  state = json.loads(json.dumps(it.get_state()))
  after = _take(it, 2)
  it.close()
  restored = make()
  restored.set_state(state)
  assert_batches_equal(_take(restored, 2), after)
  restored.close()
  # Workers split the stream differently from a single process, but each batch is whole.
  assert all(b["inputs"].shape == (4, 256) and (b["segment_ids"][:, 0] == 1).all()
             for b in first + after)


# --- tfds ---------------------------------------------------------------------------------


def _build_tiny_tfds(data_dir):
  """A real array_record TFDS dataset, built without TensorFlow."""
  import tensorflow_datasets as tfds

  class VptTinyQa(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version("1.0.0")
    # tfds looks for checksum files next to the builder's module via
    # importlib_resources (not installed); a None code path skips that lookup.
    code_path = None

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
          "question": tfds.features.Text(), "answer": tfds.features.Text()}))

    def _split_generators(self, dl_manager):
      return {"train": self._generate_examples(12), "validation": self._generate_examples(5)}

    def _generate_examples(self, n):
      for i in range(n):
        yield i, {"question": f"Question: what is {i} + 1? ü\nAnswer:",
                  "answer": f"{i} + 1 = {i + 1}\n#### {i + 1}"}

  VptTinyQa(data_dir=data_dir, file_format="array_record").download_and_prepare()


def test_tfds_source(tmp_path, tokenizer):
  data_dir = str(tmp_path / "tfds")
  _build_tiny_tfds(data_dir)
  cfg = _cfg(source="tfds", tfds_name="vpt_tiny_qa", tfds_data_dir=data_dir,
             prompt_field="question", answer_field="answer")
  src = sources.make_source(cfg, "train")
  assert len(src) == 12 and len(sources.make_source(cfg, "eval")) == 5
  recs = [src[i] for i in range(12)]
  assert all(isinstance(r["prompt"], str) and r["prompt"].endswith("ü\nAnswer:") for r in recs)
  expected = {f"Question: what is {i} + 1? ü\nAnswer: {i} + 1 = {i + 1}\n#### {i + 1}"
              for i in range(12)}
  assert {sources.record_text(r) for r in recs} == expected
  batches = _all(pipeline.make_lm_iterator(cfg, tokenizer, split="train", global_batch_size=4,
                                           seq_len=64, seed=0, num_epochs=1))
  assert {tokenizer.decode(np.concatenate([i, t[-1:]])) for i, t, _ in packed_segments(batches)} == expected

  with pytest.raises(ValueError, match=r"tfds vpt_tiny_qa\[train\] record 0: missing field 'text'"):
    sources.make_source(_cfg(source="tfds", tfds_name="vpt_tiny_qa", tfds_data_dir=data_dir), "train")
  with pytest.raises(ValueError, match=r"data.tfds_name='vpt_tiny_qa' \(split='nope'.*Unknown split"):
    sources.make_source(_cfg(source="tfds", tfds_name="vpt_tiny_qa", tfds_data_dir=data_dir,
                             train_split="nope"), "train")
  with pytest.raises(ValueError, match=r"data.tfds_name='no_such_ds_xyz'.*cannot open"):
    sources.make_source(_cfg(source="tfds", tfds_name="no_such_ds_xyz", tfds_data_dir=data_dir),
                        "train")
