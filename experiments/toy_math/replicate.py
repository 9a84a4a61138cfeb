"""CPU-scale replication of the paper's language results (its Table 1 and Table 4 ablations).

    python experiments/toy_math/replicate.py --out experiments/toy_math/results      # the full sweep
    python experiments/toy_math/replicate.py --out /tmp/smoke --smoke                  # minutes: wiring only

1. A base LM (`tiny`, ~1M parameters) is pretrained briefly on a general mix: the embedded synthetic
   math generator with a large share of off-domain filler text.
2. From that base, continued pretraining on the math stream (less filler: NuminaMath-CoT's role)
   for every arm — NTP, V-Pretraining (dot, cosine), random feedback, uniform top-K smoothing, self
   top-K distillation, and trust-region-regularised V-Pretraining at several λ — with a synthetic
   GSM8K-format feedback set of 1,024 problems, for several seeds, under matched learner updates;
   then every arm cheaper than V-Pretraining is re-run with more steps under matched wall-clock
   (steps scaled by the measured seconds per step).
3. Every run is evaluated at its last step (no checkpoint selection) on a held-out synthetic test
   set — problems of the generator's 'eval' partition, which neither the stream nor the feedback set
   contains: strict Pass@1 (needs the `#### N` format), format-agnostic Pass@1 (the last number),
   the answer NLL split into format tokens (`#`) and content tokens, held-out pretraining perplexity,
   and α statistics by target-token class. Intermediate checkpoints give the curves.

Writes results.json, table.md and PNG plots to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)

from vpt import config_lib, train  # noqa: E402
from vpt import vpt_step  # noqa: E402
from vpt.data import synthetic_math  # noqa: E402
from vpt.data.feedback import make_feedback_iterator  # noqa: E402
from vpt.data.pipeline import make_lm_iterator  # noqa: E402
from vpt.evals import gsm8k  # noqa: E402
from vpt.models.designer import DesignerConfig, TaskDesigner  # noqa: E402
from vpt.models.lm import LMConfig, Transformer  # noqa: E402
from vpt.tasks.lm_soft_targets import candidate_logprobs, candidates  # noqa: E402

ARMS = {
    "ntp": {"vpt.mode": "ntp"},
    "value": {"vpt.mode": "value", "vpt.align": "dot"},
    "value_cosine": {"vpt.mode": "value", "vpt.align": "cosine"},
    "random_feedback": {"vpt.mode": "random_feedback", "vpt.align": "dot"},
    "uniform_topk": {"vpt.mode": "uniform_topk"},
    "self_distill": {"vpt.mode": "self_distill"},
    "value_tr0.3": {"vpt.mode": "value", "vpt.align": "dot", "vpt.reg_trust_region": 0.3},
    "value_tr3": {"vpt.mode": "value", "vpt.align": "dot", "vpt.reg_trust_region": 3.0},
}
PAPER_TABLE4 = {  # Qwen1.5-4B GSM8K Pass@1 (v1 Table 4 / v2 Table 5)
    "ntp": 56.48, "random_feedback": 54.31, "uniform_topk": 54.58, "self_distill": 57.61, "value": 58.98}
TEST_SEED, VALIDATION_SEED = 910_001, 910_002  # 'eval'-partition problems; validation is unused here.


def _experiment_config(arg):
  return config_lib.load_config_file(os.path.join(REPO, "experiments", "lm_vpt.py"), arg)



def base_config(args):
  config = _experiment_config(f"{args.size},ntp")
  return config_lib.with_overrides(config, {"num_steps": args.base_steps, "data.synthetic.irrelevant_fraction": 0.6,
                       "data.synthetic.seed": 101, "progress_bar": False, "mesh.num_devices": 1,
                       "eval_every_steps": args.base_steps, "checkpoint.every_steps": args.base_steps,
                       "optimizer.learning_rate": 3e-3, "optimizer.warmup_steps": max(1, args.base_steps // 10)})


def arm_config(args, arm, seed, steps, base_dir):
  config = _experiment_config(f"{args.size},value")
  every = max(1, steps // args.curve_points)
  overrides = {
      "num_steps": steps, "seed": seed, "init_from": base_dir, "progress_bar": False, "mesh.num_devices": 1,
      "data.synthetic.irrelevant_fraction": 0.3, "data.synthetic.seed": 202 + seed,
      "optimizer.learning_rate": 1e-3, "optimizer.warmup_steps": max(1, steps // 20),
      "eval_every_steps": every, "checkpoint.every_steps": every, "checkpoint.keep": args.curve_points + 2,
      "vpt.burn_in_steps": steps // 10, "feedback.num_examples": 1024, "log_every_steps": 10,
      **ARMS[arm]}
  return config_lib.with_overrides(config, overrides)


def interleaved_step_times(args, arms, base_dir, tokenizer, rounds: int = 5) -> dict[str, float]:
  """Seconds per learner step of every arm, measured side by side: the arms' jitted steps are built
  once, then timed round-robin (each window = `meta_every` steps, so it holds exactly one meta step),
  and the median window of each arm is kept. Load from other jobs hits every arm alike, which the
  per-run step times of separate, sequential runs cannot promise."""
  from vpt import sharding

  runners = {}
  for arm in arms:
    config = arm_config(args, arm, 0, args.steps, base_dir)
    model_cfg = LMConfig.from_config(config.model, tokenizer.vocab_size)
    model = Transformer(model_cfg)
    optimizer, schedule = train.make_learner_optimizer(config, model_cfg)
    init_fn = train.make_init_fn(config, model, optimizer)
    mesh = sharding.make_mesh(config.mesh)
    shardings = sharding.state_shardings(jax.eval_shape(init_fn), mesh, optimizer)
    state = jax.jit(init_fn, out_shardings=shardings)()
    step = train.jit_train_step(config, model, optimizer, schedule, shardings, mesh)
    vpt_cfg = config.vpt
    # Start on a meta step, past the burn-in: every window then holds one meta step.
    first = -(-vpt_cfg.burn_in_steps // vpt_cfg.meta_every) * vpt_cfg.meta_every
    state = state.replace(step=jnp.asarray(first, state.step.dtype))
    batch = jax.tree.map(jnp.asarray, next(make_lm_iterator(config.data, tokenizer, split="train", seq_len=config.data.seq_len,
                                                            global_batch_size=config.batch_size, seed=0)))
    fb = (jax.tree.map(jnp.asarray, next(make_feedback_iterator(config.feedback, tokenizer, seed=0)))
          if vpt_step.uses_designer(vpt_cfg) else None)
    runners[arm] = {"state": state, "step": step, "batch": batch, "fb": fb, "window": vpt_cfg.meta_every}

  def window(arm):
    r = runners[arm]
    t = time.perf_counter()
    for _ in range(r["window"]):
      r["state"], metrics = r["step"](r["state"], r["batch"], r["fb"])
    jax.block_until_ready(metrics)
    return (time.perf_counter() - t) / r["window"]

  for arm in arms:  # compile, and one warm window
    window(arm), window(arm)
  times = {arm: [] for arm in arms}
  for _ in range(rounds):
    for arm in arms:
      times[arm].append(window(arm))
  return {arm: statistics.median(t) for arm, t in times.items()}


def test_records(n):
  data = synthetic_math.SyntheticMath(TEST_SEED, n, partition="eval")
  return [{"question": r["question"], "answer": r["answer"], "final": str(synthetic_math.final_answer(r["answer"]))}
          for r in (data[i] for i in range(n))]


def token_class(piece: str) -> str:
  if "#" in piece:
    return "format"
  if any(c.isdigit() for c in piece):
    return "digit"
  if any(c in "+-*/=" for c in piece):
    return "operator"
  if "\n" in piece:
    return "newline"
  return "word"


def answer_nll_by_class(model, params, tokenizer, fb_cfg, records):
  """Mean answer-token NLL on the test problems, split into format ('#') and content tokens."""
  it = make_feedback_iterator(fb_cfg, tokenizer, seed=0, records=records)
  sums, counts = {"format": 0.0, "content": 0.0}, {"format": 0, "content": 0}
  logp_fn = jax.jit(lambda p, b: jnp.take_along_axis(jax.nn.log_softmax(model.apply(
      {"params": p}, b["inputs"], b["positions"], b["segment_ids"])), b["targets"][..., None], -1)[..., 0])
  for _ in range(max(1, len(records) // fb_cfg.batch_size)):
    b = next(it)
    logp = np.asarray(logp_fn(params, b))
    for row in range(b["targets"].shape[0]):
      for t in np.nonzero(b["loss_mask"][row])[0]:
        cls = "format" if token_class(tokenizer.id_to_piece(int(b["targets"][row, t]))) == "format" else "content"
        sums[cls] -= float(logp[row, t])
        counts[cls] += 1
  return {f"answer_nll_{k}": sums[k] / max(counts[k], 1) for k in sums}


def alpha_by_class(config, model, params, designer_params, tokenizer):
  """Mean α of the designer's targets per class of the true next token, on a held-out stream batch."""
  it = make_lm_iterator(config.data, tokenizer, split="eval", global_batch_size=config.batch_size,
                        seq_len=config.data.seq_len, seed=0)
  b = jax.tree.map(jnp.asarray, next(it))
  designer = TaskDesigner(DesignerConfig.from_config(config.vpt)) if vpt_step.uses_designer(config.vpt) else None
  logits = model.apply({"params": params}, b["inputs"], b["positions"], b["segment_ids"])
  cand = candidates(logits, b["targets"], config.vpt.top_k)
  alpha, _ = vpt_step.designer_targets(config.vpt, designer, designer_params, params["embed_tokens"]["embedding"], b,
                                       cand, candidate_logprobs(logits, cand))
  alpha, targets, mask = np.asarray(alpha), np.asarray(b["targets"]), np.asarray(b["loss_mask"])
  out = {}
  for cls in ("format", "digit", "operator", "newline", "word"):
    sel = [(r, t) for r, t in zip(*np.nonzero(mask)) if token_class(tokenizer.id_to_piece(int(targets[r, t]))) == cls]
    out[f"alpha_{cls}"] = float(np.mean([alpha[r, t] for r, t in sel])) if sel else float("nan")
  return out


