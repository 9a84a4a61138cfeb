"""Decoding throughput: KV-cached generation vs recomputing the full prefix for every token.

    python benchmarks/bench_generate.py [--size tiny] [--batch 8] [--prompt-len 64] [--new 256] [--repeats 5]

Greedy decoding of `--new` tokens for a batch of random prompts (lengths up to --prompt-len, left
padded) on a randomly initialised model; eos is disabled so every variant decodes every token.
Timings are medians over `--repeats` rounds (variants interleaved, so load drift hits all alike)
after one warm-up call each (compilation excluded), and cover the whole call (prefill included).
Variants of the cached loop: one `lax.while_loop` over all steps, chunks of 32 steps (what
`generate` uses with stop strings: the host checks them between chunks) and a jitted single step
called from Python per token (asynchronous dispatch, no host sync). The uncached reference
recomputes the prefix rounded up to 16 slots (`window_bucket=16`); `--full-window` adds the
variant that runs the whole P + new buffer every step (one compiled shape). Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from vpt.language import config_lib, generate as gen
from vpt.language.models.lm import LMConfig, Transformer


REF = "full-prefix recompute (prefix rounded up to 16)"


def timed_interleaved(fns: dict, repeats: int) -> dict:
  """name -> (median seconds, output). One warm-up call each (compiles every shape it needs),
  then `repeats` rounds calling every variant once, so load drift hits all variants alike."""
  outs = {name: fn() for name, fn in fns.items()}
  times = {name: [] for name in fns}
  for _ in range(repeats):
    for name, fn in fns.items():
      t = time.perf_counter()
      outs[name] = fn()
      times[name].append(time.perf_counter() - t)
  return {name: (statistics.median(times[name]), outs[name]) for name in fns}


def python_loop_single_step(cfg, params, prompts, new, eos, pad, prompt_len):
  """The alternative design: one jitted decode step per token, dispatched from Python."""
  spec, knobs = gen._spec(cfg, new, 0.0, 1.0, eos, pad)  # pylint: disable=protected-access
  tokens, lengths = gen._layout(prompts, prompt_len, pad)  # pylint: disable=protected-access
  rng = jax.random.PRNGKey(0)
  state = gen._prefill(params, tokens, lengths, np.ones(len(prompts), bool), rng, knobs, spec=spec)  # pylint: disable=protected-access
  for t in range(1, new):
    state = gen._decode(params, state, jnp.int32(t + 1), rng, knobs, spec=spec)  # pylint: disable=protected-access
  return np.asarray(state["out"])


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--size", default="tiny")
  ap.add_argument("--vocab", type=int, default=1024)
  ap.add_argument("--batch", type=int, default=8)
  ap.add_argument("--prompt-len", type=int, default=64)
  ap.add_argument("--new", type=int, default=256)
  ap.add_argument("--repeats", type=int, default=5)
  ap.add_argument("--full-window", action="store_true")
  ap.add_argument("--cached-only", action="store_true", help="compare the cached loop variants only")
  args = ap.parse_args()

  mc = config_lib.model_config(args.size)
  mc.vocab_size = args.vocab
  cfg = LMConfig.from_config(mc)
  model = Transformer(cfg)
  params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))["params"]
  rng = np.random.default_rng(0)
  lengths = rng.integers(args.prompt_len * 3 // 4, args.prompt_len + 1, size=args.batch)
  lengths[0] = args.prompt_len
  prompts = [[2] + rng.integers(4, args.vocab, size=n - 1).tolist() for n in lengths]
  eos, pad, p = args.vocab, 0, args.prompt_len  # eos out of the vocabulary: never emitted.
  kw = dict(max_new_tokens=args.new, eos_id=eos, pad_id=pad, prompt_len=p)
  tokens = args.batch * args.new

  variants = {
      "KV cache, one while_loop": lambda: gen.generate_tokens(model, params, prompts, **kw),
      "KV cache, while_loop chunks of 32": lambda: gen.generate_tokens(
          model, params, prompts, chunk_size=32, should_stop=lambda i, ids: False, **kw),
      "KV cache, jitted step per token from Python": lambda: python_loop_single_step(
          cfg, params, prompts, args.new, eos, pad, p),
  }
  if not args.cached_only:
    variants[REF] = lambda: gen.generate_tokens_uncached(model, params, prompts, window_bucket=16, **kw)
  if args.full_window:
    variants[f"full recompute of all {p + args.new} slots"] = lambda: gen.generate_tokens_uncached(
        model, params, prompts, window_bucket=None, **kw)

  results = timed_interleaved(variants, args.repeats)
  ref = results.get(REF, results["KV cache, one while_loop"])
  for name, (_, out) in results.items():
    if not np.array_equal(out, ref[1]):
      print(f"  WARNING: {name} decoded different tokens than the uncached reference")

  print()
  print(f"backend {jax.default_backend()} ({jax.device_count()} devices); model {args.size} "
        f"(vocab {args.vocab}, {cfg.n_layers} layers, d_model {cfg.d_model}); batch {args.batch}, "
        f"prompts {lengths.min()}–{lengths.max()} tokens (bucket {p}), {args.new} new tokens, greedy; "
        f"median of {args.repeats}")
  print()
  print(f"| decoding | median time | new tokens/s | speed-up vs {'recompute' if REF in results else 'one while_loop'} |")
  print("|---|---|---|---|")
  for name, (sec, _) in results.items():
    print(f"| {name} | {sec:.3f} s | {tokens / sec:,.0f} | {ref[0] / sec:.2f}× |")


if __name__ == "__main__":
  main()
