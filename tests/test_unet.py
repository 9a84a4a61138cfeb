"""The U-Net mask designer: μ starts uniform near 1 (views ≈ the fixed pipeline) for any crop size, and
the regularisers equal their hand-computed values. (That every layer reaches μ once the zero output
kernel moves is checked with the designer gradient in test_vision_step.py.)"""

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from vpt.vision.models import unet as unet_lib
from vpt.vision.views import blend_views, gaussian_blur


# Unoptimised LLVM code generation: the programs are tiny, and XLA:CPU's optimising backend would take
# most of the test time compiling random initialisers.
fast_jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0,
                                                        "xla_cpu_use_fusion_emitters": False})


def _init(net, images):
  return fast_jit(lambda r, x: net.init(r, x)["params"])(jax.random.PRNGKey(0), images)


def test_mask_starts_uniform_near_one_for_any_crop_size():
  cfg = unet_lib.UNetConfig(base_channels=4, depth=3, init_keep=0.97)
  net = unet_lib.MaskUNet(cfg)
  images = jnp.asarray(np.random.default_rng(0).uniform(size=(2, 20, 20, 3)), jnp.float32)  # 20 → 10 → 5 → 3
  params = _init(net, images)

  @fast_jit
  def run(params, images):
    mu = unet_lib.predict_mask(net, params, images)
    blurred = gaussian_blur(images, 1.0, 3)
    return mu, blurred, blend_views(images, mu, blurred)

  mu, blurred, view = run(params, images)
  assert mu.shape == (2, 20, 20)
  np.testing.assert_allclose(mu, 0.97, rtol=1e-6)
  # ṽ = μv + (1−μ)Blur(v) is within (1 − κ_init)·|v − Blur v| of the fixed pipeline's view.
  np.testing.assert_allclose(view, images, atol=0.03 * float(np.abs(images - blurred).max()) + 1e-6)
  # Channel widths double per level: base·2^level.
  assert params["down_3"]["Conv_0"]["kernel"].shape == (3, 3, 16, 32)
  assert params["dec_0"]["Conv_0"]["kernel"].shape == (3, 3, 8, 4)  # concat(up 4, skip 4) → 4


def test_regularisers_equal_hand_computed_values(x64):
  rng = np.random.default_rng(4)
  mu = rng.uniform(size=(3, 5, 7))
  kappa = 0.6
  spars = np.mean([(m.mean() - kappa) ** 2 for m in mu])
  tv = np.mean([np.abs(np.diff(m, axis=0)).mean() + np.abs(np.diff(m, axis=1)).mean() for m in mu])
  regs = fast_jit(lambda m, k: (unet_lib.keep_ratio_penalty(m, k), unet_lib.total_variation(m)))
  got = regs(jnp.asarray(mu), kappa)
  np.testing.assert_allclose(got, (spars, tv), rtol=1e-12)
  # A crop keeping exactly κ of a constant mask costs nothing; a constant mask has no variation.
  np.testing.assert_allclose(regs(jnp.full((3, 5, 7), kappa), kappa), (0.0, 0.0), atol=1e-30)
  # A vertical edge of height 1 across a 5x7 crop: TV = 5 unit jumps over 5·6 horizontal pairs;
  # half the pixels kept against κ = 0.6.
  edge = jnp.zeros((3, 5, 7)).at[:, :, 4:].set(1.0)
  np.testing.assert_allclose(regs(edge, kappa), ((3 / 7 - kappa) ** 2, 5 / 30), rtol=1e-12)


def test_config_from_the_designer_section_and_bad_values():
  d = ml_collections.ConfigDict(dict(base_channels=8, depth=2, learning_rate=1e-4, keep_ratio=0.5))
  cfg = unet_lib.UNetConfig.from_config(d)
  assert (cfg.base_channels, cfg.depth, cfg.init_keep) == (8, 2, 0.95)
  with pytest.raises(ValueError, match="init_keep"):
    unet_lib.UNetConfig(init_keep=1.0)
  with pytest.raises(ValueError, match="act"):
    unet_lib.UNetConfig(act="tanh")
  with pytest.raises(ValueError, match=r"images \[B, H, W, C\]"):
    unet_lib.MaskUNet(cfg).init(jax.random.PRNGKey(0), jnp.zeros((8, 8, 3)))
