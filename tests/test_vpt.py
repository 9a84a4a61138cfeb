"""V-Pretraining steps and runs: isolation of the learner from the feedback labels, α ≡ 0 == NTP,
sharded == single device, resume between meta steps == uninterrupted, every ablation runs."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import preempt_run

from vpt.core import config as core_config, sharding
from vpt.core.optim import make_optimizer
from vpt.language import config_lib, train
from vpt.language.models.designer import DesignerConfig, TaskDesigner
from vpt.language.models.lm import LMConfig, Transformer
from vpt.language.steps import init_train_state, state_shardings
from vpt.language.vpt_step import init_designer_state, make_designer_optimizer, make_vpt_train_step

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEQ, VOCAB, K = 16, 64, 6


def vpt_config(arg="nano,value", **overrides):
  config = core_config.load_config_file(os.path.join(REPO, "experiments", "lm_vpt.py"), arg)
  return core_config.with_overrides(config, {"progress_bar": False, "mesh.num_devices": 1, **overrides})


def _batch(seed, b=8):
  rng = np.random.default_rng(seed)
  toks = rng.integers(1, VOCAB, (b, SEQ + 1)).astype(np.int32)
  mask = np.ones((b, SEQ), np.float32)
  mask[:, :4] = 0
  return {"inputs": toks[:, :-1], "targets": toks[:, 1:], "loss_mask": mask,
          "segment_ids": np.ones((b, SEQ), np.int32),
          "positions": np.broadcast_to(np.arange(SEQ, dtype=np.int32), (b, SEQ)).copy()}


def _step_setup(designer_lr=1e-2, mode="value", mesh_sizes=(1, 1, 1), feedback_direction="feedback"):
  vcfg = config_lib.vpt_config()
  vcfg.mode, vcfg.top_k, vcfg.meta_every, vcfg.feedback_direction = mode, K, 2, feedback_direction
  vcfg.designer.d_model, vcfg.designer.n_layers, vcfg.designer.n_heads, vcfg.designer.d_ff = 16, 1, 2, 32
  vcfg.designer.learning_rate = designer_lr
  model = Transformer(LMConfig(vocab_size=VOCAB, d_model=32, n_layers=3, n_heads=4, n_kv_heads=2, d_ff=64))
  opt_cfg = config_lib.base_config().optimizer
  optimizer, schedule = make_optimizer(opt_cfg, 20)
  mesh_cfg = config_lib.base_config().mesh
  mesh_cfg.data, mesh_cfg.fsdp, mesh_cfg.tensor = mesh_sizes
  mesh = sharding.make_mesh(mesh_cfg, jax.devices()[:int(np.prod(mesh_sizes))])

  def init_fn():
    state = init_train_state(model, optimizer, SEQ, seed=0)
    designer = TaskDesigner(DesignerConfig.from_config(vcfg))
    return state.replace(designer=init_designer_state(designer, make_designer_optimizer(vcfg), state.params, SEQ,
                                                      K, seed=0))

  shards = state_shardings(jax.eval_shape(init_fn), mesh, optimizer)
  state = jax.jit(init_fn, out_shardings=shards)()
  bsh = sharding.batch_sharding(mesh)
  step = jax.jit(make_vpt_train_step(model, optimizer, schedule, vcfg, opt_cfg), in_shardings=(shards, bsh, bsh),
                 out_shardings=(shards, sharding.replicated(mesh)))
  put = lambda b: sharding.global_batch(b, mesh)
  return state, step, put


def _at_meta_step(state, step, put):
  """Two steps in (so the learning rate is past 0): state.step == 2, a meta step (meta_every=2)."""
  for i in range(2):
    state, _ = step(state, put(_batch(50 + i)), put(_batch(150 + i)))
  assert int(state.step) == 2
  return state


def test_learner_update_does_not_depend_on_feedback_answers_with_designer_fixed():
  state, step, put = _step_setup(designer_lr=0.0)  # the meta step runs but φ cannot move.
  state = _at_meta_step(state, step, put)
  fb = _batch(100)
  fb_other = {k: v.copy() for k, v in fb.items()}
  fb_other["targets"] = (fb_other["targets"] * 7 + 3) % VOCAB  # different answers
  s1, m1 = step(state, put(_batch(0)), put(fb))
  s2, m2 = step(state, put(_batch(0)), put(fb_other))
  assert float(m1["meta/value"]) != float(m2["meta/value"])  # the feedback really was read...
  assert float(m1["learning_rate"]) > 0 and float(m1["alpha_mean"]) > 0
  for a, b in zip(jax.tree.leaves(s1.params), jax.tree.leaves(s2.params)):
    np.testing.assert_array_equal(a, b)  # ...yet the learner's update is bit-identical.


def test_feedback_reaches_the_learner_only_through_the_designer():
  state, step, put = _step_setup(designer_lr=1e-2)
  state = _at_meta_step(state, step, put)
  fb = _batch(100)
  fb_other = {k: v.copy() for k, v in fb.items()}
  fb_other["targets"] = (fb_other["targets"] * 7 + 3) % VOCAB
  s1, _ = step(state, put(_batch(0)), put(fb))
  s2, _ = step(state, put(_batch(0)), put(fb_other))
  differs = lambda x, y: any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(x), jax.tree.leaves(y)))
  assert differs(s1.designer.params, s2.designer.params)
  assert differs(s1.params, s2.params)  # different feedback => different φ => different learner step
  # Same designer => same learner update, whatever the feedback: at a non-meta step (3) the
  # feedback batch is not even read.
  s3, _ = step(s1, put(_batch(1)), put(fb_other))
  s4, _ = step(s1, put(_batch(1)), put(fb))
  for a, b in zip(jax.tree.leaves(s3.params), jax.tree.leaves(s4.params)):
    np.testing.assert_array_equal(a, b)


def test_learner_gradient_is_not_a_function_of_the_downstream_loss():
  """d(learner params after the step)/d(feedback loss mask) is exactly zero when φ is held fixed."""
  state, step, put = _step_setup(designer_lr=0.0)
  state = _at_meta_step(state, step, put)
  fb = put(_batch(100))
  fn = lambda mask: step(state, put(_batch(0)), {**fb, "loss_mask": mask})[0].params
  _, vjp = jax.vjp(fn, fb["loss_mask"])
  (cotangent_mask,) = vjp(jax.tree.map(jnp.ones_like, state.params))
  np.testing.assert_array_equal(np.asarray(cotangent_mask), 0.0)


@pytest.mark.slow  # three step programs compiled
def test_random_feedback_is_a_control_of_the_designer_not_a_mode_of_its_own():
  """vpt.feedback_direction='random' with the designer ('value') is the older mode 'random_feedback',
  bit for bit; it replaces g_down (the value changes, g_down's norm stays) and nothing else."""
  runs = {}
  for name, mode, direction in [("feedback", "value", "feedback"), ("random", "value", "random"),
                                ("old_name", "random_feedback", "feedback")]:
    state, step, put = _step_setup(mode=mode, feedback_direction=direction)
    state, metrics = step(state, put(_batch(0)), put(_batch(100)))  # step 0: a meta step
    runs[name] = jax.device_get((state, metrics))
  for a, b in zip(jax.tree.leaves(runs["random"]), jax.tree.leaves(runs["old_name"])):
    np.testing.assert_array_equal(a, b)
  true_m, random_m = runs["feedback"][1], runs["random"][1]  # the same θ, g_down replaced
  np.testing.assert_allclose(random_m["meta/g_down_norm"], true_m["meta/g_down_norm"], rtol=1e-6)
  assert float(random_m["meta/value"]) != float(true_m["meta/value"])
  with pytest.raises(core_config.ConfigError, match="config.vpt.feedback_direction='random': expected 'feedback' "
                                                    "with vpt.mode='ntp'"):
    config_lib.validate(vpt_config("nano,value", **{"vpt.mode": "ntp", "vpt.feedback_direction": "random"}))


@pytest.mark.parametrize("mesh_sizes", [(2, 2, 2), (4, 2, 1)])
def test_sharded_vpt_step_matches_single_device(mesh_sizes):
  results = []
  for sizes in [(1, 1, 1), mesh_sizes]:
    state, step, put = _step_setup(mesh_sizes=sizes)
    for i in range(3):  # steps 0 and 2 are meta steps
      state, m = step(state, put(_batch(i)), put(_batch(100 + i)))
    results.append((jax.device_get(state), float(m["loss"]), float(m["meta/value"])))
  (ref, loss_ref, v_ref), (got, loss, v) = results
  np.testing.assert_allclose(loss, loss_ref, rtol=1e-5)
  np.testing.assert_allclose(v, v_ref, rtol=1e-4)
  for a, b in zip(jax.tree.leaves((got.params, got.designer.params)), jax.tree.leaves((ref.params, ref.designer.params))):
    np.testing.assert_allclose(a, b, atol=3e-5)


@pytest.mark.slow
def test_host_dispatched_programs_equal_the_single_cond_program(x64):
  """vpt.dispatch='host': the loop runs make_vpt_train_step(meta=True) on meta steps and (meta=False)
  otherwise; over two meta and two plain steps (meta every 2, a moving designer) they equal the lax.cond
  program. float64 compute and state: Adam's first designer step is ≈ lr·sign(g), which float32
  rounding can flip where g ≈ 0; the two programs are fused apart, so they agree to float64 rounding.
  Metrics are reported in float32 (their rounding: rtol 2^-23)."""
  vcfg = config_lib.vpt_config()
  vcfg.mode, vcfg.top_k, vcfg.meta_every = "value", K, 2
  vcfg.designer.d_model, vcfg.designer.n_layers, vcfg.designer.n_heads, vcfg.designer.d_ff = 16, 1, 2, 32
  vcfg.designer.learning_rate = 1e-2
  model = Transformer(LMConfig(vocab_size=VOCAB, d_model=32, n_layers=3, n_heads=4, n_kv_heads=2, d_ff=64,
                               dtype="float64"))
  opt_cfg = config_lib.base_config().optimizer
  optimizer, schedule = make_optimizer(opt_cfg, 20)
  f64 = lambda tree: jax.tree.map(lambda x: x.astype(jnp.float64) if jnp.issubdtype(x.dtype, jnp.floating) else x,
                                  tree)
  state = init_train_state(model, optimizer, SEQ, seed=0)
  designer = TaskDesigner(DesignerConfig.from_config(vcfg))
  state = state.replace(designer=init_designer_state(designer, make_designer_optimizer(vcfg), state.params, SEQ, K,
                                                     seed=0))
  start = state.replace(params=f64(state.params), opt_state=f64(state.opt_state),
                        designer=state.designer.replace(params=f64(state.designer.params),
                                                        opt_state=f64(state.designer.opt_state)))
  cond = jax.jit(make_vpt_train_step(model, optimizer, schedule, vcfg, opt_cfg))
  host = {m: jax.jit(make_vpt_train_step(model, optimizer, schedule, vcfg, opt_cfg, meta=m)) for m in (True, False)}
  a = b = start
  without_metrics = lambda st: st.replace(designer=st.designer.replace(last_meta=None))
  for i in range(4):
    batch, fb = _batch(50 + i), _batch(150 + i)
    a, ma = cond(a, batch, fb)
    b, mb = host[i % 2 == 0](b, batch, fb)
    for x, y in zip(jax.tree.leaves(without_metrics(a)), jax.tree.leaves(without_metrics(b))):
      assert x.dtype == y.dtype and x.dtype != np.float32
      np.testing.assert_allclose(x, y, rtol=1e-10, atol=1e-14)  # float64 rounding; atol: exact-zero gradients
    for k in ma:
      np.testing.assert_allclose(ma[k], mb[k], rtol=2**-23, atol=1e-30, err_msg=k)
  assert not all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(start.designer.params),
                                                      jax.tree.leaves(b.designer.params)))  # the designer moved


