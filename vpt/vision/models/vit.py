"""Vision Transformer learner in the DINOv2 / DINOv3 layout (Flax linen).

Pre-norm blocks (LayerNorm → attention → layer scale → residual; LayerNorm → MLP → layer scale →
residual), a conv patch embedding, a cls token, optional register tokens and a final LayerNorm.
Positions are either learned absolute embeddings (DINOv2; bicubic-interpolated to other grids
exactly as torch's `interpolate` does in HF) or 2-D RoPE on the patch tokens (DINOv3).

Parameter names follow the Hugging Face module tree (`patch_embeddings`, `cls_token`,
`register_tokens`, `position_embeddings`, `layers_{i}/{norm1, attention/{q,k,v,o}_proj,
layer_scale1/lambda1, norm2, mlp/…, layer_scale2/lambda1}`, `norm`) so checkpoints map one-to-one
(vpt/vision/interop/dinov2.py). The blocks are `layers_{i}` and the final norm `norm`, as in the LM, so
`vpt.core.alignment.split_params` picks the alignment subset S (last K blocks + final norm) unchanged.
Dense kernels are `[in, out]`, the patch kernel `[kh, kw, in, out]`; images are `[B, H, W, C]`.
Parameters are float32; `dtype` is the compute dtype ("float64" for the numerics tests).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


ACTIVATIONS = {
    "gelu": functools.partial(nn.gelu, approximate=False),  # HF "gelu" is the exact erf form.
    "gelu_pytorch_tanh": functools.partial(nn.gelu, approximate=True),
    "gelu_new": functools.partial(nn.gelu, approximate=True),
    "silu": nn.silu,
    "swish": nn.silu,
    "relu": nn.relu,
}


@dataclasses.dataclass(frozen=True)
class ViTConfig:
  image_size: int = 224  # the pretrained size: learned position embeddings hold (image_size/patch_size)² cells
  patch_size: int = 16
  d_model: int = 768
  n_layers: int = 12
  n_heads: int = 12
  mlp_ratio: float = 4.0
  d_ff: int = 0  # 0: from mlp_ratio (for "swiglu": DINOv2's 2/3 rule rounded up to a multiple of 8)
  # "mlp": fc1 → act → fc2 (DINOv2, DINOv3 small/base/large); "swiglu": DINOv2-giant's SwiGLU
  # (silu gate); "gated": DINOv3's gated MLP with activation `act`.
  mlp: str = "mlp"
  act: str = "gelu"
  n_registers: int = 0
  layer_scale_init: float = 1.0
  ln_eps: float = 1e-6
  # "learned" (DINOv2, interpolated bicubic for other grids) or "rope" (DINOv3, patch tokens only).
  pos_embed: str = "learned"
  pos_interp_antialias: bool = False  # Dinov2WithRegisters interpolates with antialias=True
  rope_theta: float = 100.0
  # DINOv3 training-time RoPE coordinate augmentation (None: off); used only when a pos_rng is given.
  rope_shift: float | None = None
  rope_jitter: float | None = None
  rope_rescale: float | None = None
  q_bias: bool = True
  k_bias: bool = True
  v_bias: bool = True
  o_bias: bool = True
  mlp_bias: bool = True
  num_channels: int = 3
  # A learned mask token (iBOT: the student's masked patches are replaced by it before the position
  # embeddings, as DINOv2/DINOv3 do); vision runs turn it on with dino.ibot_weight > 0.
  mask_token: bool = False
  dtype: str = "float32"
  remat: bool = False
  init_std: float = 0.02

  def __post_init__(self):
    if self.d_model % self.n_heads:
      raise ValueError(f"ViTConfig.d_model={self.d_model} is not divisible by n_heads={self.n_heads}")
    if self.image_size % self.patch_size:
      raise ValueError(f"ViTConfig.image_size={self.image_size} is not a multiple of patch_size={self.patch_size}")
    if self.mlp not in ("mlp", "swiglu", "gated"):
      raise ValueError(f"ViTConfig.mlp={self.mlp!r}; expected 'mlp', 'swiglu' or 'gated'")
    if self.act not in ACTIVATIONS:
      raise ValueError(f"ViTConfig.act={self.act!r}; expected one of {sorted(ACTIVATIONS)}")
    if self.pos_embed not in ("learned", "rope"):
      raise ValueError(f"ViTConfig.pos_embed={self.pos_embed!r}; expected 'learned' or 'rope'")
    if self.pos_embed == "rope" and (self.d_model // self.n_heads) % 4:
      raise ValueError(f"ViTConfig: 2-D RoPE needs head_dim % 4 == 0, got {self.d_model // self.n_heads}")

  @property
  def head_dim(self) -> int:
    return self.d_model // self.n_heads

  @property
  def grid_size(self) -> int:
    """Patches per side at the pretrained image size."""
    return self.image_size // self.patch_size

  @property
  def n_prefix(self) -> int:
    """Tokens before the patches: cls, then the registers."""
    return 1 + self.n_registers

  @property
  def hidden_dim(self) -> int:
    if self.d_ff:
      return self.d_ff
    hidden = int(self.d_model * self.mlp_ratio)
    if self.mlp == "swiglu":
      hidden = (int(hidden * 2 / 3) + 7) // 8 * 8
    return hidden

  @property
  def compute_dtype(self):
    return jnp.dtype(self.dtype)

  @classmethod
  def from_config(cls, model_cfg) -> "ViTConfig":
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(model_cfg.keys()) - fields)
    if unknown:
      raise ValueError(f"unknown ViT config fields {unknown}; expected a subset of {sorted(fields)}")
    return cls(**dict(model_cfg.items()))


def vit_config(size: str = "tiny", **overrides) -> ViTConfig:
  """Presets. nano: unit tests and CPU end-to-end runs; the others are the standard ViT widths."""
  presets = {
      "nano": dict(image_size=32, patch_size=8, d_model=32, n_layers=2, n_heads=2),
      "tiny": dict(d_model=192, n_layers=12, n_heads=3),
      "small": dict(d_model=384, n_layers=12, n_heads=6),
      "base": dict(d_model=768, n_layers=12, n_heads=12),
      "large": dict(d_model=1024, n_layers=24, n_heads=16),
  }
  if size not in presets:
    raise ValueError(f"ViT size {size!r} unknown; expected one of {sorted(presets)}")
  return ViTConfig(**{**presets[size], **overrides})


# ----------------------------------------------------------------------------- positions


def _bicubic_matrix(n_in: int, n_out: int, antialias: bool) -> np.ndarray:
  """[n_out, n_in] weights of torch's 1-D bicubic `interpolate` (align_corners=False).

  Without antialias: Keys a = −0.75, 4 taps, borders replicated. With antialias (torch's separable
  AA kernel, as PIL): Keys a = −0.5 widened by the downscale factor, taps clipped to the image and
  renormalised. Both match torch to float64 rounding (tested).
  """
  m = np.zeros((n_out, n_in))
  scale = n_in / n_out
  if not antialias:
    a = -0.75

    def w(x):
      x = abs(x)
      if x <= 1:
        return ((a + 2) * x - (a + 3)) * x * x + 1
      return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a if x < 2 else 0.0

    for i in range(n_out):
      src = (i + 0.5) * scale - 0.5
      x0 = math.floor(src)
      for k in range(-1, 3):
        m[i, min(max(x0 + k, 0), n_in - 1)] += w(src - x0 - k)
    return m
  a = -0.5

  def f(x):
    x = abs(x)
    if x < 1:
      return ((a + 2) * x - (a + 3)) * x * x + 1
    return (((x - 5) * x + 8) * x - 4) * a if x < 2 else 0.0

  support, inv = (2.0 * scale, 1.0 / scale) if scale >= 1 else (2.0, 1.0)
  for i in range(n_out):
    c = scale * (i + 0.5)
    lo, hi = max(int(c - support + 0.5), 0), min(int(c + support + 0.5), n_in)
    ws = np.array([f((j - c + 0.5) * inv) for j in range(lo, hi)])
    m[i, lo:hi] = ws / ws.sum()
  return m


def interpolate_grid(x: jax.Array, out_hw: tuple[int, int], antialias: bool = False) -> jax.Array:
  """Bicubic resize of a [h, w, D] grid to [H, W, D], torch-exact (in ≥ float32, like HF)."""
  h, w, _ = x.shape
  acc = jnp.promote_types(x.dtype, jnp.float32)
  mh = jnp.asarray(_bicubic_matrix(h, out_hw[0], antialias), acc)
  mw = jnp.asarray(_bicubic_matrix(w, out_hw[1], antialias), acc)
  return jnp.einsum("hH,wW,HWd->hwd", mh, mw, x.astype(acc), precision=jax.lax.Precision.HIGHEST).astype(x.dtype)


def rope_tables(cfg: ViTConfig, grid: tuple[int, int], pos_rng: jax.Array | None = None, dtype=jnp.float32):
  """DINOv3 2-D RoPE (cos, sin), each [P, head_dim]: patch centres in [−1, 1], head_dim/4 frequencies
  per axis, angles 2π·coord·freq laid out (y freqs, x freqs) and tiled twice (rotate-half convention).
  With `pos_rng` the coordinates get DINOv3's training-time shift / jitter / rescale augmentation."""
  gh, gw = grid
  # As HF: coordinates, 2π·coordinate and the frequencies are float32 values; the product is taken
  # in the compute precision (float64 in the float64 tests, where HF's buffers become float64).
  f32, acc = jnp.float32, jnp.promote_types(dtype, jnp.float32)
  ys = (jnp.arange(gh, dtype=f32) + 0.5) / gh
  xs = (jnp.arange(gw, dtype=f32) + 0.5) / gw
  coords = jnp.stack(jnp.meshgrid(ys, xs, indexing="ij"), axis=-1).reshape(-1, 2) * 2.0 - 1.0
  if pos_rng is not None:
    k_shift, k_jitter, k_rescale = jax.random.split(pos_rng, 3)
    if cfg.rope_shift is not None:
      coords = coords + jax.random.uniform(k_shift, (1, 2), f32, -cfg.rope_shift, cfg.rope_shift)
    if cfg.rope_jitter is not None:
      r = math.log(cfg.rope_jitter)
      coords = coords * jnp.exp(jax.random.uniform(k_jitter, (1, 2), f32, -r, r))
    if cfg.rope_rescale is not None:
      r = math.log(cfg.rope_rescale)
      coords = coords * jnp.exp(jax.random.uniform(k_rescale, (), f32, -r, r))
  inv_freq = (1.0 / cfg.rope_theta ** jnp.arange(0, 1, 4 / cfg.head_dim, dtype=f32)).astype(acc)
  angles = (2 * math.pi * coords).astype(acc)[:, :, None] * inv_freq[None, None, :]
  angles = jnp.tile(angles.reshape(angles.shape[0], -1), (1, 2))
  return jnp.cos(angles).astype(dtype), jnp.sin(angles).astype(dtype)


