"""Batched autoregressive generation from the learner LM, with a KV cache.

Prompts are left-padded into a fixed bucket [B, P] and the cache holds P + max_new_tokens slots,
so one compiled prefill and one compiled decode program serve every batch of that shape. Row i's
prompt (n_i tokens) starts at slot P - n_i; its tokens get RoPE positions 0..n_i-1 and its t-th
new token position n_i + t, exactly as if it were alone in the batch, so cached decoding gives
the same tokens as recomputing the whole prefix every step (`generate_tokens_uncached`).

The decode loop is a `lax.while_loop` run in chunks of `chunk_size` steps: between chunks the
host checks stop strings and marks finished rows, and the loop exits early once every row is done.

Under a mesh (`mesh=`), the batch rows (prompts, KV cache, outputs) are split over the data axes
(`data` × `fsdp`) and the params laid out by vpt.core.sharding's rules (fsdp/tensor), so a model too
large for one device generates on a pod; every process passes the same prompts and gets all rows.

The cached forward below is a pure function of the params pytree, written against the layout of
`vpt.language.models.lm.Transformer` (same ops, same dtypes, `rope` and `grouped_query_attention` reused);
the uncached reference calls `Transformer.apply` itself, so the tests compare the two.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from vpt.core import sharding as sharding_lib
from vpt.core.lora import merge_lora
from vpt.language.models.lm import SHARDING_RULES, LMConfig, Transformer, grouped_query_attention, rope

DEFAULT_STOP = ("\n\n", "Question:")
# Decode steps per device call when stop strings are checked on the host (without stop strings the
# whole loop is one call). benchmarks/bench_generate.py on 2 CPU cores (tiny model, batch 8, 256
# new tokens): one while_loop 0.22 s, chunks of 32 0.24 s, a jitted step per token dispatched from
# Python 0.31 s; chunks keep the early exit on stop strings for ~7%.
DEFAULT_CHUNK = 32
PROMPT_BUCKET = 64  # prompt lengths are rounded up to a multiple of this (fewer compiled shapes).


@dataclasses.dataclass(frozen=True)
class _Spec:
  """The static (compile-time) part of a generation call; the rest are traced `knobs`."""
  cfg: LMConfig
  max_new_tokens: int
  greedy: bool
  nucleus: bool
  mesh: Mesh | None = None  # rows split over its data axes (the cache too).


def _rows(spec: _Spec, x):
  """x with its leading (row) dimension split over the mesh's data axes (no-op without a mesh)."""
  if spec.mesh is None:
    return x
  return jax.lax.with_sharding_constraint(x, NamedSharding(spec.mesh, P(sharding_lib.BATCH_AXES)))


def _cfg_of(model) -> LMConfig:
  return model if isinstance(model, LMConfig) else model.cfg


def _unwrap(params):
  # Accept both `state.params` and Flax's {"params": ...} variables dict.
  if isinstance(params, dict) and set(params) == {"params"}:
    return params["params"]
  return params


# ----------------------------------------------------------------------------------------------
# The cached forward pass (mirrors Transformer; kept op-for-op identical to Flax's Dense/Embed).


def _dense(x, p, dtype):
  kernel = p["kernel"].astype(dtype)
  y = jax.lax.dot_general(x.astype(dtype), kernel, (((x.ndim - 1,), (0,)), ((), ())))
  if "bias" in p:
    y += jnp.reshape(p["bias"].astype(dtype), (1,) * (y.ndim - 1) + (-1,))
  return y


def _rms_norm(x, scale, eps):
  x32 = x.astype(jnp.promote_types(x.dtype, jnp.float32))
  x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
  return (x32 * scale).astype(x.dtype)


