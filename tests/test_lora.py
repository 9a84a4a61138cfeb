"""LoRA: adapters start as the identity, only adapters train (base bit-identical), the value JVP on
S = the last blocks' adapters equals the explicit float64 dot product, merging folds adapters exactly."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from jax.sharding import PartitionSpec as P

from vpt.core import alignment, config as core_config, lora as lora_lib, sharding
from vpt.core.optim import make_optimizer
from vpt.language import config_lib, generate as gen, value as value_lib
from vpt.language.losses import downstream_nll
from vpt.language.models.designer import DesignerConfig, TaskDesigner
from vpt.language.models.lm import LMConfig, Transformer
from vpt.language.steps import init_train_state, state_shardings
from vpt.language.vpt_step import init_designer_state, make_designer_optimizer, make_vpt_train_step, meta_objective

VOCAB, SEQ, LAYERS, K = 48, 12, 2, 6


def _cfg(**kw):
  base = dict(vocab_size=VOCAB, d_model=32, n_layers=LAYERS, n_heads=4, n_kv_heads=2, d_ff=64)
  return LMConfig(**{**base, **kw})


def _batch(seed, b=4):
  rng = np.random.default_rng(seed)
  toks = rng.integers(1, VOCAB, (b, SEQ + 1)).astype(np.int32)
  mask = np.ones((b, SEQ), np.float32)
  mask[:, :3] = 0
  return {"inputs": toks[:, :-1], "targets": toks[:, 1:], "loss_mask": mask,
          "segment_ids": np.ones((b, SEQ), np.int32),
          "positions": np.broadcast_to(np.arange(SEQ, dtype=np.int32), (b, SEQ)).copy()}


def _perturb(params, scale=0.1, seed=0):
  """Non-zero lora_b (and everything else moved a little) so the adapters matter."""
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
  return jax.tree.unflatten(treedef, [p + scale * jax.random.normal(k, p.shape, p.dtype) for k, p in zip(keys, leaves)])


def _optimizer(num_steps=10, **overrides):
  opt_cfg = config_lib.base_config().optimizer
  opt_cfg.warmup_steps = 0
  opt_cfg.update(overrides)
  optimizer, schedule = make_optimizer(opt_cfg, num_steps)
  return lora_lib.freeze_base(optimizer), schedule, opt_cfg


def test_lora_model_at_init_is_the_base_model_exactly():
  targets = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
  base, adapted = Transformer(_cfg()), Transformer(_cfg(lora_rank=4, lora_targets=targets))
  tokens = jnp.asarray(_batch(0)["inputs"])
  p_base = jax.jit(base.init)(jax.random.PRNGKey(0), tokens)["params"]
  p_lora = jax.jit(adapted.init)(jax.random.PRNGKey(0), tokens)["params"]
  adapters, rest = lora_lib.split_lora(p_lora)
  # The adapters sit beside exactly the targeted kernels; the base leaves are those of the plain model.
  assert sorted({k.split("/")[-2] for k in adapters}) == sorted(targets.split(","))
  assert len(adapters) == 2 * LAYERS * 7
  flat_base = traverse_util.flatten_dict(p_base, sep="/")
  assert rest.keys() == flat_base.keys()
  for k in rest:
    np.testing.assert_array_equal(rest[k], flat_base[k], err_msg=k)
  a = adapters["layers_0/mlp/down_proj/lora_a"]
  assert a.shape == (64, 4) and float(jnp.abs(a).max()) <= 1 / np.sqrt(64) and float(jnp.std(a)) > 0
  assert all(float(jnp.abs(v).max()) == 0.0 for k, v in adapters.items() if k.endswith("lora_b"))

  @jax.jit
  def logits(p_lora, p_base):
    return (base.apply({"params": p_base}, tokens), adapted.apply({"params": p_lora}, tokens),
            adapted.apply({"params": p_lora}, tokens, deterministic=False, rngs={"dropout": jax.random.PRNGKey(1)}))

  want, got, train_mode = logits(p_lora, p_base)
  np.testing.assert_array_equal(got, want)
  np.testing.assert_array_equal(train_mode, want)  # dropout on changes nothing either while B = 0.
  # (That adapters do change the output once B moves: test_merge_lora_gives_the_adapted_models_logits.)


def _vpt_cfg(**kw):
  c = config_lib.vpt_config()
  c.mode, c.top_k, c.meta_every = "value", K, 2
  c.designer.d_model, c.designer.n_layers, c.designer.n_heads, c.designer.d_ff = 16, 1, 2, 32
  c.update(kw)
  return c


def test_value_jvp_on_lora_subset_equals_explicit_dot_product(x64):
  """S = the adapters of the last block (of 2): g_down over S alone, V = ⟨g_down, ∇_S L_pre⟩ by one JVP,
  and the Adam geometry finds the adapters' second moments inside the frozen-base optimizer."""
  model = Transformer(_cfg(lora_rank=3, dtype="float64"))
  batch, fb = jax.tree.map(jnp.asarray, _batch(1)), jax.tree.map(jnp.asarray, _batch(2))
  optimizer, _, opt_cfg = _optimizer()
  designer = TaskDesigner(DesignerConfig(d_model=16, n_layers=1, n_heads=2, d_ff=32, dtype="float64"))
  vpt_cfg = _vpt_cfg(align_last_n_layers=1)

  @jax.jit
  def values():
    params = model.init(jax.random.PRNGKey(0), batch["inputs"])["params"]
    params = _perturb(jax.tree.map(lambda p: p.astype(jnp.float64), params))
    opt_state = optimizer.init(params)  # with a history, so Adam's v̂ is not trivial:
    _, opt_state = optimizer.update(jax.tree.map(lambda p: 0.3 * jnp.sin(3.0 * p), params), opt_state, params)
    dstate = init_designer_state(designer, make_designer_optimizer(vpt_cfg), params, SEQ, K, seed=0)
    dparams = jax.tree.map(lambda p: p.astype(jnp.float64) + 0.3, dstate.params)
    objective, info = meta_objective(params, opt_state, dparams, batch, fb, jax.random.PRNGKey(3), model=model,
                                     designer=designer, vpt_cfg=vpt_cfg, learner_opt_cfg=opt_cfg)
    # Explicit references through the whole network (no prefix split): g_down and g_pre on S.
    subset, rest = alignment.split_params(params, LAYERS, 1)
    full = lambda s, b: model.apply({"params": alignment.merge_params(s, rest)}, b["inputs"], b["positions"],
                                    b["segment_ids"])
    g_down = jax.grad(lambda s: downstream_nll(full(s, fb), fb["targets"], fb["loss_mask"]))(subset)
    q = info["targets_of"](dparams)[2]
    g_pre = jax.grad(lambda s: value_lib.soft_loss_of_logits(info["cand_ids"], q, batch["loss_mask"])(
        full(s, batch)))(subset)
    nu = traverse_util.flatten_dict(alignment._find_adam_state(opt_state).nu, sep="/")
    precond = alignment.adam_preconditioner(opt_state, 1, LAYERS, opt_cfg.eps, opt_cfg.b2)
    explicit_precond = {k: 1.0 / (jnp.sqrt(nu[k] / (1 - opt_cfg.b2)) + opt_cfg.eps) for k in g_down}
    return (objective(dparams)[1]["value"], alignment.tree_vdot(g_down, g_pre), info["g_down"], g_down,
            precond, explicit_precond)

  value, explicit, g_down_jvp_path, g_down, precond, explicit_precond = values()
  expect = {f"layers_1/{m}/{t}" for m in ("self_attn/q_proj", "self_attn/k_proj", "self_attn/v_proj", "self_attn/o_proj",
                                          "mlp/gate_proj", "mlp/up_proj", "mlp/down_proj") for t in ("lora_a", "lora_b")}
  assert set(g_down) == set(g_down_jvp_path) == set(precond) == expect
  for k in expect:
    np.testing.assert_allclose(g_down_jvp_path[k], g_down[k], rtol=1e-9, atol=1e-15)
    np.testing.assert_allclose(precond[k], explicit_precond[k], rtol=1e-12)
  assert abs(float(explicit)) > 1e-6
  np.testing.assert_allclose(float(value), float(explicit), rtol=1e-8)
  assert float(np.std(precond["layers_1/mlp/up_proj/lora_a"])) > 0  # a real (non-identity) preconditioner


