"""Token-level losses: the learner's next-token NLL and the downstream (feedback) loss.

`next_token_nll_sum` returns sums and counts separately, so that gradient accumulation and
data-parallel reduction normalise by the number of loss tokens in the *global* batch.
`downstream_nll` is the paper's L_down: a mean over examples of their mean answer-token NLL."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def next_token_nll_sum(logits: jax.Array, targets: jax.Array, loss_mask: jax.Array):
  """(sum over loss tokens of −log p(target), number of loss tokens). logits: [B, T, V] float32."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
  mask = loss_mask.astype(jnp.float32)
  return jnp.sum(nll * mask), jnp.sum(mask)


def downstream_nll(logits: jax.Array, targets: jax.Array, loss_mask: jax.Array) -> jax.Array:
  """Mean over examples of the mean answer-token NLL (the paper's downstream loss).

  (1/|B|) Σ_i (1/|A_i|) Σ_{t∈A_i} −log p(targets[i, t]), with A_i the tokens where
  loss_mask[i] > 0 (weighted by loss_mask) and B the rows with a non-empty A_i;
  0 if no row has one. Unlike the token-mean LM loss, every example weighs the
  same whatever its length. logits [B, T, V] (computed in at least float32,
  float64 stays float64), targets [B, T] int, loss_mask [B, T].
  """
  dtype = jnp.promote_types(logits.dtype, jnp.float32)
  logp = jax.nn.log_softmax(logits.astype(dtype), axis=-1)
  nll = -jnp.take_along_axis(logp, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
  mask = loss_mask.astype(dtype)
  # where, not a product: a masked-out -inf log-probability must not turn into NaN.
  per_token = jnp.where(mask > 0, nll * mask, 0)
  count = jnp.sum(mask, axis=-1)
  has_answer = count > 0
  per_example = jnp.sum(per_token, axis=-1) / jnp.where(has_answer, count, 1)
  n = jnp.sum(has_answer)
  return jnp.sum(jnp.where(has_answer, per_example, 0)) / jnp.maximum(n, 1).astype(dtype)
