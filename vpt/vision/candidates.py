"""Discrete candidate tasks for vision: M fixed views of every global crop, scored by one vmapped JVP.

Candidate kinds (a fixed, documented set; `kinds` picks an ordered subset, repeats allowed — each
entry draws its own randomness). Every kind maps a global crop v ∈ [0, 1]^{H×W×C} to a view:

  identity   v                                   (the fixed pipeline, μ ≡ 1)
  blur_all   Blur(v)                             (μ ≡ 0)
  center     μ = 1 on the centred square of side center_frac·H, blurred outside
  border     the complement: the centre blurred, the border kept
  blocks     μ = a random g×g block mask (each block kept with probability block_keep), drawn per
             crop from the step's rng (key fold_in(fold_in(rng, candidate), view), split per example)
  zoom       a stronger crop: the centred box of area zoom_scale·H·W resized back to H×W

The masked kinds use ṽ = μ ⊙ v + (1 − μ) ⊙ Blur(v) (`blend_views`), as the U-Net designer does.

Value. V_c = ⟨g_down, ∇_S L_pre(θ; c)⟩ is the directional derivative of L_pre(θ_S; c) along g_down,
so every candidate's value comes from ONE forward-mode `jax.jvp` of the learner loss, vmapped over
the candidates (`candidate_values`): no per-candidate backward pass. `reference_candidate_values`
is the explicit form (a backward per candidate and a dot product) for tests and the benchmark.

Designer (choice). The designer is a learned per-candidate logit table a ∈ R^M; the weights are
w = softmax(a / τ). The meta step maximises the expected value of the mixture task,
Σ_c w_c V_c (exact: L_pre of the mixture is linear in w) plus λ_ent·H(w), with the designer's
AdamW — the same "designer maximises V" structure as the U-Net, and Adam averages the noisy
per-batch V_c over meta steps (a softmax of one batch's raw V would follow its noise and depend on
V's scale). The learner then either samples one candidate per image from w (`learner="sample"`,
the cost of a baseline step) or minimises Σ_c w_c L_pre(θ; c) over all candidate views
(`learner="weighted"`, M× the student's global-view cost).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import jax
import jax.numpy as jnp

from vpt.vision.views import blend_views, gaussian_blur, resized_crop

KINDS = ("identity", "blur_all", "center", "border", "blocks", "zoom")
LEARNER_MODES = ("sample", "weighted")


@dataclasses.dataclass(frozen=True)
class CandidateConfig:
  kinds: tuple[str, ...] = KINDS
  temperature: float = 1.0  # τ in w = softmax(a / τ)
  blur_sigma: float = 1.0  # Gaussian σ of Blur(v), in pixels of the crop
  center_frac: float = 0.5  # centre / border: side of the centred square, as a fraction of the crop side
  block_grid: int = 4  # blocks: g×g blocks
  block_keep: float = 0.5  # blocks: probability that a block is kept
  zoom_scale: float = 0.5  # zoom: area fraction of the centred box
  learner: str = "sample"  # 'sample' | 'weighted'
  lambda_entropy: float = 0.0  # + λ·H(w) in the designer's objective (keeps w from collapsing)
  learning_rate: float = 1e-2  # the logit table's AdamW learning rate

  def __post_init__(self):
    bad = [k for k in self.kinds if k not in KINDS]
    if bad or not self.kinds:
      raise ValueError(f"candidates.kinds={self.kinds}: unknown kinds {bad}; expected a non-empty list of {KINDS}")
    if self.learner not in LEARNER_MODES:
      raise ValueError(f"candidates.learner={self.learner!r}; expected one of {LEARNER_MODES}")
    if self.temperature <= 0:
      raise ValueError(f"candidates.temperature={self.temperature}: expected > 0")

  @property
  def num(self) -> int:
    return len(self.kinds)

  @classmethod
  def from_config(cls, cand_cfg) -> "CandidateConfig":
    """From config.vpt.candidates: kinds, temperature, num (must equal len(kinds) or be 0), …"""
    fields = {f.name for f in dataclasses.fields(cls)}
    kw = {k: (tuple(v) if isinstance(v, list) else v) for k, v in cand_cfg.items() if k in fields}
    out = cls(**kw)
    num = int(cand_cfg.get("num", 0) or 0)
    if num and num != out.num:
      raise ValueError(f"config.vpt.candidates.num={num} but kinds={out.kinds} has {out.num} entries")
    return out


# ----------------------------------------------------------------------------- views


def _blur(views: jax.Array, sigma: float) -> jax.Array:
  """Blur [N, H, W, C] with a static radius ceil(3σ), clipped below the crop side."""
  radius = max(1, min(math.ceil(3 * sigma), min(views.shape[1:3]) - 1))
  return gaussian_blur(views, float(sigma), radius)


def _center_mask(h: int, w: int, frac: float, dtype) -> jax.Array:
  sh, sw = max(1, round(h * frac)), max(1, round(w * frac))
  top, left = (h - sh) // 2, (w - sw) // 2
  rows = (jnp.arange(h) >= top) & (jnp.arange(h) < top + sh)
  cols = (jnp.arange(w) >= left) & (jnp.arange(w) < left + sw)
  return (rows[:, None] & cols[None, :]).astype(dtype)


def _block_masks(key, n: int, h: int, w: int, grid: int, keep: float, dtype) -> jax.Array:
  """[n, h, w]: per crop, g×g blocks kept with probability `keep` (nearest-neighbour upsampled)."""
  keys = jax.random.split(key, n)
  blocks = jax.vmap(lambda k: jax.random.bernoulli(k, keep, (grid, grid)))(keys).astype(dtype)
  rows = jnp.minimum(jnp.arange(h) * grid // h, grid - 1)
  cols = jnp.minimum(jnp.arange(w) * grid // w, grid - 1)
  return blocks[:, rows][:, :, cols]


def _zoom(views: jax.Array, scale: float) -> jax.Array:
  h, w = views.shape[1:3]
  ch, cw = h * math.sqrt(scale), w * math.sqrt(scale)
  box = (jnp.float32((h - ch) / 2), jnp.float32((w - cw) / 2), jnp.float32(ch), jnp.float32(cw))
  return jax.vmap(lambda im: resized_crop(im, box, h))(views).astype(views.dtype)


def candidate_views(rng: jax.Array, global_views: jax.Array, cfg: CandidateConfig) -> jax.Array:
  """[M, G, B, H, W, C] candidate views of global crops [G, B, H, W, C] (square crops)."""
  g, b, h, w, c = global_views.shape
  if h != w:
    raise ValueError(f"candidate_views: expected square crops, got {h}x{w}")
  flat = global_views.reshape((g * b, h, w, c))
  blurred = _blur(flat, cfg.blur_sigma) if any(k in ("blur_all", "center", "border", "blocks")
                                                for k in cfg.kinds) else None
  out = []
  for m, kind in enumerate(cfg.kinds):
    if kind == "identity":
      view = flat
    elif kind == "blur_all":
      view = blurred
    elif kind in ("center", "border"):
      mask = _center_mask(h, w, cfg.center_frac, flat.dtype)
      mask = mask if kind == "center" else 1 - mask
      view = blend_views(flat, jnp.broadcast_to(mask, (g * b, h, w)), blurred)
    elif kind == "blocks":
      key = jax.random.fold_in(rng, m)
      masks = jnp.concatenate([_block_masks(jax.random.fold_in(key, v), b, h, w, cfg.block_grid, cfg.block_keep,
                                            flat.dtype) for v in range(g)])
      view = blend_views(flat, masks, blurred)
    else:  # zoom
      view = _zoom(flat, cfg.zoom_scale)
    out.append(view.reshape(global_views.shape))
  return jnp.stack(out)


# ----------------------------------------------------------------------------- values


def candidate_values(loss_fn: Callable, subset: dict, tangent: dict, cand_views: jax.Array):
  """(L_c, V_c) for every candidate c, each [M]: V_c = d/dε loss_fn(subset + ε·tangent, cand_views[c]).

  `jax.vmap` over the candidates of ONE `jax.jvp` (forward mode): V_c = ⟨tangent, ∇_S L(θ; c)⟩
  without any backward pass. loss_fn(subset, views) -> scalar.
  """
  one = lambda views: jax.jvp(lambda s: loss_fn(s, views), (subset,), (tangent,))
  return jax.vmap(one)(cand_views)


def reference_candidate_values(loss_fn: Callable, subset: dict, g_down: dict, cand_views: jax.Array) -> jax.Array:
  """Explicit V_c = ⟨g_down, ∇_S L(θ; c)⟩: one backward pass per candidate (`lax.map`, sequential, not
  batched), then a dot product. For tests and the benchmark."""

  def one(views):
    grad = jax.grad(loss_fn)(subset, views)
    return sum(jnp.vdot(g_down[k], grad[k]) for k in g_down)

  return jax.lax.map(one, cand_views)


def candidate_weights(logits: jax.Array, temperature: float) -> jax.Array:
  return jax.nn.softmax(logits / temperature)


def candidate_objective(logits: jax.Array, values: jax.Array, cfg: CandidateConfig):
  """(designer loss, aux): −Σ_c w_c V_c − λ_ent·H(w), w = softmax(a / τ); V held constant."""
  values = jax.lax.stop_gradient(values)
  w = candidate_weights(logits, cfg.temperature)
  expected = jnp.sum(w * values)
  entropy = -jnp.sum(w * jnp.log(jnp.maximum(w, 1e-30)))
  return -expected - cfg.lambda_entropy * entropy, {"value": expected, "entropy": entropy, "weights": w}


def sample_candidates(rng: jax.Array, cand_views: jax.Array, weights: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(views [G, B, H, W, C], choice [B]): candidate c_b ~ w for image b (both of its global crops)."""
  b = cand_views.shape[2]
  choice = jax.random.categorical(rng, jnp.log(jnp.maximum(weights, 1e-30)), shape=(b,))
  picked = cand_views[choice, :, jnp.arange(b)]  # [B, G, H, W, C]
  return jnp.moveaxis(picked, 0, 1), choice
