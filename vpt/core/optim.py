"""The learner's optimizer from config: AdamW, linear warmup + cosine decay, global-norm clipping."""

from __future__ import annotations

import jax
import optax


def learning_rate_schedule(opt_cfg, num_steps: int) -> optax.Schedule:
  warmup = min(int(opt_cfg.warmup_steps), max(num_steps - 1, 0))
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0,
      peak_value=opt_cfg.learning_rate,
      warmup_steps=warmup,
      decay_steps=max(num_steps, warmup + 1),
      end_value=opt_cfg.learning_rate * opt_cfg.end_lr_fraction,
  )


def _decay_mask(params):
  # Weight decay on matrices only: not on norms' scales or biases (the usual LM practice).
  return jax.tree.map(lambda p: p.ndim >= 2, params)


def make_optimizer(opt_cfg, num_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
  schedule = learning_rate_schedule(opt_cfg, num_steps)
  parts = []
  if opt_cfg.grad_clip_norm > 0:
    parts.append(optax.clip_by_global_norm(opt_cfg.grad_clip_norm))
  parts.append(optax.adamw(schedule, b1=opt_cfg.b1, b2=opt_cfg.b2, eps=opt_cfg.eps,
                           weight_decay=opt_cfg.weight_decay, mask=_decay_mask))
  return optax.chain(*parts), schedule
