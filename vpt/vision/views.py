"""On-device DINO multi-crop views and the designer's learned view, all jit-able with explicit RNG.

Images are `[B, H, W, C]` floats in [0, 1] (uint8 is converted); views stay in [0, 1] so the
designer blends in pixel space; `normalize` maps to the ViT's input statistics afterwards. Every
example gets its own key (`jax.vmap` over the batch) and every shape is static, so one compiled
program serves all steps.

DINO's recipe per view (Caron et al. 2021): random resized crop (global scale (0.4, 1), local
(0.05, 0.4), aspect ratio (3/4, 4/3), then a bilinear resize with antialias, as PIL), horizontal flip p=0.5, colour
jitter (brightness 0.4, contrast 0.4, saturation 0.2, hue 0.1, random order) p=0.8, grayscale p=0.2,
Gaussian blur σ ~ U(0.1, 2) with p = 1.0 / 0.1 on the two global views and 0.5 on the local ones,
solarisation p = 0.2 on the second global view only.

The designer's view (PAPER §4): ṽ = μ ⊙ v + (1 − μ) ⊙ Blur(v), μ ∈ [0, 1]^{H×W}: `blend_views`.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_GRAY = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale weights


@dataclasses.dataclass(frozen=True)
class MultiCropConfig:
  global_size: int = 224
  local_size: int = 96
  n_global: int = 2
  n_local: int = 6
  global_scale: tuple[float, float] = (0.4, 1.0)  # DINOv2/v3 use (0.32, 1.0) and (0.05, 0.32)
  local_scale: tuple[float, float] = (0.05, 0.4)
  ratio: tuple[float, float] = (3 / 4, 4 / 3)
  flip_p: float = 0.5
  jitter_p: float = 0.8
  brightness: float = 0.4
  contrast: float = 0.4
  saturation: float = 0.2
  hue: float = 0.1
  grayscale_p: float = 0.2
  global_blur_p: tuple[float, ...] = (1.0, 0.1)  # global view i uses entry i (cycled)
  local_blur_p: float = 0.5
  global_solarize_p: tuple[float, ...] = (0.0, 0.2)
  local_solarize_p: float = 0.0
  blur_sigma: tuple[float, float] = (0.1, 2.0)  # in pixels of the output view
  blur_radius: int = 0  # kernel half-width; 0: ceil(3·σ_max)

  @property
  def radius(self) -> int:
    return self.blur_radius or math.ceil(3 * self.blur_sigma[1])


# ----------------------------------------------------------------------------- blur and blend


def gaussian_kernel(sigma, radius: int) -> jax.Array:
  """Normalised 1-D Gaussian taps at −radius…radius (torchvision's kernel for size 2·radius+1)."""
  sigma = jnp.asarray(sigma)
  x = jnp.arange(-radius, radius + 1, dtype=jnp.promote_types(sigma.dtype, jnp.float32))
  pdf = jnp.exp(-0.5 * (x / sigma) ** 2)
  return pdf / jnp.sum(pdf)


def _blur_one(image: jax.Array, sigma, radius: int) -> jax.Array:
  """Separable Gaussian blur of one [H, W, C] image, reflect padding (torchvision)."""
  k = gaussian_kernel(sigma, radius).astype(image.dtype)
  h, w, _ = image.shape
  x = jnp.pad(image, ((radius, radius), (0, 0), (0, 0)), mode="reflect")
  x = sum(k[i] * x[i:i + h] for i in range(2 * radius + 1))
  x = jnp.pad(x, ((0, 0), (radius, radius), (0, 0)), mode="reflect")
  return sum(k[i] * x[:, i:i + w] for i in range(2 * radius + 1))


def gaussian_blur(images: jax.Array, sigma, radius: int | None = None) -> jax.Array:
  """Blur [B, H, W, C] images; `sigma` is a scalar or one per image ([B]).

  `radius` (static) defaults to ceil(3σ) and then needs a Python-number σ.
  """
  if radius is None:
    if not isinstance(sigma, (int, float)):
      raise ValueError("gaussian_blur: pass a static `radius` when sigma is an array")
    radius = max(1, math.ceil(3 * sigma))
  if radius >= min(images.shape[1], images.shape[2]):
    raise ValueError(f"gaussian_blur: radius {radius} must be smaller than the image side "
                     f"{min(images.shape[1:3])} (reflect padding)")
  sigma = jnp.broadcast_to(jnp.asarray(sigma, images.dtype), images.shape[:1])
  return jax.vmap(lambda im, s: _blur_one(im, s, radius))(images, sigma)


def blend_views(v: jax.Array, mu: jax.Array, blurred: jax.Array) -> jax.Array:
  """ṽ = μ ⊙ v + (1 − μ) ⊙ blurred. v, blurred: [B, H, W, C]; μ: [B, H, W] or [B, H, W, 1].

  High μ keeps pixels, low μ shows the blurred background; differentiable in μ (the designer step).
  """
  if mu.ndim == v.ndim - 1:
    mu = mu[..., None]
  if mu.shape[:3] != v.shape[:3]:
    raise ValueError(f"blend_views: mask shape {mu.shape} does not match views {v.shape}")
  return mu * v + (1 - mu) * blurred


def normalize(images: jax.Array, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> jax.Array:
  """[0, 1] pixels → the ViT's input statistics (per channel)."""
  c = images.shape[-1]
  mean, std = jnp.asarray(mean[:c], images.dtype), jnp.asarray(std[:c], images.dtype)
  return (images - mean) / std


# ----------------------------------------------------------------------------- geometry


def crop_box(key, height: int, width: int, scale, ratio, tries: int = 10):
  """torchvision RandomResizedCrop.get_params: (top, left, h, w) as float32 scalars.

  `tries` candidates are drawn at once and the first that fits is used; if none fits, the
  centre crop with the aspect ratio clamped to `ratio`.
  """
  # One draw for everything: each threefry call is compiled separately, so fewer calls compile faster.
  u = jax.random.uniform(key, (2 * tries + 2,))
  area = height * width * (scale[0] + (scale[1] - scale[0]) * u[:tries])
  log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
  aspect = jnp.exp(log_lo + (log_hi - log_lo) * u[tries:2 * tries])
  w = jnp.round(jnp.sqrt(area * aspect))
  h = jnp.round(jnp.sqrt(area / aspect))
  ok = (w > 0) & (w <= width) & (h > 0) & (h <= height)
  first = jnp.argmax(ok)
  h, w = h[first], w[first]
  top = jnp.floor(u[-2] * (height - h + 1))
  left = jnp.floor(u[-1] * (width - w + 1))
  in_ratio = width / height
  if in_ratio < ratio[0]:
    fh, fw = float(round(width / ratio[0])), float(width)
  elif in_ratio > ratio[1]:
    fh, fw = float(height), float(round(height * ratio[1]))
  else:
    fh, fw = float(height), float(width)
  fallback = (jnp.float32((height - fh) // 2), jnp.float32((width - fw) // 2), jnp.float32(fh), jnp.float32(fw))
  any_ok = jnp.any(ok)
  return tuple(jnp.where(any_ok, a, b).astype(jnp.float32) for a, b in zip((top, left, h, w), fallback))


def _crop_resize_weights(start, length, n_in: int, size: int) -> jax.Array:
  """[size, n_in] bilinear (triangle) weights resampling input pixels [start, start + length) to
  `size` outputs, the kernel widened by the downscale factor (antialias), pixels outside the box
  excluded and each row renormalised: crop-then-resize, as `jax.image.resize` of the slice."""
  scale = size / length
  width = jnp.maximum(1.0 / scale, 1.0)
  centres = start + (jnp.arange(size) + 0.5) / scale  # output pixel centres in input coordinates
  pixels = jnp.arange(n_in) + 0.5
  w = jnp.maximum(0.0, 1.0 - jnp.abs(pixels[None, :] - centres[:, None]) / width)
  w = w * ((pixels >= start) & (pixels < start + length))[None, :]
  return w / jnp.sum(w, axis=1, keepdims=True)


def resized_crop(image: jax.Array, box, size: int) -> jax.Array:
  """Crop `box` = (top, left, h, w) of one [H, W, C] image and resize it to [size, size, C]: bilinear
  with antialias (PIL-like), as torchvision's resized_crop. The box may be traced; one separable
  pair of weight matrices, so shapes stay static."""
  top, left, h, w = box
  wy = _crop_resize_weights(top, h, image.shape[0], size).astype(image.dtype)
  wx = _crop_resize_weights(left, w, image.shape[1], size).astype(image.dtype)
  out = jnp.einsum("sh,hwc,tw->stc", wy, image, wx, precision=jax.lax.Precision.HIGHEST)
  return jnp.clip(out, 0.0, 1.0)


# ----------------------------------------------------------------------------- colour


def grayscale(image: jax.Array) -> jax.Array:
  """[…, 3] → [..., 1] luma (torchvision weights)."""
  w = jnp.asarray(_GRAY, image.dtype)
  return jnp.sum(image * w, axis=-1, keepdims=True)


def rgb_to_hsv(image: jax.Array) -> jax.Array:
  r, g, b = image[..., 0], image[..., 1], image[..., 2]
  maxc, minc = jnp.max(image, axis=-1), jnp.min(image, axis=-1)
  eq = maxc == minc
  cr = maxc - minc
  s = cr / jnp.where(eq, 1.0, maxc)
  div = jnp.where(eq, 1.0, cr)
  rc, gc, bc = (maxc - r) / div, (maxc - g) / div, (maxc - b) / div
  h = jnp.where(maxc == r, bc - gc, jnp.where(maxc == g, 2.0 + rc - bc, 4.0 + gc - rc))
  h = jnp.mod(h / 6.0 + 1.0, 1.0)
  return jnp.stack([h, s, maxc], axis=-1)


def hsv_to_rgb(hsv: jax.Array) -> jax.Array:
  h, s, v = hsv[..., 0], hsv[..., 1], hsv[..., 2]
  i = jnp.floor(h * 6.0)
  f = h * 6.0 - i
  i = jnp.mod(i.astype(jnp.int32), 6)
  p = jnp.clip(v * (1 - s), 0, 1)
  q = jnp.clip(v * (1 - s * f), 0, 1)
  t = jnp.clip(v * (1 - s * (1 - f)), 0, 1)
  pick = lambda *c: jnp.select([i == n for n in range(6)], c)
  return jnp.stack([pick(v, q, p, p, t, v), pick(t, v, v, q, p, p), pick(p, p, t, v, v, q)], axis=-1)


def _shift_hue(image, shift):
  hsv = rgb_to_hsv(image)
  return hsv_to_rgb(hsv.at[..., 0].set(jnp.mod(hsv[..., 0] + shift, 1.0)))


def color_jitter(key, image: jax.Array, brightness: float, contrast: float, saturation: float, hue: float):
  """torchvision ColorJitter on one [H, W, C] image: factors drawn uniformly, ops in random order.

  Saturation and hue need RGB; for other channel counts only brightness and contrast apply.
  """
  u = jax.random.uniform(key, (8,), image.dtype)
  between = lambda x, lo, hi: lo + (hi - lo) * x
  fb = between(u[0], max(0.0, 1 - brightness), 1 + brightness)
  fc = between(u[1], max(0.0, 1 - contrast), 1 + contrast)
  fs = between(u[2], max(0.0, 1 - saturation), 1 + saturation)
  fh = between(u[3], -hue, hue)
  rgb = image.shape[-1] == 3
  gray = grayscale if rgb else (lambda x: jnp.mean(x, axis=-1, keepdims=True))
  ops = [
      lambda x: jnp.clip(x * fb, 0, 1),
      lambda x: jnp.clip(fc * x + (1 - fc) * jnp.mean(gray(x)), 0, 1),
  ]
  if rgb:
    ops += [
        lambda x: jnp.clip(fs * x + (1 - fs) * gray(x), 0, 1),
        lambda x: _shift_hue(x, fh),
    ]
  order = jnp.argsort(u[4:4 + len(ops)])  # a uniformly random permutation
  # One loop body holding every op (vmap turns the switch into a select): compiles once, not 4×.
  return jax.lax.fori_loop(0, len(ops), lambda n, x: jax.lax.switch(order[n], ops, x), image)


def solarize(image: jax.Array, threshold: float = 0.5) -> jax.Array:
  """Invert pixels at or above the threshold (PIL's solarize(128) on [0, 1] floats)."""
  return jnp.where(image >= threshold, 1.0 - image, image)


# ----------------------------------------------------------------------------- views


def augment_view(key, image: jax.Array, cfg: MultiCropConfig, size: int, scale, blur_p, solarize_p) -> jax.Array:
  """One DINO view of one [H, W, C] image in [0, 1]; blur_p and solarize_p may be traced."""
  k_crop, k_jitter, k_rest = jax.random.split(key, 3)
  u = jax.random.uniform(k_rest, (6,), image.dtype)
  h, w, c = image.shape
  out = resized_crop(image, crop_box(k_crop, h, w, scale, cfg.ratio), size)
  out = jnp.where(u[0] < cfg.flip_p, out[:, ::-1], out)
  jittered = color_jitter(k_jitter, out, cfg.brightness, cfg.contrast, cfg.saturation, cfg.hue)
  out = jnp.where(u[1] < cfg.jitter_p, jittered, out)
  if c == 3:
    out = jnp.where(u[2] < cfg.grayscale_p, jnp.broadcast_to(grayscale(out), out.shape), out)
  sigma = cfg.blur_sigma[0] + (cfg.blur_sigma[1] - cfg.blur_sigma[0]) * u[3]
  out = jnp.where(u[4] < blur_p, _blur_one(out, sigma, min(cfg.radius, size - 1)), out)
  return jnp.where(u[5] < solarize_p, solarize(out), out)


def as_float(images: jax.Array) -> jax.Array:
  """Images [B, H, W, C] as floats in [0, 1] (integer images are divided by 255)."""
  if images.ndim != 4:
    raise ValueError(f"expected images [B, H, W, C], got shape {images.shape}")
  if jnp.issubdtype(images.dtype, jnp.integer):
    return images.astype(jnp.float32) / 255.0
  return images


def multi_crop(rng, images: jax.Array, cfg: MultiCropConfig) -> tuple[jax.Array, jax.Array]:
  """(global views [n_global, B, S, S, C], local views [n_local, B, s, s, C]) in [0, 1].

  View v of example b uses key split(fold_in(rng, v), B)[b]: deterministic for a fixed rng.
  """
  images = as_float(images)
  b, c = images.shape[0], images.shape[-1]

  def views(first, n, size, scale, blur_p, solarize_p):
    """n views of every image in one flat vmap over (view, example): one program per view size."""
    if n == 0:
      return jnp.zeros((0, b, size, size, c), images.dtype)
    keys = jnp.concatenate([jax.random.split(jax.random.fold_in(rng, first + v), b) for v in range(n)])
    per_view = lambda p: jnp.repeat(jnp.asarray(p, images.dtype), b)
    one = lambda k, im, bp, sp: augment_view(k, im, cfg, size, scale, bp, sp)
    out = jax.vmap(one)(keys, jnp.tile(images, (n, 1, 1, 1)), per_view(blur_p), per_view(solarize_p))
    return out.reshape((n, b) + out.shape[1:])

  cycle = lambda ps, n: [ps[i % len(ps)] for i in range(n)]
  g = views(0, cfg.n_global, cfg.global_size, cfg.global_scale, cycle(cfg.global_blur_p, cfg.n_global),
            cycle(cfg.global_solarize_p, cfg.n_global))
  loc = views(cfg.n_global, cfg.n_local, cfg.local_size, cfg.local_scale, [cfg.local_blur_p] * cfg.n_local,
              [cfg.local_solarize_p] * cfg.n_local)
  return g, loc
