"""The DINOv2 terms beyond DINO's class-token loss: iBOT masked-patch loss, KoLeo, Sinkhorn-Knopp
centering, and DINOv2's block-wise patch masks (Oquab et al. 2023; DINOv3 trains the same terms).

iBOT. A share `mask_prob` of the student's global crops has a block-wise set of patches masked (the
student's embedding replaces them by a learned mask token; the teacher sees the crop unmasked). For
the masked patches p of image i (n_i of them), with teacher probabilities q_p over the patch
prototypes and student outputs s_p:

    L_iBOT = −(1/M) Σ_i (1/max(n_i, 1)) Σ_{p masked in i} Σ_k q_pk · log softmax(s_p / T_s)_k

M counts every global crop of the batch, masked or not (DINOv2's `forward_masked`): a per-image mean
over its masked patches, then a mean over images. q = softmax((t − c_iBOT)/T_t) with the iBOT centre
c_iBOT ← m·c_iBOT + (1 − m)·mean of the teacher's masked-patch outputs, or Sinkhorn-Knopp.

KoLeo (Sablayrolles et al. 2019). On ℓ2-normalised features x_1…x_B of one global crop index:

    L_KoLeo = −(1/B) Σ_i log(min_{j≠i} ‖x_i − x_j‖ + ε)

The nearest neighbour is an index (piecewise constant, no derivative); the distance to it is
differentiated. DINOv2 sums it over the global crop indices (never between two crops of one image).
(torch's PairwiseDistance adds its ε = 1e-8 to the difference vector before the norm; we take the
plain distance, a difference of order 1e-8·√D.)

Sinkhorn-Knopp (SwAV; DINOv2's `centering='sinkhorn_knopp'`). Q = exp(t/T_t)ᵀ [K prototypes × B
samples], Q ← Q/ΣQ, then n times: rows ← rows/(K·row sum), columns ← columns/(B·column sum); finally
Q·B, so every sample's column sums to 1 exactly and every prototype's row to ≈ B/K (exactly after
infinitely many iterations). Rows of `valid == False` (padding of the masked-patch buffer) take no
part and come back as zeros. The global max of t/T_t is subtracted before the exponential: it cancels
in the first normalisation and keeps exp finite.

Masks (DINOv2's collate + MaskingGenerator). Of the M global crops, n = ⌊M·mask_prob⌋ get a target
of ⌊N·u_i⌋ patches with u_i ~ U(p_i, p_{i+1}), p = linspace(r_min, r_max, n + 1) (stratified), the
rest none; the assignment to crops is a random permutation. Each target is filled by random
rectangles (area ~ U(4, left), log-aspect ~ U(log 0.3, log 1/0.3), h, w rounded, strictly inside the
grid) that add between 1 and `left` new patches; after 10 consecutive rejections the image keeps what
it has. All of it is `jax.random` from one key: the masks are a function of the step's rng. The count
of masked patches is at most Σ_i ⌊N·p_{i+1}⌋ (`mask_upperbound`, static), so the masked tokens are
gathered into a buffer of that static size with a `valid` flag (DINOv2's `upperbound`).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

CENTERINGS = ("centering", "sinkhorn_knopp")
SK_ITERATIONS = 3  # DINOv2


# ----------------------------------------------------------------------------- teacher targets


def sinkhorn_knopp(teacher_out: jax.Array, t_t, n_iterations: int = SK_ITERATIONS,
                   valid: jax.Array | None = None) -> jax.Array:
  """[N, K] teacher outputs → [N, K] assignments (each valid row sums to 1), over all N rows at once."""
  acc = jnp.promote_types(teacher_out.dtype, jnp.float32)
  logits = teacher_out.astype(acc) / t_t
  if valid is None:
    valid = jnp.ones(logits.shape[:1], bool)
  shift = jax.lax.stop_gradient(jnp.max(jnp.where(valid[:, None], logits, -jnp.inf)))
  shift = jnp.where(jnp.isfinite(shift), shift, 0.0)  # no valid row: everything below stays 0
  q = jnp.where(valid[:, None], jnp.exp(logits - shift), 0.0).T  # [K, N]; the shift cancels below
  k = q.shape[0]
  b = jnp.sum(valid).astype(acc)
  nonzero = lambda s: jnp.where(s > 0, s, 1.0)
  q = q / nonzero(jnp.sum(q))
  for _ in range(n_iterations):
    q = q / nonzero(jnp.sum(q, axis=1, keepdims=True)) / k
    q = q / nonzero(jnp.sum(q, axis=0, keepdims=True)) / nonzero(b)
  return (q * b).T


def centered_softmax(teacher_out: jax.Array, center: jax.Array, t_t) -> jax.Array:
  acc = jnp.promote_types(teacher_out.dtype, jnp.float32)
  return jax.nn.softmax((teacher_out.astype(acc) - center.astype(acc)) / t_t, axis=-1)


def teacher_probs(teacher_out: jax.Array, center: jax.Array, t_t, centering: str,
                  valid: jax.Array | None = None) -> jax.Array:
  """The teacher's targets over the last axis: centred softmax, or Sinkhorn-Knopp over all leading axes."""
  if centering == "centering":
    return centered_softmax(teacher_out, center, t_t)
  if centering != "sinkhorn_knopp":
    raise ValueError(f"config.dino.centering={centering!r}; expected one of {CENTERINGS}")
  flat = teacher_out.reshape(-1, teacher_out.shape[-1])
  return sinkhorn_knopp(flat, t_t, valid=valid).reshape(teacher_out.shape)