def _forward(cfg: LMConfig, params, tokens, positions, mask, cache, slot):
  """Logits of the last position [B, V] and the per-layer (k, v).

  cache None (prefill): tokens attend to themselves and the returned (k, v) are theirs [B, T, ...].
  Otherwise tokens are written into the cache at `slot` and attend to all of it (mask [B,1,T,L]);
  the updated cache is returned.
  """
  dt = cfg.compute_dtype
  hd = cfg.resolved_head_dim
  b, t = tokens.shape
  x = jnp.take(params["embed_tokens"]["embedding"], tokens, axis=0).astype(dt)
  new_cache = []
  for i in range(cfg.n_layers):
    lp = params[f"layers_{i}"]
    a = lp["self_attn"]
    h = _rms_norm(x, lp["input_layernorm"]["scale"], cfg.rms_norm_eps)
    q = _dense(h, a["q_proj"], dt).reshape(b, t, cfg.n_heads, hd)
    k = _dense(h, a["k_proj"], dt).reshape(b, t, cfg.n_kv_heads, hd)
    v = _dense(h, a["v_proj"], dt).reshape(b, t, cfg.n_kv_heads, hd)
    q = rope(q, positions, cfg.rope_theta)
    k = rope(k, positions, cfg.rope_theta)
    if cache is not None:
      ck, cv = cache[i]
      k = jax.lax.dynamic_update_slice(ck, k.astype(ck.dtype), (0, slot, 0, 0))
      v = jax.lax.dynamic_update_slice(cv, v.astype(cv.dtype), (0, slot, 0, 0))
    new_cache.append((k, v))
    out = grouped_query_attention(q, k, v, mask).reshape(b, t, cfg.n_heads * hd)
    x = x + _dense(out, a["o_proj"], dt)
    m = lp["mlp"]
    h = _rms_norm(x, lp["post_attention_layernorm"]["scale"], cfg.rms_norm_eps)
    gated = jax.nn.silu(_dense(h, m["gate_proj"], dt)) * _dense(h, m["up_proj"], dt)
    x = x + _dense(gated, m["down_proj"], dt)
  # Only the last position is sampled from: the head (the widest matmul) runs on it alone.
  x = _rms_norm(x[:, -1:], params["norm"]["scale"], cfg.rms_norm_eps)
  if cfg.tie_embeddings:
    logits = jnp.einsum("btd,vd->btv", x, params["embed_tokens"]["embedding"].astype(dt),
                        preferred_element_type=cfg.logits_dtype)
  else:
    logits = _dense(x, params["lm_head"], dt)
  return logits[:, 0].astype(cfg.logits_dtype), new_cache


# ----------------------------------------------------------------------------------------------
# Sampling.


def sample_logits(logits, rng, temperature, top_p, *, greedy: bool, nucleus: bool):
  """Next tokens [B] from logits [B, V]: argmax, or temperature + top-p (nucleus) sampling."""
  if greedy:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits.astype(jnp.float32) / temperature
  if nucleus:
    # Keep the smallest set of top tokens whose mass reaches top_p (the top token always).
    sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    kept = jnp.where(mass_before < top_p, sorted_logits, jnp.inf)
    cutoff = jnp.min(kept, axis=-1, keepdims=True)
    logits = jnp.where(logits >= cutoff, logits, -jnp.inf)
  return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


def _pick(spec: _Spec, logits, rng, t, knobs, done):
  """Samples step t's tokens (pad for finished rows); returns (tokens, new done).

  knobs = (temperature, top_p, eos_id, pad_id) are traced: changing them does not recompile.
  """
  temperature, top_p, eos_id, pad_id = knobs
  tok = sample_logits(logits, jax.random.fold_in(rng, t), temperature, top_p,
                      greedy=spec.greedy, nucleus=spec.nucleus)
  tok = jnp.where(done, pad_id, tok)
  return tok, done | (tok == eos_id)


# ----------------------------------------------------------------------------------------------
# Cached generation: prefill, then chunks of a while_loop.


@functools.partial(jax.jit, static_argnames=("spec",))
def _prefill(params, tokens, lengths, active, rng, knobs, *, spec: _Spec):
  cfg = spec.cfg
  b, p = tokens.shape
  pad = p - lengths
  slots = jnp.arange(p)
  positions = jnp.maximum(slots[None] - pad[:, None], 0)
  valid = slots[None] >= pad[:, None]
  # Causal over the row's own tokens. Padding queries see no key: their softmax is uniform over
  # finfo.min scores (no NaN) and their outputs are never read.
  mask = (jnp.tril(jnp.ones((p, p), bool))[None] & valid[:, None, :])[:, None]
  logits, kvs = _forward(cfg, params, tokens, positions, mask, None, 0)
  length = p + spec.max_new_tokens
  cache = [tuple(_rows(spec, jnp.zeros((b, length) + x.shape[2:], x.dtype).at[:, :p].set(x)) for x in kv)
           for kv in kvs]
  tok, done = _pick(spec, logits, rng, 0, knobs, ~active)
  out = _rows(spec, jnp.full((b, spec.max_new_tokens), knobs[3], jnp.int32).at[:, 0].set(tok))
  return {"cache": cache, "out": out, "t": jnp.int32(1), "done": done, "pad": pad, "lengths": lengths}


