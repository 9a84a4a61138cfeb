"""CPU-scale replication of the paper's language results (its Table 1 and Table 4 ablations).

    python experiments/toy_math/replicate.py --out /tmp/repl-format                   # the default stream
    python experiments/toy_math/replicate.py --out /tmp/repl-skill --stream skill     # the skill experiment
    python experiments/toy_math/replicate.py --out /tmp/smoke --smoke                 # minutes: wiring only
    python experiments/toy_math/replicate.py --out /tmp/repl-skill --stream skill --resume --arms ntp,value_avg0.9
                                              # adds arms / seeds / the runs a cut-short sweep missed

1. The base model of the main job (`experiments/lm_vpt.py:tiny`, vpt/language/base_model.py): 600 NTP steps on
   the clean synthetic generator with 60 % filler, trained once and cached (`--base_cache`).
2. From that base, continued pretraining on a stream that mismatches the downstream, for every arm —
   NTP, V-Pretraining (dot, cosine), random feedback, uniform top-K smoothing, self top-K distillation,
   trust-region V-Pretraining — with the synthetic GSM8K-format feedback set of 1,024 problems, for
   several seeds, under matched learner updates; then (format stream) every arm cheaper than
   V-Pretraining is re-run with more steps under matched wall-clock. Streams (`--stream`):
     format: the main job's default — 30 % of solutions end `#### N`, 70 % NuminaMath's `$\\boxed{N}$`;
     skill:  every solution ends `#### N`, but 40 % of the written `a op b = c` results are wrong
             (random numbers of the same length): NTP copies wrong arithmetic.
3. Every run is evaluated at its last step (no checkpoint selection) on held-out *test* problems — the
   generator's 'test' partition, which neither the stream, the feedback set nor the validation problems
   that chose the settings contain (vpt/language/evals/math_skills.py): strict and format-agnostic Pass@1,
   `####` rate, facts right, lines per solution, the answer NLL split into format and content tokens,
   held-out pretraining perplexity, and where the designer acted (α by class of the true token, on the
   training stream). Differences to NTP are paired by seed (same data order and initialisation).

Writes results.json, table.md and PNG plots to --out.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import multiprocessing
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)

from experiments import replication  # noqa: E402
from vpt.core import checkpoint as ckpt_lib, config as core_config, run_dir
from vpt.language import base_model
from vpt.language import train  # noqa: E402
from vpt.language import vpt_step  # noqa: E402
from vpt.language.data import synthetic_math  # noqa: E402
from vpt.language.data.feedback import make_feedback_iterator  # noqa: E402
from vpt.language.data.pipeline import make_lm_iterator  # noqa: E402
from vpt.language.evals import math_skills  # noqa: E402
from vpt.language.models.lm import LMConfig, Transformer  # noqa: E402
from vpt.language.steps import state_shardings

ARMS = {
    "ntp": {"vpt.mode": "ntp"},
    "value": {"vpt.mode": "value", "vpt.align": "dot"},
    "value_cosine": {"vpt.mode": "value", "vpt.align": "cosine"},
    "random_feedback": {"vpt.mode": "random_feedback", "vpt.align": "dot"},
    "uniform_topk": {"vpt.mode": "uniform_topk"},
    "self_distill": {"vpt.mode": "self_distill"},
    "value_tr0.3": {"vpt.mode": "value", "vpt.align": "dot", "vpt.reg_trust_region": 0.3},
    "value_tr3": {"vpt.mode": "value", "vpt.align": "dot", "vpt.reg_trust_region": 3.0},
    # The signal options of issue 14 (item 3): g_down averaged over ≈ 10 meta steps' feedback batches;
    # a gate that reads the learner's confidence (log p(y), best other, gap, entropy).
    "value_avg0.9": {"vpt.mode": "value", "vpt.align": "dot", "vpt.g_down_average": 0.9},
    "value_gate": {"vpt.mode": "value", "vpt.align": "dot", "vpt.designer.gate_features": True},
}
DEFAULT_ARMS = "ntp,value,value_cosine,random_feedback,uniform_topk,self_distill,value_tr0.3"
STREAMS = {  # overrides of the main job's continued-pretraining stream (experiments/lm_ntp.py)
    "format": {},
    "skill": {"data.synthetic.downstream_format_fraction": 1.0, "data.synthetic.corrupt_fact_rate": 0.4,
              "data.synthetic.corrupt_mode": "random"},
}
PAPER_TABLE4 = {  # Qwen1.5-4B GSM8K Pass@1 (v1 Table 4 / v2 Table 5)
    "ntp": 56.48, "random_feedback": 54.31, "uniform_topk": 54.58, "self_distill": 57.61, "value": 58.98}
# What a resumed sweep must share with the runs it keeps.
RESUME_MUST_MATCH = ("stream", "size", "steps", "test_items", "curve_items", "curve_points", "nll_items",
                     "max_new_tokens", "smoke")
TEST_SEED = 910_001  # 'test'-partition problems; the settings were chosen on 'validation' problems.


def arm_config(args, arm, seed, steps):
  """The main job's config (base, stream, designer) with the arm, seed, steps and stream applied."""
  config = core_config.load_config_file(os.path.join(REPO, "experiments", "lm_vpt.py"), f"{args.size},value")
  every = max(1, steps // args.curve_points)
  overrides = {
      "num_steps": steps, "seed": seed, "progress_bar": False, "mesh.num_devices": 1,
      "data.synthetic.seed": 202 + seed, "optimizer.warmup_steps": max(1, steps // 20),
      "eval_every_steps": every, "checkpoint.every_steps": every, "checkpoint.keep": args.curve_points + 2,
      "vpt.burn_in_steps": steps // 10, "feedback.num_examples": 1024, "log_every_steps": 10,
      "eval_generation.num_items": 0, "base.cache_dir": args.base_cache,
      **STREAMS[args.stream], **ARMS[arm]}
  if args.smoke:
    overrides.update({"base.num_steps": args.base_steps, "optimizer.learning_rate": 1e-3})
  return base_model.with_base(core_config.with_overrides(config, overrides), train.run)


def interleaved_step_times(args, arms, tokenizer, rounds: int = 5) -> dict[str, float]:
  """Seconds per learner step of every arm, measured side by side: the arms' jitted steps are built
  once, then timed round-robin (each window = `meta_every` steps, so it holds exactly one meta step),
  and the median window of each arm is kept. Load from other jobs hits every arm alike, which the
  per-run step times of separate, sequential runs cannot promise."""
  from vpt.core import sharding

  runners = {}
  for arm in arms:
    config = arm_config(args, arm, 0, args.steps)
    model_cfg = LMConfig.from_config(config.model, tokenizer.vocab_size)
    model = Transformer(model_cfg)
    optimizer, schedule = train.make_learner_optimizer(config, model_cfg)
    init_fn = train.make_init_fn(config, model, optimizer)
    mesh = sharding.make_mesh(config.mesh)
    shardings = state_shardings(jax.eval_shape(init_fn), mesh, optimizer)
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
  data = synthetic_math.SyntheticMath(TEST_SEED, n, partition="test")
  return [{"question": r["question"], "answer": r["answer"], "final": str(synthetic_math.final_answer(r["answer"]))}
          for r in (data[i] for i in range(n))]


def evaluate_run(config, workdir, summary, records, args, tokenizer):
  model = Transformer(LMConfig.from_config(config.model, tokenizer.vocab_size))
  curve = []
  for step in run_dir.checkpoint_steps(workdir):
    params, _ = ckpt_lib.restore_learner_params(workdir, step)
    n = len(records) if step == config.num_steps else args.curve_items
    evaluate = math_skills.make_generation_evaluator(model, tokenizer, records[:n], max_new_tokens=args.max_new_tokens)
    scores = evaluate(params, out_path=os.path.join(workdir, f"test_predictions_{step}.json"))
    curve.append({"step": step, **scores})
  params = summary["state"].params
  final = dict(curve[-1])
  nll_records = records[:args.nll_items]
  it = make_feedback_iterator(config.feedback, tokenizer, seed=0, records=nll_records)
  batches = [next(it) for _ in range(max(1, len(nll_records) // config.feedback.batch_size))]
  final.update(math_skills.answer_nll_by_class(model, params, tokenizer, batches))
  final.update(pretrain_perplexity=summary["eval"]["perplexity"], feedback_loss=summary["eval"]["feedback_loss"],
               heldout_loss=summary["eval"].get("heldout_loss"), steps=summary["step"],
               step_time_s=summary["throughput"]["step_time_s"])
  final.update(summary.get("designer", {}))  # α by class on the training stream (designer arms)
  if config.vpt.mode in ("uniform_topk", "self_distill"):
    designer = math_skills.designer_on_stream(config, model, jax.device_get(params), None, tokenizer)
    final.update({k: v for k, v in designer.items() if k.startswith("alpha_")})
  metrics = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  return final, curve, metrics


def _train_and_evaluate(args, arm, seed, steps, protocol, records, tokenizer):
  workdir = os.path.join(args.out, "runs", f"{protocol}-{arm}-s{seed}")
  config = arm_config(args, arm, seed, steps)
  summary = train.run(config, workdir)
  final, curve, metrics = evaluate_run(config, workdir, summary, records, args, tokenizer)
  return {"arm": arm, "seed": seed, "protocol": protocol, "final": final, "curve": curve,
          "train": [m for m in metrics if "train/loss" in m], "evals": [m for m in metrics if "eval/feedback_loss" in m]}


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--out", required=True)
  ap.add_argument("--stream", default="format", choices=sorted(STREAMS))
  ap.add_argument("--size", default="tiny")
  ap.add_argument("--seeds", type=int, default=3)
  ap.add_argument("--steps", type=int, default=200)
  ap.add_argument("--arms", default=DEFAULT_ARMS)
  ap.add_argument("--skip_wallclock", action="store_true", help="matched learner updates only")
  ap.add_argument("--base_cache", default="", help="where the base model is cached (default: vpt's cache dir)")
  ap.add_argument("--test_items", type=int, default=400)
  ap.add_argument("--curve_items", type=int, default=48)
  ap.add_argument("--curve_points", type=int, default=2)
  ap.add_argument("--nll_items", type=int, default=128)
  ap.add_argument("--max_new_tokens", type=int, default=96)
  ap.add_argument("--jobs", type=int, default=1, help="runs trained at once (one core each)")
  ap.add_argument("--smoke", action="store_true", help="nano model, 1 seed, few steps: checks the wiring")
  ap.add_argument("--resume", action="store_true",
                  help="keep the runs of --out/results.json and train only the missing (arm, seed, protocol) runs; "
                       "the settings must match the saved ones, the step times of the matched wall-clock are reused")
  ap.add_argument("--table_only", action="store_true",
                  help="write table.md and the plots from --out/results.json (e.g. of a sweep cut short)")
  args = ap.parse_args()
  if args.table_only:
    return tabulate(args.out)
  args.base_steps = 0
  if args.smoke:
    args.size, args.seeds, args.steps, args.base_steps = "nano", 1, 8, 8
    args.test_items, args.curve_items, args.nll_items, args.max_new_tokens, args.curve_points = 16, 8, 16, 16, 2
    args.base_cache = args.base_cache or os.path.join(args.out, "base")
  os.makedirs(args.out, exist_ok=True)
  arms = args.arms.split(",")
  start = time.perf_counter()
  records = test_records(args.test_items)
  base_dir = arm_config(args, "ntp", 0, args.steps).init_from  # trains the base if the cache lacks it
  from vpt.language.data.tokenizer import SentencePieceTokenizer
  tokenizer = SentencePieceTokenizer(os.path.join(base_dir, "tokenizer", "spm.model"))

  results, step_time, wallclock_steps, earlier_seconds = [], {}, {}, 0.0
  saved = replication.resume_from(args.out, args, RESUME_MUST_MATCH) if args.resume else None
  if saved is not None:
    results, step_time, wallclock_steps = saved["results"], saved["step_time_s"], saved["wallclock_steps"]
    earlier_seconds = saved["seconds"]
    arms = list(dict.fromkeys([r["arm"] for r in results] + arms))
    args.arms = ",".join(arms)
    print(f"--resume: {len(results)} runs kept from {args.out}/results.json", flush=True)
  done = {(r["arm"], r["seed"], r["protocol"]) for r in results}

  def save(elapsed):
    replication.save_results(args.out, args=vars(args), base_dir=base_dir, seconds=earlier_seconds + elapsed,
                             step_time_s=step_time, wallclock_steps=wallclock_steps, results=results)

  def run_all(jobs):
    """Trains and evaluates every (arm, seed, steps, protocol) of `jobs`, `args.jobs` at a time (each run
    keeps one core busy: the tiny learner does not scale to two); runs already in `results` are skipped."""
    jobs = [job for job in jobs if (job[0], job[1], job[3]) not in done]

    def record(result):
      results.append(result)
      save(time.perf_counter() - start)  # a sweep cut short keeps what it measured
      final = result["final"]
      print(f"[{time.perf_counter() - start:.0f}s] {result['protocol']} {result['arm']} seed {result['seed']}: "
            f"strict {final['strict_pass@1']:.3f} agnostic {final['pass@1']:.3f} #### {final['format_rate']:.3f} "
            f"facts {final['facts_right']:.3f} ppl {final['pretrain_perplexity']:.3f}", flush=True)

    if args.jobs <= 1:
      for job in jobs:
        record(_train_and_evaluate(args, *job, records, tokenizer))
      return
    with concurrent.futures.ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
      for result in pool.map(_train_and_evaluate, *zip(*[(args, *job, records, tokenizer) for job in jobs])):
        record(result)

  run_all([(arm, seed, args.steps, "steps") for seed in range(args.seeds) for arm in arms])
  protocols = ["steps"]
  if not args.skip_wallclock:
    # Matched wall-clock: V-Pretraining's seconds per step sets the budget; cheaper arms get more steps.
    protocols.append("wallclock")
    if not all(arm in step_time for arm in arms):  # (a resumed sweep keeps the times its budget came from)
      step_time.update(interleaved_step_times(args, arms, tokenizer))
    print("seconds per step, measured side by side:", {a: round(t, 4) for a, t in step_time.items()}, flush=True)
    budget = step_time.get("value", max(step_time.values())) * args.steps
    wallclock_steps.update({arm: int(round(budget / step_time[arm])) for arm in arms})
    longer = []
    for seed in range(args.seeds):
      for arm in arms:
        # Within the timing's noise (a few %) of the matched-steps run: that run is the answer.
        if (arm, seed, "wallclock") in done:
          continue
        if abs(wallclock_steps[arm] - args.steps) <= 0.03 * args.steps:
          twin = next(r for r in results if r["arm"] == arm and r["seed"] == seed and r["protocol"] == "steps")
          results.append({**twin, "protocol": "wallclock"})
        else:
          longer.append((arm, seed, wallclock_steps[arm], "wallclock"))
    run_all(longer)

  elapsed = time.perf_counter() - start
  save(elapsed)
  write_table(args, results, arms, earlier_seconds + elapsed, wallclock_steps, protocols)
  write_plots(args, results, arms, step_time)
  print(f"done in {elapsed / 60:.1f} min; see {args.out}/table.md", flush=True)


def tabulate(out):
  """table.md and plots from a results.json, with the settings of the run that wrote it."""
  with open(os.path.join(out, "results.json")) as f:
    saved = json.load(f)
  args = argparse.Namespace(**{**saved["args"], "out": out})
  results = saved["results"]
  arms = list(dict.fromkeys(r["arm"] for r in results))
  protocols = [p for p in ("steps", "wallclock") if any(r["protocol"] == p for r in results)]
  seeds = {p: sorted({r["seed"] for r in results if r["protocol"] == p}) for p in protocols}
  print(f"tabulating {len(results)} runs: seeds per protocol {seeds}", flush=True)
  write_table(args, results, arms, saved["seconds"], saved["wallclock_steps"], protocols)
  write_plots(args, results, arms, saved["step_time_s"])


COLUMNS = [("strict_pass@1", "strict Pass@1"), ("pass@1", "Pass@1 (format-agnostic)"), ("format_rate", "`####` rate"),
           ("facts_right", "facts right"), ("lines_per_solution", "lines per solution"),
           ("answer_nll_content", "answer NLL, content"), ("answer_nll_format", "answer NLL, format"),
           ("feedback_loss", "feedback-set L_down"), ("pretrain_perplexity", "held-out pretraining ppl"),
           ("alpha_format", "α at the answer marker"), ("q_hash_at_boxed", "q(####) where stream writes boxed"),
           ("alpha_digit", "α on digits"), ("alpha_word", "α on words")]
PAIRED = [("strict_pass@1", "strict Pass@1"), ("pass@1", "Pass@1 (format-agnostic)"), ("format_rate", "`####` rate"),
          ("facts_right", "facts right"), ("lines_per_solution", "lines per solution"),
          ("feedback_loss", "feedback-set L_down"), ("pretrain_perplexity", "held-out pretraining ppl")]


def write_table(args, results, arms, elapsed, wallclock_steps, protocols=("steps", "wallclock")):
  lines = [f"Stream `{args.stream}`: {STREAMS[args.stream] or 'the main job default'}. Measured "
           f"{time.strftime('%Y-%m-%d')}; {args.seeds} seeds; {args.steps} learner steps (matched updates); "
           f"whole sweep {elapsed / 60:.1f} min on this machine. Mean ± std over seeds; last step evaluated "
           f"(no checkpoint selection); test = {args.test_items} held-out 'test' problems, greedy, "
           f"{args.max_new_tokens} new tokens.", ""]
  for protocol in protocols:
    lines.append(f"### {'Matched learner updates' if protocol == 'steps' else 'Matched wall-clock'}")
    lines.append("")
    lines.append("| arm | steps | seeds | " + " | ".join(c[1] for c in COLUMNS) + " | paper (Qwen1.5-4B, Pass@1) |")
    lines.append("|---" * (len(COLUMNS) + 4) + "|")
    for arm in arms:
      rows = [r["final"] for r in results if r["arm"] == arm and r["protocol"] == protocol]
      if not rows:
        continue
      steps = args.steps if protocol == "steps" else wallclock_steps[arm]
      cells = [replication.mean_std([row.get(k) for row in rows]) for k, _ in COLUMNS]
      lines.append(f"| {arm} | {steps} | {len(rows)} | " + " | ".join(cells) + f" | {PAPER_TABLE4.get(arm, '—')} |")
    lines.append("")
  for protocol in protocols if "ntp" in arms else ():
    label = "matched updates" if protocol == "steps" else "matched wall-clock: each arm's own step count"
    lines += [f"### Paired differences to NTP ({label}; mean ± s.e. over seeds, seeds with arm > NTP)", "",
              "| arm | " + " | ".join(c[1] for c in PAIRED) + " |", "|---" * (len(PAIRED) + 1) + "|"]
    for arm in arms:
      if arm == "ntp":
        continue
      cells = [replication.difference_cell(replication.paired_difference(results, arm, key, "ntp",
                                                                           protocol=protocol)) for key, _ in PAIRED]
      lines.append(f"| {arm} | " + " | ".join(cells) + " |")
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
    series = [(steps, np.mean([[p["strict_pass@1"] for p in r["curve"]] for r in runs], axis=0)),
              (steps, np.mean([[p["facts_right"] for p in r["curve"]] for r in runs], axis=0)),
              (eval_steps, np.mean([[m["eval/feedback_loss"] for m in r["evals"]] for r in runs], axis=0))]
    for col, (x, y) in enumerate(series):
      axes[0, col].plot(x, y, marker="o", label=arm)
      seconds = step_time.get(arm) or np.mean([r["final"]["step_time_s"] for r in runs])  # side by side if measured
      axes[1, col].plot(x * seconds, y, marker="o", label=arm)
  for row, xlabel in enumerate(("learner step", "training seconds (side-by-side step time × step)")):
    for col, (ylabel, title) in enumerate((("strict Pass@1 (#### N)", "Held-out strict accuracy"),
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
    gain = np.mean([r["facts_right"] for r in rows]) - np.mean([b["facts_right"] for b in base])
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
