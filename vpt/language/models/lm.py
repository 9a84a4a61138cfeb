"""Causal decoder LM in the Qwen2 / Llama layout (Flax linen).

Parameter names follow the Hugging Face module tree (`embed_tokens`, `layers_{i}/self_attn/q_proj`,
`mlp/gate_proj`, `norm`, `lm_head`) so checkpoints map one-to-one; kernels are stored
`[in_features, out_features]` (HF's transpose). Parameters are float32; `dtype` is the compute
dtype ("float64" exists for the float64 numerics tests). Packed sequences are supported through
`segment_ids` (0 = padding) and per-segment `positions` (RoPE restarts at every packed example).

LoRA (`lora_rank > 0`): each targeted projection keeps its HF-named `kernel`/`bias` and gains
`lora_a` [in, r] and `lora_b` [r, out] beside them (PEFT's layout, transposed like the kernels), so
y = x W + b + dropout(x) A B · α/r. B starts at zero: the adapted model at init is the base model.
Dropout is active only with `deterministic=False` and a 'dropout' rng (the learner's train step).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vpt.language.config_lib import LORA_TARGETS


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
  lora_rank: int = 0  # 0: no adapters (all parameters are the model)
  lora_alpha: float = 16.0
  lora_dropout: float = 0.05
  lora_targets: str = ",".join(LORA_TARGETS)  # comma-separated projection names

  @property
  def lora_target_set(self) -> frozenset[str]:
    return frozenset(t.strip() for t in self.lora_targets.split(",") if t.strip())

  def is_lora_target(self, name: str) -> bool:
    return self.lora_rank > 0 and name in self.lora_target_set

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


# PEFT's lora_A init: kaiming_uniform(a=√5) on [r, in], i.e. U(±1/√in); here on the [in, r] transpose.
lora_a_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


class LoRADense(nn.Module):
  """nn.Dense (same parameters, same arithmetic) plus the low-rank update dropout(x) A B · α/r."""

  features: int
  use_bias: bool
  dtype: Any
  kernel_init: Callable
  rank: int
  alpha: float
  dropout: float

  @nn.compact
  def __call__(self, x, deterministic: bool = True):
    kernel = self.param("kernel", self.kernel_init, (x.shape[-1], self.features), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros_init(), (self.features,), jnp.float32) if self.use_bias else None
    lora_a = self.param("lora_a", lora_a_init, (x.shape[-1], self.rank), jnp.float32)
    lora_b = self.param("lora_b", nn.initializers.zeros_init(), (self.rank, self.features), jnp.float32)
    x, kernel, bias, lora_a, lora_b = nn.dtypes.promote_dtype(x, kernel, bias, lora_a, lora_b, dtype=self.dtype)
    y = jax.lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())))
    if bias is not None:
      y += jnp.reshape(bias, (1,) * (y.ndim - 1) + (-1,))
    h = nn.Dropout(self.dropout)(x, deterministic=deterministic)
    return y + (h @ lora_a @ lora_b) * (self.alpha / self.rank)


def _linear(cfg: "LMConfig", name: str, features: int, bias: bool):
  """The projection `name`: nn.Dense, or LoRADense when LoRA targets it. Returns x, deterministic -> y."""
  init = nn.initializers.normal(cfg.init_std)
  if cfg.is_lora_target(name):
    layer = LoRADense(features, bias, cfg.compute_dtype, init, cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout,
                      name=name)
    return lambda x, deterministic: layer(x, deterministic)
  layer = nn.Dense(features, use_bias=bias, dtype=cfg.compute_dtype, param_dtype=jnp.float32, kernel_init=init,
                   name=name)
  return lambda x, deterministic: layer(x)


class Attention(nn.Module):
  cfg: LMConfig

  @nn.compact
  def __call__(self, x, positions, mask, deterministic: bool = True):
    cfg = self.cfg
    hd = cfg.resolved_head_dim

    def proj(name, features, bias, inputs):
      return _linear(cfg, name, features, bias)(inputs, deterministic)

    b, t, _ = x.shape
    q = proj("q_proj", cfg.n_heads * hd, cfg.qkv_bias, x).reshape(b, t, cfg.n_heads, hd)
    k = proj("k_proj", cfg.n_kv_heads * hd, cfg.qkv_bias, x).reshape(b, t, cfg.n_kv_heads, hd)
    v = proj("v_proj", cfg.n_kv_heads * hd, cfg.qkv_bias, x).reshape(b, t, cfg.n_kv_heads, hd)
    q = rope(q, positions, cfg.rope_theta)
    k = rope(k, positions, cfg.rope_theta)
    out = grouped_query_attention(q, k, v, mask).reshape(b, t, cfg.n_heads * hd)
    return proj("o_proj", cfg.d_model, False, out)


class MLP(nn.Module):
  cfg: LMConfig

  @nn.compact
  def __call__(self, x, deterministic: bool = True):
    cfg = self.cfg
    dense = lambda f, name, inputs: _linear(cfg, name, f, False)(inputs, deterministic)
    h = nn.silu(dense(cfg.d_ff, "gate_proj", x)) * dense(cfg.d_ff, "up_proj", x)
    return dense(cfg.d_model, "down_proj", h)


class Block(nn.Module):
  cfg: LMConfig

  @nn.compact
  def __call__(self, x, positions, mask, deterministic: bool = True):
    h = RMSNorm(self.cfg.rms_norm_eps, name="input_layernorm")(x)
    x = x + Attention(self.cfg, name="self_attn")(h, positions, mask, deterministic)
    h = RMSNorm(self.cfg.rms_norm_eps, name="post_attention_layernorm")(x)
    return x + MLP(self.cfg, name="mlp")(h, deterministic)


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

  `hidden_before(…, layer)` and `from_hidden(h, …, layer)` split the network at a block boundary:
  V-Pretraining differentiates only the last blocks (the alignment subset S), so it runs the
  prefix once, as a constant, and takes JVPs/VJPs of the suffix alone.
  """

  cfg: LMConfig
  # Optional NamedSharding of the batch dimension (sharding.batch_sharding(mesh)). The residual stream
  # is constrained to it, so that XLA gathers FSDP-sharded weights instead of replicating the batch and
  # sharding activations along the model dimension (which the embedding's layout would otherwise give).
  batch_sharding: Any = None

  def setup(self):
    cfg = self.cfg
    self.embed_tokens = nn.Embed(cfg.vocab_size, cfg.d_model, param_dtype=jnp.float32,
                                 embedding_init=nn.initializers.normal(cfg.init_std))
    # `deterministic` (argument 4, counting self) is a Python bool: static under remat.
    block_cls = nn.remat(Block, static_argnums=(4,)) if cfg.remat else Block
    self.layers = [block_cls(cfg) for _ in range(cfg.n_layers)]
    self.norm = RMSNorm(cfg.rms_norm_eps)
    if not cfg.tie_embeddings:
      self.lm_head = nn.Dense(cfg.vocab_size, use_bias=False, dtype=cfg.compute_dtype, param_dtype=jnp.float32,
                              kernel_init=nn.initializers.normal(cfg.init_std))

  def __call__(self, tokens, positions=None, segment_ids=None, return_hidden: bool = False,
               deterministic: bool = True):
    h = self.hidden_before(tokens, positions, segment_ids, self.cfg.n_layers, deterministic)
    x = self.norm(h)
    logits = self._head(x)
    return (logits, x) if return_hidden else logits

  def hidden_before(self, tokens, positions=None, segment_ids=None, layer: int = 0, deterministic: bool = True):
    """The residual stream entering block `layer` (embeddings when layer == 0)."""
    positions, segment_ids = _defaults(tokens, positions, segment_ids)
    x = self._constrain(self.embed_tokens(tokens).astype(self.cfg.compute_dtype))
    mask = attention_mask(segment_ids)
    for block in self.layers[:layer]:
      x = self._constrain(block(x, positions, mask, deterministic))
    return x

  def from_hidden(self, h, positions, segment_ids, layer: int, deterministic: bool = True):
    """Runs blocks `layer…` on the residual stream h, then the final norm and the head."""
    mask = attention_mask(segment_ids)
    h = self._constrain(h)
    for block in self.layers[layer:]:
      h = self._constrain(block(h, positions, mask, deterministic))
    return self._head(self.norm(h))

  def _constrain(self, x):
    s = self.batch_sharding
    if s is None:
      return x
    axes = s.spec[0] if len(s.spec) else None
    axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
    shards = int(np.prod([s.mesh.shape[a] for a in axes]))
    if x.shape[0] % shards:  # e.g. a generation batch of odd size: leave the layout to XLA.
      return x
    return jax.lax.with_sharding_constraint(x, s)

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


