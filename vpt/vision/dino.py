"""DINO continued self-supervised learning: projection head, multi-crop loss, centering, EMA teacher.

The student sees every view (global and local crops); the teacher, an exponential moving average
of the student, sees only the global crops. The loss is the cross-entropy between the centred,
sharpened teacher distribution of one global view and the student distribution of every *other*
view (Caron et al. 2021, the paper's SSL objective for vision). The teacher never receives a
gradient: its outputs are stop-gradient inside `dino_loss` and its parameters only move through
`ema_update`.

Views are laid out view-major: student outputs `[V, B, K]` with the `n_global` global views first,
teacher outputs `[n_global, B, K]`.
"""

from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from vpt.vision.models.vit import ViT, ViTConfig, forward_flops


@dataclasses.dataclass(frozen=True)
class DINOHeadConfig:
  out_dim: int = 8192  # prototypes (the paper's projection output)
  hidden_dim: int = 2048
  bottleneck_dim: int = 256
  n_layers: int = 3
  norm_last_layer: bool = True  # the weight-norm gain is fixed to 1 (DINO's default for ViTs)
  init_std: float = 0.02


class DINOHead(nn.Module):
  """MLP (GELU) → bottleneck → ℓ2-normalise → weight-normalised linear layer to the prototypes."""

  cfg: DINOHeadConfig
  dtype: str = "float32"

  @nn.compact
  def __call__(self, x):
    cfg = self.cfg
    dense = lambda f, name: nn.Dense(f, dtype=jnp.dtype(self.dtype), param_dtype=jnp.float32,
                                     kernel_init=nn.initializers.truncated_normal(cfg.init_std), name=name)
    for i in range(cfg.n_layers - 1):
      x = nn.gelu(dense(cfg.hidden_dim, f"mlp_{i}")(x), approximate=False)
    x = dense(cfg.bottleneck_dim, f"mlp_{cfg.n_layers - 1}")(x)
    acc = jnp.promote_types(x.dtype, jnp.float32)
    x = x.astype(acc)
    x = x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
    # Weight norm, W = g · v / ‖v‖ per prototype (a column of the [bottleneck, out] kernel).
    v = self.param("last_layer_v", nn.initializers.truncated_normal(cfg.init_std), (cfg.bottleneck_dim, cfg.out_dim),
                   jnp.float32).astype(acc)
    w = v / jnp.linalg.norm(v, axis=0, keepdims=True)
    if not cfg.norm_last_layer:
      w = w * self.param("last_layer_g", nn.initializers.ones, (cfg.out_dim,), jnp.float32).astype(acc)
    return x @ w


class DINOModel(nn.Module):
  """Backbone (ViT, cls feature) + projection head; params {"backbone": …, "head": …}, plus
  "ibot_head" with a separate iBOT patch head (DINOv2's `ibot.separate_head`; `init_all` creates it).

  `hidden_before`/`from_hidden` split at a backbone block like the ViT's, with the head on top, so
  the value can differentiate the last K blocks while the prefix runs once.
  """

  vit_cfg: ViTConfig
  head_cfg: DINOHeadConfig
  ibot_head_cfg: DINOHeadConfig | None = None

  def setup(self):
    self.backbone = ViT(self.vit_cfg)
    self.head = DINOHead(self.head_cfg, self.vit_cfg.dtype)
    if self.ibot_head_cfg is not None:
      self.ibot_head = DINOHead(self.ibot_head_cfg, self.vit_cfg.dtype)

  def __call__(self, images):
    return self.head(self.backbone(images)["cls"])

  def init_all(self, images):
    """Runs every submodule once (for `init`): the cls head and, if separate, the iBOT head on the patches."""
    features = self.backbone(images)
    out = self.head(features["cls"])
    if self.ibot_head_cfg is not None:
      self.ibot_head(features["patches"])
    return out

  def hidden_before(self, images, layer: int):
    return self.backbone.hidden_before(images, layer)

  def from_hidden(self, h, layer: int, grid=None):
    return self.head(self.backbone.from_hidden(h, layer, grid=grid)["cls"])


def multicrop_apply(apply_fn, params, global_views: jax.Array, local_views: jax.Array | None = None) -> jax.Array:
  """[V, B, K] outputs for global views [G, B, H, W, C] then local views [L, B, h, w, C].

  Each resolution is one batched forward (the ViT interpolates its position embeddings for the
  local size), as in DINO.
  """
  def run(views):
    v, b = views.shape[:2]
    out = apply_fn(params, views.reshape((v * b,) + views.shape[2:]))
    return out.reshape(v, b, -1)

  outs = [run(global_views)]
  if local_views is not None and local_views.shape[0]:
    outs.append(run(local_views))
  return jnp.concatenate(outs, axis=0)


