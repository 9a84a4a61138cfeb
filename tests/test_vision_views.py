"""On-device multi-crop augmentations, the blur and the designer's blended view."""

import colorsys
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vpt.vision import views as vv


# DINO's recipe at toy sizes; the second global view is always solarised so that the per-view
# probabilities are visible: a solarised [0, 1] image never exceeds 0.5.
CFG = vv.MultiCropConfig(global_size=16, local_size=8, n_global=2, n_local=3, blur_sigma=(0.1, 1.0),
                         global_solarize_p=(0.0, 1.0))
IMAGES = jnp.asarray(np.random.default_rng(0).uniform(size=(3, 20, 24, 3)), jnp.float32)


@functools.lru_cache(maxsize=None)
def _multi_crop():
  return jax.jit(lambda key, images: vv.multi_crop(key, images, CFG))


def test_multi_crop_shapes_ranges_and_determinism():
  g, loc = _multi_crop()(jax.random.PRNGKey(0), IMAGES)
  assert g.shape == (2, 3, 16, 16, 3) and loc.shape == (3, 3, 8, 8, 3)
  assert g.dtype == loc.dtype == jnp.float32
  for v in (g, loc):
    assert float(v.min()) >= 0.0 and float(v.max()) <= 1.0
  g2, loc2 = _multi_crop()(jax.random.PRNGKey(0), IMAGES)
  np.testing.assert_array_equal(g, g2)
  np.testing.assert_array_equal(loc, loc2)
  g3, loc3 = _multi_crop()(jax.random.PRNGKey(1), IMAGES)
  assert np.abs(np.asarray(g3 - g)).mean() > 1e-2 and np.abs(np.asarray(loc3 - loc)).mean() > 1e-2
  # Views of one image differ from each other, and examples differ from each other.
  assert np.abs(np.asarray(loc[0] - loc[1])).mean() > 1e-2
  assert np.abs(np.asarray(g[0, 0] - g[0, 1])).mean() > 1e-2
  # Per-view probabilities: view 1 is solarised (≤ 0.5 everywhere), view 0 and the local views are not.
  assert float(g[1].max()) <= 0.5 < float(g[0].max())
  assert float(loc.max()) > 0.5


def test_view_pipeline_at_its_extremes():
  """Identity crop, no flip / jitter / grayscale: blur_p and solarize_p (traced) switch exactly."""
  cfg = vv.MultiCropConfig(flip_p=0.0, jitter_p=0.0, grayscale_p=0.0, ratio=(1.0, 1.0), blur_sigma=(0.5, 1.0))
  images = jnp.asarray(np.random.default_rng(1).uniform(size=(2, 12, 12, 3)), jnp.float32)
  keys = jax.random.split(jax.random.PRNGKey(0), 2)
  view = jax.jit(jax.vmap(lambda k, im, bp, sp: vv.augment_view(k, im, cfg, 12, (1.0, 1.0), bp, sp),
                          in_axes=(0, 0, None, None)))
  np.testing.assert_allclose(view(keys, images, 0.0, 0.0), images, atol=1e-6)
  np.testing.assert_allclose(view(keys, images, 0.0, 1.0), vv.solarize(images), atol=1e-6)
  blurred = view(keys, images, 1.0, 0.0)
  assert np.abs(np.asarray(blurred - images)).mean() > 1e-2
  assert float(blurred.std()) < float(images.std())  # smoothing lowers the variance


def _reference_blur(image, sigma, radius):
  x = np.arange(-radius, radius + 1)
  k = np.exp(-0.5 * (x / sigma) ** 2)
  k /= k.sum()
  p = np.pad(image, ((radius, radius), (radius, radius), (0, 0)), mode="reflect")
  h, w, _ = image.shape
  rows = sum(k[i] * p[i:i + h] for i in range(len(k)))
  return sum(k[i] * rows[:, i:i + w] for i in range(len(k)))


def test_gaussian_blur_against_numpy_and_on_constants(x64):
  rng = np.random.default_rng(2)
  images = rng.uniform(size=(2, 9, 11, 3))
  sigma = np.array([0.7, 1.6])
  out = vv.gaussian_blur(jnp.asarray(images), jnp.asarray(sigma), radius=4)
  for b in range(2):
    np.testing.assert_allclose(out[b], _reference_blur(images[b], sigma[b], 4), atol=1e-12)
  const = jnp.full((2, 9, 11, 3), 0.37)
  np.testing.assert_allclose(vv.gaussian_blur(const, 1.5), const, atol=1e-12)
  np.testing.assert_allclose(vv.gaussian_blur(const, jnp.asarray(sigma), radius=5), const, atol=1e-12)
  with pytest.raises(ValueError, match="radius"):
    vv.gaussian_blur(const, jnp.asarray(sigma))
  with pytest.raises(ValueError, match="smaller than the image side"):
    vv.gaussian_blur(const, 4.0)