def test_lora_v_pretraining_steps_update_only_the_adapters():
  """A few V-Pretraining steps (meta steps at 0 and 2; 2 microbatches, adapter dropout 0.5)."""
  vcfg = _vpt_cfg(meta_every=2)
  vcfg.designer.learning_rate = 1e-2
  model = Transformer(_cfg(lora_rank=4, lora_dropout=0.5))
  optimizer, schedule, opt_cfg = _optimizer()

  def init_fn():
    state = init_train_state(model, optimizer, SEQ, seed=0)
    d = TaskDesigner(DesignerConfig.from_config(vcfg))
    return state.replace(designer=init_designer_state(d, make_designer_optimizer(vcfg), state.params, SEQ, K, 0))

  initial = state = jax.jit(init_fn)()
  step = jax.jit(make_vpt_train_step(model, optimizer, schedule, vcfg, opt_cfg, accum_steps=2))
  for i in range(3):
    state, m = step(state, _batch(20 + i, b=8), _batch(120 + i))
    assert np.isfinite(float(m["loss"])), m
  assert float(m["meta/value"]) != 0.0 and float(m["meta/g_down_norm"]) > 0.0
  assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(state.designer.params),
                                                      jax.tree.leaves(initial.designer.params)))
  adapters0, base0 = lora_lib.split_lora(initial.params)
  adapters, base = lora_lib.split_lora(state.params)
  for k in base:  # frozen: bit-identical, weight decay and all
    np.testing.assert_array_equal(base[k], base0[k], err_msg=k)
  for k in adapters:  # every adapter moved (A through weight decay at the first step, then through B)
    assert not np.array_equal(adapters[k], adapters0[k]), k
  # Adam moments exist for the adapters only, and the shardings of such a state can be laid out.
  n_adapter = sum(v.size for v in adapters.values())
  n_state = sum(np.size(x) for x in jax.tree.leaves(state.opt_state))
  assert 2 * n_adapter <= n_state < 2 * n_adapter + 16
  mesh_cfg = config_lib.base_config().mesh
  mesh_cfg.data, mesh_cfg.fsdp, mesh_cfg.tensor = 1, 4, 2
  mesh = sharding.make_mesh(mesh_cfg, jax.devices()[:8])
  shards = state_shardings(jax.eval_shape(lambda: initial), mesh, optimizer)
  assert shards.params["layers_0"]["mlp"]["gate_proj"]["kernel"].spec == P("fsdp", "tensor")
  assert all(s.is_fully_replicated for s in jax.tree.leaves(shards.opt_state))  # adapter moments: replicated like them
  # Dropout is on in the learner step, keyed by (state.rng, state.step): the same state and batch give
  # the same loss again, another root key another loss (step 3 is no meta step: the key feeds dropout only).
  batch, moved = _batch(10, b=8), state.replace(params=_perturb(state.params))
  loss = lambda st: float(step(st, batch, _batch(120))[1]["loss"])
  assert loss(moved) == loss(moved)
  assert abs(loss(moved) - loss(moved.replace(rng=jax.random.PRNGKey(99)))) > 1e-4