def flops_per_token(*, n_params_nonembed: int, n_layers: int, d_model: int, seq_len: int,
                    vocab_size: int, n_heads: int, head_dim: int, training: bool = True,
                    causal: bool = True) -> float:
  """Model FLOPs per token of a decoder-only transformer (PaLM appendix B accounting).

  Forward, per token (a multiply-add = 2 FLOPs):
    2 * n_params_nonembed            every weight matrix of the blocks (q, k, v, o,
                                     MLP), applied once to the token; GQA is already
                                     reflected in the k/v parameter counts
    + 2 * d_model * vocab_size       the LM head, counted even when tied to the
                                     embedding (the lookup itself is a gather, 0 FLOPs)
    + 4 * L * T * n_heads * head_dim   attention: q.k scores (2*T*hd per head) and the
                                     probability-weighted sum of values (2*T*hd), T=seq_len
  With `causal=True` (default) the attention term is halved, since a token attends to
  T/2 keys on average; this matches MaxText and does not credit work a dense mask
  wastes. `causal=False` gives PaLM's full 4*L*T*H*hd (training 12*L*H*hd*T).
  Training = 3 * forward (the backward pass is 2x: gradients w.r.t. activations and
  weights). Rematerialisation is not counted: MFU counts model FLOPs, not hardware ones.
  Norms, softmax, activations and biases are ignored (O(d) per token, not O(d^2)).
  `n_params_nonembed` excludes the embedding and the LM head; the few norm/bias
  parameters may be left in, they are negligible.
  """
  attention = 4.0 * n_layers * seq_len * n_heads * head_dim
  if causal:
    attention /= 2
  forward = 2.0 * n_params_nonembed + 2.0 * d_model * vocab_size + attention
  return 3.0 * forward if training else forward


# How vpt.core.sharding shards this model's parameters over the mesh (data, fsdp, tensor).
# (regex on the '/'-joined parameter path, mesh axis per dimension). First match wins.
# Kernels are [in, out]: column-parallel layers split `out` over tensor, row-parallel `in`.
SHARDING_RULES = (
    (r"embed_tokens/embedding$", ("tensor", "fsdp")),
    (r"self_attn/(q_proj|k_proj|v_proj)/kernel$", ("fsdp", "tensor")),
    (r"self_attn/(q_proj|k_proj|v_proj)/bias$", ("tensor",)),
    (r"self_attn/o_proj/kernel$", ("tensor", "fsdp")),
    (r"mlp/(gate_proj|up_proj)/kernel$", ("fsdp", "tensor")),
    (r"mlp/down_proj/kernel$", ("tensor", "fsdp")),
    (r"lm_head/kernel$", ("fsdp", "tensor")),
    (r".*", ()),  # norms and anything else: replicated.
)