@functools.partial(jax.jit, static_argnames=("spec",), donate_argnums=(1,))
def _decode(params, state, t_end, rng, knobs, *, spec: _Spec):
  """Decodes until step t_end (exclusive), max_new_tokens, or every row is done."""
  n = spec.max_new_tokens
  length = state["cache"][0][0].shape[1]
  p = length - n
  keys = jnp.arange(length)

  def cond(s):
    return (s["t"] < jnp.minimum(t_end, n)) & ~jnp.all(s["done"])

  def body(s):
    t = s["t"]
    last = jax.lax.dynamic_slice_in_dim(s["out"], t - 1, 1, axis=1)
    slot = p + t - 1
    positions = (s["lengths"] + t - 1)[:, None]
    mask = ((keys[None] >= s["pad"][:, None]) & (keys[None] <= slot))[:, None, None, :]
    logits, cache = _forward(spec.cfg, params, last, positions, mask, s["cache"], slot)
    tok, done = _pick(spec, logits, rng, t, knobs, s["done"])
    out = jax.lax.dynamic_update_slice(s["out"], tok[:, None], (0, t))
    return {**s, "cache": cache, "out": out, "t": t + 1, "done": done}

  return jax.lax.while_loop(cond, body, state)


def _layout(prompts: Sequence[Sequence[int]], prompt_len: int | None, pad_id: int):
  lengths = np.array([len(p) for p in prompts], np.int32)
  if lengths.min() < 1:
    raise ValueError("every prompt needs at least one token (e.g. bos)")
  p = int(prompt_len or lengths.max())
  if lengths.max() > p:
    raise ValueError(f"a prompt has {lengths.max()} tokens, more than prompt_len={p}")
  tokens = np.full((len(prompts), p), pad_id, np.int32)
  for i, ids in enumerate(prompts):
    tokens[i, p - len(ids):] = ids
  return tokens, lengths


def _spec(model, max_new_tokens, temperature, top_p, eos_id, pad_id, mesh=None):
  """(static spec, traced (temperature, top_p, eos_id, pad_id))."""
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens={max_new_tokens}: expected >= 1")
  if temperature < 0 or not 0 < top_p <= 1:
    raise ValueError(f"temperature={temperature}, top_p={top_p}: expected temperature >= 0 and "
                     "0 < top_p <= 1")
  greedy = temperature == 0
  spec = _Spec(_cfg_of(model), int(max_new_tokens), greedy=greedy, nucleus=top_p < 1 and not greedy, mesh=mesh)
  # temperature is only divided by when sampling; the floor keeps the greedy program NaN-free.
  knobs = (jnp.float32(max(temperature, 1e-6)), jnp.float32(top_p), jnp.int32(eos_id), jnp.int32(pad_id))
  return spec, knobs


def _host(x) -> np.ndarray:
  """A (possibly multi-host) array as NumPy, every row on every process."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(x)


def _place(x, sharding):
  """`x` (NumPy, the same on every process, or a jax.Array) laid out by `sharding`."""
  if isinstance(x, jax.Array):
    return x if x.sharding == sharding else jax.device_put(x, sharding)
  x = np.asarray(x)
  return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


def shard_params(params, mesh: Mesh):
  """The params laid out on `mesh` by vpt.core.sharding's rules (arrays already so placed are kept)."""
  params = _unwrap(params)
  return jax.tree.map(_place, params, sharding_lib.param_shardings(params, mesh, SHARDING_RULES))