def fact_accuracy(generations) -> float:
  """Share of the `a op b = c` facts written in the generations that are arithmetically right: a
  format-agnostic measure of skill with far more samples than Pass@1 (2–4 facts per problem)."""
  facts = [f for text in generations for f in synthetic_math.extract_equations(text)]
  return sum(synthetic_math.evaluate(a, op, b) == c for a, op, b, c in facts) / max(len(facts), 1)


def evaluate_run(config, workdir, summary, records, args, tokenizer):
  model = Transformer(LMConfig.from_config(config.model, tokenizer.vocab_size))
  curve = []
  for step in sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit()):
    params, _ = gsm8k.restore_params(workdir, step)
    n = len(records) if step == config.num_steps else args.curve_items
    out_path = os.path.join(workdir, f"test_predictions_{step}.json")
    scores = gsm8k.evaluate(model, params, tokenizer, records[:n], max_new_tokens=args.max_new_tokens,
                            batch_size=32, out_path=out_path)
    with open(out_path) as f:
      generations = [p["generated"] for p in json.load(f)["predictions"]]
    curve.append({"step": step, "pass@1": scores["pass@1"], "strict_pass@1": scores["strict_pass@1"],
                  "format_rate": scores["format_rate"], "fact_accuracy": fact_accuracy(generations)})
  params = summary["state"].params
  designer_params = summary["state"].designer.params if summary["state"].designer is not None else None
  final = dict(curve[-1])
  final.update(answer_nll_by_class(model, params, tokenizer, config.feedback, records[:args.nll_items]))
  final.update(pretrain_perplexity=summary["eval"]["perplexity"], feedback_loss=summary["eval"]["feedback_loss"],
               heldout_loss=summary["eval"].get("heldout_loss"), steps=summary["step"],
               step_time_s=summary["throughput"]["step_time_s"])
  if config.vpt.mode != "ntp":
    final.update(alpha_by_class(config, model, params, designer_params, tokenizer))
  metrics = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  return final, curve, metrics


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--out", required=True)
  ap.add_argument("--size", default="tiny")
  ap.add_argument("--seeds", type=int, default=3)
  ap.add_argument("--steps", type=int, default=200)
  ap.add_argument("--base_steps", type=int, default=1000)
  ap.add_argument("--arms", default=",".join(ARMS))
  ap.add_argument("--test_items", type=int, default=200)
  ap.add_argument("--curve_items", type=int, default=48)
  ap.add_argument("--curve_points", type=int, default=2)
  ap.add_argument("--nll_items", type=int, default=128)
  ap.add_argument("--max_new_tokens", type=int, default=96)
  ap.add_argument("--smoke", action="store_true", help="nano model, 1 seed, few steps: checks the wiring")
  args = ap.parse_args()
  if args.smoke:
    args.size, args.seeds, args.steps, args.base_steps = "nano", 1, 8, 8
    args.test_items, args.curve_items, args.nll_items, args.max_new_tokens, args.curve_points = 16, 8, 16, 16, 2
  os.makedirs(args.out, exist_ok=True)
  arms = args.arms.split(",")
  start = time.perf_counter()
  records = test_records(args.test_items)

  base_dir = os.path.join(args.out, "runs", "base")
  train.run(base_config(args), base_dir)
  from vpt.data.tokenizer import SentencePieceTokenizer
  tokenizer = SentencePieceTokenizer(os.path.join(base_dir, "tokenizer", "spm.model"))

  results = []

  def run_arm(arm, seed, steps, protocol):
    workdir = os.path.join(args.out, "runs", f"{protocol}-{arm}-s{seed}")
    config = arm_config(args, arm, seed, steps, base_dir)
    summary = train.run(config, workdir)
    final, curve, metrics = evaluate_run(config, workdir, summary, records, args, tokenizer)
    results.append({"arm": arm, "seed": seed, "protocol": protocol, "final": final, "curve": curve,
                    "train": [m for m in metrics if "train/loss" in m],
                    "evals": [m for m in metrics if "eval/feedback_loss" in m]})
    print(f"[{time.perf_counter() - start:.0f}s] {protocol} {arm} seed {seed}: pass@1 {final['pass@1']:.3f} "
          f"strict {final['strict_pass@1']:.3f} ppl {final['pretrain_perplexity']:.3f}", flush=True)
    return final

  for seed in range(args.seeds):
    for arm in arms:
      run_arm(arm, seed, args.steps, "steps")
  # Matched wall-clock: V-Pretraining's seconds per step sets the budget; cheaper arms get more steps.
  step_time = interleaved_step_times(args, arms, base_dir, tokenizer)
  print("seconds per step, measured side by side:", {a: round(t, 4) for a, t in step_time.items()}, flush=True)
  budget = step_time.get("value", max(step_time.values())) * args.steps
  wallclock_steps = {arm: int(round(budget / step_time[arm])) for arm in arms}
  for seed in range(args.seeds):
    for arm in arms:
      # Within the timing's noise (a few %) of the matched-steps run: that run is the answer.
      if abs(wallclock_steps[arm] - args.steps) <= 0.03 * args.steps:
        twin = next(r for r in results if r["arm"] == arm and r["seed"] == seed and r["protocol"] == "steps")
        results.append({**twin, "protocol": "wallclock"})
      else:
        run_arm(arm, seed, wallclock_steps[arm], "wallclock")

  elapsed = time.perf_counter() - start
  with open(os.path.join(args.out, "results.json"), "w") as f:
    json.dump({"args": vars(args), "seconds": elapsed, "step_time_s": step_time, "wallclock_steps": wallclock_steps,
               "results": results}, f, indent=1, default=float)
  write_table(args, results, arms, elapsed, wallclock_steps)
  write_plots(args, results, arms, step_time)
  print(f"done in {elapsed / 60:.1f} min; see {args.out}/table.md", flush=True)


