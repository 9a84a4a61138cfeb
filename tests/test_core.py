"""vpt.core: the meta schedule, the meta-or-skip dispatch, the alignment bookkeeping and the loop,
against explicit references (float64 where it is arithmetic) and a toy task."""

import os
import signal

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vpt.core import alignment, loop, meta


@pytest.mark.parametrize("burn_in,every", [(0, 1), (0, 4), (6, 4), (8, 4)])
def test_meta_schedule_on_host_and_device(burn_in, every):
  steps = np.arange(40)
  expected = [s for s in steps if s >= burn_in and s % every == 0]
  assert [s for s in steps if meta.is_meta_step(int(s), burn_in, every)] == expected
  traced = jax.jit(lambda s: meta.is_meta_step(s, burn_in, every))(jnp.asarray(steps))
  assert list(steps[np.asarray(traced)]) == expected
  # n counts the meta steps so far, this one included: 1, 2, 3, … at the meta steps.
  assert [int(meta.meta_index(s, burn_in, every)) for s in expected] == list(range(1, len(expected) + 1))


def _tree(seed, scale=1.0):
  rng = np.random.default_rng(seed)
  return {"a/kernel": jnp.asarray(scale * rng.standard_normal((3, 4))), "b/bias": jnp.asarray(rng.standard_normal(5))}


@pytest.mark.parametrize("is_meta", [True, False])
def test_record_alignment_is_the_explicit_cosine_on_meta_steps_only(x64, is_meta):
  g_down, g_pre = _tree(0), _tree(1, scale=3.0)
  last = {"cosine": jnp.asarray(0.25, jnp.float32), "g_pre_norm": jnp.asarray(7.0, jnp.float32), "value": 1.0}
  out = meta.record_alignment(last, jnp.asarray(is_meta), g_down, g_pre)
  flat = lambda t: np.concatenate([np.asarray(t[k], np.float64).ravel() for k in sorted(t)])
  d, p = flat(g_down), flat(g_pre)
  cos, norm = (d @ p / (np.linalg.norm(d) * np.linalg.norm(p)), np.linalg.norm(p)) if is_meta else (0.25, 7.0)
  np.testing.assert_allclose(float(out["cosine"]), cos, rtol=1e-6)  # stored as float32
  np.testing.assert_allclose(float(out["g_pre_norm"]), norm, rtol=1e-6)
  assert out["value"] == 1.0 and out["cosine"].dtype == jnp.float32


def test_meta_or_skip_in_one_program_equals_the_host_dispatched_programs():
  x = jnp.arange(6.0)
  run, skip = (lambda: (x * 2.0, jnp.sum(x))), (lambda: (x, jnp.zeros(())))
  for is_meta in (True, False):
    (a, b), flag = jax.jit(lambda m: meta.meta_or_skip(None, m, run, skip))(jnp.asarray(is_meta))
    (c, d), flag2 = meta.meta_or_skip(is_meta, None, run, skip)
    np.testing.assert_array_equal(a, c)
    np.testing.assert_array_equal(b, d)
    assert bool(flag) == bool(flag2) == is_meta


def test_value_jvp_equals_the_double_backward_reference(x64):
  """⟨g_down, ∇_S L⟩ and its gradient in the task's parameter φ: forward-over-reverse == nested grad."""
  subset, g_down = _tree(2), _tree(3)
  target = _tree(4)

  def loss_of(phi):
    return lambda s: sum(jnp.sum(jnp.tanh(phi * s[k]) * target[k]) for k in s)

  v_jvp = lambda phi: alignment.value_jvp(loss_of(phi), subset, g_down)[1]
  v_ref = lambda phi: alignment.reference_value(loss_of(phi), subset, g_down)
  np.testing.assert_allclose(v_jvp(0.7), v_ref(0.7), rtol=1e-12)
  np.testing.assert_allclose(jax.grad(v_jvp)(0.7), jax.grad(v_ref)(0.7), rtol=1e-12)


def test_split_params_takes_the_last_blocks_and_the_tail():
  params = {f"layers_{i}": {"w": jnp.ones(2) * i} for i in range(4)}
  params.update(embed={"e": jnp.ones(2)}, norm={"scale": jnp.ones(2)})
  subset, rest = alignment.split_params(params, 4, 2)
  assert sorted(subset) == ["layers_2/w", "layers_3/w", "norm/scale"]
  assert sorted(rest) == ["embed/e", "layers_0/w", "layers_1/w"]
  assert alignment.merge_params(subset, rest).keys() == params.keys()
  assert sorted(alignment.split_params(params, 4, 0)[0]) == sorted([*subset, *rest])  # n = 0: everything
  assert all(not np.any(v) for v in alignment.subset_zeros(params, 4, 2).values())


# ----------------------------------------------------------------------------- the loop, on a toy task


@flax.struct.dataclass
class _State:
  step: jax.Array
  w: jax.Array


def _start():
  return _State(step=jnp.int32(0), w=jnp.float32(0.0))


class _Saves:
  def __init__(self):
    self.steps = []

  def save(self, step, state, iterators, force):
    assert force and iterators == {}
    self.steps.append((step, float(state.w)))


