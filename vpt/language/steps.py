"""Pure, jittable training and evaluation steps: `(state, batch) -> (state, metrics)`.

The step's randomness is `fold_in(state.rng, state.step)`: the root key lives in the state (and
so in checkpoints), and a resumed run draws exactly the keys an uninterrupted run would.
`TrainState.designer` is the slot for the V-Pretraining task designer (its params and optimizer
state); it is None for plain next-token prediction.

With LoRA (`model.cfg.lora_rank > 0`) the learner step differentiates the adapters only (the frozen
base gets no gradient buffers; its optimizer is `lora.freeze_base`-wrapped), and the adapters'
dropout draws its key from the same per-step stream, so resumed runs stay exact.
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax

from flax import traverse_util

from vpt.core import lora as lora_lib, sharding as sharding_lib
from vpt.language.losses import next_token_nll_sum
from vpt.language.models.lm import SHARDING_RULES


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


def uses_dropout(model: nn.Module) -> bool:
  """Whether the learner's train step runs stochastic layers (only LoRA's adapter dropout today)."""
  cfg = model.cfg
  return cfg.lora_rank > 0 and cfg.lora_dropout > 0


def step_dropout_rng(model: nn.Module, state: TrainState):
  """The learner step's dropout key (a stream of its own beside the meta step's), or None."""
  if not uses_dropout(model):
    return None
  return jax.random.fold_in(jax.random.fold_in(state.rng, state.step), 1)


def apply_lm(model: nn.Module, params, batch: dict, dropout_rng=None):
  """Logits of the batch; dropout (if the model has any) only when a key is given."""
  if dropout_rng is None:
    return model.apply({"params": params}, batch["inputs"], batch["positions"], batch["segment_ids"])
  return model.apply({"params": params}, batch["inputs"], batch["positions"], batch["segment_ids"],
                     deterministic=False, rngs={"dropout": dropout_rng})


def lm_loss_fn(model: nn.Module) -> Callable:
  """params, batch[, dropout_rng] -> (summed NLL, aux) with aux = {'count', 'sums', 'maxes'}
  (see accumulate_gradients)."""

  def loss_fn(params, batch, dropout_rng=None):
    logits = apply_lm(model, params, batch, dropout_rng)
    loss_sum, count = next_token_nll_sum(logits, batch["targets"], batch["loss_mask"])
    return loss_sum, {"count": count, "sums": {}, "maxes": {}}

  return loss_fn


def accumulate_gradients(loss_fn: Callable, params, batch, accum_steps: int, dropout_rng=None):
  """Summed loss, aux and gradient of the summed loss over `accum_steps` microbatches.

  `loss_fn(params, batch[, dropout_rng]) -> (loss_sum, {'count': tokens, 'sums': {...}, 'maxes': {...}})`.
  Microbatches are scanned so peak activation memory is that of one microbatch; because sums
  (not means) are accumulated, the result equals the full-batch gradient. 'sums' entries add up
  across microbatches and 'maxes' entries take the maximum. With a `dropout_rng`, microbatch i
  gets the key fold_in(dropout_rng, i).
  """
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  if dropout_rng is None:
    call = lambda p, b, i: grad_fn(p, b)
  else:
    call = lambda p, b, i: grad_fn(p, b, jax.random.fold_in(dropout_rng, i))
  if accum_steps == 1:
    (loss_sum, aux), grads = call(params, batch, 0)
    return loss_sum, aux, grads
  # Microbatch i is rows i, i + accum_steps, i + 2·accum_steps, …: every device holds the same number of
  # rows of every microbatch (the batch is split over devices in contiguous blocks), so no microbatch
  # has to be moved between devices. The sums do not depend on how the rows are grouped.
  micro = jax.tree.map(
      lambda x: jnp.swapaxes(x.reshape(x.shape[0] // accum_steps, accum_steps, *x.shape[1:]), 0, 1), batch)

  def body(carry, xs):
    mb, i = xs
    (loss_sum, aux), grads = call(params, mb, i)
    acc_loss, acc_aux, acc_grads = carry
    merged = {"count": acc_aux["count"] + aux["count"],
              "sums": jax.tree.map(jnp.add, acc_aux["sums"], aux["sums"]),
              "maxes": jax.tree.map(jnp.maximum, acc_aux["maxes"], aux["maxes"])}
    return (acc_loss + loss_sum, merged, jax.tree.map(jnp.add, acc_grads, grads)), None

  aux_shape = jax.eval_shape(lambda: call(params, jax.tree.map(lambda x: x[0], micro), 0)[0][1])
  zeros_aux = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), aux_shape)
  zeros = jax.tree.map(jnp.zeros_like, params)
  (loss_sum, aux, grads), _ = jax.lax.scan(body, (jnp.zeros(()), zeros_aux, zeros),
                                           (micro, jnp.arange(accum_steps)))
  return loss_sum, aux, grads


def learner_update(state: TrainState, batch: dict, loss_fn: Callable, optimizer: optax.GradientTransformation,
                   schedule: optax.Schedule, accum_steps: int, *, dropout_rng=None, lora_only: bool = False):
  """One optimizer step of the learner on `loss_fn(params, batch[, dropout_rng]) -> (loss_sum, aux)`.

  `lora_only`: differentiate the LoRA adapters only (the frozen base's gradient is zero and is
  never computed or accumulated); `optimizer` must then be `lora.freeze_base`-wrapped.
  Returns (new state, metrics, the mean-loss gradient before clipping).
  """
  if lora_only:
    trainable, frozen = lora_lib.split_lora(state.params)
    join = lambda t: traverse_util.unflatten_dict({**frozen, **t}, sep="/")
    loss_sum, aux, grads = accumulate_gradients(lambda t, *a: loss_fn(join(t), *a), trainable, batch,
                                                accum_steps, dropout_rng)
  else:
    loss_sum, aux, grads = accumulate_gradients(loss_fn, state.params, batch, accum_steps, dropout_rng)
  count = aux["count"]
  denom = jnp.maximum(count, 1.0)
  grads = jax.tree.map(lambda g: g / denom, grads)
  grad_norm = optax.tree.norm(grads)
  if lora_only:  # the full-shaped gradient the optimizer expects; its zeros are never materialised.
    grads = traverse_util.unflatten_dict({**{k: jnp.zeros_like(v) for k, v in frozen.items()}, **grads}, sep="/")
  updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  loss = loss_sum / denom
  metrics = {
      "loss": loss,
      "perplexity": jnp.exp(jnp.minimum(loss, 30.0)),
      "grad_norm": grad_norm,
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
    new_state, metrics, _ = learner_update(state, batch, loss_fn, optimizer, schedule, accum_steps,
                                           dropout_rng=step_dropout_rng(model, state),
                                           lora_only=model.cfg.lora_rank > 0)
    return new_state, metrics

  return train_step


def make_eval_step(model: nn.Module) -> Callable:
  """params, batch -> {'loss_sum', 'loss_tokens'} (summed, so several batches combine exactly)."""
  loss_fn = lm_loss_fn(model)

  def eval_step(params, batch):
    loss_sum, aux = loss_fn(params, batch)
    return {"loss_sum": loss_sum, "loss_tokens": aux["count"]}

  return eval_step


def state_shardings(abstract_state: TrainState, mesh: jax.sharding.Mesh, optimizer: optax.GradientTransformation):
  """Shardings for a TrainState (the LM's rules, vpt.language.models.lm.SHARDING_RULES): optimizer moments
  follow their parameters, the rest is replicated."""
  params = sharding_lib.param_shardings(abstract_state.params, mesh, SHARDING_RULES)
  repl = sharding_lib.replicated(mesh)
  is_masked = lambda x: isinstance(x, optax.MaskedNode)
  if any(map(is_masked, jax.tree.leaves(abstract_state.opt_state, is_leaf=is_masked))):
    # Moments for a subset of the parameters (optax.multi_transform, e.g. LoRA's frozen base) are not
    # params-shaped, which tree_map_params needs: the rules find each moment's parameter by the
    # path suffix (…/mu/layers_0/mlp/gate_proj/kernel); counts and other scalars are replicated.
    opt_state = sharding_lib.param_shardings(abstract_state.opt_state, mesh, SHARDING_RULES)
  else:
    opt_state = optax.tree_map_params(optimizer, lambda _, s: s, abstract_state.opt_state, params,
                                      transform_non_params=lambda _: repl)
  return abstract_state.replace(step=repl, params=params, opt_state=opt_state, rng=repl,
                                designer=jax.tree.map(lambda _: repl, abstract_state.designer))
