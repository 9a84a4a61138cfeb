"""Causal decoder LM in the Qwen2 / Llama layout (Flax linen).

Parameter names follow the Hugging Face module tree (`embed_tokens`, `layers_{i}/self_attn/q_proj`,
`mlp/gate_proj`, `norm`, `lm_head`) so checkpoints map one-to-one; kernels are stored
`[in_features, out_features]` (HF's transpose). Parameters are float32; `dtype` is the compute
dtype ("float64" exists for the float64 numerics tests). Packed sequences are supported through
`segment_ids` (0 = padding) and per-segment `positions` (RoPE restarts at every packed example).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class LMConfig:
  vocab_size: int
  d_model: int
  n_layers: int
  n_heads: int
  n_kv_heads: int
  d_ff: int
  head_dim: int = 0  # 0: d_model // n_heads
  rope_theta: float = 10_000.0
  rms_norm_eps: float = 1e-6
  qkv_bias: bool = True
  tie_embeddings: bool = True
  dtype: str = "float32"
  remat: bool = False
  init_std: float = 0.02

  @property
  def resolved_head_dim(self) -> int:
    return self.head_dim or self.d_model // self.n_heads

  @property
  def compute_dtype(self):
    return jnp.dtype(self.dtype)

  @property
  def logits_dtype(self):
    # float32 logits for bf16/fp32 compute; float64 in float64 numerics tests.
    return jnp.promote_types(self.compute_dtype, jnp.float32)

  @classmethod
  def from_config(cls, model_cfg, vocab_size: int | None = None) -> "LMConfig":
    fields = {f.name for f in dataclasses.fields(cls)}
    values = {k: v for k, v in model_cfg.items() if k in fields}
    if not values.get("vocab_size"):
      if not vocab_size:
        raise ValueError("config.model.vocab_size is 0 and no tokenizer vocabulary size was given")
      values["vocab_size"] = vocab_size
    return cls(**values)


class RMSNorm(nn.Module):
  eps: float

  @nn.compact
  def __call__(self, x):
    scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), jnp.float32)
    x32 = x.astype(jnp.promote_types(x.dtype, jnp.float32))  # bf16 in, fp32 statistics
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return (x32 * scale).astype(x.dtype)


def rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
  """Rotary embedding in the HF "rotate_half" convention. x: [B, T, H, D], positions: [B, T]."""
  d = x.shape[-1]
  f32 = jnp.promote_types(x.dtype, jnp.float32)
  inv_freq = 1.0 / (theta ** (jnp.arange(0, d, 2, dtype=f32) / d))
  angles = positions.astype(f32)[..., None] * inv_freq  # [B, T, D/2]
  angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]
  x32 = x.astype(f32)
  x1, x2 = jnp.split(x32, 2, axis=-1)
  rotated = jnp.concatenate([-x2, x1], axis=-1)
  return (x32 * jnp.cos(angles) + rotated * jnp.sin(angles)).astype(x.dtype)


def grouped_query_attention(q, k, v, mask):
  """q: [B, T, H, D]; k, v: [B, S, Hkv, D]; mask: [B, 1, T, S] bool. Softmax in >= float32.

  Query heads are grouped over their shared kv head instead of repeating k and v in memory.
  """
  b, t, h, d = q.shape
  hkv = k.shape[2]
  q = q.reshape(b, t, hkv, h // hkv, d)
  acc = jnp.promote_types(q.dtype, jnp.float32)
  scores = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=acc) / jnp.sqrt(d).astype(acc)
  scores = jnp.where(mask[:, :, None], scores, jnp.finfo(acc).min)
  weights = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
  out = jnp.einsum("bkgts,bskd->btkgd", weights, v, preferred_element_type=acc)
  return out.astype(v.dtype).reshape(b, t, h, d)


class Attention(nn.Module):
  cfg: LMConfig

  @nn.compact
  def __call__(self, x, positions, mask):
    cfg = self.cfg
    hd = cfg.resolved_head_dim
    init = nn.initializers.normal(cfg.init_std)

    def proj(name, features, bias):
      return nn.Dense(features, use_bias=bias, dtype=cfg.compute_dtype, param_dtype=jnp.float32,
                      kernel_init=init, name=name)

    b, t, _ = x.shape
    q = proj("q_proj", cfg.n_heads * hd, cfg.qkv_bias)(x).reshape(b, t, cfg.n_heads, hd)
    k = proj("k_proj", cfg.n_kv_heads * hd, cfg.qkv_bias)(x).reshape(b, t, cfg.n_kv_heads, hd)
    v = proj("v_proj", cfg.n_kv_heads * hd, cfg.qkv_bias)(x).reshape(b, t, cfg.n_kv_heads, hd)
    q = rope(q, positions, cfg.rope_theta)
    k = rope(k, positions, cfg.rope_theta)
    out = grouped_query_attention(q, k, v, mask).reshape(b, t, cfg.n_heads * hd)
    return proj("o_proj", cfg.d_model, False)(out)


class MLP(nn.Module):
  cfg: LMConfig

  @nn.compact
  def __call__(self, x):
    cfg = self.cfg
    dense = lambda f, name: nn.Dense(f, use_bias=False, dtype=cfg.compute_dtype, param_dtype=jnp.float32,
                                     kernel_init=nn.initializers.normal(cfg.init_std), name=name)
    h = nn.silu(dense(cfg.d_ff, "gate_proj")(x)) * dense(cfg.d_ff, "up_proj")(x)
    return dense(cfg.d_model, "down_proj")(h)


class Block(nn.Module):
  cfg: LMConfig

  @nn.compact
  def __call__(self, x, positions, mask):
    h = RMSNorm(self.cfg.rms_norm_eps, name="input_layernorm")(x)
    x = x + Attention(self.cfg, name="self_attn")(h, positions, mask)
    h = RMSNorm(self.cfg.rms_norm_eps, name="post_attention_layernorm")(x)
    return x + MLP(self.cfg, name="mlp")(h)


def attention_mask(segment_ids: jax.Array) -> jax.Array:
  """[B, 1, T, T] boolean: causal and within the same packed segment.

  Padding (segment 0) attends to earlier padding only, so no row is empty (no NaN); its
  outputs are ignored through the loss mask.
  """
  t = segment_ids.shape[1]
  causal = jnp.tril(jnp.ones((t, t), dtype=bool))
  same = segment_ids[:, :, None] == segment_ids[:, None, :]
  return (causal[None] & same)[:, None]


class Transformer(nn.Module):
  """Returns float32 logits [B, T, V] (and the final hidden states if asked).

  `hidden_before(…, layer)` and `logits_from(h, …, layer)` split the network at a block boundary:
  V-Pretraining differentiates only the last blocks (the alignment subset S), so it runs the
  prefix once, as a constant, and takes JVPs/VJPs of the suffix alone.
  """

  cfg: LMConfig

  def setup(self):
    cfg = self.cfg
    self.embed_tokens = nn.Embed(cfg.vocab_size, cfg.d_model, param_dtype=jnp.float32,
                                 embedding_init=nn.initializers.normal(cfg.init_std))
    block_cls = nn.remat(Block) if cfg.remat else Block
    self.layers = [block_cls(cfg) for _ in range(cfg.n_layers)]
    self.norm = RMSNorm(cfg.rms_norm_eps)
    if not cfg.tie_embeddings:
      self.lm_head = nn.Dense(cfg.vocab_size, use_bias=False, dtype=cfg.compute_dtype, param_dtype=jnp.float32,
                              kernel_init=nn.initializers.normal(cfg.init_std))

  def __call__(self, tokens, positions=None, segment_ids=None, return_hidden: bool = False):
    h = self.hidden_before(tokens, positions, segment_ids, self.cfg.n_layers)
    x = self.norm(h)
    logits = self._head(x)
    return (logits, x) if return_hidden else logits

  def hidden_before(self, tokens, positions=None, segment_ids=None, layer: int = 0):
    """The residual stream entering block `layer` (embeddings when layer == 0)."""
    positions, segment_ids = _defaults(tokens, positions, segment_ids)
    x = self.embed_tokens(tokens).astype(self.cfg.compute_dtype)
    mask = attention_mask(segment_ids)
    for block in self.layers[:layer]:
      x = block(x, positions, mask)
    return x

  def logits_from(self, h, positions, segment_ids, layer: int):
    """Runs blocks `layer…` on the residual stream h, then the final norm and the head."""
    mask = attention_mask(segment_ids)
    for block in self.layers[layer:]:
      h = block(h, positions, mask)
    return self._head(self.norm(h))

  def _head(self, x):
    cfg = self.cfg
    if cfg.tie_embeddings:
      logits = jnp.einsum("btd,vd->btv", x, self.embed_tokens.embedding.astype(cfg.compute_dtype),
                          preferred_element_type=cfg.logits_dtype)
    else:
      logits = self.lm_head(x)
    return logits.astype(cfg.logits_dtype)


def _defaults(tokens, positions, segment_ids):
  if positions is None:
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
  if segment_ids is None:
    segment_ids = jnp.ones_like(tokens)
  return positions, segment_ids


def count_params(params: Any) -> int:
  return sum(int(p.size) for p in jax.tree.leaves(params))


def count_nonembedding_params(params: Any) -> int:
  """Parameters excluding the token embedding table (the LM head is counted when untied)."""
  return count_params(params) - int(params["embed_tokens"]["embedding"].size)
