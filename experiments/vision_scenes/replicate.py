"""CPU-scale replication of the paper's vision result (PAPER §4, §7.1): DINO continued SSL vs V-Pretraining.

    python experiments/vision_scenes/replicate.py --out experiments/vision_scenes/results --ignore_gate   # the sweep
    python experiments/vision_scenes/replicate.py --out /tmp/vsmoke --smoke                 # wiring only

1. A base ViT (`tiny` of experiments/vision_dino.py: 32 px procedural scenes — `SCENES` below: 1–3 larger
   objects on a dark ground — patch 4, d 96, 4 blocks) is pretrained with plain DINO on the unlabeled
   scene stream (1,000 steps at LR 1e-4) — the stand-in for a DINOv3 checkpoint. It is probed on val
   beside a random-init ViT: the arms run only if it beats it (the gate, `--gate_margin`).
2. From that base (student, teacher and centre), every arm continues for the same number of learner
   updates, batch and schedule (matched learner updates, the paper's v1 protocol), for several seeds:
     dino             continued DINO SSL on the fixed multi-crop pipeline (the baseline)
     unet             V-Pretraining, a U-Net designer learning soft masks μ on the global crops
     candidates       V-Pretraining, M candidate views weighted by their vmapped-JVP value
     random_feedback  the U-Net designer with g_down replaced by a random direction of equal norm
   (meta step every 2, designer LR 5e-3: ~80 designer updates). Feedback: segmentation CE + depth L1
   heads on frozen features, refreshed on labeled_train at each meta step, g_down on labeled_meta
   (2,000 + 512 scenes, the paper's ADE20K pool sizes). Labels never reach the learner.
3. Every run's last checkpoint (no selection) is probed on frozen features: linear-BN segmentation (mIoU)
   and depth (RMSE, AbsRel, δ1) heads and a linear / kNN classifier (the largest object's class), fitted
   on labeled_train and scored on the held-out test split (scenes of unseen Fashion-MNIST items).

Writes results.json, table.md and PNG plots (results.png, curves.png, masks.png, candidates.png) to --out.
Compilation is cached on disk (--xla_cache), so each arm compiles once across seeds.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)

import jax  # noqa: E402
import numpy as np  # noqa: E402

from experiments import replication  # noqa: E402
from vpt.core import config as core_config, metrics as metrics_lib, sharding
from vpt.vision import train as train_vision
from vpt.vision import step as vision_step  # noqa: E402
from vpt.vision.models.vit import ViT, ViTConfig  # noqa: E402

ARMS = ("dino", "unet", "candidates", "random_feedback")
METRICS = (  # (key, label, higher is better)
    ("miou", "seg mIoU ↑", True), ("rmse", "depth RMSE ↓", False), ("abs_rel", "depth AbsRel ↓", False),
    ("delta1", "depth δ1 ↑", True), ("linear_acc", "linear acc ↑", True), ("knn_acc", "kNN acc ↑", True))
PAPER = (  # PAPER §7.1, DINOv3 ViT-L continued SSL, baseline → V-Pretraining (v1)
    "Paper (DINOv3 ViT-L, ADE20K / NYUv2 / ImageNet-1K probes): mIoU 51.33 → 52.40, NYUv2 RMSE 0.5752 → 0.5522, "
    "linear acc 84.07 → 84.59.")


# The scenes of every run here: larger objects (1–3) on a dark ground with bright objects. With the
# defaults (2–5 small objects, any colours) a linear seg head on random-init or raw-pixel features
# predicts background everywhere (mIoU = IoU_bg / 14), so no base can be measured against the floor;
# with these, random init scores mIoU 0.11 on val (experiments/vision_scenes/README.md).
SCENES = {"data.scenes.object_size": 1.2, "data.scenes.min_objects": 1, "data.scenes.max_objects": 3,
          "data.scenes.ground_color": (0.0, 0.3), "data.scenes.object_tint": (0.5, 1.0)}


def _experiment(arg):
  config = core_config.load_config_file(os.path.join(REPO, "experiments", "vision_dino.py"), arg)
  return core_config.with_overrides(config, SCENES)


def base_config(args):
  config = _experiment(f"{args.size},dino")
  return core_config.with_overrides(config, {
      "num_steps": args.base_steps, "seed": 1000, "progress_bar": False, "mesh.num_devices": 1,
      "optimizer.learning_rate": args.base_lr, "optimizer.warmup_steps": max(1, args.base_steps // 10),
      "eval.num_train": 0, "checkpoint.every_steps": args.base_steps, "log_every_steps": max(1, args.base_steps // 20)})


def arm_config(args, arm, seed, base_dir):
  config = _experiment(f"{args.size},{arm}")
  return core_config.with_overrides(config, {
      "num_steps": args.steps, "seed": seed, "init_from": base_dir, "progress_bar": False, "mesh.num_devices": 1,
      "optimizer.learning_rate": args.lr, "optimizer.warmup_steps": max(1, args.steps // 20),
      "vpt.burn_in_steps": args.burn_in, "vpt.meta_every": args.meta_every,
      "vpt.designer.learning_rate": args.designer_lr, "eval.num_train": 0,  # probed once, on test, after training
      "checkpoint.every_steps": args.steps, "log_every_steps": max(1, args.steps // 40)})


GATE_METRICS = (("miou", True), ("linear_acc", True), ("rmse", False))  # (key, higher is better)


def probe_random_init(config, split):
  """The frozen-feature probes of a randomly initialised ViT of `config`'s shape on `split`: the floor a
  pretrained base has to clear before continuing it can say anything."""
  config = train_vision.resolve_config(config)
  mesh = sharding.make_mesh(config.mesh)
  size = config.data.image_size
  params = ViT(ViTConfig.from_config(config.model)).init(jax.random.PRNGKey(config.seed), np.zeros((1, size, size, 3)))
  return train_vision.Evaluator(config, mesh, split)(params["params"])


def gate_verdict(random_init, base, margin):
  """(passed, reasons): the base must beat the random-init ViT by `margin` on every GATE_METRICS entry
  (absolute; RMSE in metres, lower is better) — otherwise the arms would compare noise around chance."""
  reasons = []
  for key, higher in GATE_METRICS:
    gain = (base[key] - random_init[key]) * (1 if higher else -1)
    if gain < margin:
      reasons.append(f"{key}: base {base[key]:.4f} vs random init {random_init[key]:.4f} (needs {margin:+.4f} better)")
  return not reasons, reasons


def probe_on_test(workdir, config):
  """The frozen-feature probes of the run's last checkpoint on the held-out test split."""
  return train_vision.evaluate_run(workdir, "test", overrides={"eval.num_train": config.eval.num_train})


