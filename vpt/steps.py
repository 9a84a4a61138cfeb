"""Pure, jittable training and evaluation steps: `(state, batch) -> (state, metrics)`.

The step's randomness is `fold_in(state.rng, state.step)`: the root key lives in the state (and
so in checkpoints), and a resumed run draws exactly the keys an uninterrupted run would.
`TrainState.designer` is the slot for the V-Pretraining task designer (its params and optimizer
state); it is None for plain next-token prediction.
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax

from vpt.tasks.losses import next_token_nll_sum


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any
  rng: jax.Array
  designer: Any = None


def init_train_state(model: nn.Module, optimizer: optax.GradientTransformation, seq_len: int,
                     seed: int) -> TrainState:
  init_rng, state_rng = jax.random.split(jax.random.PRNGKey(seed))
  tokens = jnp.zeros((1, seq_len), jnp.int32)
  params = model.init(init_rng, tokens)["params"]
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params),
                    rng=state_rng)


def lm_loss_fn(model: nn.Module) -> Callable:
  """params, batch -> (summed NLL, aux) with aux = {'count', 'sums', 'maxes'} (see accumulate_gradients)."""

  def loss_fn(params, batch):
    logits = model.apply({"params": params}, batch["inputs"], batch["positions"], batch["segment_ids"])
    loss_sum, count = next_token_nll_sum(logits, batch["targets"], batch["loss_mask"])
    return loss_sum, {"count": count, "sums": {}, "maxes": {}}

  return loss_fn


def accumulate_gradients(loss_fn: Callable, params, batch, accum_steps: int):
  """Summed loss, aux and gradient of the summed loss over `accum_steps` microbatches.

  `loss_fn(params, batch) -> (loss_sum, {'count': tokens, 'sums': {...}, 'maxes': {...}})`.
  Microbatches are scanned so peak activation memory is that of one microbatch; because sums
  (not means) are accumulated, the result equals the full-batch gradient. 'sums' entries add up
  across microbatches and 'maxes' entries take the maximum.
  """
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  if accum_steps == 1:
    (loss_sum, aux), grads = grad_fn(params, batch)
    return loss_sum, aux, grads
  micro = jax.tree.map(lambda x: x.reshape(accum_steps, x.shape[0] // accum_steps, *x.shape[1:]), batch)

  def body(carry, mb):
    (loss_sum, aux), grads = grad_fn(params, mb)
    acc_loss, acc_aux, acc_grads = carry
    merged = {"count": acc_aux["count"] + aux["count"],
              "sums": jax.tree.map(jnp.add, acc_aux["sums"], aux["sums"]),
              "maxes": jax.tree.map(jnp.maximum, acc_aux["maxes"], aux["maxes"])}
    return (acc_loss + loss_sum, merged, jax.tree.map(jnp.add, acc_grads, grads)), None

  aux_shape = jax.eval_shape(lambda: grad_fn(params, jax.tree.map(lambda x: x[0], micro))[0][1])
  zeros_aux = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), aux_shape)
  zeros = jax.tree.map(jnp.zeros_like, params)
  (loss_sum, aux, grads), _ = jax.lax.scan(body, (jnp.zeros(()), zeros_aux, zeros), micro)
  return loss_sum, aux, grads


def learner_update(state: TrainState, batch: dict, loss_fn: Callable, optimizer: optax.GradientTransformation,
                   schedule: optax.Schedule, accum_steps: int):
  """One optimizer step of the learner on `loss_fn(params, batch) -> (loss_sum, aux)` (see above).

  Returns (new state, metrics, the mean-loss gradient before clipping).
  """
  loss_sum, aux, grads = accumulate_gradients(loss_fn, state.params, batch, accum_steps)
  count = aux["count"]
  denom = jnp.maximum(count, 1.0)
  grads = jax.tree.map(lambda g: g / denom, grads)
  updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  loss = loss_sum / denom
  metrics = {
      "loss": loss,
      "perplexity": jnp.exp(jnp.minimum(loss, 30.0)),
      "grad_norm": optax.tree.norm(grads),
      "param_norm": optax.tree.norm(params),
      "learning_rate": schedule(state.step),
      "loss_tokens": count,
      **{k: v / denom for k, v in aux["sums"].items()},
      **aux["maxes"],
  }
  return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics, grads


def make_train_step(model: nn.Module, optimizer: optax.GradientTransformation, schedule: optax.Schedule,
                    accum_steps: int = 1) -> Callable:
  """The plain next-token-prediction step (the V-Pretraining baseline)."""
  loss_fn = lm_loss_fn(model)

  def train_step(state: TrainState, batch: dict[str, jax.Array]):
    new_state, metrics, _ = learner_update(state, batch, loss_fn, optimizer, schedule, accum_steps)
    return new_state, metrics

  return train_step


def make_eval_step(model: nn.Module) -> Callable:
  """params, batch -> {'loss_sum', 'loss_tokens'} (summed, so several batches combine exactly)."""
  loss_fn = lm_loss_fn(model)

  def eval_step(params, batch):
    loss_sum, aux = loss_fn(params, batch)
    return {"loss_sum": loss_sum, "loss_tokens": aux["count"]}

  return eval_step