def test_merge_lora_gives_the_adapted_models_logits():
  cfg = _cfg(lora_rank=4, lora_alpha=8.0)
  adapted = Transformer(cfg)
  tokens = jnp.asarray(_batch(4)["inputs"])
  params = jax.jit(lambda: _perturb(adapted.init(jax.random.PRNGKey(0), tokens)["params"]))()
  want = jax.jit(adapted.apply)({"params": params}, tokens)
  plain = Transformer(_cfg())
  plain_logits = jax.jit(plain.apply)
  for p in (params, jax.device_get(params)):  # jax and NumPy leaves
    merged = lora_lib.merge_lora(p, cfg)
    assert not lora_lib.has_lora(merged)
    np.testing.assert_allclose(plain_logits({"params": merged}, tokens), want, atol=1e-5)
  # The model ConfigDict works as the LoRA config too; a rank of 0 with adapters present is an error.
  mcfg = config_lib.model_config("nano")
  mcfg.lora_rank, mcfg.lora_alpha = 4, 8.0
  np.testing.assert_allclose(plain_logits({"params": lora_lib.merge_lora(params, mcfg)}, tokens), want, atol=1e-5)
  with pytest.raises(ValueError, match="lora_rank"):
    lora_lib.merge_lora(params, _cfg())
  # Cached generation (its forward runs the plain layout) folds the adapters in: its first greedy
  # token is the adapted model's argmax, which here differs from the base model's on some rows.
  first = gen.generate_tokens(adapted, params, np.asarray(tokens).tolist(), max_new_tokens=1, eos_id=2, pad_id=0)
  base_params = traverse_util.unflatten_dict(lora_lib.split_lora(params)[1], sep="/")
  np.testing.assert_array_equal(first[:, 0], np.argmax(want[:, -1], -1))
  assert (np.argmax(plain_logits({"params": base_params}, tokens)[:, -1], -1) != first[:, 0]).any()


def test_config_errors_name_the_field():
  config = config_lib.base_config()
  config.model.lora_rank = 8
  config.model.lora_targets = "q_proj,qkv"
  with pytest.raises(ValueError, match="model.lora_targets"):
    config_lib.validate(config)
  config.model.lora_targets, config.model.lora_dropout = "q_proj", 1.0
  with pytest.raises(ValueError, match="model.lora_dropout"):
    config_lib.validate(config)


@pytest.mark.slow
def test_lora_run_checkpoints_and_resumes_exactly(tmp_path):
  """train.run with LoRA + V-Pretraining: the frozen-base optimizer state (adapter moments only)
  checkpoints and restores; a resumed run ends bit-identical to the uninterrupted one."""
  import os
  import shutil
  from vpt.language import train
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  config = core_config.load_config_file(os.path.join(repo, "experiments", "lm_vpt.py"), "nano,value")
  config = core_config.with_overrides(config, {"model.lora_rank": 4, "num_steps": 3, "checkpoint.every_steps": 2,
                                              "progress_bar": False, "mesh.num_devices": 1, "eval_every_steps": 1000})
  full = train.run(config, str(tmp_path))
  shutil.rmtree(tmp_path / "checkpoints" / "3")
  resumed = train.run(config, str(tmp_path))
  assert resumed["start_step"] == 2
  a, b = jax.device_get(resumed["state"]), jax.device_get(full["state"])
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y)
  n_adapter = sum(v.size for v in lora_lib.split_lora(a.params)[0].values())
  assert 2 * n_adapter <= sum(np.size(x) for x in jax.tree.leaves(a.opt_state)) < 2 * n_adapter + 16
