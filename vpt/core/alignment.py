"""The alignment subset S and the value V(φ) = ⟨g_down, ∇_S L_pre(θ; task_φ)⟩, for any modality.

S. A learner whose blocks are named `layers_<i>` (i = 0 … n_layers−1) has S = the last n blocks and
the top-level modules after them (`tail`: the final norm, and an untied LM head); n = 0 means every
parameter. With LoRA adapters in the parameters (the base frozen), S is the adapters of the last n
blocks instead (every adapter for n = 0). Because S starts at a block boundary, the prefix of the
network runs once as a constant and every gradient or JVP on S touches the last blocks only.

The value. For a loss S ↦ L(S) (the modality's SSL loss on the designer's task, prefix held
constant), V = d/dε L(θ_S + ε·g_down) at ε = 0 = ⟨g_down, ∇_S L⟩: ONE forward-mode JVP
(`value_jvp`). jax.grad of it with respect to the task's parameters φ is reverse-over-forward and
equals ∇_φ ⟨g_down, ∇_S L⟩ exactly — no double backward. `reference_value` is the explicit nested-
grad form the tests and benchmarks hold the JVP against.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import traverse_util

from vpt.core import ALIGNS
from vpt.core.lora import is_lora_path

Params = Any
TAIL = ("norm/", "lm_head/")  # the modules after the last block that belong to S


# ----------------------------------------------------------------------------- the subset S


def first_aligned_layer(n_layers: int, align_last_n_layers: int) -> int:
  return 0 if align_last_n_layers <= 0 else n_layers - align_last_n_layers


def split_params(params: Params, n_layers: int, align_last_n_layers: int, tail=TAIL) -> tuple[dict, dict]:
  """(S, rest) as flat {'a/b/c': array} dicts; `merge_params` puts them back together."""
  flat = traverse_util.flatten_dict(params, sep="/")
  first = first_aligned_layer(n_layers, align_last_n_layers)
  in_last = lambda path: path.startswith("layers_") and int(path.split("/")[0].split("_")[1]) >= first
  if any(is_lora_path(k) for k in flat):  # LoRA: the adapters of the last blocks (all: n = 0).
    in_s = lambda path: is_lora_path(path) and (align_last_n_layers <= 0 or in_last(path))
    return ({k: v for k, v in flat.items() if in_s(k)}, {k: v for k, v in flat.items() if not in_s(k)})
  if align_last_n_layers <= 0:
    return flat, {}
  in_s = lambda path: in_last(path) or path.startswith(tuple(tail))
  return ({k: v for k, v in flat.items() if in_s(k)}, {k: v for k, v in flat.items() if not in_s(k)})


def merge_params(subset: dict, rest: dict) -> Params:
  return traverse_util.unflatten_dict({**rest, **subset}, sep="/")


def subset_zeros(params: Params, n_layers: int, align_last_n_layers: int, tail=TAIL) -> dict:
  """0 on S: the g_down of a step without a meta step."""
  return jax.tree.map(jnp.zeros_like, split_params(params, n_layers, align_last_n_layers, tail)[0])


# ----------------------------------------------------------------------------- tree algebra on S


def tree_vdot(a: dict, b: dict) -> jax.Array:
  return sum(jnp.vdot(a[k], b[k]) for k in a)


def tree_norm(a: dict) -> jax.Array:
  return optax.tree.norm(a)


def cosine(a: dict, b: dict) -> jax.Array:
  """⟨a, b⟩ / (‖a‖‖b‖), 0 when either is 0."""
  return tree_vdot(a, b) / jnp.maximum(tree_norm(a) * tree_norm(b), 1e-30)


def align_from_value(value: jax.Array, align: str, g_down_norm: jax.Array, g_pre_norm) -> jax.Array:
  """Align(g_down, g_pre) from V = ⟨g_down, g_pre⟩: V itself ('dot', the paper's), or the cosine
  V / (‖g_down‖‖g_pre‖). 'cosine' passes the ‖g_pre(φ)‖ it differentiates (exact); 'cosine_cheap' passes
  ‖g_pre‖ at the current φ, held constant (the gradient of V, rescaled); the modality computes it."""
  if align == "dot":
    return value
  if align not in ALIGNS:
    raise ValueError(f"align={align!r}; expected one of {ALIGNS}")
  return value / jnp.maximum(g_down_norm * g_pre_norm, 1e-30)


def random_like(rng: jax.Array, tree: dict, norm: jax.Array) -> dict:
  """A uniformly random direction with the given global norm (the random-feedback control)."""
  keys = jax.random.split(rng, len(tree))
  raw = {k: jax.random.normal(key, v.shape, v.dtype) for key, (k, v) in zip(keys, sorted(tree.items()))}
  scale = norm / jnp.maximum(tree_norm(raw), 1e-30)
  return {k: v * scale for k, v in raw.items()}


# ----------------------------------------------------------------------------- the value


def value_jvp(loss_of_subset: Callable[[dict], jax.Array], subset: dict, tangent: dict) -> tuple[jax.Array, jax.Array]:
  """(L(S), V) with V = ⟨tangent, ∇_S L⟩: one forward-mode pass. Differentiable in whatever
  `loss_of_subset` closes over (the designer's task) by reverse-over-forward."""
  return jax.jvp(loss_of_subset, (subset,), (tangent,))


def reference_value(loss_of_subset: Callable[[dict], jax.Array], subset: dict, g_down: dict) -> jax.Array:
  """Explicit ⟨g_down, ∇_S L⟩ by a backward pass; differentiable in the task by double backward
  (nested grad). For tests and benchmarks: `value_jvp` must agree with it."""
  return tree_vdot(g_down, jax.grad(loss_of_subset)(subset))


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
