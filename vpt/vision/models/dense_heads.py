"""Linear-BN dense heads on frozen patch features (DINOv2-style linear probes) and their losses.

A head maps patch tokens [B, N, D] on a (gh, gw) grid to per-pixel outputs:
BatchNorm over D (statistics over batch and patches, like BatchNorm2d on the
feature map), a 1x1 linear layer, then bilinear upsampling (half-pixel centres,
as torch's align_corners=False) to the label size. The depth head predicts depth
directly (not via bins): softplus of the linear output, so it is positive, with
the bias initialised so the first prediction is `init_depth`.

BatchNorm: `train=True` normalises with the batch statistics and updates the
running ones (collection 'batch_stats'); `train=False` uses the running ones, so
the head is a fixed affine map of the features. The feedback gradient g_down
(through the features into the backbone) uses train=False.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

IGNORE_INDEX = 255


class LinearBNHead(nn.Module):
  """tokens [B, N, D] -> [B, H, W, num_outputs] (depth: [B, H, W])."""

  num_outputs: int
  depth: bool = False  # softplus output, squeezed to [B, H, W]
  init_depth: float = 1.0  # depth head: initial prediction (metres)
  momentum: float = 0.9
  epsilon: float = 1e-5

  @nn.compact
  def __call__(self, tokens, grid, out_size, train: bool = False):
    b, n, d = tokens.shape
    gh, gw = (int(g) for g in grid)
    if gh * gw != n:
      raise ValueError(f"patch grid {gh}x{gw} = {gh * gw} patches, but the tokens have N = {n}")
    h, w = (int(s) for s in out_size)
    x = nn.BatchNorm(use_running_average=not train, momentum=self.momentum, epsilon=self.epsilon,
                     name="bn")(tokens.astype(jnp.float32))
    bias_init = nn.initializers.zeros
    if self.depth:
      bias_init = nn.initializers.constant(float(np.log(np.expm1(self.init_depth))))
    x = nn.Dense(self.num_outputs, bias_init=bias_init, name="linear")(x)
    if self.depth:
      x = jax.nn.softplus(x)
    x = x.reshape(b, gh, gw, self.num_outputs)
    if (h, w) != (gh, gw):
      x = jax.image.resize(x, (b, h, w, self.num_outputs), "bilinear")
    return x[..., 0] if self.depth else x


def seg_head(num_classes: int) -> LinearBNHead:
  """Segmentation head: per-pixel logits [B, H, W, num_classes]."""
  return LinearBNHead(num_outputs=num_classes)


def depth_head(init_depth: float = 1.0) -> LinearBNHead:
  """Depth head: per-pixel depth [B, H, W] in metres (> 0)."""
  if init_depth <= 0:
    raise ValueError(f"init_depth={init_depth}: expected > 0")
  return LinearBNHead(num_outputs=1, depth=True, init_depth=init_depth)


def init_head(head: LinearBNHead, rng, tokens, grid, out_size) -> dict:
  """The head's variables {'params', 'batch_stats'} for tokens like `tokens` (one jitted init:
  eager initialisation compiles every small op separately)."""
  grid, out_size = tuple(int(g) for g in grid), tuple(int(s) for s in out_size)
  return dict(jax.jit(lambda r, t: head.init(r, t, grid, out_size, train=False))(rng, tokens))


def apply_head(head: LinearBNHead, variables: dict, tokens, grid, out_size, train: bool = False):
  """(output, variables): train=True uses batch statistics and returns updated running ones."""
  if not train:
    return head.apply(variables, tokens, grid, out_size, train=False), variables
  out, updates = head.apply(variables, tokens, grid, out_size, train=True, mutable=["batch_stats"])
  return out, {**variables, **updates}


def _at_least_f32(x):
  """bf16 activations are upcast; float64 (tests under x64) stays float64."""
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def seg_loss(logits: jax.Array, labels: jax.Array, ignore_index: int = IGNORE_INDEX) -> jax.Array:
  """Mean pixel cross-entropy over pixels whose label is not `ignore_index` (0 if there are none).

  logits [..., C], labels [...] int in [0, C) or ignore_index.
  """
  logp = jax.nn.log_softmax(_at_least_f32(logits), axis=-1)
  valid = labels != ignore_index
  safe = jnp.where(valid, labels, 0).astype(jnp.int32)
  nll = -jnp.take_along_axis(logp, safe[..., None], axis=-1)[..., 0]
  count = jnp.sum(valid)
  return jnp.sum(jnp.where(valid, nll, 0.0)) / jnp.maximum(count, 1)


def depth_l1(pred: jax.Array, depth: jax.Array) -> jax.Array:
  """Mean |pred - depth| over valid pixels (depth > 0); 0 if there are none."""
  valid = depth > 0
  err = jnp.where(valid, jnp.abs(_at_least_f32(pred) - depth), 0.0)
  return jnp.sum(err) / jnp.maximum(jnp.sum(valid), 1)


def depth_l2(pred: jax.Array, depth: jax.Array) -> jax.Array:
  """Mean (pred - depth)^2 over valid pixels (depth > 0): the paper's evaluation-probe loss."""
  valid = depth > 0
  err = jnp.where(valid, jnp.square(_at_least_f32(pred) - depth), 0.0)
  return jnp.sum(err) / jnp.maximum(jnp.sum(valid), 1)
