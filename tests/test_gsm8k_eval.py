"""GSM8K evaluator: answer extraction, Pass@k, k-shot prompts, evaluate() and the CLI."""

import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vpt.language import generate as gen
from vpt.language.data import synthetic_math
from vpt.language.data.feedback import load_gsm8k_jsonl
from vpt.language.evals import gsm8k
from vpt.language.models.lm import LMConfig, Transformer

from conftest import GSM8K_DIR, CharTokenizer


@pytest.mark.parametrize("strip_calculator", [False, True])
def test_every_gsm8k_test_gold_extracts_to_its_final_answer(strip_calculator):
  records = load_gsm8k_jsonl(os.path.join(GSM8K_DIR, "test.jsonl"), strip_calculator=strip_calculator)
  assert len(records) == 1319
  for r in records:
    gold = r["answer"].split("####")[-1].strip().replace(",", "")
    assert gsm8k.extract_answer(r["answer"]) == gsm8k.normalize_number(gold) == gsm8k.gold_answer(r), r
    assert gsm8k.extract_strict(r["answer"]) == gsm8k.gold_answer(r)


@pytest.mark.parametrize("text,expected", [
    ("#### 1,234", "1234"),
    ("so she pays $1,234.00 in total.", "1234"),
    ("#### $18", "18"),
    ("#### -5", "-5"),
    ("#### - 3", "-3"),
    ("The change is -7 degrees", "-7"),
    ("#### +4", "4"),
    ("2.50 per apple", "2.5"),
    ("It costs 3.0", "3"),
    ("about .5 of it", "0.5"),
    ("The answer is 42.", "42"),
    ("10-5 = 5", "5"),  # a subtraction is not a negative number.
    ("1,000,000 grains", "1000000"),
    ("48 - 8 = 40\n#### 40\n\nQuestion: 7 apples", "40"),  # '####' wins over later numbers.
    ("first 3 then 9 then 12", "12"),
    ("no number here", None),
    ("", None),
])
def test_extract_answer_cases(text, expected):
  assert gsm8k.extract_answer(text) == expected


def test_strict_needs_the_hash_format():
  assert gsm8k.extract_strict("the answer is 12") is None
  assert gsm8k.extract_strict("6 + 6 = 12\n#### 12") == "12"
  assert gsm8k.extract_strict("#### twelve") is None


def test_pass_at_k_matches_closed_form():
  for n in range(1, 21):
    for c in range(n + 1):
      for k in range(1, n + 1):
        exact = 1.0 - math.comb(n - c, k) / math.comb(n, k)
        assert gsm8k.pass_at_k(n, c, k) == pytest.approx(exact, abs=1e-12), (n, c, k)
  assert gsm8k.pass_at_k(200, 3, 100) == pytest.approx(1 - math.comb(197, 100) / math.comb(200, 100))
  assert gsm8k.pass_at_k(5, 2, 1) == pytest.approx(0.4)
  with pytest.raises(ValueError):
    gsm8k.pass_at_k(4, 5, 1)
  with pytest.raises(ValueError):
    gsm8k.pass_at_k(4, 1, 5)


def _demo_questions(prompt):
  blocks = prompt.split("\n\n")[:-1]  # the last block is the test question.
  return [b.split("\nAnswer:")[0][len("Question: "):] for b in blocks]


def test_k_shot_prompts_exclude_test_items_and_are_deterministic():
  train = [{"question": f"train q{i}?", "answer": f"{i} + 1 = {i + 1}\n#### {i + 1}"} for i in range(40)]
  # Test items that also appear in the training list must never be drawn as demonstrations.
  test = [{"question": f"test q{i}?", "answer": "#### 1"} for i in range(3)] + train[:30]
  for seed in range(5):
    prompts = gsm8k.build_prompts(test, shots=8, train_records=train, seed=seed)
    assert prompts == gsm8k.build_prompts(test, shots=8, train_records=train, seed=seed)
    test_questions = {r["question"] for r in test}
    for p, r in zip(prompts, test):
      demos = _demo_questions(p)
      assert len(demos) == 8 and not test_questions & set(demos)
      assert p.endswith(synthetic_math.format_prompt(r["question"]))
      assert p.startswith("Question: train q") and "\nAnswer: " in p
  # Only 10 training records are not test items: 10 shots take exactly those.
  assert set(_demo_questions(gsm8k.build_prompts(test, shots=10, train_records=train)[0])) == {
      f"train q{i}?" for i in range(30, 40)}
  with pytest.raises(ValueError):
    gsm8k.build_prompts(test, shots=11, train_records=train)
  a = gsm8k.build_prompts(test, shots=4, train_records=train, seed=0)[0]
  b = gsm8k.build_prompts(test, shots=4, train_records=train, seed=1)[0]
  assert a != b
  assert gsm8k.build_prompts(test[:1], shots=0) == [synthetic_math.format_prompt("test q0?")]


def test_k_shot_from_real_gsm8k_train_split():
  train = load_gsm8k_jsonl(os.path.join(GSM8K_DIR, "train.jsonl"))
  test = load_gsm8k_jsonl(os.path.join(GSM8K_DIR, "test.jsonl"))[:20]
  prompts = gsm8k.build_prompts(test, shots=4, train_records=train, seed=0)
  train_q = {r["question"] for r in train}
  for p in prompts:
    demos = _demo_questions(p)
    assert len(demos) == 4 and set(demos) <= train_q
    assert not {r["question"] for r in test} & set(demos)
    assert "<<" not in p  # calculator annotations are stripped from the solutions.


def _synthetic_records(n, seed=0):
  data = synthetic_math.SyntheticMath(seed, n)
  return [{"question": r["question"], "answer": r["answer"]} for r in (data[i] for i in range(n))]


