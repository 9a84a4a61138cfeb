"""The meta schedule and what every V-Pretraining step does around the modality's meta update.

Schedule. Step t (the learner's step counter, 0-based) is a meta step iff t ≥ burn_in and
t % meta_every == 0: a function of the checkpointed step alone, so a resumed run takes its meta
steps exactly where an uninterrupted run would. `meta_index` is n, the meta steps so far with this
one (what a running average over meta steps is bias-corrected by).

Dispatch (config `vpt.dispatch`, one of DISPATCHES). 'cond': one program runs the meta update under
`lax.cond` on the step counter (`meta_or_skip(None, …)`). 'host': the host knows whether this step is a
meta step and the loop calls one of two programs, each compiled with the branch fixed
(`meta_or_skip(True / False, …)`): the same results up to floating-point reassociation (XLA fuses
each program on its own), twice the compiles, and straight-line code — XLA:CPU ran the vision meta update
up to 2.6× slower inside a conditional (BENCHMARKS.md). Either way a step without a meta step gets
g_down = 0 on S.

Bookkeeping. After the learner step, cos(g_down, g_pre) with g_pre = the gradient the learner
actually stepped along (on S, with the updated designer) is free — a separate g_pre would cost a
backward pass. `record_alignment` writes it, and ‖g_pre‖, into the designer's last meta metrics on
meta steps and keeps the previous values otherwise; every step reports them as `meta/<name>`.
"""

from __future__ import annotations

from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import optax

from vpt.core import DISPATCHES, alignment


@flax.struct.dataclass
class DesignerState:
  params: Any
  opt_state: Any
  last_meta: dict  # the latest meta step's metrics, reported on every step
  g_down_avg: Any = None  # m of a running g_down average on S (language: vpt.g_down_average > 0), else None


def is_meta_step(step, burn_in_steps: int, meta_every: int):
  """Works on Python ints (host) and traced scalars (device) alike."""
  return (step >= burn_in_steps) & (step % meta_every == 0)


def meta_index(step, burn_in_steps: int, meta_every: int):
  """n ≥ 1: the meta steps taken up to and including meta step `step`."""
  first = -(-burn_in_steps // meta_every) * meta_every
  return (step - first) // meta_every + 1


def designer_optimizer(learning_rate: float, grad_clip_norm: float,
                       weight_decay: float) -> optax.GradientTransformation:
  """AdamW for φ, after global-norm clipping (none for grad_clip_norm ≤ 0)."""
  parts = [optax.clip_by_global_norm(grad_clip_norm)] if grad_clip_norm > 0 else []
  parts.append(optax.adamw(learning_rate, weight_decay=weight_decay))
  return optax.chain(*parts)


def programs_for(dispatch: str, uses_designer: bool) -> tuple[bool | None, ...]:
  """The step programs a loop compiles: (None,) — one program, the meta step under lax.cond (or no meta
  step at all); (False, True) — the plain and the meta program, dispatched by the host."""
  if dispatch not in DISPATCHES:
    raise ValueError(f"vpt.dispatch={dispatch!r}; expected one of {DISPATCHES}")
  return (False, True) if uses_designer and dispatch == "host" else (None,)


def program_key(keys, is_meta: bool) -> bool | None:
  """Which of the programs keyed by `programs_for` runs a step: the one program, or the meta / plain one."""
  return None if None in keys else is_meta


def meta_or_skip(dispatch: bool | None, is_meta, run: Callable[[], Any], skip: Callable[[], Any]):
  """(outputs of `run` on a meta step, else of `skip`; is_meta as an array).

  dispatch=None: `lax.cond(is_meta, …)` in this program. dispatch=True / False: the host decided —
  `run` or `skip` alone is traced, and `is_meta` is ignored."""
  if dispatch is None:
    return jax.lax.cond(is_meta, lambda _: run(), lambda _: skip(), None), jnp.asarray(is_meta)
  return (run() if dispatch else skip()), jnp.asarray(dispatch)


def record_alignment(last_meta: dict, is_meta, g_down: dict, g_pre: dict) -> dict:
  """last_meta with cos(g_down, g_pre) and ‖g_pre‖ of this step where it is a meta step."""
  last = dict(last_meta)
  g_pre_norm = alignment.tree_norm(g_pre)
  cos = alignment.tree_vdot(g_down, g_pre) / jnp.maximum(alignment.tree_norm(g_down) * g_pre_norm, 1e-30)
  last["cosine"] = jnp.where(is_meta, cos, last["cosine"]).astype(jnp.float32)
  last["g_pre_norm"] = jnp.where(is_meta, g_pre_norm, last["g_pre_norm"]).astype(jnp.float32)
  return last
