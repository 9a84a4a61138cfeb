"""V-Pretraining overhead, side by side in one run (prints Markdown tables for BENCHMARKS.md):

1. learner-step throughput of V-Pretraining (designer forward every step, one meta step every
   `--meta_every`) ÷ plain NTP, on a learner much larger than the designer;
2. one value + designer-gradient evaluation: the JVP path vs the explicit double-backward reference;
3. peak memory (XLA's compiled temp + argument + output sizes) of each program.

    python benchmarks/bench_vpt.py [--size small] [--batch 8] [--seq 128] [--repeats 3]

Timings are medians over repeated windows (shared, noisy machines); a window of the training
steps is `meta_every` steps, so it holds exactly one meta step.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from vpt.core.optim import make_optimizer
from vpt.language import config_lib, value as value_lib
from vpt.language.losses import downstream_nll
from vpt.language.models.designer import DesignerConfig, TaskDesigner
from vpt.language.models.lm import LMConfig, Transformer, count_params
from vpt.language.soft_targets import candidate_logprobs, candidates, soft_targets
from vpt.language.steps import init_train_state, make_train_step
from vpt.language.vpt_step import designer_targets, init_designer_state, make_designer_optimizer, make_vpt_train_step


def median_seconds(fn, repeats: int, per_window: int = 1) -> float:
  out = []
  for _ in range(repeats):
    t = time.perf_counter()
    for _ in range(per_window):
      r = fn()
    jax.block_until_ready(r)
    out.append((time.perf_counter() - t) / per_window)
  return statistics.median(out)


def peak_bytes(compiled) -> float:
  m = compiled.memory_analysis()
  return float(m.temp_size_in_bytes + m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes)


def make_batch(rng, batch, seq, vocab):
  toks = rng.integers(0, vocab, (batch, seq + 1)).astype(np.int32)
  mask = np.ones((batch, seq), np.float32)
  mask[:, : seq // 4] = 0  # a prompt
  return jax.device_put({"inputs": toks[:, :-1], "targets": toks[:, 1:], "loss_mask": mask,
                         "segment_ids": np.ones((batch, seq), np.int32),
                         "positions": np.broadcast_to(np.arange(seq, dtype=np.int32), (batch, seq)).copy()})


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--size", default="small")
  ap.add_argument("--vocab", type=int, default=4096)
  ap.add_argument("--batch", type=int, default=8)
  ap.add_argument("--seq", type=int, default=128)
  ap.add_argument("--meta_every", type=int, default=8)
  ap.add_argument("--top_k", type=int, default=64)
  ap.add_argument("--repeats", type=int, default=3)
  ap.add_argument("--align_last_n_layers", type=int, default=2)
  args = ap.parse_args()

  mc = config_lib.model_config(args.size)
  mc.vocab_size = args.vocab
  model = Transformer(LMConfig.from_config(mc))
  vcfg = config_lib.vpt_config()
  vcfg.mode, vcfg.top_k, vcfg.meta_every = "value", args.top_k, args.meta_every
  vcfg.align_last_n_layers = args.align_last_n_layers
  d = vcfg.designer
  d.d_model, d.n_layers, d.n_heads, d.d_ff = 128, 2, 4, 384
  opt_cfg = config_lib.base_config().optimizer
  optimizer, schedule = make_optimizer(opt_cfg, 10_000)
  designer = TaskDesigner(DesignerConfig.from_config(vcfg))
  state = init_train_state(model, optimizer, args.seq, seed=0)
  state = state.replace(step=jnp.asarray(1, jnp.int32))  # past the LR warm-up's zero
  dstate = init_designer_state(designer, make_designer_optimizer(vcfg), state.params, args.seq, args.top_k, 0)
  n_learner, n_designer = count_params(state.params), count_params(dstate.params)
  rng = np.random.default_rng(0)
  batch = make_batch(rng, args.batch, args.seq, args.vocab)
  fb = make_batch(rng, args.batch, args.seq, args.vocab)

  # --- 1. training-step throughput -----------------------------------------------------------
  ntp_step = jax.jit(make_train_step(model, optimizer, schedule))
  ntp_c = ntp_step.lower(state, batch).compile()

  def vpt_program(meta_rows):
    cfg = config_lib.vpt_config()
    cfg.update(vcfg)
    cfg.meta_batch_size = meta_rows
    fb_rows = {k: v[:meta_rows] for k, v in fb.items()}
    step = jax.jit(make_vpt_train_step(model, optimizer, schedule, cfg, opt_cfg))
    return step.lower(state.replace(designer=dstate), batch, fb_rows).compile(), fb_rows

  variants = {"meta step on the whole batch": args.batch, "meta step on 1/4 of the batch": max(1, args.batch // 4)}
  programs = {name: vpt_program(rows) for name, rows in variants.items()}
  holders = {"ntp": state, **{name: state.replace(designer=dstate) for name in variants}}

  def runner(name):
    def run():
      if name == "ntp":
        holders[name], m = ntp_c(holders[name], batch)
      else:
        compiled, fb_rows = programs[name]
        holders[name], m = compiled(holders[name], batch, fb_rows)
      return m["loss"]
    return run

  runners = {name: runner(name) for name in holders}
  for fn in runners.values():
    for _ in range(2):
      jax.block_until_ready(fn())
  # Interleave the programs so machine noise hits all alike; a window holds one meta step.
  times = {name: [] for name in runners}
  for _ in range(args.repeats):
    for name, fn in runners.items():
      times[name].append(median_seconds(fn, 1, args.meta_every))
  step_time = {name: statistics.median(ts) for name, ts in times.items()}
  t_ntp = step_time["ntp"]

  # --- 2. value + designer gradient: JVP path vs double backward ------------------------------
  fb_aligned, fb_subset = value_lib.Aligned.build(model, state.params, fb, vcfg.align_last_n_layers)
  g_down = value_lib.subset_grad(fb_aligned, fb_subset,
                                 lambda lg: downstream_nll(lg, fb["targets"], fb["loss_mask"]))
  embedding = state.params["embed_tokens"]["embedding"]

  def q_of(dparams, cand_ids, cand_logp):
    alpha, r = designer_targets(vcfg, designer, dparams, embedding, batch, cand_ids, cand_logp)
    return soft_targets(alpha, r)

  def jvp_path(params, dparams, g):
    aligned, subset = value_lib.Aligned.build(model, params, batch, vcfg.align_last_n_layers)
    logits, dlogits = value_lib.logits_jvp(aligned, subset, g)
    cand_ids = candidates(logits, batch["targets"], vcfg.top_k)
    cand_logp = candidate_logprobs(logits, cand_ids)
    s = value_lib.logprob_tangents(logits, dlogits, cand_ids)
    return jax.value_and_grad(lambda dp: value_lib.value_from_tangents(q_of(dp, cand_ids, cand_logp), s,
                                                                       batch["loss_mask"]))(dparams)

  def double_backward_path(params, dparams, g):
    aligned, subset = value_lib.Aligned.build(model, params, batch, vcfg.align_last_n_layers)
    logits = aligned.logits(subset)
    cand_ids = candidates(logits, batch["targets"], vcfg.top_k)
    cand_logp = candidate_logprobs(logits, cand_ids)
    return jax.value_and_grad(lambda dp: value_lib.reference_value(
        aligned, subset, g, cand_ids, q_of(dp, cand_ids, cand_logp), batch["loss_mask"]))(dparams)

  jvp_c = jax.jit(jvp_path).lower(state.params, dstate.params, g_down).compile()
  ref_c = jax.jit(double_backward_path).lower(state.params, dstate.params, g_down).compile()
  (v_jvp, g_jvp), (v_ref, g_ref) = jvp_c(state.params, dstate.params, g_down), ref_c(state.params, dstate.params,
                                                                                       g_down)
  rel_v = abs(float(v_jvp) - float(v_ref)) / abs(float(v_ref))
  flat = lambda t: np.concatenate([np.ravel(x) for x in jax.tree.leaves(t)])
  rel_g = float(np.linalg.norm(flat(g_jvp) - flat(g_ref)) / np.linalg.norm(flat(g_ref)))
  for c in (jvp_c, ref_c):
    jax.block_until_ready(c(state.params, dstate.params, g_down))
  jvp_times, ref_times = [], []
  for _ in range(args.repeats + 2):
    jvp_times.append(median_seconds(lambda: jvp_c(state.params, dstate.params, g_down), 1))
    ref_times.append(median_seconds(lambda: ref_c(state.params, dstate.params, g_down), 1))
  t_jvp, t_ref = statistics.median(jvp_times), statistics.median(ref_times)

  print(f"backend {jax.default_backend()}; learner {args.size} {n_learner / 1e6:.2f}M params, designer "
        f"{n_designer / 1e6:.3f}M ({n_learner / n_designer:.0f}× smaller); batch {args.batch}×{args.seq}, "
        f"K={args.top_k}, meta every {args.meta_every}, S = "
        f"{'all parameters' if not vcfg.align_last_n_layers else f'last {vcfg.align_last_n_layers} blocks + norm'}\n")
  tokens = args.batch * args.seq
  print("| program | median time | tokens/s | peak memory (XLA) |")
  print("|---|---|---|---|")
  print(f"| NTP train step | {t_ntp:.3f} s | {tokens / t_ntp:,.0f} | {peak_bytes(ntp_c) / 2**20:.1f} MiB |")
  for name, rows in variants.items():
    print(f"| V-Pretraining train step, {name} ({rows}×{args.seq} unlabeled + {rows}×{args.seq} feedback) | "
          f"{step_time[name]:.3f} s | {tokens / step_time[name]:,.0f} | {peak_bytes(programs[name][0]) / 2**20:.1f} MiB |")
  print(f"| value + designer gradient, JVP path | {t_jvp:.3f} s | | {peak_bytes(jvp_c) / 2**20:.1f} MiB |")
  print(f"| value + designer gradient, double backward | {t_ref:.3f} s | | {peak_bytes(ref_c) / 2**20:.1f} MiB |")
  print()
  print("| ratio | ours | paper / goal |")
  print("|---|---|---|")
  for name in variants:
    print(f"| V-Pretraining ÷ NTP throughput, {name} | {t_ntp / step_time[name]:.3f} | 0.84 (v1), 0.91 (v2); goal ≥ 0.93 |")
    print(f"| V-Pretraining ÷ NTP peak memory, {name} | {peak_bytes(programs[name][0]) / peak_bytes(ntp_c):.3f} | "
          f"1.043 (v1), 1.164 (v2) |")
  print(f"| double backward ÷ JVP time | {t_ref / t_jvp:.2f}× | goal ≥ 3× |")
  print(f"| double backward ÷ JVP peak memory | {peak_bytes(ref_c) / peak_bytes(jvp_c):.2f}× | lower is the goal |")
  print(f"| JVP vs double backward: rel. diff of V / of ∇φV (fp32) | {rel_v:.1e} / {rel_g:.1e} | |")


if __name__ == "__main__":
  main()