def _apply_rope(x, cos, sin):
  """x: [B, T, H, D]; RoPE on the last P tokens (the patches), prefix tokens untouched."""
  n_prefix = x.shape[1] - cos.shape[0]
  prefix, patches = x[:, :n_prefix], x[:, n_prefix:]
  x1, x2 = jnp.split(patches, 2, axis=-1)
  rotated = jnp.concatenate([-x2, x1], axis=-1)
  patches = patches * cos[None, :, None] + rotated * sin[None, :, None]
  return jnp.concatenate([prefix, patches.astype(x.dtype)], axis=1)


# ----------------------------------------------------------------------------- blocks


def _dense(cfg: ViTConfig, features: int, bias: bool, name: str):
  return nn.Dense(features, use_bias=bias, dtype=cfg.compute_dtype, param_dtype=jnp.float32,
                  kernel_init=nn.initializers.truncated_normal(cfg.init_std), name=name)


def _layer_norm(cfg: ViTConfig, name: str | None = None):
  # Two-pass variance, as torch: the fast E[x²]−E[x]² form loses digits on large-mean residual streams.
  return nn.LayerNorm(epsilon=cfg.ln_eps, dtype=cfg.compute_dtype, param_dtype=jnp.float32, use_fast_variance=False,
                      name=name)


