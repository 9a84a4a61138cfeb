"""Resume never loses a run: a changed config stops before touching anything (or, opted in, restarts
with the old checkpoints kept), only damaged checkpoints are set aside, storage/memory errors propagate,
a failed start leaves the run's config.json alone, and SIGTERM on a checkpoint step saves once."""

import errno
import json
import os
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import preempt_run

from vpt.core import checkpoint as ckpt_lib, config as core_config, metrics
from vpt.language import train
from vpt.vision import train as train_vision

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ----------------------------------------------------------------------------- Checkpointer


def _state(n: int, fill: float = 0.0):
  """w[0] = fill; the rest random (incompressible: large w is stored in the data files)."""
  w = np.random.default_rng(0).standard_normal(n).astype(np.float32)
  w[0] = fill
  return {"w": jnp.asarray(w), "b": jnp.zeros((2,), jnp.int32)}


def _abstract(n: int):
  sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), _state(n))


def _checkpointer(directory):
  return ckpt_lib.Checkpointer(str(directory), keep=5, async_save=False, iterator_names=())


def _listing(directory):
  return sorted(os.listdir(directory))


def test_changed_structure_stops_before_touching_anything(tmp_path):
  ck = _checkpointer(tmp_path)
  for step in (1, 2):
    ck.save(step, _state(4, step), {})
  before = _listing(tmp_path)
  with pytest.raises(ckpt_lib.CheckpointMismatchError) as e:
    ck.restore_latest(_abstract(8), {}, config_note="Config keys changed: model.d_model: 4 → 8")
  message = str(e.value)
  assert "w: checkpoint float32[4], this run float32[8]" in message
  assert "model.d_model: 4 → 8" in message and "on_mismatch=restart" in message
  assert _listing(tmp_path) == before  # nothing renamed, nothing deleted
  # ... and the run with the original structure still resumes from the newest step.
  state, step = _checkpointer(tmp_path).restore_latest(_abstract(4), {})
  assert step == 2 and float(state["w"][0]) == 2.0


def test_dtype_and_missing_fields_are_mismatches(tmp_path):
  ck = _checkpointer(tmp_path)
  ck.save(1, _state(4), {})
  abstract = {**_abstract(4), "b": jax.ShapeDtypeStruct((2,), jnp.float32), "extra": jax.ShapeDtypeStruct((3,),
                                                                                                        jnp.float32)}
  with pytest.raises(ckpt_lib.CheckpointMismatchError, match=r"b: checkpoint int32\[2\], this run float32\[2\]"):
    ck.restore_latest(abstract, {})
  with pytest.raises(ckpt_lib.CheckpointMismatchError, match="extra: not in the checkpoint"):
    ck.restore_latest(abstract, {})
  with pytest.raises(ValueError, match="on_mismatch='bogus'"):
    ck.restore_latest(_abstract(4), {}, on_mismatch="bogus")
  assert _listing(tmp_path) == ["1"]


def test_restart_keeps_the_old_checkpoints_under_unique_names(tmp_path):
  ck = _checkpointer(tmp_path)
  for step in (1, 2):
    ck.save(step, _state(4), {})
  assert ck.restore_latest(_abstract(8), {}, on_mismatch="restart") == (None, None)
  assert _listing(tmp_path) == ["1.replaced", "2.replaced"]
  ck.save(2, _state(8), {})  # the restarted run re-saves step 2; switching back restarts again
  assert ck.restore_latest(_abstract(4), {}, on_mismatch="restart") == (None, None)
  assert _listing(tmp_path) == ["1.replaced", "2.replaced", "2.replaced.1"]
  assert ck.all_steps() == []


def _damage_metadata(step_dir):
  os.remove(os.path.join(step_dir, "state", "_METADATA"))


def _damage_arrays(step_dir):
  """Truncates the array data files, leaving the (matching) metadata readable."""
  data = os.path.join(step_dir, "state", "ocdbt.process_0", "d")
  for f in os.listdir(data):
    with open(os.path.join(data, f), "wb") as fh:
      fh.write(b"garbage")