def _final(summary, test, step_time):
  out = {k: test[k] for k, _, _ in METRICS if k in test}
  train = summary.get("train") or {}
  out.update(train_loss=train.get("loss"), step_time_s=step_time, mask_mean=train.get("mask_mean"))
  return out


def example_masks(config, designer_params, images):
  """(μ [N, H, W], ṽ [N, H, W, C]) of the U-Net designer on `images` (test scenes at the crop size)."""
  setup = vision_step.VisionSetup.from_config(config)
  views, mu = jax.jit(lambda p, x: vision_step.unet_views(setup, p, x))(designer_params, images[None])
  return np.asarray(mu), np.asarray(views[0])


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--out", required=True)
  ap.add_argument("--size", default="tiny")
  ap.add_argument("--seeds", type=int, default=3)
  ap.add_argument("--steps", type=int, default=160, help="learner updates of every arm (matched)")
  ap.add_argument("--base_steps", type=int, default=1000)
  ap.add_argument("--lr", type=float, default=1e-4, help="continued SSL learning rate")
  ap.add_argument("--base_lr", type=float, default=1e-4, help="DINO's rule 5e-4·batch/256 = 6e-5 at batch 32; "
                  "1e-3 destroys the features of this ViT (README)")
  ap.add_argument("--burn_in", type=int, default=0, help="learner steps before the first meta step")
  ap.add_argument("--meta_every", type=int, default=2, help="learner steps per meta step")
  ap.add_argument("--designer_lr", type=float, default=5e-3,
                  help="the paper's 1.5e-4–8e-4 serve ~5,000 designer updates; here there are steps/meta_every")
  ap.add_argument("--arms", default=",".join(ARMS))
  ap.add_argument("--xla_cache", default=os.path.join(tempfile.gettempdir(), "vpt_xla_cache"),
                  help="persistent compilation cache ('' = off)")
  ap.add_argument("--gate_margin", type=float, default=0.01,
                  help="the base must beat a random-init ViT by this much on val (mIoU, linear acc, RMSE)")
  ap.add_argument("--ignore_gate", action="store_true", help="run the arms even if the base fails the gate")
  ap.add_argument("--smoke", action="store_true", help="nano model, 1 seed, a few steps: checks the wiring")
  args = ap.parse_args()
  if args.smoke:
    # The base and the dino arm then share one compiled step (same schedule): only the wiring is checked.
    args.size, args.seeds, args.steps, args.base_steps, args.base_lr = "nano", 1, 4, 4, args.lr
  arms = args.arms.split(",")
  unknown = sorted(set(arms) - set(ARMS))
  if unknown:
    ap.error(f"--arms: unknown {unknown}; expected a subset of {ARMS}")
  if args.xla_cache:
    jax.config.update("jax_compilation_cache_dir", args.xla_cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  os.makedirs(args.out, exist_ok=True)
  start = time.perf_counter()
  log = lambda msg: print(f"[{time.perf_counter() - start:.0f}s] {msg}", flush=True)

  base_dir = os.path.join(args.out, "runs", "base")
  base = train_vision.run(base_config(args), base_dir)
  experiment = _experiment(f"{args.size},dino")
  results = [{"arm": "base", "seed": 0, "final": _final(base, probe_on_test(base_dir, experiment),
                                                         base.get("throughput", {}).get("step_time_s"))}]
  log(f"base: {results[0]['final']}")
  # The gate, on val (test is only scored after training): is the base a better start than random weights?
  probes = {"eval.num_train": experiment.eval.num_train}  # base_config has it off
  gate = {"split": "val", "margin": args.gate_margin,
          "random_init": probe_random_init(core_config.with_overrides(base_config(args), probes), "val"),
          "base": train_vision.evaluate_run(base_dir, "val", overrides=probes)}
  gate["passed"], gate["reasons"] = gate_verdict(gate["random_init"], gate["base"], args.gate_margin)
  log(f"gate on val: {'passed' if gate['passed'] else 'FAILED: ' + '; '.join(gate['reasons'])}")
  if not gate["passed"] and not args.ignore_gate:
    write_results(args, time.perf_counter() - start, gate, results)
    sys.exit(f"The base is not better than a randomly initialised ViT on val ({'; '.join(gate['reasons'])}): "
             "continuing it cannot test the claim, so no arm was run. Pretrain a better base (--base_steps, "
             "--base_lr) or pass --ignore_gate to run the arms anyway.")

  masks = {}
  for seed in range(args.seeds):
    for arm in arms:
      workdir = os.path.join(args.out, "runs", f"{arm}-s{seed}")
      config = arm_config(args, arm, seed, base_dir)
      summary = train_vision.run(config, workdir)
      test = probe_on_test(workdir, _experiment(f"{args.size},{arm}"))
      final = _final(summary, test, summary.get("throughput", {}).get("step_time_s"))
      records = metrics_lib.read_jsonl(os.path.join(workdir, "metrics.jsonl"))
      results.append({"arm": arm, "seed": seed, "final": final, "train": [r for r in records if "train/loss" in r]})
      if seed == 0 and arm in ("unet", "random_feedback"):
        masks[arm] = (config, jax.device_get(summary["state"].designer.params))
      log(f"{arm} seed {seed}: " + ", ".join(f"{k} {final[k]:.4f}" for k, _, _ in METRICS if k in final))

  elapsed = time.perf_counter() - start
  write_results(args, elapsed, gate, results)
  write_table(args, results, arms, elapsed, gate)
  write_plots(args, results, arms, masks)
  log(f"done in {elapsed / 60:.1f} min; see {args.out}/table.md")


def write_results(args, seconds, gate, results):
  replication.save_results(args.out, args=vars(args), seconds=seconds, gate=gate, results=results)


def _rows(results, arm):
  return sorted((r for r in results if r["arm"] == arm), key=lambda r: r["seed"])


def write_table(args, results, arms, elapsed, gate):
  lines = [f"Measured {time.strftime('%Y-%m-%d')}: `{args.size}` ViT on procedural scenes ({SCENES}), base "
           f"{args.base_steps} DINO steps at LR {args.base_lr:g}, then {args.steps} learner updates per arm (matched; LR "
           f"{args.lr:g}; meta step every {args.meta_every}, designer LR {args.designer_lr:g}), {args.seeds} seeds; whole sweep "
           f"{elapsed / 60:.1f} min on this machine. Mean ± std over seeds; last checkpoint probed on frozen "
           "features (no selection); probes fitted on labeled_train, scored on the test split.", "",
           "| arm | " + " | ".join(label for _, label, _ in METRICS) + " | final DINO loss | mean μ | s/step |",
           "|---" * (len(METRICS) + 4) + "|"]
  for arm in ["base"] + arms:
    rows = [r["final"] for r in _rows(results, arm)]
    mean_std = lambda key, fmt="{:.4f}": replication.mean_std([row.get(key) for row in rows], fmt)
    cells = [mean_std(k) for k, _, _ in METRICS]
    cells += [mean_std("train_loss"), mean_std("mask_mean"), mean_std("step_time_s", "{:.3f}")]
    lines.append(f"| {arm} | " + " | ".join(cells) + " |")
  if "dino" in arms:
    lines += ["", "Paired differences against the `dino` baseline (same seed: same data order and crops), "
              "mean ± s.e. over seeds, seeds where the arm is better (positive = better):", ""]
    lines += replication.markdown_table(
        ["arm"] + [label for _, label, _ in METRICS],
        [[arm] + [replication.difference_cell(replication.paired_difference(
            results, arm, k, "dino", higher_is_better=higher), "{:+.4f}") for k, _, higher in METRICS]
         for arm in arms if arm != "dino"])
  lines += ["", f"Gate (val split, margin {gate['margin']}): " + (
      "passed" if gate["passed"] else "FAILED, arms run with --ignore_gate: " + "; ".join(gate["reasons"])) + ". "
      + ", ".join(f"{k} random init {gate['random_init'][k]:.4f} / base {gate['base'][k]:.4f}" for k, _ in GATE_METRICS)]
  lines += ["", PAPER]
  with open(os.path.join(args.out, "table.md"), "w") as f:
    f.write("\n".join(lines) + "\n")
  print("\n".join(lines), flush=True)


def write_plots(args, results, arms, masks):
  import matplotlib  # noqa: PLC0415
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # noqa: PLC0415

  fig, axes = plt.subplots(1, 3, figsize=(14, 4))
  base = _rows(results, "base")[0]["final"]
  for ax, (key, label, _) in zip(axes, [METRICS[0], METRICS[1], METRICS[4]]):
    vals = [[r["final"].get(key, np.nan) for r in _rows(results, arm)] for arm in arms]
    ax.bar(arms, [np.mean(v) for v in vals], yerr=[np.std(v, ddof=1) if len(v) > 1 else 0 for v in vals],
           capsize=4, color="C0", alpha=0.8)
    for i, v in enumerate(vals):
      ax.scatter([i] * len(v), v, color="k", s=10, zorder=3)
    ax.axhline(base.get(key, np.nan), color="C3", ls="--", lw=1, label="base (before continuation)")
    ax.set(title=label, ylabel=label)
    lo = min(min(v) for v in vals + [[base.get(key, np.nan)]])
    hi = max(max(v) for v in vals + [[base.get(key, np.nan)]])
    if np.isfinite(lo) and np.isfinite(hi):
      pad = 0.5 * (hi - lo) + 1e-6
      ax.set_ylim(lo - pad, hi + pad)
    ax.tick_params(axis="x", labelrotation=20)
    ax.grid(alpha=0.3, axis="y")
  axes[0].legend(fontsize=8)
  fig.suptitle(f"Frozen-feature probes on held-out scenes after {args.steps} matched updates "
               f"(mean ± std over {args.seeds} seeds; dots: seeds)")
  fig.tight_layout()
  fig.savefig(os.path.join(args.out, "results.png"), dpi=110)
  plt.close(fig)

  panels = [("train/loss", "DINO loss"), ("train/meta/value", "value V (last meta step)"),
            ("train/meta/cosine", "cos(g_down, g_pre)"), ("train/mask_mean", "mean mask μ")]
  fig, axes = plt.subplots(1, len(panels), figsize=(18, 4))
  for i, arm in enumerate(arms):
    runs = _rows(results, arm)
    n = min(len(r["train"]) for r in runs)  # a preempted run logs fewer steps: plot the common prefix
    for ax, (key, title) in zip(axes, panels):
      if not n or not all(key in m for m in runs[0]["train"]):
        continue
      steps = [m["step"] for m in runs[0]["train"][:n]]
      ys = np.mean([[m[key] for m in r["train"][:n]] for r in runs], axis=0)
      ax.plot(steps, ys, label=arm, color=f"C{i}")  # one colour per arm in every panel
      ax.set(title=title, xlabel="learner step")
  for ax in axes:
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(os.path.join(args.out, "curves.png"), dpi=110)
  plt.close(fig)

  if masks:
    config = next(iter(masks.values()))[0]
    source = train_vision.labeled_source(config.data, "test")
    n = 6
    images = np.stack([source[i]["image"] for i in range(n)]).astype(np.float32) / 255.0
    size = config.dino.global_size
    if images.shape[1] != size:
      images = np.asarray(jax.image.resize(images, (n, size, size, 3), "bilinear"))
    rows = [("test scene", images, None)]
    for arm, (cfg, params) in masks.items():
      mu, views = example_masks(cfg, params, images)
      rows += [(f"μ ({arm})", mu, "viridis"), (f"view ṽ ({arm})", np.clip(views, 0, 1), None)]
    fig, axes = plt.subplots(len(rows), n, figsize=(1.8 * n, 1.9 * len(rows)))
    for r, (title, arrs, cmap) in enumerate(rows):
      for c in range(n):
        ax = axes[r, c]
        ax.imshow(arrs[c], cmap=cmap, vmin=0 if cmap else None, vmax=1 if cmap else None)
        ax.set_xticks([])
        ax.set_yticks([])
        if c == 0:
          ax.set_ylabel(title, fontsize=8)
        if cmap:
          ax.set_xlabel(f"mean μ {arrs[c].mean():.2f}", fontsize=7)
    fig.suptitle("Masks μ the designer learned (seed 0, last step): high μ keeps pixels, low μ blurs them")
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, "masks.png"), dpi=110)
    plt.close(fig)

  if "candidates" in arms:
    runs = _rows(results, "candidates")
    keys = sorted(k for k in runs[0]["train"][0] if k.startswith("train/meta/cand_") and k.endswith("/weight"))
    fig, ax = plt.subplots(figsize=(7, 4))
    steps = [m["step"] for m in runs[0]["train"]]
    for key in keys:
      ax.plot(steps, np.mean([[m[key] for m in r["train"]] for r in runs], axis=0),
              label=key[len("train/meta/"):-len("/weight")])
    ax.set(title="Candidate weights w = softmax(a/τ) over training (mean over seeds)", xlabel="learner step",
           ylabel="weight")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, "candidates.png"), dpi=110)
    plt.close(fig)


if __name__ == "__main__":
  main()
