"""Downstream loss during training: L_down on feedback-set batches and on held-out problems.

Both arms of a comparison (NTP baseline, V-Pretraining) report the same numbers, so the summary
can show whether feedback reached the learner through the designer — and the held-out set shows
whether it generalises beyond the feedback examples.
"""

from __future__ import annotations

import jax

from vpt.core import sharding
from vpt.language.data.feedback import heldout_records, make_feedback_iterator
from vpt.language.losses import downstream_nll


def make_downstream_eval(model, fb_cfg, tokenizer, mesh, *, seed: int, num_batches: int):
  """Returns evaluate(params) -> {'feedback_loss', ['heldout_loss']}; batches are fixed across calls."""
  batch_sh = sharding.batch_sharding(mesh)

  def loss(params, batch):
    logits = model.apply({"params": params}, batch["inputs"], batch["positions"], batch["segment_ids"])
    return downstream_nll(logits, batch["targets"], batch["loss_mask"])

  loss = jax.jit(loss, in_shardings=(None, batch_sh))
  sets = {"feedback_loss": None}
  held = heldout_records(fb_cfg)
  if held:
    sets["heldout_loss"] = held

  def batches(records):
    it = make_feedback_iterator(fb_cfg, tokenizer, seed=seed, process_index=jax.process_index(),
                                process_count=jax.process_count(), records=records)
    n = num_batches if records is None else max(1, min(num_batches, len(records) // fb_cfg.batch_size))
    return [sharding.global_batch(next(it), mesh) for _ in range(n)]

  fixed = {name: batches(records) for name, records in sets.items()}

  def evaluate(params) -> dict[str, float]:
    return {name: sum(float(loss(params, b)) for b in bs) / len(bs) for name, bs in fixed.items()}

  return evaluate
