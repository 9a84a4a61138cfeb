"""Why does the V-Pretraining designer switch itself off (α → 0) in the CPU-scale replication?

    python experiments/toy_math/diagnose.py headroom --out /tmp/diagnose [--base_dir DIR] [--stream skill]
    python experiments/toy_math/diagnose.py sweep --out /tmp/diagnose [--stream format] [--only 'K 4;K 64']

`headroom` measures, at the base model the arms start from, how much value any target reshaping
could buy. The value is linear in q, so per position t it changes with α_t by

    ∂V/∂α_t ∝ s_t(y_t) − Σ_v r_t(v) s_t(v),     s_t(v) = ⟨g_down, ∇_S log p(v | x_<t)⟩,

positive (α helps) only where r puts mass on candidates with a more negative s than the true token.
For r = uniform, r = the learner's own top-K (self-distillation), r = the freshly initialised designer
and r = the oracle (all mass on argmin_v s_t(v)) it reports that gain per class of the true token and
for a math-only and a filler-only stream; a gain below zero means the best α for that r is 0.

`sweep` trains one seed of V-Pretraining per setting of one knob at a time around the main job's
setting (the stream's format share, the initial gate, K, meta period r, alignment subset S, designer LR,
burn-in, a fixed-α designer that learns r only, gate features) and records the designer's mean α over
training and the feedback-set loss, held-out pretraining perplexity and strict / format-agnostic Pass@1
on VALIDATION problems (the generator's 'validation' partition: never the test problems of replicate.py).
The base is the main job's (cached; `--base_dir` names another run directory).
Writes diagnose_headroom.md / diagnose_sweep.md and .json to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import replicate  # noqa: E402  (sets up the repository import path)
from vpt.core import config as core_config
from vpt.language import analysis, train
from vpt.language import vpt_step  # noqa: E402
from vpt.language.data import synthetic_math  # noqa: E402
from vpt.language.data.feedback import make_feedback_iterator  # noqa: E402
from vpt.language.data.pipeline import make_lm_iterator  # noqa: E402
from vpt.language.data.tokenizer import SentencePieceTokenizer  # noqa: E402
from vpt.language.evals import math_skills  # noqa: E402
from vpt.language.models.designer import DesignerConfig, TaskDesigner  # noqa: E402
from vpt.language.models.lm import LMConfig, Transformer  # noqa: E402

CLASSES = math_skills.TOKEN_CLASSES
VALIDATION_SEED = 910_002  # 'validation'-partition problems (replicate.py tests on 'test' ones).


# ----------------------------------------------------------------------------- headroom


def _gain_rows(scores, r_by_name, mask, classes, alpha_max):
  """Per (r, class): mean over loss positions of α_max·(s(y) − Σ r s): the value gained by α = α_max."""
  s = np.asarray(scores["s"], np.float64)
  s_true = s[..., 0]
  rows = []
  for name, r in r_by_name.items():
    gain = alpha_max * (s_true - np.sum(np.asarray(r, np.float64) * s, axis=-1))
    for cls in ("all",) + CLASSES:
      sel = mask & ((classes == cls) if cls != "all" else True)
      if sel.sum() == 0:
        continue
      rows.append({"r": name, "class": cls, "positions": int(sel.sum()),
                   "gain": float(gain[sel].mean()), "gain_frac_positive": float((gain[sel] > 0).mean()),
                   "value_onehot": float(-s_true[sel].mean())})
  return rows


def headroom(args):
  config = replicate.arm_config(_replicate_args(args), "value", 0, args.steps)
  base_dir = args.base_dir or config.init_from
  tokenizer = SentencePieceTokenizer(os.path.join(base_dir, "tokenizer", "spm.model"))
  run = analysis.load_run(base_dir)
  model, params = run.model, run.params
  n_last, top_k = config.vpt.align_last_n_layers, config.vpt.top_k
  designer = TaskDesigner(DesignerConfig.from_config(config.vpt))
  designer_params = vpt_step.init_designer_state(designer, vpt_step.make_designer_optimizer(config.vpt), params,
                                                 config.data.seq_len, top_k, seed=0).params
  fb_iter = make_feedback_iterator(config.feedback, tokenizer, seed=0)
  results = {}
  for stream, filler in (("math", 0.0), ("filler", 1.0), ("mix (30 % filler)", 0.3)):
    data_cfg = core_config.with_overrides(config, {"data.synthetic.irrelevant_fraction": filler}).data
    it = make_lm_iterator(data_cfg, tokenizer, split="train", global_batch_size=config.batch_size,
                          seq_len=data_cfg.seq_len, seed=7)
    rows_all, reliability = [], []
    for _ in range(args.batches):
      batch = jax.tree.map(jnp.asarray, next(it))
      # g_down from two disjoint halves of the feedback set: scores under one half pick targets,
      # the other half judges them (a cross-validated oracle: the part of s a designer could learn).
      g_a, g_b = (_mean_grad(model, params, fb_iter, n_last, args.fb_batches) for _ in range(2))
      scores = analysis.candidate_scores(model, params, batch, g_b, n_last, top_k)
      s_a = np.asarray(analysis.candidate_scores(model, params, batch, g_a, n_last, top_k)["s"])
      cand_ids, cand_logp = jnp.asarray(scores["cand_ids"]), jnp.asarray(scores["cand_logp"])
      _, r_init = vpt_step.designer_targets(config.vpt, designer, designer_params,
                                            params["embed_tokens"]["embedding"], batch, cand_ids, cand_logp)
      s = np.asarray(scores["s"])
      mask = np.asarray(batch["loss_mask"]) > 0
      eye = np.eye(top_k)
      r_by_name = {
          "uniform": np.full(s.shape, 1.0 / top_k),
          "self-distill": np.asarray(jax.nn.softmax(cand_logp, axis=-1)),
          "designer at init": np.asarray(r_init),
          "oracle, cross-validated (argmin of the other half's s)": eye[np.argmin(s_a, axis=-1)],
          "oracle, in-sample (argmin s)": eye[np.argmin(s, axis=-1)],
      }
      targets = np.asarray(batch["targets"])
      classes = np.vectorize(lambda i: math_skills.token_class(tokenizer.id_to_piece(int(i))))(targets)
      rows_all += _gain_rows(scores, r_by_name, mask, classes, config.vpt.alpha_max)
      rel_a, rel_b = (x[..., 1:] - x[..., :1] for x in (s_a, s))
      reliability.append(float(np.corrcoef(rel_a[mask].ravel(), rel_b[mask].ravel())[0, 1]))
    print(f"{stream}: split-half reliability of s(v) − s(y) = {np.mean(reliability):.3f}", flush=True)
    results[stream] = {"rows": _pool(rows_all), "split_half_reliability": float(np.mean(reliability))}
  with open(os.path.join(args.out, "diagnose_headroom.json"), "w") as f:
    json.dump(results, f, indent=1)
  lines = ["| stream | r | class | positions | value of one-hot −mean s(y) | gain of α = α_max | share of positions "
           "gaining |", "|---|---|---|---|---|---|---|"]
  for stream, res in results.items():
    for row in res["rows"]:
      lines.append(f"| {stream} | {row['r']} | {row['class']} | {row['positions']} | {row['value_onehot']:+.3e} | "
                   f"{row['gain']:+.3e} | {row['gain_frac_positive']:.2f} |")
  lines.append("")
  lines += [f"Split-half reliability of s_t(v) − s_t(y) ({stream}): {res['split_half_reliability']:.3f}"
            for stream, res in results.items()]
  table = "\n".join(lines)
  with open(os.path.join(args.out, "diagnose_headroom.md"), "w") as f:
    f.write(table + "\n")
  print(table)


def _mean_grad(model, params, fb_iter, n_last, n):
  """g_down averaged over n feedback batches (n·feedback.batch_size problems)."""
  grads = [analysis.downstream_grad(model, params, jax.tree.map(jnp.asarray, next(fb_iter)), n_last)
           for _ in range(n)]
  return jax.tree.map(lambda *g: sum(g) / n, *grads)


def _pool(rows):
  """Position-weighted means of the per-batch rows, per (r, class)."""
  pooled = {}
  for row in rows:
    p = pooled.setdefault((row["r"], row["class"]), {"r": row["r"], "class": row["class"], "positions": 0,
                                                      "gain": 0.0, "gain_frac_positive": 0.0, "value_onehot": 0.0})
    n = row["positions"]
    for k in ("gain", "gain_frac_positive", "value_onehot"):
      p[k] += row[k] * n
    p["positions"] += n
  for p in pooled.values():
    for k in ("gain", "gain_frac_positive", "value_onehot"):
      p[k] /= p["positions"]
  return list(pooled.values())


# ----------------------------------------------------------------------------- sweep

# One knob at a time, around the main job's setting (the first entry).
SWEEP = {
    "reference (the main job's setting)": {},
    "format share 0.15": {"data.synthetic.downstream_format_fraction": 0.15},
    "meta every 8, designer LR 1e-3": {"vpt.meta_every": 8, "vpt.designer.learning_rate": 1e-3},
    "gate features": {"vpt.designer.gate_features": True},
    "gate starts at α_max/2": {"vpt.designer.alpha_init_logit": 0.0},
    "K 4": {"vpt.top_k": 4},
    "K 64": {"vpt.top_k": 64},
    "meta every 2": {"vpt.meta_every": 2},
    "S = last block": {"vpt.align_last_n_layers": 1},
    "S = all parameters": {"vpt.align_last_n_layers": 0},
    "designer LR 1e-4": {"vpt.designer.learning_rate": 1e-4},
    "designer LR 1e-2": {"vpt.designer.learning_rate": 1e-2},
    "no burn-in": {"vpt.burn_in_steps": 0},
    "burn-in 100": {"vpt.burn_in_steps": 100},
    "α fixed 0.25, r learned": {"vpt.learn_alpha": False},
    "geometry adam": {"vpt.geometry": "adam"},
    "feedback batch 128": {"feedback.batch_size": 128},
    "feedback batch 256": {"feedback.batch_size": 256},
}


def _replicate_args(args):
  return argparse.Namespace(size="tiny", curve_points=1, steps=args.steps, stream=args.stream, smoke=False,
                            base_cache=args.base_cache, base_steps=0)


def sweep(args):
  base_dir = replicate.arm_config(_replicate_args(args), "value", 0, args.steps).init_from
  tokenizer = SentencePieceTokenizer(os.path.join(base_dir, "tokenizer", "spm.model"))
  data = synthetic_math.SyntheticMath(VALIDATION_SEED, args.val_items, partition="validation")
  records = [{"question": r["question"], "answer": r["answer"], "final": str(synthetic_math.final_answer(r["answer"]))}
             for r in (data[i] for i in range(args.val_items))]
  names = args.only.split(";") if args.only else list(SWEEP)
  unknown = [n for n in names if n not in SWEEP]
  if unknown:
    raise ValueError(f"--only: unknown settings {unknown}; expected some of {list(SWEEP)}")
  # Results accumulate in diagnose_sweep.json: a setting already measured is not re-run.
  path = os.path.join(args.out, "diagnose_sweep.json")
  done = json.load(open(path)) if os.path.exists(path) else {"steps": args.steps, "results": []}
  if done["steps"] != args.steps:
    raise ValueError(f"{path} holds {done['steps']}-step runs; --steps={args.steps}")
  results = done["results"]
  start = time.perf_counter()
  for name in [n for n in names if n not in {r["setting"] for r in results}]:
    config = replicate.arm_config(_replicate_args(args), "value", 0, args.steps)
    config = core_config.with_overrides(config, {"checkpoint.every_steps": args.steps, "eval_every_steps": args.steps,
                                                **SWEEP[name]})
    workdir = os.path.join(args.out, "runs", "diagnose-" + "".join(c if c.isalnum() else "_" for c in name))
    summary = train.run(config, workdir)
    model = Transformer(LMConfig.from_config(config.model, tokenizer.vocab_size))
    scores = math_skills.make_generation_evaluator(model, tokenizer, records, max_new_tokens=96)(summary["state"].params)
    metrics = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    alphas = [m["train/alpha_mean"] for m in metrics if "train/alpha_mean" in m]
    values = [m["train/meta/value"] for m in metrics if "train/meta/value" in m]
    row = {"setting": name, "overrides": SWEEP[name], "alpha_first": alphas[0] if alphas else None,
           "alpha_last": alphas[-1] if alphas else None, "value_mean": float(np.mean(values)) if values else None,
           "feedback_loss": summary["eval"]["feedback_loss"], "perplexity": summary["eval"]["perplexity"],
           "val_pass@1": scores["pass@1"], "val_strict_pass@1": scores["strict_pass@1"],
           "val_format_rate": scores["format_rate"],
           "seconds": summary.get("throughput", {}).get("seconds")}
    results.append(row)
    with open(path, "w") as f:
      json.dump({"steps": args.steps, "val_items": args.val_items, "results": results}, f, indent=1)
    print(f"[{time.perf_counter() - start:.0f}s] {json.dumps(row)}", flush=True)
  lines = ["| setting | α first → last logged | mean V on meta steps | feedback-set L_down | held-out ppl | "
           "validation Pass@1 (format-agnostic) | validation strict Pass@1 |", "|---|---|---|---|---|---|---|"]
  for row in results:
    alpha = f"{row['alpha_first']:.3f} → {row['alpha_last']:.4f}" if row["alpha_first"] is not None else "—"
    value = f"{row['value_mean']:+.2e}" if row["value_mean"] is not None else "—"
    lines.append(f"| {row['setting']} | {alpha} | {value} | {row['feedback_loss']:.3f} | {row['perplexity']:.3f} | "
                 f"{row['val_pass@1']:.3f} | {row['val_strict_pass@1']:.3f} |")
  with open(os.path.join(args.out, "diagnose_sweep.md"), "w") as f:
    f.write("\n".join(lines) + "\n")
  print("\n".join(lines))


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("what", choices=("headroom", "sweep"))
  ap.add_argument("--base_dir", default="", help="headroom: a base run directory (default: the main job's base)")
  ap.add_argument("--base_cache", default="", help="where the main job's base is cached (default: vpt's cache)")
  ap.add_argument("--stream", default="format", choices=sorted(replicate.STREAMS))
  ap.add_argument("--out", required=True)
  ap.add_argument("--steps", type=int, default=200)
  ap.add_argument("--batches", type=int, default=4, help="headroom: unlabeled batches per stream")
  ap.add_argument("--fb_batches", type=int, default=16, help="headroom: feedback batches per half")
  ap.add_argument("--val_items", type=int, default=100, help="sweep: validation problems for Pass@1")
  ap.add_argument("--only", default="", help="sweep: ';'-separated setting names (default: all)")
  args = ap.parse_args()
  os.makedirs(args.out, exist_ok=True)
  headroom(args) if args.what == "headroom" else sweep(args)


if __name__ == "__main__":
  main()
