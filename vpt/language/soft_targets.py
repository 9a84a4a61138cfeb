"""Top-K soft next-token targets (the language task construction c_φ).

For every position t: candidates C_t = {y_t} ∪ top_{K−1}(sg p_θ(·|x_<t) without y_t), with the true
token always at index 0, and a target q_t = (1−α_t)·onehot(y_t) + α_t·r_t over C_t. The learner's loss
−Σ_t m_t Σ_{v∈C_t} q_t(v) log p_θ(v|x_<t) is linear in q — which is what lets the value be computed
with one JVP (see vpt/language/value.py).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def candidates(logits: jax.Array, targets: jax.Array, k: int) -> jax.Array:
  """[B, T, K] int32 candidate ids: the true token first, then the learner's top-(K−1) others."""
  logits = jax.lax.stop_gradient(logits)
  vocab = logits.shape[-1]
  k = min(k, vocab)
  is_target = jnp.arange(vocab) == targets[..., None]
  masked = jnp.where(is_target, -jnp.inf, logits)  # the true token never appears twice.
  _, top = jax.lax.top_k(masked, k - 1)
  return jnp.concatenate([targets[..., None], top], axis=-1).astype(jnp.int32)


def candidate_logprobs(logits: jax.Array, cand_ids: jax.Array) -> jax.Array:
  logp = jax.nn.log_softmax(logits, axis=-1)
  return jnp.take_along_axis(logp, cand_ids, axis=-1)


def soft_targets(alpha: jax.Array, r: jax.Array) -> jax.Array:
  """q = (1−α)·onehot(index 0) + α·r; α: [B, T], r: [B, T, K] (rows sum to 1)."""
  onehot = (jnp.arange(r.shape[-1]) == 0).astype(r.dtype)
  return (1.0 - alpha[..., None]) * onehot + alpha[..., None] * r


def soft_ce_sum(cand_logp: jax.Array, q: jax.Array, loss_mask: jax.Array):
  """(−Σ_t m_t Σ_k q_tk log p_tk, Σ_t m_t)."""
  mask = loss_mask.astype(cand_logp.dtype)
  return -jnp.sum(mask[..., None] * q * cand_logp), jnp.sum(mask)


def target_stat_sums(alpha: jax.Array, r: jax.Array, q: jax.Array, loss_mask: jax.Array):
  """Sums over loss positions (α, entropy of r, q's mass on the true token) and the max α.

  Sums, not means, so microbatches combine exactly; divide by the loss-token count.
  """
  mask = loss_mask.astype(jnp.float32)
  total = lambda x: jnp.sum(x.astype(jnp.float32) * mask)
  entropy = -jnp.sum(jnp.where(r > 0, r * jnp.log(jnp.where(r > 0, r, 1.0)), 0.0), axis=-1)
  sums = {"alpha_mean": total(alpha), "r_entropy": total(entropy), "q_true_mass": total(q[..., 0])}
  maxes = {"alpha_max": jnp.max(jnp.where(mask > 0, alpha, 0.0)).astype(jnp.float32)}
  return sums, maxes


def target_stats(alpha: jax.Array, r: jax.Array, q: jax.Array, loss_mask: jax.Array) -> dict[str, jax.Array]:
  """Means over loss positions of `target_stat_sums`, plus the max α."""
  sums, maxes = target_stat_sums(alpha, r, q, loss_mask)
  n = jnp.maximum(jnp.sum(loss_mask.astype(jnp.float32)), 1.0)
  return {**{k: v / n for k, v in sums.items()}, **maxes}
