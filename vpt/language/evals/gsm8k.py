"""GSM8K evaluation by generation: answer extraction, k-shot prompts, Pass@k, a CLI.

    python -m vpt.language.evals.gsm8k --workdir RUN_DIR [--step N] --data /path/test.jsonl \
        [--limit N] [--shots 0] [--samples 1 --k 1] [--mesh data=1,fsdp=-1,tensor=1] [--out preds.json]

`--workdir` is a vpt run directory or a Hugging Face model directory (config.json, safetensors,
tokenizer.json: `--workdir /models/Qwen2.5-0.5B` scores the base model before training). Only the
learner's parameters are read (a partial restore of the checkpointed state's `params`: the
optimizer and designer stay on disk), sharded over a mesh by vpt.core.sharding's rules, and the batch
of prompts is split over its data axes (vpt.language.generate): a 7B model evaluates on a pod, every host
running the same command. The mesh is the run's `config.mesh` (an HF directory: fsdp over all
devices) unless `--mesh` overrides it.

Prompts follow the training layout: the model learned `format_prompt(q) + ' ' + solution`, so
the prompt ends at 'Answer:' and the generated text (which starts with the separator) is
stripped. k-shot prompts prepend k solved problems drawn with a fixed seed from the training
split, `Question: ...\\nAnswer: <solution>\\n\\n`; generation stops at '\\n\\n' / 'Question:'.

Scores: `pass@k` counts a sample correct when `extract_answer` (the number after '####', else
the last number in the text) equals the gold answer; `strict_pass@k` also requires the '####'
format. `lenient_pass@1` is `pass@1`, named for the comparison with `strict_pass@1`.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from collections.abc import Callable, Sequence
from decimal import Decimal, InvalidOperation
from typing import Any

import jax
import numpy as np

from vpt.core import run_dir, sharding
from vpt.language import config_lib, generate as generate_lib, learner_source
from vpt.language.data.synthetic_math import ANSWER_SEP, format_prompt

# A number as written in text: optional sign and '$', thousands separators, decimals. The
# lookbehind keeps '10-5' from reading as -5 and 'x2' / '1.5.' fragments from splitting.
_NUMBER = r"[-+]?\$?(?:\d+(?:,\d{3})*(?:\.\d+)?|\.\d+)"
_NUMBER_RE = re.compile(r"(?<![\w.])" + _NUMBER)
# Right after '####' a space between sign, '$' and digits is tolerated ('#### - 3', '#### $ 5').
_HASH_NUMBER_RE = re.compile(r"\s*([-+]?)\s*\$?\s*((?:\d+(?:,\d{3})*(?:\.\d+)?|\.\d+))")


def normalize_number(text: str) -> str | None:
  """Canonical form of a number: '1,234' -> '1234', '$5.00' -> '5', '+2.50' -> '2.5'."""
  s = re.sub(r"[,$\s]", "", text)
  if s.startswith("+"):
    s = s[1:]
  try:
    d = Decimal(s)
  except InvalidOperation:
    return None
  if not d.is_finite():
    return None
  if d == d.to_integral_value():
    return str(int(d))
  return format(d.normalize(), "f")


def _after_hashes(text: str) -> str | None:
  """The number the first '####' line states, or None."""
  i = text.find("####")
  if i < 0:
    return None
  rest = text[i + 4:].split("\n", 1)[0]
  m = _HASH_NUMBER_RE.match(rest)
  if m:
    return normalize_number(m.group(1) + m.group(2))
  m = _NUMBER_RE.search(rest)
  return normalize_number(m.group(0)) if m else None


def extract_strict(text: str) -> str | None:
  """The answer in the GSM8K format only ('#### N'), canonical, or None."""
  return _after_hashes(text)


def extract_answer(text: str) -> str | None:
  """'#### N' if present, else the last number in the text; canonical string or None."""
  found = _after_hashes(text)
  if found is not None:
    return found
  numbers = _NUMBER_RE.findall(text)
  return normalize_number(numbers[-1]) if numbers else None


def gold_answer(record: dict) -> str:
  """The canonical gold answer of a {"question", "answer"[, "final"]} record."""
  if record.get("final") is not None:
    gold = normalize_number(str(record["final"]))
  else:
    gold = extract_strict(record["answer"])
  if gold is None:
    raise ValueError(f"record has no numeric final answer: {record.get('answer', '')[-80:]!r}")
  return gold


def pass_at_k(n: int, c: int, k: int) -> float:
  """Unbiased Pass@k from n samples with c correct: 1 - C(n-c, k) / C(n, k) (stable product)."""
  if not 0 <= c <= n or not 1 <= k <= n:
    raise ValueError(f"pass_at_k(n={n}, c={c}, k={k}): expected 0 <= c <= n and 1 <= k <= n")
  if n - c < k:
    return 1.0
  # C(n-c, k) / C(n, k) = prod_{i=n-c+1}^{n} (1 - k / i)
  return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


# ----------------------------------------------------------------------------------------------
# Prompts.


def _question_key(q: str) -> str:
  return " ".join(q.split())


def few_shot_demos(train_records: Sequence[dict], shots: int, seed: int,
                   exclude_questions: Sequence[str] = ()) -> list[dict]:
  """`shots` training records drawn with `seed`, none of whose questions is in exclude_questions."""
  if shots <= 0:
    return []
  excluded = {_question_key(q) for q in exclude_questions}
  pool = [r for r in train_records if _question_key(r["question"]) not in excluded]
  if len(pool) < shots:
    raise ValueError(f"shots={shots} but only {len(pool)} training records are not test items")
  idx = np.random.default_rng(seed).choice(len(pool), size=shots, replace=False)
  demos = [pool[int(i)] for i in idx]
  assert not any(_question_key(d["question"]) in excluded for d in demos), "a demo is a test item"
  return demos


def few_shot_prefix(demos: Sequence[dict]) -> str:
  return "".join(format_prompt(d["question"]) + ANSWER_SEP + d["answer"].strip() + "\n\n" for d in demos)


def build_prompts(records: Sequence[dict], *, shots: int = 0,
                  train_records: Sequence[dict] | None = None, seed: int = 0) -> list[str]:
  """One prompt per record: the k-shot prefix (the same demos for every item) + the question."""
  prefix = ""
  if shots:
    if not train_records:
      raise ValueError(f"shots={shots} needs train_records (the GSM8K training split)")
    prefix = few_shot_prefix(few_shot_demos(train_records, shots, seed,
                                            [r["question"] for r in records]))
  # The prompt stops at 'Answer:' without ANSWER_SEP: training encoded the prompt and
  # ANSWER_SEP + answer separately, so these are exactly the prompt tokens the model saw, and the
  # separator (merged into the answer's first pieces) is generated. `evaluate` strips it.
  return [prefix + format_prompt(r["question"]) for r in records]


# ----------------------------------------------------------------------------------------------
# Evaluation.


def evaluate(model, params, tokenizer, records: Sequence[dict], *, shots: int = 0,
             train_records: Sequence[dict] | None = None, n_samples: int = 1,
             ks: Sequence[int] = (1,), temperature: float = 0.0, top_p: float = 1.0,
             max_new_tokens: int = 256, seed: int = 0, batch_size: int = 16,
             stop: Sequence[str] = generate_lib.DEFAULT_STOP, out_path: str | None = None,
             mesh: jax.sharding.Mesh | None = None, return_predictions: bool = False):
  """Generates n_samples answers per record and scores them (see the module docstring).

  Returns {'pass@k', 'strict_pass@k' for k in ks, 'lenient_pass@1', 'strict_pass@1',
  'format_rate', 'n_items', 'n_samples', ...}; writes those scores with per-item predictions to
  `out_path` (JSON) when given. Greedy Pass@1: n_samples=1, temperature=0. With `mesh`, generation
  runs sharded over it (vpt.language.generate); only process 0 writes `out_path`. With `return_predictions`:
  (scores, per-item predictions as written to `out_path`).
  """
  if not records:
    raise ValueError("no records to evaluate")
  if n_samples < 1 or (n_samples > 1 and temperature == 0):
    raise ValueError(f"n_samples={n_samples}, temperature={temperature}: several samples need "
                     "temperature > 0 (greedy samples are identical)")
  ks = sorted(set(int(k) for k in ks) | {1})
  if max(ks) > n_samples:
    raise ValueError(f"ks={ks}: every k must be <= n_samples={n_samples}")
  start = time.perf_counter()
  prompts = build_prompts(records, shots=shots, train_records=train_records, seed=seed)
  texts = generate_lib.generate(
      model, params, tokenizer, [p for p in prompts for _ in range(n_samples)],
      max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, stop=stop,
      rng=jax.random.PRNGKey(seed), batch_size=batch_size, mesh=mesh)
  predictions, counts, strict_counts, formatted = [], [], [], 0
  for i, record in enumerate(records):
    gold = gold_answer(record)
    samples = []
    for text in texts[i * n_samples:(i + 1) * n_samples]:
      text = text.strip()  # the continuation starts with ANSWER_SEP.
      extracted, strict = extract_answer(text), extract_strict(text)
      formatted += strict is not None
      samples.append({"generated": text, "extracted": extracted, "correct": extracted == gold,
                      "strict_correct": strict == gold})
    c = sum(s["correct"] for s in samples)
    c_strict = sum(s["strict_correct"] for s in samples)
    counts.append(c)
    strict_counts.append(c_strict)
    item = {"question": record["question"], "gold": gold, **samples[0]}
    if n_samples > 1:
      item.update(samples=samples, num_correct=c, num_strict_correct=c_strict)
    predictions.append(item)
  scores: dict[str, Any] = {}
  for k in ks:
    scores[f"pass@{k}"] = float(np.mean([pass_at_k(n_samples, c, k) for c in counts]))
    scores[f"strict_pass@{k}"] = float(np.mean([pass_at_k(n_samples, c, k) for c in strict_counts]))
  scores["lenient_pass@1"] = scores["pass@1"]
  scores["format_rate"] = formatted / (len(records) * n_samples)
  scores.update(n_items=len(records), n_samples=n_samples, shots=shots, temperature=temperature,
                top_p=top_p, max_new_tokens=max_new_tokens, seed=seed,
                seconds=time.perf_counter() - start)
  if out_path and jax.process_index() == 0:
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    with open(out_path, "w") as f:
      json.dump({"scores": scores, "predictions": predictions}, f, indent=1)
  return (scores, predictions) if return_predictions else scores


_SCORE_KEYS = re.compile(r"^(strict_|lenient_)?pass@\d+$|^format_rate$")


def make_gsm8k_evaluator(model, tokenizer, records: Sequence[dict], *, prefix: str = "gsm8k_",
                         **kwargs) -> Callable[[Any], dict[str, float]]:
  """evaluate(params) -> {prefix + score: float} on fixed records (kwargs as for `evaluate`)."""
  records = list(records)

  def evaluate_params(params) -> dict[str, float]:
    scores = evaluate(model, params, tokenizer, records, **kwargs)
    return {prefix + k: float(v) for k, v in scores.items() if _SCORE_KEYS.match(k)}

  return evaluate_params


# ----------------------------------------------------------------------------------------------
# The evaluation mesh (the model itself: vpt.language.learner_source.load_learner).


def parse_mesh(text: str, base=None):
  """A mesh config from 'data=1,fsdp=-1,tensor=1[,num_devices=N]' (unnamed axes keep `base`'s
  values, else config_lib's defaults)."""
  mesh_cfg = config_lib.base_config().mesh
  if base is not None:
    mesh_cfg.update({k: int(v) for k, v in dict(base).items() if k in mesh_cfg})
  for part in filter(None, (p.strip() for p in text.split(","))):
    key, _, value = part.partition("=")
    key = key.strip()
    if key not in mesh_cfg or not value.strip().lstrip("-").isdigit():
      raise ValueError(f"--mesh={text!r}: expected comma-separated AXIS=N with AXIS in {sorted(mesh_cfg)} "
                       "(one axis may be -1: the remaining devices)")
    mesh_cfg[key] = int(value)
  return mesh_cfg


def eval_mesh(workdir: str, override: str = "") -> jax.sharding.Mesh:
  """The mesh to evaluate `workdir` on: its config.mesh (an HF directory: fsdp over all devices),
  with the axes `override` ('data=2,fsdp=4') names replaced."""
  base = {"data": 1, "fsdp": -1, "tensor": 1, "num_devices": 0}
  if not learner_source.is_hf(workdir) and run_dir.config_path(workdir).is_file():
    saved = run_dir.read_config(workdir).get("mesh")
    base = saved.to_dict() if saved else base
  return sharding.make_mesh(parse_mesh(override, base))


def _default_train_path(data: str) -> str | None:
  candidate = os.path.join(os.path.dirname(os.path.abspath(data)), "train.jsonl")
  return candidate if os.path.isfile(candidate) and os.path.abspath(data) != candidate else None


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  from vpt.language.data.feedback import load_gsm8k_jsonl  # pylint: disable=g-import-not-at-top

  ap = argparse.ArgumentParser(prog="python -m vpt.language.evals.gsm8k", description=__doc__.split("\n")[0])
  ap.add_argument("--workdir", required=True,
                  help="vpt run directory (config.json, checkpoints/), or a Hugging Face model directory")
  ap.add_argument("--step", type=int, default=None, help="checkpoint step (default: newest)")
  ap.add_argument("--data", required=True, help="GSM8K-format jsonl to evaluate (e.g. test.jsonl)")
  ap.add_argument("--train-data", default=None,
                  help="k-shot demonstrations source (default: train.jsonl beside --data)")
  ap.add_argument("--limit", type=int, default=0, help="first N records only (0: all)")
  ap.add_argument("--shots", type=int, default=0)
  ap.add_argument("--samples", type=int, default=1, help="samples per problem (n of Pass@k)")
  ap.add_argument("--k", type=int, nargs="+", default=[1], help="k values of Pass@k")
  ap.add_argument("--temperature", type=float, default=None,
                  help="default: 0 (greedy) with one sample, 0.8 with several")
  ap.add_argument("--top-p", type=float, default=1.0)
  ap.add_argument("--max-new-tokens", type=int, default=256)
  ap.add_argument("--batch-size", type=int, default=16)
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--out", default=None, help="write scores and per-item predictions (JSON) here")
  ap.add_argument("--mesh", default="", help="mesh axes overriding the run's config.mesh, e.g. "
                  "'data=1,fsdp=-1,tensor=1' or 'num_devices=1' (an HF directory: fsdp over all devices)")
  args = ap.parse_args(argv)

  records = load_gsm8k_jsonl(args.data)
  if args.limit:
    records = records[:args.limit]
  train_records = None
  if args.shots:
    train_path = args.train_data or _default_train_path(args.data)
    if not train_path:
      ap.error("--shots > 0 needs --train-data (no train.jsonl beside --data)")
    if os.path.abspath(train_path) == os.path.abspath(args.data):
      ap.error("--train-data is the evaluated file: demonstrations must come from the training split")
    train_records = load_gsm8k_jsonl(train_path)
  temperature = args.temperature if args.temperature is not None else (0.0 if args.samples == 1 else 0.8)
  try:
    mesh = eval_mesh(args.workdir, args.mesh)
  except ValueError as e:
    ap.error(f"{e} (the evaluation mesh: the run's config.mesh unless --mesh, e.g. --mesh data=1,fsdp=-1,tensor=1)")
  model, params, tokenizer, step = learner_source.load_learner(args.workdir, args.step, mesh=mesh)
  print(f"GSM8K: {len(records)} problems from {args.data}, {args.shots}-shot, {args.samples} "
        f"sample(s) at temperature {temperature}; {args.workdir} step {step}; mesh {dict(mesh.shape)}", flush=True)
  scores = evaluate(model, params, tokenizer, records, shots=args.shots, train_records=train_records,
                    n_samples=args.samples, ks=args.k, temperature=temperature, top_p=args.top_p,
                    max_new_tokens=args.max_new_tokens, seed=args.seed, batch_size=args.batch_size,
                    out_path=args.out, mesh=mesh)
  scores["step"] = step
  if args.out and jax.process_index() == 0:  # record which checkpoint produced the predictions.
    with open(args.out) as f:
      written = json.load(f)
    written["scores"]["step"] = step
    written["run"] = {"workdir": os.path.abspath(args.workdir), "step": step, "data": args.data}
    with open(args.out, "w") as f:
      json.dump(written, f, indent=1)
  print(json.dumps(scores, indent=2), flush=True)
  return scores


if __name__ == "__main__":
  main(sys.argv[1:])