def dino_loss(student_out: jax.Array, teacher_out: jax.Array, center: jax.Array, t_s: float, t_t: float,
              n_global: int) -> jax.Array:
  """Mean over pairs (teacher view g, student view v ≠ g) of −Σ_k softmax((t_g − c)/T_t)_k ·
  log softmax(s_v/T_s)_k, averaged over the batch.

  student_out: [V, B, K] with the n_global global views first; teacher_out: [n_global, B, K].
  """
  if teacher_out.shape[0] != n_global or student_out.shape[0] < n_global:
    raise ValueError(f"dino_loss: teacher_out has {teacher_out.shape[0]} views and student_out "
                     f"{student_out.shape[0]}; expected n_global={n_global} teacher views and at least as many "
                     f"student views")
  acc = jnp.promote_types(student_out.dtype, jnp.float32)
  teacher = jax.lax.stop_gradient(teacher_out.astype(acc) - center.astype(acc))
  q = jax.nn.softmax(teacher / t_t, axis=-1)  # [G, B, K]
  log_p = jax.nn.log_softmax(student_out.astype(acc) / t_s, axis=-1)  # [V, B, K]
  n_views, batch = student_out.shape[:2]
  cross = -jnp.einsum("gbk,vbk->gv", q, log_p) / batch  # batch-mean cross-entropy per (g, v) pair
  pair = jnp.arange(n_global)[:, None] != jnp.arange(n_views)[None, :]
  n_pairs = n_global * n_views - min(n_global, n_views)
  return jnp.sum(jnp.where(pair, cross, 0.0)) / n_pairs


def update_center(center: jax.Array, teacher_out: jax.Array, momentum: float = 0.9) -> jax.Array:
  """c ← m·c + (1 − m)·mean of the teacher outputs over views and batch (the global batch under jit)."""
  batch_center = jnp.mean(teacher_out.reshape(-1, teacher_out.shape[-1]), axis=0)
  return jax.lax.stop_gradient(center * momentum + batch_center.astype(center.dtype) * (1 - momentum))


def ema_update(teacher, student, momentum):
  """θ̄ ← m·θ̄ + (1 − m)·θ, leaf by leaf (trees of the same structure)."""
  return jax.tree.map(lambda t, s: (t * momentum + s * (1 - momentum)).astype(t.dtype), teacher, student)


def momentum_schedule(step, total: int, base: float = 0.996, final: float = 1.0):
  """Cosine teacher momentum: `base` at step 0, `final` at step `total` (DINO's per-iteration schedule)."""
  frac = jnp.clip(jnp.asarray(step, jnp.float32) / max(total, 1), 0.0, 1.0)
  return final + 0.5 * (base - final) * (1.0 + jnp.cos(math.pi * frac))


def teacher_temperature(step, warmup_steps: int = 0, warmup_temp: float = 0.04, temp: float = 0.04):
  """Linear teacher-temperature warmup from `warmup_temp` to `temp`, then constant."""
  if warmup_steps <= 0:
    return jnp.asarray(temp, jnp.float32)
  frac = jnp.clip(jnp.asarray(step, jnp.float32) / warmup_steps, 0.0, 1.0)
  return warmup_temp + (temp - warmup_temp) * frac


def dino_objective(apply_fn, student_params, teacher_params, center, global_views, local_views, *,
                   t_s: float = 0.1, t_t: float = 0.04):
  """(loss, teacher_out): the student sees all views, the teacher only the global ones.

  Differentiate with respect to `student_params` only; the teacher branch is stop-gradient, so its
  gradient is exactly zero even if the teacher parameters are differentiated too.
  """
  student = multicrop_apply(apply_fn, student_params, global_views, local_views)
  teacher = jax.lax.stop_gradient(multicrop_apply(apply_fn, teacher_params, global_views))
  return dino_loss(student, teacher, center, t_s, t_t, global_views.shape[0]), teacher


def flops_per_image(*, crops: list[tuple[int, int]], n_teacher_crops: int, **vit) -> float:
  """Model FLOPs of one DINO training image: the student trains on every crop (forward + backward =
  3 forwards) and the EMA teacher runs forward on the first `n_teacher_crops` (the global crops).
  `crops`: [(n_tokens, n_patches)] of each crop, global crops first; `vit`: vit.forward_flops's sizes.
  The designer's views, the iBOT patch head, the EMA update and the meta step are not counted: MFU
  counts the learner's model FLOPs, as the language side's does."""
  forward = [forward_flops(n_tokens=t, n_patches=p, **vit) for t, p in crops]
  return 3.0 * sum(forward) + sum(forward[:n_teacher_crops])