def generate_tokens(model, params, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
                    eos_id: int, pad_id: int, temperature: float = 0.0, top_p: float = 1.0,
                    rng: jax.Array | None = None, prompt_len: int | None = None,
                    active: Sequence[bool] | None = None, chunk_size: int | None = None,
                    should_stop: Callable[[int, np.ndarray], bool] | None = None,
                    mesh: Mesh | None = None) -> np.ndarray:
  """KV-cached generation for one batch of token prompts (each including bos).

  Returns [B, max_new_tokens] int32: the new tokens, with eos kept and pad_id after it (and after
  a row that `should_stop(row, tokens_so_far)` ended between chunks, or an inactive row).
  `model` is a Transformer or its LMConfig; temperature 0 is greedy. With `mesh`, the rows are
  split over its data axes (B must be a multiple of data × fsdp) and the params sharded by
  vpt.core.sharding's rules.
  """
  spec, knobs = _spec(model, max_new_tokens, temperature, top_p, eos_id, pad_id, mesh)
  params = _unwrap(params)
  tokens, lengths = _layout(prompts, prompt_len, pad_id)
  act = np.ones(len(prompts), bool) if active is None else np.asarray(active, bool)
  if mesh is not None:
    dp = mesh.shape["data"] * mesh.shape["fsdp"]
    if len(prompts) % dp:
      raise ValueError(f"{len(prompts)} prompts cannot be split over the mesh's data axes (data × fsdp = {dp}): "
                       "pass a multiple of it (inactive rows fill a batch)")
    params = shard_params(params, mesh)
    rows = NamedSharding(mesh, P(sharding_lib.BATCH_AXES))
    tokens, lengths, act = (_place(x, rows) for x in (tokens, lengths, act))
  if spec.cfg.lora_rank > 0:  # the cached forward runs the plain layout: fold the LoRA adapters in.
    params = merge_lora(params, spec.cfg)
  rng = jax.random.PRNGKey(0) if rng is None else rng
  state = _prefill(params, tokens, lengths, act, rng, knobs, spec=spec)
  chunk = chunk_size or spec.max_new_tokens
  t = 1
  while t < spec.max_new_tokens:
    state = _decode(params, state, jnp.int32(min(t + chunk, spec.max_new_tokens)), rng, knobs, spec=spec)
    t, done = int(state["t"]), _host(state["done"])
    if done.all():
      break
    if should_stop is not None and t < spec.max_new_tokens:
      out = _host(state["out"])
      stopped = np.array([d or should_stop(i, out[i, :t]) for i, d in enumerate(done)])
      if stopped.all():
        break
      if (stopped != done).any():
        new_done = jnp.asarray(stopped) if mesh is None else _place(stopped, state["done"].sharding)
        state = {**state, "done": new_done}
  return _host(state["out"])


# ----------------------------------------------------------------------------------------------
# The uncached reference: the whole (left-padded) prefix through Transformer.apply every step.


@functools.partial(jax.jit, static_argnames=("spec", "window"))
def _full_step(params, buf, positions, segments, t, done, rng, knobs, *, spec: _Spec, window: int):
  p = buf.shape[1] - spec.max_new_tokens
  logits = Transformer(spec.cfg).apply({"params": params}, buf[:, :window], positions[:, :window],
                                       segments[:, :window])
  last = jax.lax.dynamic_index_in_dim(logits, p + t - 1, axis=1, keepdims=False)
  tok, done = _pick(spec, last, rng, t, knobs, done)
  buf = jax.lax.dynamic_update_slice(buf, tok[:, None], (0, p + t))
  return buf, done