class Attention(nn.Module):
  cfg: ViTConfig

  @nn.compact
  def __call__(self, x, rope=None):
    cfg = self.cfg
    b, t, _ = x.shape
    heads = lambda y: y.reshape(b, t, cfg.n_heads, cfg.head_dim)
    q = heads(_dense(cfg, cfg.d_model, cfg.q_bias, "q_proj")(x))
    k = heads(_dense(cfg, cfg.d_model, cfg.k_bias, "k_proj")(x))
    v = heads(_dense(cfg, cfg.d_model, cfg.v_bias, "v_proj")(x))
    if rope is not None:
      q, k = _apply_rope(q, *rope), _apply_rope(k, *rope)
    acc = jnp.promote_types(q.dtype, jnp.float32)
    scores = jnp.einsum("bthd,bshd->bhts", q, k, preferred_element_type=acc) / jnp.sqrt(cfg.head_dim).astype(acc)
    weights = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bhts,bshd->bthd", weights, v, preferred_element_type=acc).astype(v.dtype)
    return _dense(cfg, cfg.d_model, cfg.o_bias, "o_proj")(out.reshape(b, t, cfg.d_model))


class MLP(nn.Module):
  cfg: ViTConfig

  @nn.compact
  def __call__(self, x):
    cfg = self.cfg
    hidden = cfg.hidden_dim
    if cfg.mlp == "mlp":
      h = ACTIVATIONS[cfg.act](_dense(cfg, hidden, cfg.mlp_bias, "fc1")(x))
      return _dense(cfg, cfg.d_model, cfg.mlp_bias, "fc2")(h)
    act = nn.silu if cfg.mlp == "swiglu" else ACTIVATIONS[cfg.act]
    h = act(_dense(cfg, hidden, cfg.mlp_bias, "gate_proj")(x)) * _dense(cfg, hidden, cfg.mlp_bias, "up_proj")(x)
    return _dense(cfg, cfg.d_model, cfg.mlp_bias, "down_proj")(h)