def test_blend_views_endpoints_formula_and_gradient(x64):
  rng = np.random.default_rng(3)
  v = jnp.asarray(rng.uniform(size=(2, 6, 5, 3)))
  blurred = vv.gaussian_blur(v, 1.0)
  np.testing.assert_array_equal(vv.blend_views(v, jnp.ones((2, 6, 5)), blurred), v)
  np.testing.assert_array_equal(vv.blend_views(v, jnp.zeros((2, 6, 5, 1)), blurred), blurred)
  mu = jnp.asarray(rng.uniform(size=(2, 6, 5)))
  np.testing.assert_allclose(vv.blend_views(v, mu, blurred), mu[..., None] * v + (1 - mu[..., None]) * blurred,
                             rtol=1e-12)
  grad = jax.grad(lambda m: jnp.sum(vv.blend_views(v, m, blurred)))(mu)
  np.testing.assert_allclose(grad, jnp.sum(v - blurred, axis=-1), rtol=1e-12)
  with pytest.raises(ValueError, match="mask shape"):
    vv.blend_views(v, jnp.ones((2, 5, 6)), blurred)


def test_random_resized_crop_boxes_follow_torchvision_rules():
  keys = jax.random.split(jax.random.PRNGKey(4), 256)
  top, left, h, w = (np.asarray(a) for a in jax.jit(jax.vmap(
      lambda k: vv.crop_box(k, 40, 48, (0.2, 0.8), (3 / 4, 4 / 3))))(keys))
  assert np.all((h >= 1) & (w >= 1) & (top >= 0) & (left >= 0) & (top + h <= 40) & (left + w <= 48))
  area = h * w / (40 * 48)
  assert area.min() > 0.2 * 0.85 and area.max() < 0.8 * 1.15  # within the scale range up to rounding
  assert np.all(w / h > 3 / 4 * 0.85) and np.all(w / h < 4 / 3 * 1.15)
  assert len(np.unique(top)) > 10 and len(np.unique(h)) > 10
  # No candidate fits (area > image): the centre crop, aspect clamped to the ratio range.
  box = [float(a) for a in vv.crop_box(jax.random.PRNGKey(0), 40, 80, (1.5, 2.0), (3 / 4, 4 / 3))]
  assert box == [0.0, 13.0, 40.0, 53.0]


def test_resized_crop_of_an_aligned_box_is_the_slice():
  image = jnp.asarray(np.random.default_rng(5).uniform(size=(20, 24, 3)), jnp.float32)
  np.testing.assert_allclose(vv.resized_crop(image, (3.0, 5.0, 10.0, 10.0), 10), image[3:13, 5:15], atol=1e-6)
  # A 2× downscale of an offset box = antialiased bilinear resize of that slice.
  small = vv.resized_crop(image, (2.0, 4.0, 16.0, 16.0), 8)
  np.testing.assert_allclose(small, jax.image.resize(image[2:18, 4:20], (8, 8, 3), "linear", antialias=True),
                             atol=1e-6)


def test_colour_operations(x64):
  rng = np.random.default_rng(6)
  pixels = rng.uniform(size=(64, 3))
  hsv = np.asarray(vv.rgb_to_hsv(jnp.asarray(pixels)))
  np.testing.assert_allclose(hsv, [colorsys.rgb_to_hsv(*p) for p in pixels], atol=1e-12)
  np.testing.assert_allclose(vv.hsv_to_rgb(jnp.asarray(hsv)), pixels, atol=1e-12)
  image = jnp.asarray(rng.uniform(size=(5, 4, 3)))
  np.testing.assert_allclose(vv.color_jitter(jax.random.PRNGKey(0), image, 0.0, 0.0, 0.0, 0.0), image, atol=1e-12)
  jittered = vv.color_jitter(jax.random.PRNGKey(0), image, 0.4, 0.4, 0.2, 0.1)
  assert float(jnp.abs(jittered - image).mean()) > 1e-3 and 0 <= float(jittered.min()) <= float(jittered.max()) <= 1
  np.testing.assert_allclose(vv.grayscale(image)[..., 0], image @ jnp.asarray([0.2989, 0.587, 0.114]), rtol=1e-12)
  np.testing.assert_array_equal(vv.solarize(image), np.where(image >= 0.5, 1 - image, image))
  gray = jnp.asarray(rng.uniform(size=(5, 4, 1)))  # one channel: brightness and contrast only
  assert vv.color_jitter(jax.random.PRNGKey(1), gray, 0.4, 0.4, 0.2, 0.1).shape == gray.shape
  np.testing.assert_allclose(vv.normalize(jnp.full((1, 2, 2, 3), 0.485))[..., 0], 0.0, atol=1e-12)