def dino_pairs_loss(q: jax.Array, student_out: jax.Array, t_s: float, n_global: int) -> jax.Array:
  """DINO's multi-crop cross-entropy from given teacher probabilities q [G, B, K] (`dino.dino_loss`'s pairs:
  teacher view g, student view v ≠ g, batch mean, mean over pairs)."""
  acc = jnp.promote_types(student_out.dtype, jnp.float32)
  log_p = jax.nn.log_softmax(student_out.astype(acc) / t_s, axis=-1)
  n_views, batch = student_out.shape[:2]
  cross = -jnp.einsum("gbk,vbk->gv", q.astype(acc), log_p) / batch
  pair = jnp.arange(n_global)[:, None] != jnp.arange(n_views)[None, :]
  return jnp.sum(jnp.where(pair, cross, 0.0)) / (n_global * n_views - min(n_global, n_views))


# ----------------------------------------------------------------------------- iBOT


def ibot_loss(student_patch_out: jax.Array, q: jax.Array, weights: jax.Array, n_images: int, t_s: float) -> jax.Array:
  """−Σ_u w_u Σ_k q_uk log softmax(s_u/T_s)_k / M over the gathered masked tokens u ([U, K]), with
  w_u = 1/n_i of the token's image (0 on padding) and M = n_images (every global crop)."""
  acc = jnp.promote_types(student_patch_out.dtype, jnp.float32)
  log_p = jax.nn.log_softmax(student_patch_out.astype(acc) / t_s, axis=-1)
  per_token = jnp.sum(q.astype(acc) * log_p, axis=-1)
  return -jnp.sum(jnp.where(weights > 0, per_token * weights.astype(acc), 0.0)) / n_images


def update_ibot_center(center: jax.Array, teacher_patch_out: jax.Array, valid: jax.Array,
                       momentum: float) -> jax.Array:
  """c ← m·c + (1 − m)·mean of the valid teacher patch outputs (unchanged when none is masked)."""
  n = jnp.sum(valid)
  mean = jnp.sum(jnp.where(valid[:, None], teacher_patch_out, 0.0), axis=0) / jnp.maximum(n, 1)
  new = center * momentum + mean.astype(center.dtype) * (1 - momentum)
  return jax.lax.stop_gradient(jnp.where(n > 0, new, center))


# ----------------------------------------------------------------------------- KoLeo


def koleo_loss(x: jax.Array, eps: float = 1e-8) -> jax.Array:
  """−mean_i log(‖x̂_i − x̂_nn(i)‖ + ε) of features [B, D], x̂ = x/max(‖x‖, ε), nn(i) = argmax_{j≠i} x̂_i·x̂_j."""
  acc = jnp.promote_types(x.dtype, jnp.float32)
  x = x.astype(acc)
  x = x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)
  dots = jax.lax.stop_gradient(x @ x.T)
  n = x.shape[0]
  dots = jnp.where(jnp.eye(n, dtype=bool), -jnp.inf, dots)  # DINOv2 fills −1: the same argmax for n ≥ 2
  nearest = jnp.argmax(dots, axis=1)
  sq = jnp.sum((x - x[nearest]) ** 2, axis=-1)
  # sqrt has no derivative at 0 (two identical features): give it 0 there, the value stays exact.
  safe = jnp.where(sq > 0, sq, 1.0)
  dist = jnp.where(sq > 0, jnp.sqrt(safe), 0.0)
  return -jnp.mean(jnp.log(dist + eps))


# ----------------------------------------------------------------------------- masks


def mask_ratio_bins(n_images: int, mask_ratio, mask_prob: float) -> np.ndarray:
  """p_0 … p_n: the stratified ratio bins of the n = ⌊M·mask_prob⌋ masked crops."""
  n_masked = int(n_images * mask_prob)
  return np.linspace(float(mask_ratio[0]), float(mask_ratio[1]), n_masked + 1)


