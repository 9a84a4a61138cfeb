"""One V-Pretraining step, whatever the modality: a meta update on meta steps, then the learner step.

    (refreshed, g_down) = task.meta_update(state, inputs)   on a meta step (the designer's step on
                          (state's own fields, 0 on S)       −Align(g_down, g_pre(φ)); any other
                                                             feedback-side state it refreshes)
    state, g = task.learner_update(state ⊕ refreshed, inputs)   the learner's self-supervised step on
                                                                the updated designer's task, detached
    designer.last_meta ← cos(g_down, g_pre = g on S), ‖g_pre‖   (vpt.core.meta.record_alignment)

A task supplies the two updates and its view of S (`StepTask`); the core supplies the order, the
schedule's dispatch (`meta_or_skip`: `lax.cond` in one program, or the host's choice of two programs)
and the alignment bookkeeping. The state is a flax struct with `step` and `designer`
(a vpt.core.meta.DesignerState); the task's own fields are its business.

Isolation is the task's half of the contract: the feedback labels in `inputs` may reach only
`meta_update`'s designer step and g_down; `learner_update` reads the designer's output through
`stop_gradient`. The core never touches a label.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax.numpy as jnp

from vpt.core import meta as meta_lib


@dataclasses.dataclass(frozen=True)
class StepTask:
  """What a modality supplies to the step.

  learner_update(state, inputs) -> (state, metrics, grads): one learner step (`step` + 1); `grads` is the
    gradient it stepped along, shaped like what `on_subset` reads.
  uses_designer: False for baselines and fixed-task controls (the step is `learner_update` alone).
  is_meta_step(step) -> bool: the schedule (vpt.core.meta.is_meta_step with the config's burn-in, period).
  meta_update(state, inputs) -> ({field: new value}, g_down on S): the meta update; the fields are
    `meta_fields` of the state (with "designer", a DesignerState whose last_meta it fills).
  on_subset(grads) -> the learner's gradient on S (g_pre); subset_zeros(state) -> zeros shaped like S.
  """
  learner_update: Callable[..., tuple[Any, dict, Any]]
  uses_designer: bool = True
  is_meta_step: Callable[[Any], Any] | None = None
  meta_update: Callable[..., tuple[dict, Any]] | None = None
  meta_fields: tuple[str, ...] = ("designer",)
  on_subset: Callable[[Any], Any] | None = None
  subset_zeros: Callable[[Any], Any] | None = None


def make_train_step(task: StepTask, dispatch: bool | None = None) -> Callable:
  """(state, *inputs) -> (state, metrics). dispatch=None: the meta update under `lax.cond` on
  `task.is_meta_step(state.step)`; True / False: always / never (the host dispatches)."""

  def train_step(state, *inputs):
    if not task.uses_designer:
      new_state, metrics, _ = task.learner_update(state, *inputs)
      return new_state, metrics
    keep = lambda: ({f: getattr(state, f) for f in task.meta_fields}, task.subset_zeros(state))
    (refreshed, g_down), is_meta = meta_lib.meta_or_skip(
        dispatch, task.is_meta_step(state.step), lambda: task.meta_update(state, *inputs), keep)
    state = state.replace(**refreshed)
    new_state, metrics, grads = task.learner_update(state, *inputs)
    last = meta_lib.record_alignment(state.designer.last_meta, is_meta, g_down, task.on_subset(grads))
    new_state = new_state.replace(designer=state.designer.replace(last_meta=last))
    metrics.update({f"meta/{k}": v for k, v in last.items()})
    metrics["meta/is_meta_step"] = is_meta.astype(jnp.float32)
    return new_state, metrics

  return train_step