def generate_tokens_uncached(model, params, prompts: Sequence[Sequence[int]], *,
                             max_new_tokens: int, eos_id: int, pad_id: int,
                             temperature: float = 0.0, top_p: float = 1.0,
                             rng: jax.Array | None = None, prompt_len: int | None = None,
                             active: Sequence[bool] | None = None,
                             window_bucket: int | None = 16) -> np.ndarray:
  """Same contract as `generate_tokens`, recomputing the full prefix for every new token.

  Step t runs the model on the first P + t slots rounded up to `window_bucket` (a few compiled
  shapes, about the real prefix cost); None runs the whole P + max_new_tokens buffer (one shape).
  """
  spec, knobs = _spec(model, max_new_tokens, temperature, top_p, eos_id, pad_id)
  params = _unwrap(params)
  tokens, lengths = _layout(prompts, prompt_len, pad_id)
  b, p = tokens.shape
  total = p + spec.max_new_tokens
  buf = np.full((b, total), pad_id, np.int32)
  buf[:, :p] = tokens
  pad = (p - lengths)[:, None]
  slots = np.arange(total)[None]
  positions = np.maximum(slots - pad, 0).astype(np.int32)
  segments = (slots >= pad).astype(np.int32)  # 0 = left padding, which the model masks out.
  done = jnp.asarray(~(np.ones(b, bool) if active is None else np.asarray(active, bool)))
  rng = jax.random.PRNGKey(0) if rng is None else rng
  buf, positions, segments = jnp.asarray(buf), jnp.asarray(positions), jnp.asarray(segments)
  for t in range(spec.max_new_tokens):
    window = total if window_bucket is None else min(total, -(-(p + t) // window_bucket) * window_bucket)
    buf, done = _full_step(params, buf, positions, segments, jnp.int32(t), done, rng, knobs, spec=spec,
                           window=window)
    if (t + 1) % 8 == 0 and bool(jnp.all(done)):
      break
  return np.asarray(buf[:, p:])


# ----------------------------------------------------------------------------------------------
# Text in, text out.


def _row_text(tokenizer, ids: np.ndarray, eos_id: int) -> str:
  ids = [int(i) for i in ids]
  if eos_id in ids:
    ids = ids[:ids.index(eos_id)]
  return tokenizer.decode(ids)


def truncate_at_stop(text: str, stop: Sequence[str]) -> str:
  """`text` up to (excluding) the earliest occurrence of any stop string."""
  cut = min((i for i in (text.find(s) for s in stop if s) if i >= 0), default=len(text))
  return text[:cut]


def _round_up(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple


def generate(model, params, tokenizer, prompts: list[str], *, max_new_tokens: int,
             temperature: float = 0.0, top_p: float = 1.0, stop: Sequence[str] = DEFAULT_STOP,
             rng: jax.Array | None = None, batch_size: int = 16, prompt_bucket: int = PROMPT_BUCKET,
             chunk_size: int | None = DEFAULT_CHUNK, use_cache: bool = True,
             mesh: Mesh | None = None) -> list[str]:
  """Continuations of `prompts` (fed as [bos] + encode(prompt)), cut at eos and at stop strings.

  The text is returned as decoded (a model trained on prompt + ' ' + answer starts with the
  separator: strip it). Prompts are batched longest-first; the last batch is filled with inactive
  rows so every batch of a bucket has the same shape. With `mesh` (cached generation), batches are
  split over its data axes: the batch size is rounded up to a multiple of data × fsdp.
  """
  if not prompts:
    return []
  if mesh is not None and not use_cache:
    raise ValueError("generate(mesh=...) runs the cached generation (use_cache=True)")
  stop = tuple(s for s in (stop or ()) if s)
  rng = jax.random.PRNGKey(0) if rng is None else rng
  encoded = [[tokenizer.bos_id] + list(tokenizer.encode(p)) for p in prompts]
  order = sorted(range(len(prompts)), key=lambda i: -len(encoded[i]))
  b = min(batch_size, len(prompts))
  if mesh is not None:
    b = _round_up(b, mesh.shape["data"] * mesh.shape["fsdp"])
    params = shard_params(params, mesh)  # once, not per batch.
  results: list[str] = [""] * len(prompts)
  for n, start in enumerate(range(0, len(order), b)):
    rows = order[start:start + b]
    batch = [encoded[i] for i in rows] + [[tokenizer.bos_id]] * (b - len(rows))
    active = [True] * len(rows) + [False] * (b - len(rows))
    kw = dict(max_new_tokens=max_new_tokens, eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id,
              temperature=temperature, top_p=top_p, rng=jax.random.fold_in(rng, n),
              prompt_len=_round_up(max(len(x) for x in batch), prompt_bucket), active=active)
    if use_cache:
      stopper = None
      if stop:
        stopper = lambda i, ids: any(s in _row_text(tokenizer, ids, tokenizer.eos_id) for s in stop)
      out = generate_tokens(model, params, batch, chunk_size=chunk_size if stop else None,
                            should_stop=stopper, mesh=mesh, **kw)
    else:
      out = generate_tokens_uncached(model, params, batch, **kw)
    for j, i in enumerate(rows):
      results[i] = truncate_at_stop(_row_text(tokenizer, out[j], tokenizer.eos_id), stop)
  return results


def generate_uncached(model, params, tokenizer, prompts: list[str], **kwargs) -> list[str]:
  """`generate` recomputing the full prefix for every token (reference for tests and benchmarks)."""
  return generate(model, params, tokenizer, prompts, use_cache=False, **kwargs)