def mask_upperbound(n_images: int, n_patches: int, mask_ratio, mask_prob: float) -> int:
  """The most patches the masks of M crops can hold (static): Σ_i ⌊N·p_{i+1}⌋."""
  return int(sum(int(n_patches * p) for p in mask_ratio_bins(n_images, mask_ratio, mask_prob)[1:]))


def block_mask(key: jax.Array, grid: tuple[int, int], target, min_num_patches: int = 4,
               max_num_patches: int | None = None, min_aspect: float = 0.3) -> jax.Array:
  """[gh, gw] bool: DINOv2's MaskingGenerator for `target` patches (a traced count), with jax.random."""
  gh, gw = grid
  max_num = gh * gw * 0.5 if max_num_patches is None else max_num_patches  # DINOv2: half the grid
  log_aspect = (math.log(min_aspect), math.log(1 / min_aspect))
  rows, cols = jnp.arange(gh)[:, None], jnp.arange(gw)[None, :]
  target = jnp.asarray(target, jnp.int32)

  def cond(carry):
    _, count, fails, _ = carry
    return (count < target) & (fails < 10)

  def body(carry):
    mask, count, fails, key = carry
    key, k_area, k_aspect, k_top, k_left = jax.random.split(key, 5)
    left = jnp.minimum(target - count, max_num).astype(jnp.float32)
    # random.uniform(a, b) is a + (b − a)·u, also for a > b (jax.random.uniform would clip to a).
    area = min_num_patches + (left - min_num_patches) * jax.random.uniform(k_area, (), jnp.float32)
    aspect = jnp.exp(jax.random.uniform(k_aspect, (), jnp.float32, *log_aspect))
    h = jnp.round(jnp.sqrt(area * aspect)).astype(jnp.int32)
    w = jnp.round(jnp.sqrt(area / aspect)).astype(jnp.int32)
    fits = (w < gw) & (h < gh)
    top = jax.random.randint(k_top, (), 0, jnp.maximum(gh - h, 0) + 1)
    lft = jax.random.randint(k_left, (), 0, jnp.maximum(gw - w, 0) + 1)
    rect = (rows >= top) & (rows < top + h) & (cols >= lft) & (cols < lft + w)
    delta = jnp.sum(rect & ~mask, dtype=jnp.int32)
    ok = fits & (delta > 0) & (delta <= left)
    return (jnp.where(ok, mask | rect, mask), count + jnp.where(ok, delta, 0), jnp.where(ok, 0, fails + 1), key)

  init = (jnp.zeros((gh, gw), bool), jnp.zeros((), jnp.int32), jnp.zeros((), jnp.int32), key)
  return jax.lax.while_loop(cond, body, init)[0]


def ibot_masks(key: jax.Array, n_images: int, grid: tuple[int, int], mask_ratio, mask_prob: float) -> jax.Array:
  """[M, gh·gw] bool masks of the M global crops (view-major order is the caller's), from `key` alone."""
  n_patches = grid[0] * grid[1]
  bins = mask_ratio_bins(n_images, mask_ratio, mask_prob)
  n_masked = len(bins) - 1
  k_ratio, k_perm, k_blocks = jax.random.split(key, 3)
  targets = jnp.zeros((n_images,), jnp.int32)
  if n_masked:
    lo, hi = jnp.asarray(bins[:-1], jnp.float32), jnp.asarray(bins[1:], jnp.float32)
    u = jax.random.uniform(k_ratio, (n_masked,), jnp.float32, lo, hi)
    caps = jnp.asarray([int(n_patches * p) for p in bins[1:]], jnp.int32)  # keeps Σ ≤ mask_upperbound
    targets = targets.at[:n_masked].set(jnp.minimum((n_patches * u).astype(jnp.int32), caps))
    targets = jax.random.permutation(k_perm, targets)
  keys = jax.random.split(k_blocks, n_images)
  masks = jax.vmap(lambda k, t: block_mask(k, grid, t))(keys, targets)
  return masks.reshape(n_images, n_patches)


def masked_positions(masks: jax.Array, upperbound: int, dtype=jnp.float32) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(flat token indices [U], valid [U], weights [U]) of the masked patches of masks [M, N], U = upperbound:
  valid marks real entries (the rest point at token 0), weights are 1/n_i of each entry's image (0 if padding)."""
  m, n = masks.shape
  flat = masks.reshape(-1)
  size = max(int(upperbound), 1)
  (idx,) = jnp.nonzero(flat, size=size, fill_value=0)
  valid = jnp.arange(size) < jnp.sum(flat)
  per_image = 1.0 / jnp.maximum(jnp.sum(masks, axis=-1), 1).astype(dtype)
  weights = jnp.where(valid, per_image[idx // n], 0.0)
  return idx, valid, weights