def _mean_std(values):
  values = [v for v in values if v is not None and np.isfinite(v)]
  if not values:
    return "—"
  return f"{np.mean(values):.3f} ± {np.std(values, ddof=1) if len(values) > 1 else 0.0:.3f}"


def write_table(args, results, arms, elapsed, wallclock_steps):
  cols = [("pass@1", "Pass@1 (format-agnostic)"), ("strict_pass@1", "strict Pass@1"),
          ("fact_accuracy", "arithmetic facts right"),
          ("format_rate", "`####` rate"), ("answer_nll_content", "answer NLL, content"),
          ("answer_nll_format", "answer NLL, format"), ("feedback_loss", "feedback-set L_down"),
          ("pretrain_perplexity", "held-out pretraining ppl"), ("alpha_format", "α on `#`"),
          ("alpha_digit", "α on digits"), ("alpha_word", "α on words")]
  lines = [f"Measured {time.strftime('%Y-%m-%d')}; {args.seeds} seeds; {args.steps} learner steps "
           f"(matched updates); whole sweep {elapsed / 60:.1f} min on this machine. Mean ± std over seeds; "
           f"last step evaluated (no checkpoint selection); test = {args.test_items} held-out problems.", ""]
  for protocol in ("steps", "wallclock"):
    lines.append(f"### {'Matched learner updates' if protocol == 'steps' else 'Matched wall-clock'}")
    lines.append("")
    lines.append("| arm | steps | " + " | ".join(c[1] for c in cols) + " | paper (Qwen1.5-4B, Pass@1) |")
    lines.append("|---" * (len(cols) + 3) + "|")
    for arm in arms:
      rows = [r["final"] for r in results if r["arm"] == arm and r["protocol"] == protocol]
      steps = args.steps if protocol == "steps" else wallclock_steps[arm]
      cells = [_mean_std([row.get(k) for row in rows]) for k, _ in cols]
      lines.append(f"| {arm} | {steps} | " + " | ".join(cells) + f" | {PAPER_TABLE4.get(arm, '—')} |")
    lines.append("")
  with open(os.path.join(args.out, "table.md"), "w") as f:
    f.write("\n".join(lines) + "\n")
  print("\n".join(lines))


