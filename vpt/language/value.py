"""Gradient alignment and the value V(φ) = ⟨g_down, ∇_S L_pre(θ; q_φ)⟩ for language.

The learner's soft-target loss is linear in q, so

    V = −(1/N) Σ_t m_t Σ_{v∈C_t} q_t(v) · s_t(v),   s_t(v) = d/dε log p_{θ+ε·g}(v | x_<t) at ε = 0,

and every s_t(v) comes from ONE forward-mode JVP of the logits along the tangent g = g_down
(restricted to the alignment subset S). ∇_φ V is then a cheap backward through q_φ alone; no
double backward through the learner. `reference_value` is the explicit double-backward form,
kept for tests and the benchmark.

The alignment subset S (vpt.core.alignment) is the last n blocks, the final norm and (if untied) the
LM head. With tied embeddings the head *is* the input embedding, whose gradient flows through every
layer, so S leaves it out; n = 0 means all parameters. With LoRA adapters (the base frozen), S is the
adapters of the last n blocks. What is language-specific here is the view of S on a batch (`Aligned`:
the prefix up to block n_layers − n held constant, logits of S) and the value's closed form through
the candidates' log-probability tangents.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp

from vpt.core import alignment
from vpt.language.models.lm import Transformer
from vpt.language.soft_targets import candidate_logprobs

Params = Any


# ----------------------------------------------------------------------------- S on a batch


@dataclasses.dataclass(frozen=True)
class Aligned:
  """The learner restricted to S on one batch: `logits(S)` with everything else held constant."""

  model: Transformer
  rest: dict
  batch: dict
  layer: int  # first block in S (0 and empty `rest` = all parameters)
  prefix: Any  # residual stream entering block `layer` (a constant), or None for all parameters

  @classmethod
  def build(cls, model: Transformer, params: Params, batch: dict, align_last_n_layers: int):
    subset, rest = alignment.split_params(params, model.cfg.n_layers, align_last_n_layers)
    layer = alignment.first_aligned_layer(model.cfg.n_layers, align_last_n_layers)
    prefix = None
    if rest:
      prefix = model.apply({"params": params}, batch["inputs"], batch["positions"], batch["segment_ids"], layer,
                           method=Transformer.hidden_before)
      prefix = jax.lax.stop_gradient(prefix)
    return cls(model, rest, batch, layer, prefix), subset

  def logits(self, subset: dict) -> jax.Array:
    params = {"params": alignment.merge_params(subset, self.rest)}
    b = self.batch
    if self.prefix is None:
      return self.model.apply(params, b["inputs"], b["positions"], b["segment_ids"])
    return self.model.apply(params, self.prefix, b["positions"], b["segment_ids"], self.layer,
                            method=Transformer.from_hidden)


# ----------------------------------------------------------------------------- gradients on S


def subset_grad(aligned: Aligned, subset: dict, loss_of_logits: Callable[[jax.Array], jax.Array]) -> dict:
  """∇_S loss(logits(S)) — a backward pass through the last blocks only."""
  return jax.grad(lambda s: loss_of_logits(aligned.logits(s)))(subset)


def logits_jvp(aligned: Aligned, subset: dict, tangent: dict) -> tuple[jax.Array, jax.Array]:
  """(logits, d logits) along `tangent` — one forward-mode pass through the last blocks."""
  return jax.jvp(aligned.logits, (subset,), (tangent,))


def logprob_tangents(logits: jax.Array, dlogits: jax.Array, cand_ids: jax.Array) -> jax.Array:
  """s_t(v) for v in C_t: d log p(v) = d logit(v) − Σ_u p(u) d logit(u)."""
  p = jax.nn.softmax(logits, axis=-1)
  mean = jnp.sum(p * dlogits, axis=-1, keepdims=True)
  return jnp.take_along_axis(dlogits, cand_ids, axis=-1) - mean


def value_from_tangents(q: jax.Array, s: jax.Array, loss_mask: jax.Array) -> jax.Array:
  """V = −(1/N) Σ_t m_t Σ_k q_tk s_tk (the directional derivative of −L_pre along g)."""
  mask = loss_mask.astype(s.dtype)
  return -jnp.sum(mask[..., None] * q * s) / jnp.maximum(jnp.sum(mask), 1.0)


def soft_loss_of_logits(cand_ids: jax.Array, q: jax.Array, loss_mask: jax.Array) -> Callable:
  """logits ↦ L_pre(q) = −(1/N) Σ m Σ q log p (mean over loss tokens), q held constant."""
  q = jax.lax.stop_gradient(q)
  mask = loss_mask.astype(q.dtype)

  def loss(logits):
    return -jnp.sum(mask[..., None] * q * candidate_logprobs(logits, cand_ids)) / jnp.maximum(jnp.sum(mask), 1.0)

  return loss


# ----------------------------------------------------------------------------- reference


def reference_value(aligned: Aligned, subset: dict, g_down: dict, cand_ids: jax.Array, q: jax.Array,
                    loss_mask: jax.Array) -> jax.Array:
  """Explicit ⟨g_down, ∇_S L_pre(θ; q)⟩; differentiable in q by double backward (tests, benchmark)."""
  mask = loss_mask.astype(q.dtype)
  n = jnp.maximum(jnp.sum(mask), 1.0)
  loss = lambda s: -jnp.sum(mask[..., None] * q * candidate_logprobs(aligned.logits(s), cand_ids)) / n
  return alignment.reference_value(loss, subset, g_down)
