"""Train-step behaviour: sharded == single device, masked tokens inert, accumulation exact."""

import jax
import numpy as np
import pytest

from vpt.core import sharding
from vpt.core.optim import make_optimizer
from vpt.language import config_lib
from vpt.language.models.lm import LMConfig, Transformer
from vpt.language.steps import init_train_state, make_train_step, state_shardings

SEQ = 16


def _setup(n_heads=4, n_kv_heads=2):
  cfg = LMConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=n_heads, n_kv_heads=n_kv_heads, d_ff=64)
  model = Transformer(cfg)
  opt_cfg = config_lib.base_config().optimizer
  opt_cfg.warmup_steps = 2
  optimizer, schedule = make_optimizer(opt_cfg, 10)
  return model, optimizer, schedule


def _batch(seed=0, b=8):
  rng = np.random.default_rng(seed)
  toks = rng.integers(1, 64, (b, SEQ + 1)).astype(np.int32)
  seg = np.ones((b, SEQ), np.int32)
  seg[:, SEQ // 2:] = 2
  pos = np.concatenate([np.arange(SEQ // 2), np.arange(SEQ // 2)])[None].repeat(b, 0).astype(np.int32)
  mask = (rng.random((b, SEQ)) < 0.7).astype(np.float32)
  return {"inputs": toks[:, :-1], "targets": toks[:, 1:], "loss_mask": mask, "segment_ids": seg, "positions": pos}


def _run(mesh_sizes, steps=3, accum=1):
  model, optimizer, schedule = _setup()
  mesh_cfg = config_lib.base_config().mesh
  mesh_cfg.data, mesh_cfg.fsdp, mesh_cfg.tensor = mesh_sizes
  n = int(np.prod(mesh_sizes))
  mesh = sharding.make_mesh(mesh_cfg, jax.devices()[:n])
  init_fn = lambda: init_train_state(model, optimizer, SEQ, seed=0)
  shards = state_shardings(jax.eval_shape(init_fn), mesh, optimizer)
  state = jax.jit(init_fn, out_shardings=shards)()
  step = jax.jit(make_train_step(model, optimizer, schedule, accum), in_shardings=(shards, sharding.batch_sharding(mesh)),
                 out_shardings=(shards, sharding.replicated(mesh)), donate_argnums=(0,))
  losses = []
  for i in range(steps):
    state, m = step(state, sharding.global_batch(_batch(i), mesh))
    losses.append(float(m["loss"]))
  return jax.device_get(state.params), losses, state


@pytest.fixture(scope="module")
def single_device_run():
  return _run((1, 1, 1))


@pytest.mark.parametrize("mesh_sizes", [(2, 4, 1), (4, 1, 2), (2, 2, 2), (1, 1, 8)])
def test_sharded_step_matches_single_device(mesh_sizes, single_device_run):
  ref_params, ref_losses, _ = single_device_run
  params, losses, state = _run(mesh_sizes)
  np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref_params)):
    np.testing.assert_allclose(a, b, atol=2e-5)
  if mesh_sizes[1] > 1:  # FSDP really shards the big kernels.
    spec = state.params["layers_0"]["mlp"]["gate_proj"]["kernel"].sharding.spec
    assert "fsdp" in tuple(spec)


def test_gradient_accumulation_equals_full_batch():
  ref_params, ref_losses, _ = _run((1, 1, 1), steps=2)
  params, losses, _ = _run((1, 1, 1), steps=2, accum=4)
  np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref_params)):
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_masked_tokens_contribute_nothing():
  """Changing the target (or input of a later segment) at a masked position changes neither loss nor grads."""
  model, optimizer, schedule = _setup()
  state = init_train_state(model, optimizer, SEQ, seed=0)
  step = jax.jit(make_train_step(model, optimizer, schedule))
  batch = _batch(0)
  batch["loss_mask"][:, :4] = 0.0
  perturbed = {k: v.copy() for k, v in batch.items()}
  perturbed["targets"][:, :4] = (perturbed["targets"][:, :4] + 7) % 64
  s1, m1 = step(state, batch)
  s2, m2 = step(state, perturbed)
  assert float(m1["loss"]) == float(m2["loss"])
  for a, b in zip(jax.tree.leaves(s1.params), jax.tree.leaves(s2.params)):
    np.testing.assert_array_equal(a, b)
  # And a masked-out position does matter once unmasked (the test can fail).
  perturbed["loss_mask"][:, :4] = 1.0
  batch["loss_mask"][:, :4] = 1.0
  assert float(step(state, batch)[1]["loss"]) != float(step(state, perturbed)[1]["loss"])


def test_mesh_errors_name_the_field():
  mesh_cfg = config_lib.base_config().mesh
  mesh_cfg.data, mesh_cfg.fsdp, mesh_cfg.tensor = 3, -1, 1
  with pytest.raises(ValueError, match="config.mesh"):
    sharding.make_mesh(mesh_cfg)
