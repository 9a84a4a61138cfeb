"""Vision V-Pretraining overhead, side by side in one run (prints Markdown tables for BENCHMARKS.md):

1. learner-step throughput of V-Pretraining (U-Net designer views every step; one meta step — heads
   refresh, g_down, designer step — every `--meta_every`) and of the candidate-task designer ÷ the plain DINO step;
2. scoring the M candidate views: one `jax.vmap` over candidates of a forward-mode JVP (the step's path)
   vs one backward pass per candidate and a dot product (the explicit reference), and their agreement;
3. the same V-Pretraining ÷ DINO ratio with the DINOv2 objective on (`dinov2`: DINO + iBOT + KoLeo +
   Sinkhorn-Knopp in both the baseline and the V-Pretraining step, the value differentiating all of it).

    python benchmarks/bench_vision.py [--size tiny] [--meta_every 4] [--repeats 5] [--modes dino,unet,...]

Batches are real procedural scenes (experiments/vision_dino.py sizes). Timings are medians over
repeated windows taken round-robin (a shared, noisy machine hits every program alike); a window of
training steps is `meta_every` steps from a step ≡ 0 mod meta_every, so it holds exactly one meta step.
`--clock cpu` times with the process's CPU time (all threads) instead of the wall clock: on a machine
another job keeps busy, the wall clock mostly measures the scheduler.
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


from vpt.core import config as core_config
from vpt.vision import train as train_vision
from vpt.vision import step as vision_step  # noqa: E402
from vpt.vision.data import images as images_lib  # noqa: E402
from vpt.vision.models.vit import count_params  # noqa: E402
from vpt.vision import candidates as cand_lib  # noqa: E402


def peak_bytes(compiled) -> float:
  m = compiled.memory_analysis()
  return float(m.temp_size_in_bytes + m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes)


NO_META = "unet, no meta step"  # the U-Net step with the meta step never taken: the per-step overhead alone
COND = "unet, lax.cond"  # the U-Net step as ONE program, the meta step under lax.cond (not what the loop runs)
DETACHED = "unet, targets detached"  # ∇φV without the teacher's path (vpt.designer.grad_through_teacher=False)
DINO_V2 = "dino, dinov2 objective"  # the baseline with DINO + iBOT + KoLeo + Sinkhorn-Knopp
UNET_V2 = "unet, dinov2 objective"  # V-Pretraining (U-Net) on the same objective
MODES = {"dino": "dino", "unet": "unet", "detached": DETACHED, "no_meta": NO_META, "cond": COND,
         "candidates": "candidates", "dinov2": DINO_V2, "unet_dinov2": UNET_V2}  # --modes names → programs


def config_for(args, mode):
  meta_every = 10**9 if mode == NO_META else args.meta_every
  overrides = {"vpt.designer.grad_through_teacher": False} if mode == DETACHED else {}
  objective = ",dinov2" if mode in (DINO_V2, UNET_V2) else ""
  mode = {NO_META: "unet", COND: "unet", DETACHED: "unet", DINO_V2: "dino", UNET_V2: "unet"}.get(mode, mode)
  config = core_config.load_config_file(os.path.join(REPO, "experiments", "vision_dino.py"),
                                       f"{args.size},{mode}{objective}")
  return core_config.with_overrides(config, {"vpt.meta_every": meta_every, "vpt.burn_in_steps": 0,
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
  ap.add_argument("--modes", default=",".join(MODES), help=f"a comma-separated subset of {list(MODES)} "
                                                            "('dino' always runs)")
  ap.add_argument("--clock", choices=("wall", "cpu"), default="wall")
  args = ap.parse_args()
  clock = time.perf_counter if args.clock == "wall" else time.process_time

  # --- 1. training-step throughput ----------------------------------------------------------------
  unknown = set(args.modes.split(",")) - set(MODES)
  if unknown:
    raise SystemExit(f"--modes: unknown {sorted(unknown)}; expected a subset of {list(MODES)}")
  modes = tuple(m for k, m in MODES.items() if k == "dino" or k in args.modes.split(","))
  configs = {m: config_for(args, m) for m in modes}
  bu, bmu, blt, blm = batches(config_for(args, "unet"))
  programs, holders = {}, {}  # mode -> (the compiled program of each step of a window, extra args)
  for mode, config in configs.items():
    config = train_vision.resolve_config(config)
    baseline = config.vpt.mode == "dino"
    sample = (blt if not baseline else bu)["image"][:1]
    state = jax.jit(lambda r, x, c=config: vision_step.init_vision_state(c, r, x))(jax.random.PRNGKey(0), sample)
    extra = (bmu, blt, blm) if not baseline else (None, None, None)
    compile_for = lambda meta, c=config, s=state, e=extra: jax.jit(
        vision_step.make_vision_train_step(c, meta=meta), donate_argnums=(0,)).lower(s, bu, *e).compile()
    if mode in ("unet", DETACHED, "candidates", UNET_V2):  # as the loop runs them: the meta program, then r − 1 plain steps
      plain = compile_for(False)
      window_programs = [compile_for(True)] + [plain] * (args.meta_every - 1)
    else:  # dino, the U-Net without meta steps (plain steps only), and the single lax.cond program
      window_programs = [compile_for(None if mode == COND else False)] * args.meta_every
    programs[mode] = (window_programs, extra)
    holders[mode] = state
  n_vit = count_params(holders["dino"].student["backbone"])
  unet_config = config_for(args, "unet")
  gs = unet_config.dino.global_size
  n_unet = count_params(vision_step.init_unet(vision_step.VisionSetup.from_config(unet_config).unet,
                                              jax.random.PRNGKey(0), np.zeros((1, gs, gs, 3), np.float32)))
  peak = {m: max(peak_bytes(c) for c in programs[m][0]) for m in modes}

  def window(mode):
    window_programs, extra = programs[mode]
    t = clock()
    for compiled in window_programs:
      holders[mode], metrics = compiled(holders[mode], bu, *extra)
    jax.block_until_ready(metrics)
    return (clock() - t) / args.meta_every

  for mode in modes:  # warm-up: one window each
    window(mode)
  times = {m: [] for m in modes}
  for _ in range(args.repeats):
    for mode in modes:
      times[mode].append(window(mode))
  step_time = {m: statistics.median(t) for m, t in times.items()}

  # --- 2. candidate scoring: vmapped JVP vs a backward pass per candidate --------------------------
  config = train_vision.resolve_config(config_for(args, "candidates"))
  setup = vision_step.VisionSetup.from_config(config)
  scorers, score_time = {}, {}
  if "candidates" in modes:
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
        t = clock()
        jax.block_until_ready(c(state, bmu, g_down))
        score_times[name].append(clock() - t)
    score_time = {name: statistics.median(t) for name, t in score_times.items()}

  c = unet_config
  print(f"backend {jax.default_backend()} ({os.cpu_count()} CPUs); `{args.size}` ViT {n_vit / 1e6:.3f}M params "
        f"(d {c.model.d_model}, {c.model.n_layers} blocks, patch {c.model.patch_size}), U-Net designer "
        f"{n_unet / 1e6:.3f}M; batch {c.batch_size} × {c.data.image_size} px (2 global {c.dino.global_size} px + "
        f"{c.dino.n_local_crops} local {c.dino.local_size} px crops), meta SSL batch {c.vpt.meta_batch_size}, "
        f"labeled batch {c.feedback.batch_size}, meta every {args.meta_every}, S = last "
        f"{c.vpt.align_last_n_layers} blocks + norm, M = {setup.cand_cfg.num} candidates; medians of "
        f"{args.repeats} windows, {args.clock} clock\n")
  print("| program | median time per step | images/s | peak memory (XLA) |")
  print("|---|---|---|---|")
  for mode in modes:
    label = {"dino": "DINO step (baseline)", "unet": "V-Pretraining step, U-Net designer",
             DETACHED: "V-Pretraining step, U-Net designer, ∇φV with the teacher's targets detached",
             NO_META: "U-Net designer step without its meta step (views only)",
             COND: "V-Pretraining step, U-Net designer, one program with the meta step under lax.cond",
             "candidates": "V-Pretraining step, candidate designer",
             DINO_V2: "DINO step, DINOv2 objective (DINO + iBOT + KoLeo + Sinkhorn-Knopp)",
             UNET_V2: "V-Pretraining step, U-Net designer, DINOv2 objective"}[mode]
    print(f"| {label} | {step_time[mode]:.3f} s | {c.batch_size / step_time[mode]:,.1f} | "
          f"{peak[mode] / 2**20:.1f} MiB |")
  for name, compiled in scorers.items():
    print(f"| score {setup.cand_cfg.num} candidates, {name} | {score_time[name]:.3f} s | | "
          f"{peak_bytes(compiled) / 2**20:.1f} MiB |")
  print()
  print("| ratio | ours | paper |")
  print("|---|---|---|")
  for mode in [m for m in ("unet", DETACHED, "candidates", UNET_V2) if m in modes]:
    base = DINO_V2 if mode == UNET_V2 else "dino"  # each against the DINO step of its own objective
    if base not in modes:
      continue
    print(f"| {mode} V-Pretraining ÷ DINO ({base}) throughput (meta every {args.meta_every}) | "
          f"{step_time[base] / step_time[mode]:.3f} | not reported for vision (language: 0.84 v1, 0.91 v2) |")
    print(f"| {mode} V-Pretraining ÷ DINO ({base}) peak memory | {peak[mode] / peak[base]:.3f} | |")
  if DINO_V2 in modes:
    print(f"| DINOv2 objective ÷ DINO-only objective, DINO step time | {step_time[DINO_V2] / step_time['dino']:.2f}× | |")
  if {"unet", NO_META} <= set(modes):
    meta_cost = args.meta_every * (step_time["unet"] - step_time[NO_META])
    print(f"| U-Net per-step overhead (views) ÷ DINO step | {step_time[NO_META] / step_time['dino'] - 1:+.3f} | |")
    print(f"| U-Net meta step ÷ DINO step (from meta every {args.meta_every} vs never) | "
          f"{meta_cost / step_time['dino']:.2f} | |")
  if {"unet", COND} <= set(modes):
    print(f"| U-Net, meta step under lax.cond ÷ two programs (step time) | {step_time[COND] / step_time['unet']:.2f}× | |")
  if scorers:
    print(f"| backward per candidate ÷ vmap JVP time | "
          f"{score_time['backward per candidate'] / score_time['vmap JVP']:.2f}× | |")
    print(f"| vmap JVP vs backward: max rel. diff of V_c (fp32) | {rel:.1e} | |")


if __name__ == "__main__":
  main()