@pytest.mark.parametrize("damage", [_damage_metadata, _damage_arrays])
def test_damaged_checkpoint_is_set_aside_twice_without_collision(tmp_path, damage):
  ck = _checkpointer(tmp_path)
  n = 1024  # 4 KiB of random floats: in the data files, not inline in the OCDBT manifest.
  ck.save(1, _state(n, 1.0), {})
  for _ in range(2):
    ck.save(2, _state(n, 2.0), {})
    damage(tmp_path / "2")
    state, step = ck.restore_latest(_abstract(n), {})
    assert step == 1 and float(state["w"][0]) == 1.0
  assert _listing(tmp_path) == ["1", "2.unreadable", "2.unreadable.1"]


@pytest.mark.parametrize("error", [
    MemoryError("out of host memory"),
    OSError(errno.EIO, "Input/output error"),
    ConnectionResetError("peer reset"),
    ValueError("UNAVAILABLE: gcs: service unavailable"),
    RuntimeError("something unforeseen"),
])
def test_transient_and_unknown_restore_errors_propagate_and_touch_nothing(tmp_path, monkeypatch, error):
  ck = _checkpointer(tmp_path)
  for step in (1, 2):
    ck.save(step, _state(4), {})

  def fail(*args, **kwargs):
    raise error
  monkeypatch.setattr(ck.manager, "restore", fail)
  with pytest.raises(type(error)):
    ck.restore_latest(_abstract(4), {})
  assert _listing(tmp_path) == ["1", "2"]


def test_error_classification():
  damaged = [FileNotFoundError("x"), json.JSONDecodeError("bad", "{", 0),
             ValueError('DATA_LOSS: Error reading "a/0.0"'), ValueError("OUT_OF_RANGE: Requested byte range")]
  wrapped = Exception("Encountered error while reading array index")
  wrapped.__cause__ = ValueError("OUT_OF_RANGE: Requested byte range [0, 10) is not valid")
  for e in damaged + [wrapped]:
    assert ckpt_lib.is_damaged_checkpoint_error(e), e
  transient = Exception("Encountered error while reading array index")
  transient.__cause__ = ValueError("DEADLINE_EXCEEDED: gcs read timed out")
  for e in [transient, MemoryError(), PermissionError("denied"), TimeoutError(), ValueError("shapes differ")]:
    assert not ckpt_lib.is_damaged_checkpoint_error(e), e


# ----------------------------------------------------------------------------- the LM loop


def nano_config(**overrides):
  config = core_config.load_config_file(os.path.join(REPO, "experiments", "lm_ntp.py"), "nano")
  return core_config.with_overrides(config, {"progress_bar": False, "mesh.num_devices": 1, "num_steps": 2,
                                            "checkpoint.every_steps": 1, "eval_batches": 1, **overrides})


def _read(path):
  with open(path) as f:
    return json.load(f)


