"""A third task, defined entirely in this file, trained through vpt.core: the core is the method, not
language or vision. (The one thing it asked of the core: `alignment.subset_zeros` takes the `tail` that
`split_params` already took — the language and vision learners both end in `norm`, this one in `out`.)

The task: a regression learner f_θ(x) (two tanh blocks `layers_0`, `layers_1` and a linear `out`)
continues a self-supervised task on unlabeled x — predict t(x) = x₀ + x₁ — whose designer reweights
the examples, L_pre(θ; φ) = mean_i w_φ(x_i) (f_θ(x_i) − t(x_i))², w_φ(x) = 2σ(a·x + c). The feedback
set is labeled with the downstream target y = x₀ − x₁ (a mismatch: the stream's target is not the
downstream's). Every `meta_every` steps the designer takes one step on −V(φ), V = ⟨g_down, ∇_S L_pre⟩
by one JVP (vpt.core.alignment), S = the last block and `out`; the learner steps on L_pre with the
designer's weights held constant. The test writes those two updates (a vpt.core.step.StepTask) and the
entry points `run` / `main_run` (vpt.core.tasks); the core supplies everything else: the step's order,
the schedule, the dispatch, the alignment bookkeeping, the designer's state and optimizer, the loop,
orbax checkpoints, preemption — and `python -m vpt.main` runs it from an experiment config.
"""

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from vpt.core import alignment, checkpoint as ckpt_lib, loop, meta, step as core_step

D, H, BATCH, META_EVERY, TAIL = 4, 8, 16, 2, ("out/",)


@flax.struct.dataclass
class State:
  step: jax.Array
  params: dict
  opt_state: optax.OptState
  designer: meta.DesignerState
  rng: jax.Array


def forward(params, x):
  h = jnp.tanh(x @ params["layers_0"]["w"] + params["layers_0"]["b"])
  h = jnp.tanh(h @ params["layers_1"]["w"] + params["layers_1"]["b"])
  return h @ params["out"]["w"]


def weights(phi, x):
  return 2.0 * jax.nn.sigmoid(x @ phi["a"] + phi["c"])


def ssl_loss(params, x, w):
  return jnp.mean(w * (forward(params, x) - (x[:, 0] + x[:, 1])) ** 2)


def downstream_loss(params, batch):
  return jnp.mean((forward(params, batch["x"]) - batch["y"]) ** 2)


LEARNER_OPT = optax.adam(3e-2)


def init(seed=0, designer_lr=3e-2) -> State:
  k = jax.random.split(jax.random.PRNGKey(seed), 4)
  params = {"layers_0": {"w": jax.random.normal(k[0], (D, H)) / np.sqrt(D), "b": jnp.zeros(H)},
            "layers_1": {"w": jax.random.normal(k[1], (H, H)) / np.sqrt(H), "b": jnp.zeros(H)},
            "out": {"w": jax.random.normal(k[2], (H,)) / np.sqrt(H)}}
  phi = {"a": jnp.zeros(D), "c": jnp.zeros(())}
  designer_opt = meta.designer_optimizer(designer_lr, 1.0, 0.0)
  last = {n: jnp.zeros((), jnp.float32) for n in ("value", "cosine", "g_pre_norm")}
  return State(step=jnp.zeros((), jnp.int32), params=params, opt_state=LEARNER_OPT.init(params),
               designer=meta.DesignerState(params=phi, opt_state=designer_opt.init(phi), last_meta=last), rng=k[3])


