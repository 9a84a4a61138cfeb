"""The vision task designer φ: a tiny U-Net predicting a soft keep-mask μ ∈ [0, 1]^{H×W} per crop.

The learned view (PAPER §4, v2 eq 49) is ṽ = μ ⊙ v + (1 − μ) ⊙ Blur(v): high μ keeps pixels, low μ
shows a blurred copy (`vpt.vision.views.blend_views`). Architecture (v1: base channels 16,
depth 3): conv3x3–GroupNorm–act blocks; down by a stride-2 conv; up by a bilinear resize to the
skip's size, a block, concatenation with the skip and another block; a 1x1 conv to one logit.

The last conv has a zero kernel and bias logit(init_keep): μ starts uniform at init_keep (≈ 1), so
the first views are ≈ the fixed pipeline's, and the first designer step moves that kernel (the
only parameter with a gradient at init), after which every layer learns.

Regularisers of the meta objective (v2 eq 54), both averaged over the crops:
  keep-ratio  R_spars = mean_b (mean_{h,w} μ_b − κ)²   (squared: smooth, zero gradient at κ; each
                                                        crop is pulled to keep a fraction κ)
  TV          R_tv    = mean_b [mean |μ_{h+1,w} − μ_{h,w}| + mean |μ_{h,w+1} − μ_{h,w}|]
                        (anisotropic L1 total variation per neighbouring pair: smooth masks)
"""

from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

_ACTS = {"silu": nn.silu, "relu": nn.relu, "gelu": nn.gelu}


@dataclasses.dataclass(frozen=True)
class UNetConfig:
  base_channels: int = 16
  depth: int = 3  # number of stride-2 downsamplings (levels below full resolution)
  groups: int = 8  # GroupNorm groups (gcd with the channel count)
  act: str = "silu"
  init_keep: float = 0.95  # μ at initialisation, everywhere
  dtype: str = "float32"  # compute dtype; parameters are float32 ("float64" for the numerics tests)

  def __post_init__(self):
    if self.base_channels < 1 or self.depth < 0:
      raise ValueError(f"UNetConfig: base_channels={self.base_channels} must be >= 1 and depth={self.depth} >= 0")
    if not 0.0 < self.init_keep < 1.0:
      raise ValueError(f"UNetConfig.init_keep={self.init_keep}: expected in (0, 1)")
    if self.act not in _ACTS:
      raise ValueError(f"UNetConfig.act={self.act!r}; expected one of {sorted(_ACTS)}")

  @classmethod
  def from_config(cls, designer_cfg, dtype: str = "float32") -> "UNetConfig":
    """From config.vpt.designer (base_channels, depth; optional groups, act, init_keep)."""
    d = designer_cfg
    return cls(base_channels=int(d.base_channels), depth=int(d.depth), groups=int(d.get("groups", 8)),
               act=d.get("act", "silu"), init_keep=float(d.get("init_keep", 0.95)), dtype=dtype)


class ConvBlock(nn.Module):
  features: int
  cfg: UNetConfig
  strides: int = 1

  @nn.compact
  def __call__(self, x):
    cfg = self.cfg
    x = nn.Conv(self.features, (3, 3), strides=self.strides, padding="SAME", dtype=jnp.dtype(cfg.dtype),
                param_dtype=jnp.float32)(x)
    x = nn.GroupNorm(num_groups=math.gcd(cfg.groups, self.features), dtype=jnp.dtype(cfg.dtype),
                     param_dtype=jnp.float32)(x)
    return _ACTS[cfg.act](x)


class MaskUNet(nn.Module):
  """images [B, H, W, C] in [0, 1] -> mask logits [B, H, W] (μ = sigmoid(logits))."""

  cfg: UNetConfig

  @nn.compact
  def __call__(self, images):
    cfg = self.cfg
    if images.ndim != 4:
      raise ValueError(f"MaskUNet expects images [B, H, W, C], got shape {images.shape}")
    width = lambda level: cfg.base_channels * 2 ** level
    h = ConvBlock(width(0), cfg, name="in")(images.astype(jnp.dtype(cfg.dtype)) * 2.0 - 1.0)
    skips = [h]
    for level in range(1, cfg.depth + 1):
      h = ConvBlock(width(level), cfg, strides=2, name=f"down_{level}")(h)
      h = ConvBlock(width(level), cfg, name=f"enc_{level}")(h)
      skips.append(h)
    skips.pop()  # the bottleneck is h itself
    for level in reversed(range(cfg.depth)):
      skip = skips[level]
      h = jax.image.resize(h, skip.shape[:3] + h.shape[3:], "bilinear")
      h = ConvBlock(width(level), cfg, name=f"up_{level}")(h)
      h = ConvBlock(width(level), cfg, name=f"dec_{level}")(jnp.concatenate([h, skip], axis=-1))
    bias = math.log(cfg.init_keep / (1.0 - cfg.init_keep))
    logits = nn.Conv(1, (1, 1), dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.float32,
                     kernel_init=nn.initializers.zeros, bias_init=nn.initializers.constant(bias), name="out")(h)
    return logits[..., 0]


def init_unet(unet: MaskUNet, rng, sample_images) -> dict:
  """The U-Net's params for crops like `sample_images` (one jitted init)."""
  return jax.jit(lambda r, x: unet.init(r, x)["params"])(rng, sample_images)


def predict_mask(unet: MaskUNet, params, images) -> jax.Array:
  """μ = sigmoid(logits) ∈ [0, 1], [B, H, W]."""
  return jax.nn.sigmoid(unet.apply({"params": params}, images))


def keep_ratio_penalty(mu: jax.Array, kappa: float) -> jax.Array:
  """R_spars = mean over crops of (mean μ − κ)²; μ [B, H, W]."""
  return jnp.mean(jnp.square(jnp.mean(mu, axis=(1, 2)) - kappa))


def total_variation(mu: jax.Array) -> jax.Array:
  """R_tv = mean over crops of the mean |vertical| + mean |horizontal| neighbour difference of μ."""
  dh = jnp.mean(jnp.abs(mu[:, 1:, :] - mu[:, :-1, :]), axis=(1, 2))
  dw = jnp.mean(jnp.abs(mu[:, :, 1:] - mu[:, :, :-1]), axis=(1, 2))
  return jnp.mean(dh + dw)