@pytest.mark.slow
def test_lm_resume_with_a_changed_config_stops_or_restarts_and_keeps_the_config_history(tmp_path):
  run = str(tmp_path)
  train.run(nano_config(), run)
  original = (tmp_path / "config.json").read_bytes()
  ckpts = tmp_path / "checkpoints"
  assert _listing(ckpts) == ["1", "2"]

  # A failed start (a missing corpus) leaves the run's config and checkpoints as they were.
  with pytest.raises(FileNotFoundError, match="nope.jsonl"):
    train.run(nano_config(**{"data.source": "jsonl", "data.train_path": str(tmp_path / "nope.jsonl")}), run)
  # A changed structure: an error naming the state fields and the config keys; nothing touched.
  with pytest.raises(ckpt_lib.CheckpointMismatchError) as e:
    train.run(nano_config(**{"model.d_model": 64}), run)
  assert "params/embed_tokens/embedding: checkpoint float32[" in str(e.value)
  assert "model.d_model: 32 → 64" in str(e.value) and "config.json" in str(e.value)
  with pytest.raises(ckpt_lib.CheckpointMismatchError, match="vpt.mode: 'ntp' → 'value'") as e:
    train.run(nano_config(**{"vpt.mode": "value"}), run)
  assert "designer/" in str(e.value)
  assert _listing(ckpts) == ["1", "2"] and _listing(tmp_path).count("config.json") == 1
  assert not any(n.startswith("config.") and n != "config.json" for n in _listing(tmp_path))
  assert (tmp_path / "config.json").read_bytes() == original

  # A compatible change (a longer schedule) resumes; its config is recorded beside the original.
  longer = train.run(nano_config(num_steps=3), run)
  assert longer["start_step"] == 2 and longer["step"] == 3
  assert (tmp_path / "config.json").read_bytes() == original
  assert _read(tmp_path / "config.1.json")["num_steps"] == 3
  train.run(nano_config(num_steps=3), run)  # the same config again: nothing new recorded
  assert not (tmp_path / "config.2.json").exists()

  # Opting in to start over keeps the old checkpoints; switching back restarts again without collisions.
  bigger = train.run(nano_config(num_steps=1, **{"model.d_model": 64, "checkpoint.on_mismatch": "restart"}), run)
  assert bigger["start_step"] == 0
  assert _listing(ckpts) == ["1", "1.replaced", "2.replaced", "3.replaced"]
  assert _read(tmp_path / "config.2.json")["model"]["d_model"] == 64
  train.run(nano_config(num_steps=1, **{"checkpoint.on_mismatch": "restart"}), run)
  assert _listing(ckpts) == ["1", "1.replaced", "1.replaced.1", "2.replaced", "3.replaced"]
  assert (tmp_path / "config.json").read_bytes() == original and (tmp_path / "config.3.json").exists()


def _params(summary):
  return jax.device_get(summary["state"].params)


@pytest.mark.slow
def test_lm_sigterm_on_a_checkpoint_step_saves_once_exits_143_and_resumes_exactly(tmp_path):
  """With a checkpoint every step, any SIGTERM lands on a checkpoint step: one save, exit 143."""
  steps, workdir = 30, tmp_path / "interrupted"
  overrides = {"num_steps": steps, "log_every_steps": 1, "checkpoint.every_steps": 1, "eval_every_steps": 1000}
  flags = [f"--config.{k}={v}" for k, v in {**overrides, "progress_bar": False, "mesh.num_devices": 1,
                                             "eval_batches": 1}.items()]
  code, out = preempt_run([f"--config={REPO}/experiments/lm_ntp.py:nano", *flags], workdir, 4, cwd=REPO)
  assert code == 143, out
  saved = max(int(d) for d in os.listdir(workdir / "checkpoints") if d.isdigit())
  assert 4 <= saved < steps and f"saving at step {saved}" in out, out

  resumed = train.run(nano_config(**overrides), str(workdir))
  assert resumed["start_step"] == saved and resumed["step"] == steps
  straight = train.run(nano_config(**overrides), str(tmp_path / "straight"))
  for a, b in zip(jax.tree.leaves(_params(resumed)), jax.tree.leaves(_params(straight))):
    np.testing.assert_array_equal(a, b)


# ----------------------------------------------------------------------------- the vision loop


def vision_config(**overrides):
  config = core_config.load_config_file(os.path.join(REPO, "experiments", "vision_dino.py"), "nano,dino")
  return core_config.with_overrides(config, {"progress_bar": False, "mesh.num_devices": 1, "num_steps": 4,
                                            "eval.num_train": 0, "log_every_steps": 1, **overrides})