def make_step(designer_lr=3e-2, dispatch=None):
  designer_opt = meta.designer_optimizer(designer_lr, 1.0, 0.0)

  def meta_update(state, x, feedback):
    subset, rest = alignment.split_params(state.params, 2, 1, tail=TAIL)
    full = lambda s: alignment.merge_params(s, rest)
    g_down = jax.lax.stop_gradient(jax.grad(lambda s: downstream_loss(full(s), feedback))(subset))  # labels: here only

    def objective(phi):
      _, value = alignment.value_jvp(lambda s: ssl_loss(full(s), x, weights(phi, x)), subset, g_down)
      return -value, value

    (_, value), grads = jax.value_and_grad(objective, has_aux=True)(state.designer.params)
    updates, opt_state = designer_opt.update(grads, state.designer.opt_state, state.designer.params)
    last = {**state.designer.last_meta, "value": value.astype(jnp.float32)}
    return {"designer": state.designer.replace(params=optax.apply_updates(state.designer.params, updates),
                                               opt_state=opt_state, last_meta=last)}, g_down

  def learner_update(state, x, feedback):
    del feedback  # the learner never reads the labels
    w = jax.lax.stop_gradient(weights(state.designer.params, x))  # the designer's task, detached
    loss, grads = jax.value_and_grad(ssl_loss)(state.params, x, w)
    updates, opt_state = LEARNER_OPT.update(grads, state.opt_state, state.params)
    new = state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates), opt_state=opt_state)
    return new, {"loss": loss}, grads

  step = core_step.make_train_step(core_step.StepTask(
      learner_update=learner_update, is_meta_step=lambda step: meta.is_meta_step(step, 0, META_EVERY),
      meta_update=meta_update,
      on_subset=lambda grads: alignment.split_params(grads, 2, 1, tail=TAIL)[0],
      subset_zeros=lambda state: alignment.subset_zeros(state.params, 2, 1, tail=TAIL)), dispatch)
  return jax.jit(step)


def batches(step: int, relabel: bool = False):
  """The step's unlabeled batch and labeled feedback batch: a function of the step alone (the feeds
  need no checkpoint). `relabel` changes the labels only."""
  kx, kf = jax.random.split(jax.random.fold_in(jax.random.PRNGKey(7), step))
  x, xf = jax.random.normal(kx, (BATCH, D)), jax.random.normal(kf, (BATCH, D))
  y = xf[:, 0] - xf[:, 1]
  return x, {"x": xf, "y": -3.0 * y + 1.0 if relabel else y}


def train(workdir, num_steps, stop_after=None, dispatch=None):
  checkpointer = ckpt_lib.Checkpointer(str(workdir), keep=2, async_save=False, iterator_names=())
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = ckpt_lib.abstract_like(jax.eval_shape(init), jax.tree.map(lambda _: device, jax.eval_shape(init)))
  state, _ = checkpointer.restore_latest(abstract, {})
  state = init() if state is None else state
  programs = {m: make_step(dispatch=m) for m in ((None,) if dispatch is None else (False, True))}

  def next_step(step):
    is_meta = bool(meta.is_meta_step(step, 0, META_EVERY))
    key = meta.program_key(programs, is_meta)
    return loop.StepCall(key, programs[key], batches(step), is_meta)

  held_out = batches(10_000)[1]
  result = loop.run_loop(
      state, int(state.step), loop.Schedule(num_steps, 2, 4, 3, stop_after), next_step=next_step,
      evaluate=lambda st, _: {"downstream_mse": float(downstream_loss(st.params, held_out))},
      rates=lambda n, s: {}, progress_fields=lambda host: {}, checkpointer=checkpointer, iterators={},
      writer=_NoWriter(), show_progress=False)
  checkpointer.close()
  return result


def run(config, workdir, stop_after=None):
  """The task's entry points (vpt.core.tasks): what `python -m vpt.main` calls for `c.task = "test_third_task"`."""
  return train(workdir, config.num_steps, stop_after=stop_after, dispatch=config.dispatch)


def main_run(config, workdir):
  result = run(config, workdir)
  return {"step": result.step, "preempted": result.preempted}


class _NoWriter:
  def write_scalars(self, step, scalars, prefix):
    del step, scalars, prefix


def _leaves(state):
  return jax.tree.leaves(jax.device_get(state.replace(rng=jnp.zeros(()))))


@pytest.mark.parametrize("dispatch", [None, "host"], ids=["cond", "host"])
def test_the_third_task_trains_checkpoints_and_resumes_bit_exactly(tmp_path, dispatch):
  straight = train(tmp_path / "straight", 10, dispatch=dispatch)
  stopped = train(tmp_path / "stopped", 10, stop_after=5, dispatch=dispatch)  # between meta steps 4 and 6
  assert stopped.preempted and stopped.step == 5
  resumed = train(tmp_path / "stopped", 10, dispatch=dispatch)
  assert not resumed.preempted and resumed.step == 10
  for a, b in zip(_leaves(straight.state), _leaves(resumed.state)):
    np.testing.assert_array_equal(a, b)
  # The meta steps ran: the designer moved, its value and the alignment were recorded.
  assert not np.allclose(np.asarray(straight.state.designer.params["a"]), 0.0)
  assert straight.last_train["meta/value"] != 0.0 and straight.last_train["meta/g_pre_norm"] > 0.0
  assert np.isfinite(straight.last_eval["downstream_mse"])