@pytest.mark.slow
def test_host_dispatch_runs_the_loop_with_two_programs(tmp_path):
  """vpt.dispatch='host' through train.run: the plain and the meta program both run (the designer moves,
  the meta steps are timed apart), and the run resumes from its own checkpoint as any other."""
  config = vpt_config("nano,value", num_steps=12, eval_batches=1, **{"vpt.dispatch": "host", "vpt.meta_every": 2,
                                                                      "log_every_steps": 4})
  summary = train.run(config, str(tmp_path), stop_after=5)
  assert summary["preempted"] and summary["step"] == 5
  summary = train.run(config, str(tmp_path))
  assert summary["start_step"] == 5 and summary["step"] == 12 and not summary["preempted"]
  assert np.isfinite(summary["train"]["meta/value"]) and summary["train"]["meta/value"] != 0.0
  # Steps 5 and 6 compile the plain and the meta program (not timed); meta steps 8 and 10 are timed apart.
  assert summary["train"]["meta_time_fraction"] >= 0.0


@pytest.mark.slow
def test_alpha_zero_reproduces_the_ntp_baseline_exactly(tmp_path):
  ntp = train.run(vpt_config("nano,ntp", num_steps=12), str(tmp_path / "ntp"))
  zero = train.run(vpt_config("nano,value", num_steps=12, **{"vpt.alpha_max": 0.0}), str(tmp_path / "zero"))
  assert float(zero["train"]["alpha_max"]) == 0.0
  for a, b in zip(jax.tree.leaves(jax.device_get(ntp["state"].params)),
                  jax.tree.leaves(jax.device_get(zero["state"].params))):
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)
  assert abs(ntp["eval"]["loss"] - zero["eval"]["loss"]) < 1e-5


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["value_cosine", "random_feedback", "uniform_topk", "self_distill"])
def test_every_ablation_runs_end_to_end(tmp_path, variant):
  summary = train.run(vpt_config(f"nano,{variant}", num_steps=8, eval_batches=1), str(tmp_path))
  assert np.isfinite(summary["train"]["loss"]) and np.isfinite(summary["eval"]["feedback_loss"])
  if variant in ("uniform_topk", "self_distill"):
    np.testing.assert_allclose(summary["train"]["alpha_mean"], 0.25, rtol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("extra", [{}, {"vpt.g_down_average": 0.9, "vpt.burn_in_steps": 6}],
                         ids=["plain", "g_down_average"])
def test_resume_between_meta_steps_equals_uninterrupted(tmp_path, extra):
  # With a running g_down average (meta steps 8, 12, …) the resumed run continues the same average.
  steps = 40
  args = [f"--config={REPO}/experiments/lm_vpt.py:nano,value", "--config.num_steps=40", "--config.log_every_steps=1",
          "--config.checkpoint.every_steps=1000", "--config.progress_bar=False", "--config.mesh.num_devices=1",
          "--config.vpt.meta_every=4", *(f"--config.{k}={v}" for k, v in extra.items())]
  workdir = tmp_path / "interrupted"
  code, out = preempt_run(args, workdir, 9, cwd=REPO)  # after step 9 (meta steps are 0, 4, 8, 12, ...)
  assert code == 143, out
  overrides = {"num_steps": steps, "log_every_steps": 1, "checkpoint.every_steps": 1000, "vpt.meta_every": 4, **extra}
  resumed = train.run(vpt_config("nano,value", **overrides), str(workdir))
  assert 9 <= resumed["start_step"] < steps
  straight = train.run(vpt_config("nano,value", **overrides), str(tmp_path / "straight"))
  for a, b in zip(jax.tree.leaves(jax.device_get((resumed["state"].params, resumed["state"].designer))),
                  jax.tree.leaves(jax.device_get((straight["state"].params, straight["state"].designer)))):
    np.testing.assert_array_equal(a, b)
  if extra:
    assert all(np.any(np.asarray(x)) for x in jax.tree.leaves(jax.device_get(resumed["state"].designer.g_down_avg)))