def write_plots(args, results, arms, step_time):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(2, 3, figsize=(16, 8.5))
  for arm in arms:
    runs = [r for r in results if r["arm"] == arm and r["protocol"] == "steps"]
    steps = np.array([p["step"] for p in runs[0]["curve"]])
    eval_steps = np.array([m["step"] for m in runs[0]["evals"]])
    series = [(steps, np.mean([[p["pass@1"] for p in r["curve"]] for r in runs], axis=0)),
              (steps, np.mean([[p["fact_accuracy"] for p in r["curve"]] for r in runs], axis=0)),
              (eval_steps, np.mean([[m["eval/feedback_loss"] for m in r["evals"]] for r in runs], axis=0))]
    for col, (x, y) in enumerate(series):
      axes[0, col].plot(x, y, marker="o", label=arm)
      axes[1, col].plot(x * step_time[arm], y, marker="o", label=arm)
  for row, xlabel in enumerate(("learner step", "training seconds (side-by-side step time × step)")):
    for col, (ylabel, title) in enumerate((("Pass@1 (format-agnostic)", "Held-out accuracy"),
                                           ("share of written facts right", "Arithmetic skill"),
                                           ("feedback-set L_down", "Feedback loss"))):
      axes[row, col].set(xlabel=xlabel, ylabel=ylabel, title=f"{title} vs {'step' if row == 0 else 'wall-clock'}")
      axes[row, col].grid(alpha=0.3)
  axes[0, 0].legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(os.path.join(args.out, "curves.png"), dpi=110)

  fig, axes = plt.subplots(1, 2, figsize=(11, 4))
  for arm in [a for a in arms if a.startswith("value")]:
    r = next(r for r in results if r["arm"] == arm and r["protocol"] == "steps")
    pts = [(m["step"], m.get("train/alpha_mean"), m.get("train/meta/value")) for m in r["train"]]
    axes[0].plot([p[0] for p in pts], [p[1] for p in pts], label=arm)
    axes[1].plot([p[0] for p in pts], [p[2] for p in pts], label=arm)
  axes[0].set(xlabel="step", ylabel="mean α", title="Designer gate α over training")
  axes[1].set(xlabel="step", ylabel="V (last meta step)", title="Value over training")
  for ax in axes:
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(os.path.join(args.out, "alpha_value.png"), dpi=110)

  fig, ax = plt.subplots(figsize=(5.5, 4.5))
  base = [r["final"] for r in results if r["arm"] == "ntp" and r["protocol"] == "steps"]
  for arm in arms:
    rows = [r["final"] for r in results if r["arm"] == arm and r["protocol"] == "steps"]
    gain = np.mean([r["fact_accuracy"] for r in rows]) - np.mean([b["fact_accuracy"] for b in base])
    cost = np.mean([r["pretrain_perplexity"] for r in rows]) / np.mean([b["pretrain_perplexity"] for b in base]) - 1
    ax.scatter(cost, gain)
    ax.annotate(arm, (cost, gain), fontsize=8)
  ax.axhline(0, color="k", lw=0.5)
  ax.axvline(0, color="k", lw=0.5)
  ax.set(xlabel="held-out pretraining perplexity vs NTP (relative)", ylabel="arithmetic facts right − NTP's",
         title="Downstream gain vs pretraining cost")
  fig.tight_layout()
  fig.savefig(os.path.join(args.out, "tradeoff.png"), dpi=110)


if __name__ == "__main__":
  main()