class _Writer:
  def __init__(self):
    self.rows = []

  def write_scalars(self, step, scalars, prefix):
    self.rows.append((prefix, step))


def _toy_run(state, start, num_steps, stop_after=None, kill_at=None):
  """w ← 0.5·w + x_step (x_step = step + 1); every 3rd step a 'meta' program (w ← w − 1 on top)."""
  plain = jax.jit(lambda s, x: (_State(s.step + 1, 0.5 * s.w + x), {"loss": s.w}))
  meta_program = jax.jit(lambda s, x: (_State(s.step + 1, 0.5 * s.w + x - 1.0), {"loss": s.w}))
  evals, saves, writer = [], _Saves(), _Writer()

  def next_step(step):
    if step == kill_at:
      os.kill(os.getpid(), signal.SIGTERM)  # the loop's handler turns it into a stop after this step
    is_meta = step % 3 == 0
    return loop.StepCall(is_meta, meta_program if is_meta else plain, (jnp.float32(step + 1),), is_meta)

  def evaluate(st, step):
    evals.append(step)
    return {"w": float(st.w)} if step % 2 == 0 else None

  result = loop.run_loop(state, start, loop.Schedule(num_steps, 3, 4, 5, stop_after), next_step=next_step,
                         evaluate=evaluate, rates=lambda n, s: {"steps_counted": n}, progress_fields=lambda h: {},
                         checkpointer=saves, iterators={}, writer=writer, show_progress=False)
  return result, evals, saves.steps, writer.rows


@pytest.mark.parametrize("how", ["stop_after", "sigterm"])
def test_loop_stops_saves_once_and_resumes_to_the_uninterrupted_result(how):
  straight, evals, saves, rows = _toy_run(_start(), 0, 12)
  assert straight.step == 12 and not straight.preempted
  assert [s for s, _ in saves] == [5, 10, 12] and evals == [4, 8, 12]
  assert [r for r in rows if r[0] == "train"] == [("train", 3), ("train", 6), ("train", 9), ("train", 12)]
  assert [r for r in rows if r[0] == "eval"] == [("eval", 4), ("eval", 8), ("eval", 12)]  # 8, 12: even steps
  assert straight.last_eval == {"w": float(straight.state.w)}
  w = 0.0
  for s in range(12):
    w = 0.5 * w + (s + 1) - (1.0 if s % 3 == 0 else 0.0)
  assert float(straight.state.w) == pytest.approx(w, rel=1e-6) and int(straight.state.step) == 12
  # Timed: every step but each program's first call (its compile); meta steps 3, 6, 9 (0 compiled).
  assert straight.timer.steps == 10 and straight.timer.meta_steps == 3

  kw = {"stop_after": 7} if how == "stop_after" else {"kill_at": 6}
  stopped, _, saves, _ = _toy_run(_start(), 0, 12, **kw)
  assert stopped.preempted and stopped.step == 7 and [s for s, _ in saves] == [5, 7]  # one save at the stop
  resumed, evals, saves, _ = _toy_run(stopped.state, 7, 12)
  assert [s for s, _ in saves] == [10, 12] and evals == [8, 12] and not resumed.preempted
  assert float(resumed.state.w) == float(straight.state.w)


def test_the_core_imports_no_modality():
  """vpt.core knows the method, not tokens or pixels: importing it loads no language or vision module."""
  import subprocess  # noqa: PLC0415
  import sys  # noqa: PLC0415
  code = ("import sys; import vpt.core.alignment, vpt.core.meta, vpt.core.loop, vpt.core.step, vpt.core.tasks, "
          "vpt.core.checkpoint, vpt.core.run_dir, vpt.core.sharding, vpt.core.optim, vpt.core.metrics; "
          "print(' '.join(m for m in sys.modules if m.startswith('vpt.')))")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                       cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  loaded = set(out.stdout.split())
  modality = {m for m in loaded if m.startswith(("vpt.language", "vpt.vision"))}
  assert "vpt.core.loop" in loaded and not modality, modality


def test_every_registered_task_supplies_the_entry_points_main_runs():
  import ml_collections  # noqa: PLC0415
  from vpt.core import tasks  # noqa: PLC0415
  assert tasks.task_name(ml_collections.ConfigDict({})) == "language"  # configs written before the field
  with pytest.raises(ValueError, match=r"config.task='audio': expected one of \['language', 'vision'\] or an "
                                       r"importable task module \(No module named 'audio'\)"):
    tasks.task_module(ml_collections.ConfigDict({"task": "audio"}))
  with pytest.raises(ValueError, match=r"config.task='vpt.core.meta': module vpt.core.meta lacks \['main_run', 'run'\]"):
    tasks.task_module(ml_collections.ConfigDict({"task": "vpt.core.meta"}))
  with pytest.raises(ValueError, match=r"config.task='no such task'"):
    tasks.task_name(ml_collections.ConfigDict({"task": "no such task"}))
  for name in tasks.TASKS:
    module = tasks.task_module(ml_collections.ConfigDict({"task": name}))
    assert callable(module.main_run) and callable(module.run), name
