"""Gradient alignment and the value V(φ) = ⟨g_down, ∇_S L_pre(θ; q_φ)⟩ for language.

The learner's soft-target loss is linear in q, so

    V = −(1/N) Σ_t m_t Σ_{v∈C_t} q_t(v) · s_t(v),   s_t(v) = d/dε log p_{θ+ε·g}(v | x_<t) at ε = 0,

and every s_t(v) comes from ONE forward-mode JVP of the logits along the tangent g = g_down
(restricted to the alignment subset S). ∇_φ V is then a cheap backward through q_φ alone; no
double backward through the learner. `reference_value` is the explicit double-backward form,
kept for tests and the benchmark.

The alignment subset S is the last n blocks, the final norm and (if untied) the LM head. With tied
embeddings the head *is* the input embedding, whose gradient flows through every layer, so S leaves
it out; n = 0 means all parameters. Because S starts at a block boundary, the prefix of the network
is run once as a constant and the JVP/VJPs only touch the last blocks.

With LoRA adapters in the parameters (the base is frozen), S is the adapters (lora_a, lora_b) of the
last n blocks instead (all adapters for n = 0): the tangent is zero on everything else.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import traverse_util

from vpt.models.lm import Transformer
from vpt.models.lora import is_lora_path
from vpt.tasks.lm_soft_targets import candidate_logprobs

Params = Any


# ----------------------------------------------------------------------------- the subset S


def split_params(params: Params, n_layers: int, align_last_n_layers: int) -> tuple[dict, dict]:
  """(S, rest) as flat {path: array} dicts; `merge_params` puts them back together."""
  flat = traverse_util.flatten_dict(params, sep="/")
  first = n_layers - align_last_n_layers
  in_last = lambda path: path.startswith("layers_") and int(path.split("/")[0].split("_")[1]) >= first
  if any(is_lora_path(k) for k in flat):  # LoRA: the adapters of the last blocks (all: n = 0).
    in_s = lambda path: is_lora_path(path) and (align_last_n_layers <= 0 or in_last(path))
    return ({k: v for k, v in flat.items() if in_s(k)}, {k: v for k, v in flat.items() if not in_s(k)})
  if align_last_n_layers <= 0:
    return flat, {}
  in_s = lambda path: in_last(path) or path.startswith("norm/") or path.startswith("lm_head/")
  return ({k: v for k, v in flat.items() if in_s(k)}, {k: v for k, v in flat.items() if not in_s(k)})


def merge_params(subset: dict, rest: dict) -> Params:
  return traverse_util.unflatten_dict({**rest, **subset}, sep="/")


def first_aligned_layer(n_layers: int, align_last_n_layers: int) -> int:
  return 0 if align_last_n_layers <= 0 else n_layers - align_last_n_layers


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
    subset, rest = split_params(params, model.cfg.n_layers, align_last_n_layers)
    layer = first_aligned_layer(model.cfg.n_layers, align_last_n_layers)
    prefix = None
    if rest:
      prefix = model.apply({"params": params}, batch["inputs"], batch["positions"], batch["segment_ids"], layer,
                           method=Transformer.hidden_before)
      prefix = jax.lax.stop_gradient(prefix)
    return cls(model, rest, batch, layer, prefix), subset

  def logits(self, subset: dict) -> jax.Array:
    params = {"params": merge_params(subset, self.rest)}
    b = self.batch
    if self.prefix is None:
      return self.model.apply(params, b["inputs"], b["positions"], b["segment_ids"])
    return self.model.apply(params, self.prefix, b["positions"], b["segment_ids"], self.layer,
                            method=Transformer.logits_from)


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


def tree_vdot(a: dict, b: dict) -> jax.Array:
  return sum(jnp.vdot(a[k], b[k]) for k in a)


def tree_norm(a: dict) -> jax.Array:
  return optax.tree.norm(a)


# ----------------------------------------------------------------------------- value geometry


def adam_preconditioner(opt_state: Any, align_last_n_layers: int, n_layers: int, eps: float, b2: float) -> dict:
  """P = 1/(sqrt(v̂)+ε) on S from the learner's Adam second moments (the identity before any update)."""
  adam = _find_adam_state(opt_state)
  nu_subset, _ = split_params(adam.nu, n_layers, align_last_n_layers)
  count = adam.count.astype(jax.tree.leaves(adam.nu)[0].dtype)
  correction = 1.0 - b2 ** jnp.maximum(count, 1.0)
  started = count > 0  # before any update v̂ = 0 and P would be 1/ε: use the identity instead.
  return {k: jnp.where(started, 1.0 / (jnp.sqrt(v / correction) + eps), 1.0) for k, v in nu_subset.items()}


def _find_adam_state(state):
  if isinstance(state, optax.ScaleByAdamState):
    return state
  if isinstance(state, dict):  # optax.multi_transform (LoRA's frozen base) keeps its inner states in a dict
    state = list(state.values())
  if isinstance(state, (tuple, list)):
    for s in state:
      found = _find_adam_state(s)
      if found is not None:
        return found
  return None


def random_like(rng: jax.Array, tree: dict, norm: jax.Array) -> dict:
  """A uniformly random direction with the given global norm (the random-feedback control)."""
  keys = jax.random.split(rng, len(tree))
  raw = {k: jax.random.normal(key, v.shape, v.dtype) for key, (k, v) in zip(keys, sorted(tree.items()))}
  scale = norm / jnp.maximum(tree_norm(raw), 1e-30)
  return {k: v * scale for k, v in raw.items()}


# ----------------------------------------------------------------------------- reference


def reference_value(aligned: Aligned, subset: dict, g_down: dict, cand_ids: jax.Array, q: jax.Array,
                    loss_mask: jax.Array) -> jax.Array:
  """Explicit ⟨g_down, ∇_S L_pre(θ; q)⟩; differentiable in q by double backward (tests, benchmark)."""
  mask = loss_mask.astype(q.dtype)
  n = jnp.maximum(jnp.sum(mask), 1.0)
  loss = lambda s: -jnp.sum(mask[..., None] * q * candidate_logprobs(aligned.logits(s), cand_ids)) / n
  return tree_vdot(g_down, jax.grad(loss)(subset))