class LayerScale(nn.Module):
  init_value: float

  @nn.compact
  def __call__(self, x):
    lam = self.param("lambda1", nn.initializers.constant(self.init_value), (x.shape[-1],), jnp.float32)
    return x * lam.astype(x.dtype)


class Block(nn.Module):
  cfg: ViTConfig

  @nn.compact
  def __call__(self, x, rope=None):
    cfg = self.cfg
    h = Attention(cfg, name="attention")(_layer_norm(cfg, "norm1")(x), rope)
    x = x + LayerScale(cfg.layer_scale_init, name="layer_scale1")(h)
    h = MLP(cfg, name="mlp")(_layer_norm(cfg, "norm2")(x))
    return x + LayerScale(cfg.layer_scale_init, name="layer_scale2")(h)


# ----------------------------------------------------------------------------- the model


class ViT(nn.Module):
  """`__call__(images)` → {"cls": [B, D], "patches": [B, N, D], "registers": [B, R, D]} after the
  final norm (plus "hidden_states" with `return_all`: the residual stream entering each block and
  leaving the last, HF's `output_hidden_states`, un-normalised, all tokens).

  `hidden_before(images, layer)` and `from_hidden(h, layer)` split the network at a block boundary:
  the V-Pretraining value differentiates only the last K blocks and the final norm (the alignment
  subset S), so the prefix runs once with the other parameters held constant.
  """

  cfg: ViTConfig

  def setup(self):
    cfg = self.cfg
    std = nn.initializers.truncated_normal(cfg.init_std)
    self.patch_embeddings = nn.Conv(cfg.d_model, (cfg.patch_size, cfg.patch_size), strides=cfg.patch_size,
                                    padding="VALID", dtype=cfg.compute_dtype, param_dtype=jnp.float32,
                                    kernel_init=std)
    self.cls_token = self.param("cls_token", std, (1, 1, cfg.d_model), jnp.float32)
    if cfg.n_registers:
      self.register_tokens = self.param("register_tokens", std, (1, cfg.n_registers, cfg.d_model), jnp.float32)
    if cfg.mask_token:  # HF Dinov2Embeddings.mask_token [1, D]; DINOv2 initialises it at zero
      self.mask_token_param = self.param("mask_token", nn.initializers.zeros, (1, cfg.d_model), jnp.float32)
    if cfg.pos_embed == "learned":
      self.position_embeddings = self.param("position_embeddings", std, (1, 1 + cfg.grid_size ** 2, cfg.d_model),
                                            jnp.float32)
    block_cls = nn.remat(Block) if cfg.remat else Block
    self.layers = [block_cls(cfg) for _ in range(cfg.n_layers)]
    self.norm = _layer_norm(cfg)

  def __call__(self, images, *, masks=None, return_all: bool = False, pos_rng=None):
    h = self.hidden_before(images, 0, masks=masks, pos_rng=pos_rng)
    return self.from_hidden(h, 0, grid=self.grid_of(images), return_all=return_all, pos_rng=pos_rng)

  def grid_of(self, images) -> tuple[int, int]:
    _, height, width, _ = images.shape
    p = self.cfg.patch_size
    if height % p or width % p:
      raise ValueError(f"image size {height}x{width} is not a multiple of the patch size {p}")
    return height // p, width // p

  def embed(self, images, masks=None):
    """Tokens entering block 0: [cls, registers, patches], [B, 1 + R + N, D].

    `masks` [B, N] bool (row-major patches): those patch embeddings become the mask token, before
    the position embeddings are added (HF / DINOv2 `bool_masked_pos`).
    """
    cfg = self.cfg
    if images.ndim != 4 or images.shape[-1] != cfg.num_channels:
      raise ValueError(f"ViT expects images [B, H, W, {cfg.num_channels}], got shape {images.shape}")
    gh, gw = self.grid_of(images)
    b = images.shape[0]
    x = self.patch_embeddings(images.astype(cfg.compute_dtype)).reshape(b, gh * gw, cfg.d_model)
    if masks is not None:
      if not cfg.mask_token:
        raise ValueError("ViT: masks given but ViTConfig.mask_token=False (no mask token to put there)")
      if masks.shape != (b, gh * gw):
        raise ValueError(f"ViT: masks of shape {masks.shape}, expected {(b, gh * gw)} (batch, patches)")
      x = jnp.where(masks[..., None], self.mask_token_param.astype(x.dtype)[None], x)
    cls = jnp.broadcast_to(self.cls_token.astype(x.dtype), (b, 1, cfg.d_model))
    if cfg.pos_embed == "learned":
      pos = self.position_embeddings[0].astype(x.dtype)
      cls = cls + pos[:1]
      patch_pos = pos[1:]
      if (gh, gw) != (cfg.grid_size, cfg.grid_size):
        g = cfg.grid_size
        patch_pos = interpolate_grid(patch_pos.reshape(g, g, -1), (gh, gw), cfg.pos_interp_antialias)
        patch_pos = patch_pos.reshape(gh * gw, -1)
      x = x + patch_pos
    parts = [cls]
    if cfg.n_registers:
      parts.append(jnp.broadcast_to(self.register_tokens.astype(x.dtype), (b, cfg.n_registers, cfg.d_model)))
    return jnp.concatenate(parts + [x], axis=1)

  def hidden_before(self, images, layer: int = 0, *, masks=None, pos_rng=None):
    """The residual stream entering block `layer` (the embeddings when layer == 0)."""
    x = self.embed(images, masks)
    rope = self._rope(self.grid_of(images), x.dtype, pos_rng)
    for block in self.layers[:layer]:
      x = block(x, rope)
    return x

  def from_hidden(self, h, layer: int, *, grid: tuple[int, int] | None = None, return_all: bool = False,
                  pos_rng=None):
    """Runs blocks `layer…` on the residual stream h, then the final norm; the features dict.

    `grid` = (rows, cols) of patches, needed only for RoPE on a non-square grid (square is assumed).
    """
    cfg = self.cfg
    rope = None
    if cfg.pos_embed == "rope":
      if grid is None:
        n = h.shape[1] - cfg.n_prefix
        side = math.isqrt(n)
        if side * side != n:
          raise ValueError(f"from_hidden: {n} patch tokens are not a square grid; pass grid=(rows, cols) for RoPE")
        grid = (side, side)
      rope = rope_tables(cfg, grid, pos_rng, h.dtype)
    hidden = [h]
    for block in self.layers[layer:]:
      h = block(h, rope)
      hidden.append(h)
    x = self.norm(h)
    out = {"cls": x[:, 0], "registers": x[:, 1:cfg.n_prefix], "patches": x[:, cfg.n_prefix:]}
    if return_all:
      out["hidden_states"] = tuple(hidden)
    return out

  def _rope(self, grid, dtype, pos_rng):
    if self.cfg.pos_embed != "rope":
      return None
    return rope_tables(self.cfg, grid, pos_rng, dtype)


def count_params(params: Any) -> int:
  return sum(int(p.size) for p in jax.tree.leaves(params))


def forward_flops(*, n_params_blocks: int, n_layers: int, d_model: int, n_tokens: int, n_patches: int,
                  patch_params: int, head_params: int = 0) -> float:
  """Model FLOPs of one ViT forward on one crop of `n_tokens` tokens (cls + registers + `n_patches`).

    2 * n_params_blocks * n_tokens     every weight matrix of the blocks, once per token
    + 2 * patch_params * n_patches     the patch embedding (a matmul per patch)
    + 4 * L * n_tokens² * d_model      attention: scores and the weighted sum (every token attends
                                       to every token: not causal)
    + 2 * head_params                  a head on the class token (DINO's MLP)
  Norms, softmax, GELU and position-embedding interpolation are ignored (O(d) per token).
  """
  return (2.0 * n_params_blocks * n_tokens + 2.0 * patch_params * n_patches
          + 4.0 * n_layers * n_tokens ** 2 * d_model + 2.0 * head_params)
