"""The learner LM against an explicit float64 NumPy reference of the Qwen2/Llama layout."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vpt.language.models.lm import LMConfig, Transformer


def reference_forward(p, tokens, positions, segment_ids, cfg):
  """Straight-line NumPy float64 forward: RMSNorm, rotate-half RoPE, GQA, SwiGLU."""
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), p)
  hd = cfg.resolved_head_dim
  def norm(x, s):
    return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + cfg.rms_norm_eps) * s
  def rope(x, pos):
    inv = 1.0 / cfg.rope_theta ** (np.arange(0, hd, 2) / hd)
    ang = pos[..., None] * inv
    ang = np.concatenate([ang, ang], -1)[:, :, None]
    x1, x2 = x[..., :hd // 2], x[..., hd // 2:]
    return x * np.cos(ang) + np.concatenate([-x2, x1], -1) * np.sin(ang)
  b, t = tokens.shape
  x = p["embed_tokens"]["embedding"][tokens]
  allowed = np.tril(np.ones((t, t), bool))[None] & (segment_ids[:, :, None] == segment_ids[:, None, :])
  for i in range(cfg.n_layers):
    lp = p[f"layers_{i}"]
    a = lp["self_attn"]
    h = norm(x, lp["input_layernorm"]["scale"])
    def lin(name, h=h):
      out = h @ a[name]["kernel"]
      return out + a[name]["bias"] if "bias" in a[name] else out
    q = rope(lin("q_proj").reshape(b, t, cfg.n_heads, hd), positions)
    k = rope(lin("k_proj").reshape(b, t, cfg.n_kv_heads, hd), positions)
    v = lin("v_proj").reshape(b, t, cfg.n_kv_heads, hd)
    rep = cfg.n_heads // cfg.n_kv_heads
    k, v = np.repeat(k, rep, axis=2), np.repeat(v, rep, axis=2)
    s = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(hd)
    s = np.where(allowed[:, None], s, -np.inf)
    w = np.exp(s - s.max(-1, keepdims=True))
    w /= w.sum(-1, keepdims=True)
    o = np.einsum("bhqk,bkhd->bqhd", w, v).reshape(b, t, -1)
    x = x + o @ a["o_proj"]["kernel"]
    m = lp["mlp"]
    h = norm(x, lp["post_attention_layernorm"]["scale"])
    g = h @ m["gate_proj"]["kernel"]
    x = x + ((g / (1 + np.exp(-g))) * (h @ m["up_proj"]["kernel"])) @ m["down_proj"]["kernel"]
  x = norm(x, p["norm"]["scale"])
  head = p["embed_tokens"]["embedding"].T if cfg.tie_embeddings else p["lm_head"]["kernel"]
  return x @ head


@pytest.mark.parametrize("tie,bias,kv", [(True, True, 2), (False, False, 4), (True, False, 1)])
def test_forward_matches_float64_reference(x64, tie, bias, kv):
  cfg = LMConfig(vocab_size=50, d_model=32, n_layers=2, n_heads=4, n_kv_heads=kv, d_ff=48,
                 qkv_bias=bias, tie_embeddings=tie, rope_theta=1000.0, dtype="float64")
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, 50, (2, 12))
  positions = np.stack([np.arange(12), np.r_[np.arange(5), np.arange(7)]])
  segments = np.stack([np.ones(12, int), np.r_[np.ones(5, int), 2 * np.ones(7, int)]])
  model = Transformer(cfg)
  params = model.init(jax.random.PRNGKey(1), jnp.asarray(tokens))["params"]
  params = jax.tree.map(lambda a: a.astype(jnp.float64) + 0.05 * jax.random.normal(jax.random.PRNGKey(2), a.shape, jnp.float64), params)
  got = model.apply({"params": params}, jnp.asarray(tokens), jnp.asarray(positions), jnp.asarray(segments))
  want = reference_forward(params, tokens, positions, segments, cfg)
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-9, atol=1e-9)


def test_packed_row_equals_separate_examples():
  """Segment masking + per-segment positions: a packed row computes each example independently."""
  cfg = LMConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64)
  model = Transformer(cfg)
  a, b = np.arange(1, 8), np.arange(20, 31)
  packed = np.r_[a, b, np.zeros(2, int)][None]
  positions = np.r_[np.arange(7), np.arange(11), np.arange(2)][None]
  segments = np.r_[np.ones(7, int), 2 * np.ones(11, int), np.zeros(2, int)][None]
  params = model.init(jax.random.PRNGKey(0), jnp.asarray(packed))["params"]
  packed_logits = model.apply({"params": params}, packed, positions, segments)
  la = model.apply({"params": params}, a[None])
  lb = model.apply({"params": params}, b[None])
  np.testing.assert_allclose(packed_logits[0, :7], la[0], atol=1e-5)
  np.testing.assert_allclose(packed_logits[0, 7:18], lb[0], atol=1e-5)


def test_bfloat16_compute_keeps_float32_params_and_is_close():
  base = dict(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64)
  tokens = jnp.arange(16)[None] % 64
  m32, m16 = Transformer(LMConfig(**base)), Transformer(LMConfig(**base, dtype="bfloat16"))
  params = m32.init(jax.random.PRNGKey(0), tokens)["params"]
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(m16.init(jax.random.PRNGKey(0), tokens)))
  l32, l16 = m32.apply({"params": params}, tokens), m16.apply({"params": params}, tokens)
  assert l16.dtype == jnp.float32
  np.testing.assert_allclose(l16, l32, atol=0.05)
