"""Token-level losses. Sums and counts are returned separately so that gradient accumulation
and data-parallel reduction normalise by the number of loss tokens in the *global* batch."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def next_token_nll_sum(logits: jax.Array, targets: jax.Array, loss_mask: jax.Array):
  """(sum over loss tokens of −log p(target), number of loss tokens). logits: [B, T, V] float32."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
  mask = loss_mask.astype(jnp.float32)
  return jnp.sum(nll * mask), jnp.sum(mask)
