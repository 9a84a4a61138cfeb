"""Vision V-Pretraining overhead, side by side in one run (prints Markdown tables for BENCHMARKS.md):

1. learner-step throughput of V-Pretraining (U-Net designer views every step; one meta step — heads
   refresh, g_down, designer step — every `--meta_every`) and of the candidate-task designer ÷ the plain DINO step;
2. scoring the M candidate views: one `jax.vmap` over candidates of a forward-mode JVP (the step's path)
   vs one backward pass per candidate and a dot product (the explicit reference), and their agreement.

    python benchmarks/bench_vision.py [--size tiny] [--meta_every 4] [--repeats 5]

Batches are real procedural scenes (experiments/vision_dino.py sizes). Timings are medians over
repeated windows taken round-robin (a shared, noisy machine hits every program alike); a window of
training steps is `meta_every` steps from a step ≡ 0 mod meta_every, so it holds exactly one meta step.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import jax
import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from vpt import config_lib, train_vision, vision_step  # noqa: E402
from vpt.data import images as images_lib  # noqa: E402
from vpt.models.vit import count_params  # noqa: E402
from vpt.tasks import vision_candidates as cand_lib  # noqa: E402


def peak_bytes(compiled) -> float:
  m = compiled.memory_analysis()
  return float(m.temp_size_in_bytes + m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes)


NO_META = "unet, no meta step"  # the U-Net step with the meta step never taken: the per-step overhead alone
COND = "unet, lax.cond"  # the U-Net step as ONE program, the meta step under lax.cond (not what the loop runs)
DETACHED = "unet, targets detached"  # ∇φV without the teacher's path (vpt.designer.grad_through_teacher=False)


def config_for(args, mode):
  meta_every = 10**9 if mode == NO_META else args.meta_every
  overrides = {"vpt.designer.grad_through_teacher": False} if mode == DETACHED else {}
  mode = "unet" if mode in (NO_META, COND, DETACHED) else mode
  config = config_lib.load_config_file(os.path.join(REPO, "experiments", "vision_dino.py"), f"{args.size},{mode}")
  return config_lib.with_overrides(config, {"vpt.meta_every": meta_every, "vpt.burn_in_steps": 0,
                                            "num_steps": 10_000, **overrides})


def batches(config):
  """One batch of each stream, as the loop feeds them (labels stripped from the unlabeled ones)."""
  data, fb = config.data, config.feedback.batch_size
  first = lambda src, bs, seed: next(images_lib.make_image_iterator(src, batch_size=bs, seed=seed))
  train = train_vision.unlabeled_source(data)
  lab = lambda split, seed: train_vision._labeled(first(train_vision.labeled_source(data, split), fb, seed))  # pylint: disable=protected-access
  return ({"image": first(train, config.batch_size, 0)["image"]}, {"image": first(train, config.vpt.meta_batch_size, 1)["image"]},
          lab("labeled_train", 2), lab("labeled_meta", 3))


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--size", default="tiny")
  ap.add_argument("--meta_every", type=int, default=4)
  ap.add_argument("--repeats", type=int, default=5)
  args = ap.parse_args()

  # --- 1. training-step throughput ----------------------------------------------------------------
  modes = ("dino", "unet", DETACHED, NO_META, COND, "candidates")
  configs = {m: config_for(args, m) for m in modes}
  bu, bmu, blt, blm = batches(configs["unet"])
  programs, holders = {}, {}  # mode -> (the compiled program of each step of a window, extra args)
  for mode, config in configs.items():
    config = train_vision.resolve_config(config)
    sample = (blt if mode != "dino" else bu)["image"][:1]
    state = jax.jit(lambda r, x, c=config: vision_step.init_vision_state(c, r, x))(jax.random.PRNGKey(0), sample)
    extra = (bmu, blt, blm) if mode != "dino" else (None, None, None)
    compile_for = lambda meta, c=config, s=state, e=extra: jax.jit(
        vision_step.make_vision_train_step(c, meta=meta), donate_argnums=(0,)).lower(s, bu, *e).compile()
    if mode in ("unet", DETACHED, "candidates"):  # as the loop runs them: the meta program, then r − 1 plain steps
      plain = compile_for(False)
      window_programs = [compile_for(True)] + [plain] * (args.meta_every - 1)
    else:  # dino, the U-Net without meta steps (plain steps only), and the single lax.cond program
      window_programs = [compile_for(None if mode == COND else False)] * args.meta_every
    programs[mode] = (window_programs, extra)
    holders[mode] = state
  n_vit = count_params(holders["dino"].student["backbone"])
  n_unet = count_params(holders["unet"].designer.params)
  peak = {m: max(peak_bytes(c) for c in programs[m][0]) for m in modes}

  def window(mode):
    window_programs, extra = programs[mode]
    t = time.perf_counter()
    for compiled in window_programs:
      holders[mode], metrics = compiled(holders[mode], bu, *extra)
    jax.block_until_ready(metrics)
    return (time.perf_counter() - t) / args.meta_every

  for mode in modes:  # warm-up: one window each
    window(mode)
  times = {m: [] for m in modes}
  for _ in range(args.repeats):
    for mode in modes:
      times[mode].append(window(mode))
  step_time = {m: statistics.median(t) for m, t in times.items()}

  # --- 2. candidate scoring: vmapped JVP vs a backward pass per candidate --------------------------
  config = train_vision.resolve_config(configs["candidates"])
  setup = vision_step.VisionSetup.from_config(config)
  state = holders["candidates"]
  key = jax.random.PRNGKey(1)
  g_down, _ = jax.jit(lambda s, h, b: vision_step.downstream_grad(setup, s, h, b))(state.student, state.heads, blm)

  def scorer(reference):
    def score(state, batch_meta_u, g):
      problem, global_views, subset = vision_step.meta_problem(setup, state, batch_meta_u, key)
      cand = cand_lib.candidate_views(jax.random.fold_in(key, 2), global_views, setup.cand_cfg)
      loss_fn = lambda s, v: problem.loss_fn(v)(s)
      if reference:
        return cand_lib.reference_candidate_values(loss_fn, subset, g, cand)
      return cand_lib.candidate_values(loss_fn, subset, g, cand)[1]
    return jax.jit(score).lower(state, bmu, g_down).compile()

  scorers = {"vmap JVP": scorer(False), "backward per candidate": scorer(True)}
  values = {name: np.asarray(c(state, bmu, g_down)) for name, c in scorers.items()}
  rel = float(np.max(np.abs(values["vmap JVP"] - values["backward per candidate"]))
              / np.max(np.abs(values["backward per candidate"])))
  score_times = {name: [] for name in scorers}
  for _ in range(args.repeats + 2):
    for name, c in scorers.items():
      t = time.perf_counter()
      jax.block_until_ready(c(state, bmu, g_down))
      score_times[name].append(time.perf_counter() - t)
  score_time = {name: statistics.median(t) for name, t in score_times.items()}

  c = configs["unet"]
  print(f"backend {jax.default_backend()} ({os.cpu_count()} CPUs); `{args.size}` ViT {n_vit / 1e6:.3f}M params "
        f"(d {c.model.d_model}, {c.model.n_layers} blocks, patch {c.model.patch_size}), U-Net designer "
        f"{n_unet / 1e6:.3f}M; batch {c.batch_size} × {c.data.image_size} px (2 global {c.dino.global_size} px + "
        f"{c.dino.n_local_crops} local {c.dino.local_size} px crops), meta SSL batch {c.vpt.meta_batch_size}, "
        f"labeled batch {c.feedback.batch_size}, meta every {args.meta_every}, S = last "
        f"{c.vpt.align_last_n_layers} blocks + norm, M = {setup.cand_cfg.num} candidates; medians of "
        f"{args.repeats} windows\n")
  print("| program | median time per step | images/s | peak memory (XLA) |")
  print("|---|---|---|---|")
  for mode in modes:
    label = {"dino": "DINO step (baseline)", "unet": "V-Pretraining step, U-Net designer",
             DETACHED: "V-Pretraining step, U-Net designer, ∇φV with the teacher's targets detached",
             NO_META: "U-Net designer step without its meta step (views only)",
             COND: "V-Pretraining step, U-Net designer, one program with the meta step under lax.cond",
             "candidates": "V-Pretraining step, candidate designer"}[mode]
    print(f"| {label} | {step_time[mode]:.3f} s | {c.batch_size / step_time[mode]:,.1f} | "
          f"{peak[mode] / 2**20:.1f} MiB |")
  for name, compiled in scorers.items():
    print(f"| score {setup.cand_cfg.num} candidates, {name} | {score_time[name]:.3f} s | | "
          f"{peak_bytes(compiled) / 2**20:.1f} MiB |")
  print()
  print("| ratio | ours | paper |")
  print("|---|---|---|")
  for mode in ("unet", DETACHED, "candidates"):
    print(f"| {mode} V-Pretraining ÷ DINO throughput (meta every {args.meta_every}) | "
          f"{step_time['dino'] / step_time[mode]:.3f} | not reported for vision (language: 0.84 v1, 0.91 v2) |")
    print(f"| {mode} V-Pretraining ÷ DINO peak memory | {peak[mode] / peak['dino']:.3f} | |")
  meta_cost = args.meta_every * (step_time["unet"] - step_time[NO_META])
  print(f"| U-Net per-step overhead (views) ÷ DINO step | {step_time[NO_META] / step_time['dino'] - 1:+.3f} | |")
  print(f"| U-Net meta step ÷ DINO step (from meta every {args.meta_every} vs never) | {meta_cost / step_time['dino']:.2f} | |")
  print(f"| U-Net, meta step under lax.cond ÷ two programs (step time) | {step_time[COND] / step_time['unet']:.2f}× | |")
  print(f"| backward per candidate ÷ vmap JVP time | {score_time['backward per candidate'] / score_time['vmap JVP']:.2f}× | |")
  print(f"| vmap JVP vs backward: max rel. diff of V_c (fp32) | {rel:.1e} | |")


if __name__ == "__main__":
  main()
