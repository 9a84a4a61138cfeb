"""Train-step throughput and MFU against this machine's measured matmul peak, plus data-pipeline
throughput, side by side in one run. Prints a Markdown table (paste it into BENCHMARKS.md).

    python benchmarks/bench_train.py [--sizes tiny,small] [--repeats 5] [--steps 5]

Timings are medians over `--repeats` timed windows of `--steps` steps each (after warm-up), because
shared machines are noisy; the peak is the fastest of several large fp32 matmuls, measured in the
same process just before.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import jax
import numpy as np

from vpt.core import metrics
from vpt.core.optim import make_optimizer
from vpt.language import config_lib
from vpt.language.data.pipeline import make_lm_iterator
from vpt.language.data.tokenizer import load_or_train_tokenizer
from vpt.language.models import lm
from vpt.language.models.lm import LMConfig, Transformer, count_nonembedding_params, count_params
from vpt.language.steps import init_train_state, make_train_step

# (size preset, batch, seq_len, vocab) — the shapes the experiments use.
SHAPES = {"tiny": (16, 128, 1024), "small": (16, 256, 4096)}


def time_windows(fn, repeats: int, steps: int) -> list[float]:
  out = []
  for _ in range(repeats):
    t = time.perf_counter()
    for _ in range(steps):
      r = fn()
    jax.block_until_ready(r)
    out.append((time.perf_counter() - t) / steps)
  return out


def bench_train(size: str, dtype: str, repeats: int, steps: int, peak: float) -> dict:
  batch, seq, vocab = SHAPES[size]
  mc = config_lib.model_config(size)
  mc.vocab_size, mc.dtype = vocab, dtype
  cfg = LMConfig.from_config(mc)
  model = Transformer(cfg)
  optimizer, schedule = make_optimizer(config_lib.base_config().optimizer, 1000)
  state = init_train_state(model, optimizer, seq, seed=0)
  rng = np.random.default_rng(0)
  toks = rng.integers(0, vocab, (batch, seq + 1)).astype(np.int32)
  data = {"inputs": toks[:, :-1], "targets": toks[:, 1:], "loss_mask": np.ones((batch, seq), np.float32),
          "segment_ids": np.ones((batch, seq), np.int32),
          "positions": np.broadcast_to(np.arange(seq, dtype=np.int32), (batch, seq)).copy()}
  data = jax.device_put(data)
  step = jax.jit(make_train_step(model, optimizer, schedule), donate_argnums=(0,))
  holder = [state]

  def run():
    holder[0], m = step(holder[0], data)
    return m["loss"]

  for _ in range(2):
    jax.block_until_ready(run())
  step_time = statistics.median(time_windows(run, repeats, steps))
  nonembed = count_nonembedding_params(state.params)
  fpt = lm.flops_per_token(n_params_nonembed=nonembed, n_layers=cfg.n_layers, d_model=cfg.d_model,
                                   seq_len=seq, vocab_size=vocab, n_heads=cfg.n_heads,
                                   head_dim=cfg.resolved_head_dim)
  tps = batch * seq / step_time
  return {"size": size, "dtype": dtype, "params": count_params(state.params), "tokens_per_step": batch * seq,
          "step_s": step_time, "tokens_per_s": tps, "gflops": fpt * tps / 1e9, "mfu": fpt * tps / peak}


def bench_data(seq_len: int, vocab: int, batches: int) -> float:
  cfg = config_lib.data_config()
  cfg.seq_len, cfg.vocab_size = seq_len, vocab
  with tempfile.TemporaryDirectory() as workdir:
    tok = load_or_train_tokenizer(cfg, workdir)
    it = make_lm_iterator(cfg, tok, split="train", global_batch_size=16, seq_len=seq_len, seed=0)
    next(it)
    t = time.perf_counter()
    n = 0
    for _ in range(batches):
      n += next(it)["inputs"].size
    return n / (time.perf_counter() - t)


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--sizes", default="tiny,small")
  ap.add_argument("--dtypes", default="float32,bfloat16")
  ap.add_argument("--repeats", type=int, default=5)
  ap.add_argument("--steps", type=int, default=5)
  ap.add_argument("--data_batches", type=int, default=200)
  args = ap.parse_args()

  peak = metrics.measure_cpu_matmul_peak(n=2048, repeats=7) if jax.default_backend() == "cpu" \
      else metrics.device_peak_flops()[0] * jax.device_count()
  print(f"backend {jax.default_backend()}, {jax.device_count()} device(s); "
        f"measured fp32 matmul peak {peak / 1e9:.1f} GFLOP/s (fastest of 7, n=2048)\n")
  rows = [bench_train(s, d, args.repeats, args.steps, peak)
          for s in args.sizes.split(",") for d in args.dtypes.split(",")]
  print("| model | compute | params | tokens/step | step (s, median) | tokens/s | model GFLOP/s | MFU vs measured peak |")
  print("|---|---|---|---|---|---|---|---|")
  for r in rows:
    print(f"| {r['size']} | {r['dtype']} | {r['params'] / 1e6:.2f}M | {r['tokens_per_step']} | {r['step_s']:.3f} | "
          f"{r['tokens_per_s']:,.0f} | {r['gflops']:.1f} | {100 * r['mfu']:.1f}% |")
  largest = max((r for r in rows if r["dtype"] == "float32"), key=lambda r: r["params"])
  batch, seq, vocab = SHAPES[largest["size"]]
  data_tps = bench_data(seq, vocab, args.data_batches)
  print(f"\n| data pipeline (synthetic_math, seq {seq}) | tokens/s | ÷ {largest['size']} fp32 training consumption |")
  print("|---|---|---|")
  print(f"| grain + sentencepiece + packing, 1 process | {data_tps:,.0f} | {data_tps / largest['tokens_per_s']:.1f}× |")


if __name__ == "__main__":
  main()