def test_scoring_with_known_generations(monkeypatch, tmp_path):
  records = _synthetic_records(6)
  golds = [gsm8k.gold_answer(r) for r in records]

  def fake_generate(model, params, tokenizer, prompts, **kw):
    # Item 0..1: full solutions; 2..3: right number without '####'; 4..5: wrong.
    out = []
    for p in prompts:
      i = next(j for j, r in enumerate(records) if p.endswith(synthetic_math.format_prompt(r["question"])))
      out.append(" " + (records[i]["answer"] if i < 2 else f"so it is {golds[i]}" if i < 4 else "#### 123456789"))
    return out

  monkeypatch.setattr(gen, "generate", fake_generate)
  scores = gsm8k.evaluate(None, None, None, records, out_path=str(tmp_path / "p.json"))
  assert scores["pass@1"] == scores["lenient_pass@1"] == pytest.approx(4 / 6)
  assert scores["strict_pass@1"] == pytest.approx(2 / 6)
  assert scores["format_rate"] == pytest.approx(4 / 6)
  preds = json.load(open(tmp_path / "p.json"))["predictions"]
  assert [p["correct"] for p in preds] == [True] * 4 + [False] * 2
  assert preds[0]["generated"] == records[0]["answer"].strip()  # the separator is stripped.


def test_evaluate_end_to_end_on_a_tiny_model(tmp_path):
  tok = CharTokenizer()
  cfg = LMConfig(vocab_size=tok.vocab_size, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64)
  model = Transformer(cfg)
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))["params"]
  rng = np.random.default_rng(0)  # NumPy draws: eager Flax init compiles many small kernels.
  params = jax.tree.map(lambda s: rng.normal(0.0, 0.1, s.shape).astype(np.float32), shapes)
  records, train = _synthetic_records(5), _synthetic_records(20, seed=1)
  out = tmp_path / "preds.json"
  # One batch per call (batch_size >= rows): one compiled prompt shape each.
  scores = gsm8k.evaluate(model, params, tok, records, max_new_tokens=12, batch_size=8, out_path=str(out))
  for key in ("pass@1", "strict_pass@1", "lenient_pass@1", "format_rate"):
    assert 0.0 <= scores[key] <= 1.0
  assert scores["n_items"] == 5 and scores["n_samples"] == 1
  written = json.load(open(out))
  assert written["scores"]["pass@1"] == scores["pass@1"]
  assert [p["question"] for p in written["predictions"]] == [r["question"] for r in records]
  assert set(written["predictions"][0]) >= {"question", "gold", "generated", "extracted", "correct"}

  sampled = gsm8k.evaluate(model, params, tok, records, shots=2, train_records=train, n_samples=3,
                           ks=(1, 2, 3), temperature=1.0, max_new_tokens=8, batch_size=16, seed=1)
  assert {"pass@1", "pass@2", "pass@3", "strict_pass@3"} <= set(sampled)
  assert sampled["pass@1"] <= sampled["pass@2"] <= sampled["pass@3"]
  with pytest.raises(ValueError):
    gsm8k.evaluate(model, params, tok, records, n_samples=2)  # several greedy samples

  evaluator = gsm8k.make_gsm8k_evaluator(model, tok, records, max_new_tokens=12, batch_size=8)
  metrics = evaluator(params)
  assert metrics["gsm8k_pass@1"] == scores["pass@1"]
  assert all(isinstance(v, float) for v in metrics.values())


def _nano_config(**overrides):
  from vpt.core import config as core_config
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  config = core_config.load_config_file(os.path.join(repo, "experiments", "lm_ntp.py"), "nano")
  return core_config.with_overrides(config, {"progress_bar": False, "mesh.num_devices": 1, **overrides})


def test_cli_on_a_tiny_run_directory(tmp_path, monkeypatch, caplog, capfd):
  """The CLI on a run: the run's final params, read alone (the restore names only `params`, and
  orbax warns of no item it could not restore)."""
  import logging
  import orbax.checkpoint as ocp
  from vpt.language import learner_source
  from vpt.language import train
  workdir = str(tmp_path / "run")
  summary = train.run(_nano_config(num_steps=3, log_every_steps=1, eval_batches=1), workdir)
  restored_items = []
  original = ocp.PyTreeCheckpointer.restore

  def spy(self, directory, *args, **kwargs):
    restored_items.append(sorted(kwargs["args"].item))
    return original(self, directory, *args, **kwargs)

  monkeypatch.setattr(ocp.PyTreeCheckpointer, "restore", spy)
  capfd.readouterr()
  caplog.clear()
  out = tmp_path / "preds.json"
  with caplog.at_level(logging.WARNING):
    scores = gsm8k.main(["--workdir", workdir, "--data", os.path.join(GSM8K_DIR, "test.jsonl"),
                         "--limit", "3", "--shots", "1", "--max-new-tokens", "8", "--out", str(out)])
    _, params, _, step = learner_source.load_learner(workdir)  # what the CLI reads
  assert restored_items == [["params"], ["params"]]
  printed = capfd.readouterr()
  assert "could not be restored" not in caplog.text + printed.out + printed.err
  assert scores["step"] == 3 and scores["n_items"] == 3 and scores["shots"] == 1
  written = json.load(open(out))
  assert len(written["predictions"]) == 3 and "pass@1" in written["scores"]
  # The restored params are the run's final params.
  assert step == 3
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(jax.device_get(summary["state"].params))):
    assert (jax.device_get(a) == b).all()
  with pytest.raises(SystemExit):
    gsm8k.main(["--workdir", workdir, "--data", os.path.join(GSM8K_DIR, "test.jsonl"), "--mesh", "fsdp=x"])