@pytest.mark.slow
def test_vision_sigterm_on_a_checkpoint_step_saves_once_and_resumes_exactly(tmp_path, monkeypatch):
  """SIGTERM arrives while step 2 (a checkpoint step) is logged: the run saves step 2 once, stops as
  preempted (main exits 143) and the resumed run equals an uninterrupted one; a failed start in
  between leaves the run's config.json alone."""
  config = vision_config(**{"checkpoint.every_steps": 2})
  straight = train_vision.run(config, str(tmp_path / "straight"))
  write_scalars = metrics.MetricWriter.write_scalars

  def write_then_preempt(self, step, scalars, prefix=""):
    write_scalars(self, step, scalars, prefix=prefix)
    if step == 2 and prefix == "train":
      os.kill(os.getpid(), signal.SIGTERM)  # handled before the loop asks whether to stop
  with monkeypatch.context() as m:
    m.setattr(metrics.MetricWriter, "write_scalars", write_then_preempt)
    half = train_vision.run(config, str(tmp_path / "resumed"))
  assert half["preempted"] and half["step"] == 2
  assert sorted(os.listdir(tmp_path / "resumed" / "checkpoints")) == ["2"]
  original = (tmp_path / "resumed" / "config.json").read_bytes()

  with pytest.raises(ValueError, match="batch_size=12"):
    train_vision.run(vision_config(**{"mesh.num_devices": 8, "batch_size": 12}), str(tmp_path / "resumed"))
  resumed = train_vision.run(config, str(tmp_path / "resumed"))
  assert resumed["start_step"] == 2 and resumed["step"] == 4
  for name in ("student", "teacher", "center", "opt_state"):
    for x, y in zip(jax.tree.leaves(jax.device_get(getattr(resumed["state"], name))),
                    jax.tree.leaves(jax.device_get(getattr(straight["state"], name)))):
      np.testing.assert_array_equal(x, y, err_msg=name)
  assert (tmp_path / "resumed" / "config.json").read_bytes() == original
  assert [n for n in os.listdir(tmp_path / "resumed") if n.startswith("config")] == ["config.json"]


def test_a_checkpoint_from_before_the_designers_g_down_average_still_restores(tmp_path):
  """DesignerState gained `g_down_avg` (None without vpt.g_down_average): a V-Pretraining checkpoint
  written before the field (nested in TrainState.designer) restores with it None; a run that does
  average is told the checkpoint lacks it, and nothing is changed."""
  import flax.struct  # noqa: PLC0415
  from typing import Any  # noqa: PLC0415
  from vpt.language.steps import TrainState  # noqa: PLC0415
  from vpt.core.meta import DesignerState  # noqa: PLC0415

  @flax.struct.dataclass
  class DesignerBefore:  # DesignerState as it was
    params: Any
    opt_state: Any
    last_meta: dict

  w = {"layers_1": {"w": jnp.arange(6.0).reshape(2, 3)}}
  before = TrainState(step=jnp.asarray(9, jnp.int32), params=w, opt_state=({"mu": w}, jnp.zeros((), jnp.int32)),
                      rng=jnp.asarray([1, 2], jnp.uint32),
                      designer=DesignerBefore({"gate": jnp.ones(4)}, (jnp.zeros(()),), {"value": jnp.asarray(0.5)}))
  checkpointer = ckpt_lib.Checkpointer(str(tmp_path / "ckpt"), keep=2, iterator_names=())
  checkpointer.save(9, before, {}, force=True)
  checkpointer.close()
  now = before.replace(designer=DesignerState(**{f: getattr(before.designer, f) for f in ("params", "opt_state",
                                                                                         "last_meta")}))
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), now)
  restored, step = ckpt_lib.Checkpointer(str(tmp_path / "ckpt"), keep=2, iterator_names=()).restore_latest(abstract, {})
  assert step == 9 and isinstance(restored, TrainState) and isinstance(restored.designer, DesignerState)
  assert restored.designer.g_down_avg is None and jax.tree.structure(restored) == jax.tree.structure(now)
  for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(now)):
    np.testing.assert_array_equal(a, b)
  averaging = abstract.replace(designer=abstract.designer.replace(
      g_down_avg={"layers_1": {"w": jax.ShapeDtypeStruct((2, 3), jnp.float32)}}))
  with pytest.raises(ckpt_lib.CheckpointMismatchError, match="designer/g_down_avg"):
    ckpt_lib.Checkpointer(str(tmp_path / "ckpt"), keep=2, iterator_names=()).restore_latest(averaging, {})
  assert ckpt_lib.Checkpointer(str(tmp_path / "ckpt"), keep=2, iterator_names=()).all_steps() == [9]