def test_the_third_task_sharded_over_8_devices_equals_one_device(x64):
  """Data parallel through the core's step: the unlabeled and the feedback batch split over 8 devices,
  the state replicated; 6 steps (3 meta steps) equal the one-device run in float64. Only the order of
  the batch reductions differs (ε = 2.2e-16 per operation), so rtol 1e-10 leaves four orders to spare."""
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P  # noqa: PLC0415
  mesh = Mesh(np.array(jax.devices()[:8]), ("data",))
  rows, replicated = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
  step = make_step()
  one, sharded = jax.device_put(init(), jax.devices()[0]), jax.device_put(init(), replicated)
  for t in range(6):
    x, feedback = batches(t)
    one, _ = step(one, x, feedback)
    sharded, _ = step(sharded, jax.device_put(x, rows), jax.device_put(feedback, rows))
  assert len(sharded.params["out"]["w"].sharding.device_set) == 8
  assert not np.allclose(np.asarray(one.designer.params["a"]), 0.0)  # the meta steps ran
  for a, b in zip(_leaves(one), _leaves(sharded)):
    np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-13)


def test_the_labels_reach_the_learner_only_through_the_designer():
  """Isolation on the third task: with φ frozen (designer learning rate 0) the learner's update is the
  same whatever the feedback labels; with φ learning, the labels change φ and through it the learner."""
  x, feedback = batches(0)  # step 0 is a meta step
  _, relabeled = batches(0, relabel=True)
  frozen = make_step(designer_lr=0.0)
  a, _ = frozen(init(designer_lr=0.0), x, feedback)
  b, _ = frozen(init(designer_lr=0.0), x, relabeled)
  for u, v in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params)):
    np.testing.assert_array_equal(u, v)
  learning = make_step()
  a, _ = learning(init(), x, feedback)
  b, _ = learning(init(), x, relabeled)
  assert not np.array_equal(a.designer.params["a"], b.designer.params["a"])
  assert any(not np.array_equal(u, v) for u, v in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params)))


def test_the_third_task_runs_from_the_command_line_as_a_module_named_by_its_config(tmp_path):
  """A new modality is a module plus an experiment config: `vpt.main` imports config.task by its dotted
  path and trains it — nothing registered, nothing in vpt changed."""
  import os  # noqa: PLC0415
  import subprocess  # noqa: PLC0415
  import sys  # noqa: PLC0415
  config = tmp_path / "third.py"
  config.write_text("import ml_collections\n\n\ndef get_config():\n"
                    "  return ml_collections.ConfigDict({'task': 'test_third_task', 'num_steps': 4, 'dispatch': 'host'})\n")
  env = {**os.environ, "JAX_PLATFORMS": "cpu",
         "PYTHONPATH": os.pathsep.join([os.path.dirname(os.path.abspath(__file__)), os.environ.get("PYTHONPATH", "")])}
  out = subprocess.run([sys.executable, "-m", "vpt.main", f"--config={config}", f"--workdir={tmp_path / 'run'}"],
                       capture_output=True, text=True, env=env, timeout=600)
  assert out.returncode == 0, out.stderr[-2000:]
  assert sorted(p.name for p in (tmp_path / "run").iterdir() if p.name.isdigit())[-1] == "4"
  config.write_text(config.read_text().replace("test_third_task", "test_fourth_task"))
  out = subprocess.run([sys.executable, "-m", "vpt.main", f"--config={config}", f"--workdir={tmp_path / 'run2'}"],
                       capture_output=True, text=True, env=env, timeout=600)
  assert out.returncode == 1 and "Invalid config: config.task='test_fourth_task'" in out.stderr, out.stderr[-2000:]
