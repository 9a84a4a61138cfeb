"""Orbax checkpointing of the whole training state and the data iterator.

A checkpoint holds `state` (learner params, optimizer state, step, RNG and, for V-Pretraining,
the designer) and one item per data iterator (`data`, and `feedback` for V-Pretraining: the
grain iterators' positions, one file per process).
Saves are asynchronous; orbax writes into a temporary directory and renames it when complete,
so a checkpoint directory without the commit marker is never picked up.

Restore never throws a run away by mistake. Before reading any array, the newest checkpoint's
metadata tree (path, shape, dtype of every leaf) and items are compared with the state this config
builds: a difference (a changed model or designer size, another vpt.mode) is a CheckpointMismatchError
naming the fields, and nothing is touched — unless `checkpoint.on_mismatch='restart'`, which starts
over with every old checkpoint kept, renamed `<step>.replaced`. Only a checkpoint that is itself
damaged (missing or undecodable files: FileNotFoundError, JSON decode errors, TensorStore
DATA_LOSS / OUT_OF_RANGE / NOT_FOUND / INVALID_ARGUMENT / FAILED_PRECONDITION) is reported, renamed
`<step>.unreadable` and the previous one used. Anything else (MemoryError, other OSErrors, storage
UNAVAILABLE / DEADLINE_EXCEEDED / …, unknown errors) propagates with every checkpoint in place.
A set-aside name that exists already gets a `.1`, `.2`, … suffix.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from etils import epath
from flax import traverse_util
from absl import logging

ON_MISMATCH = ("error", "restart")

# TensorStore / absl status codes in restore errors: the files are damaged, or the storage failed
# (which a later attempt may not see: never a reason to set a checkpoint aside).
_DAMAGED = ("DATA_LOSS", "OUT_OF_RANGE", "NOT_FOUND", "INVALID_ARGUMENT", "FAILED_PRECONDITION")
_TRANSIENT = ("UNAVAILABLE", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED", "ABORTED", "CANCELLED",
              "PERMISSION_DENIED", "UNAUTHENTICATED", "INTERNAL", "UNKNOWN")


class CheckpointMismatchError(ValueError):
  """The run's checkpoint holds another state (shapes, dtypes, fields) than this config builds."""


def _error_chain(e: BaseException) -> list[BaseException]:
  chain, todo = [], [e]
  while todo:
    x = todo.pop()
    if x is not None and all(x is not c for c in chain):
      chain.append(x)
      todo += [x.__cause__, x.__context__]
  return chain


def _status(e: BaseException) -> str:
  m = re.match(r"([A-Z_]{4,}): ", str(e))
  return m.group(1) if m else ""


def is_damaged_checkpoint_error(e: BaseException) -> bool:
  """Whether a restore error says the checkpoint's files are missing or undecodable (set it aside),
  rather than a failure of the machine or the storage (propagate: the checkpoint may be fine)."""
  chain = _error_chain(e)
  for x in chain:
    if isinstance(x, MemoryError) or _status(x) in _TRANSIENT:
      return False
    if isinstance(x, OSError) and not isinstance(x, (FileNotFoundError, NotADirectoryError)):
      return False
  return any(isinstance(x, (FileNotFoundError, NotADirectoryError, json.JSONDecodeError, UnicodeDecodeError))
             or _status(x) in _DAMAGED for x in chain)


def _leaf_str(shape, dtype) -> str:
  return f"{jax.numpy.dtype(dtype).name}[{', '.join(map(str, shape))}]"


def state_differences(saved: dict[tuple, Any], abstract_state: Any) -> list[str]:
  """'path: checkpoint …, this run …' for every array leaf whose presence, shape or dtype differs
  between a checkpoint's metadata (flat dict, orbax tree paths) and `abstract_state`."""
  want = {k: v for k, v in ocp.tree.to_flat_dict(abstract_state).items() if hasattr(v, "shape")}
  have = {k: v for k, v in saved.items() if getattr(v, "shape", None) is not None}
  out = []
  for key in list(want) + [k for k in have if k not in want]:  # this run's field order (step, params, …)
    name = "/".join(map(str, key))
    if key not in have:
      out.append(f"{name}: not in the checkpoint, this run {_leaf_str(want[key].shape, want[key].dtype)}")
    elif key not in want:
      out.append(f"{name}: checkpoint {_leaf_str(have[key].shape, have[key].dtype)}, not in this run")
    elif (tuple(have[key].shape) != tuple(want[key].shape)
          or jax.numpy.dtype(have[key].dtype) != jax.numpy.dtype(want[key].dtype)):
      out.append(f"{name}: checkpoint {_leaf_str(have[key].shape, have[key].dtype)}, "
                 f"this run {_leaf_str(want[key].shape, want[key].dtype)}")
  return out


class Checkpointer:

  def __init__(self, directory: str, *, keep: int, async_save: bool = True,
               iterator_names: tuple[str, ...] = ("data",)):
    self.directory = os.path.abspath(directory) if "://" not in directory else directory
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save,
                                           create=True, cleanup_tmp_directories=True)
    self.iterator_names = tuple(iterator_names)
    self.manager = ocp.CheckpointManager(self.directory, options=options,
                                         item_names=("state",) + self.iterator_names)

  def save(self, step: int, state: Any, iterators: dict[str, Any], *, force: bool = False) -> bool:
    args = ocp.args.Composite(state=ocp.args.StandardSave(state), **{
        name: grain.checkpoint.CheckpointSave(iterators[name]) for name in self.iterator_names})
    return self.manager.save(step, args=args, force=force)

  def all_steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def restore_latest(self, abstract_state: Any, iterators: dict[str, Any], *, on_mismatch: str = "error",
                     config_note: str = "") -> tuple[Any, int] | tuple[None, None]:
    """Restores the newest checkpoint that loads; returns (state, step) or (None, None).

    `abstract_state` is a pytree of jax.ShapeDtypeStruct with shardings, so arrays are read
    straight into their target shardings. The iterators are restored in place. A checkpoint of
    another structure raises CheckpointMismatchError (`config_note`, e.g. the config keys that
    changed, is added to its message) or, with on_mismatch='restart', is set aside with every
    other checkpoint, returning (None, None). See the module docstring for damaged checkpoints.
    """
    if on_mismatch not in ON_MISMATCH:
      raise ValueError(f"config.checkpoint.on_mismatch={on_mismatch!r}: expected one of {ON_MISMATCH}")
    for step in reversed(self.all_steps()):
      try:
        differences = self._differences(step, abstract_state)
      except Exception as e:  # noqa: BLE001 — classified: only damage sets the checkpoint aside.
        if not is_damaged_checkpoint_error(e):
          raise
        self._report_damaged(step, e)
        continue
      if differences:
        if on_mismatch == "restart":
          print(f"WARNING: checkpoint step {step} in {self.directory} does not match this config "
                f"({len(differences)} fields differ, e.g. {differences[0]}); checkpoint.on_mismatch='restart': "
                f"starting over, the old checkpoints kept as <step>.replaced.", flush=True)
          for old in self.all_steps():
            self._set_aside(old, "replaced")
          return None, None
        shown = "\n  ".join(differences[:12]) + (f"\n  … and {len(differences) - 12} more"
                                                  if len(differences) > 12 else "")
        raise CheckpointMismatchError(
            f"checkpoint step {step} in {self.directory} does not match the state this config builds "
            f"({len(differences)} fields differ):\n  {shown}\n{config_note + chr(10) if config_note else ''}"
            "Nothing was changed. Resume with the run's settings, or set --config.checkpoint.on_mismatch=restart "
            "to start over (the old checkpoints are kept, renamed <step>.replaced).")
      try:
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), **{
                name: grain.checkpoint.CheckpointRestore(iterators[name]) for name in self.iterator_names}))
      except Exception as e:  # noqa: BLE001 — classified as above.
        if not is_damaged_checkpoint_error(e):
          logging.error("Checkpoint at step %d in %s failed to restore (%s: %s); left in place.",
                        step, self.directory, type(e).__name__, e)
          raise
        self._report_damaged(step, e)
        continue
      return restored["state"], step
    return None, None

  def _differences(self, step: int, abstract_state: Any) -> list[str]:
    """The checkpoint's items and state leaves that differ from this run's (reads metadata only)."""
    step_dir = epath.Path(self.directory) / str(step)
    handler = ocp.StandardCheckpointHandler()
    try:
      saved = ocp.tree.to_flat_dict(handler.metadata(step_dir / "state").tree)
    finally:
      handler.close()
    items = {p.name for p in step_dir.iterdir() if p.is_dir()} - {"state"}
    out = [f"data iterator {name!r}: not in the checkpoint" for name in self.iterator_names if name not in items]
    out += [f"data iterator {name!r}: in the checkpoint, not in this run"
            for name in sorted(items - set(self.iterator_names))]
    return out + state_differences(saved, abstract_state)

  def _report_damaged(self, step: int, e: BaseException) -> None:
    logging.error("Checkpoint at step %d in %s is damaged (%s: %s); trying an older one.",
                  step, self.directory, type(e).__name__, e)
    print(f"WARNING: checkpoint step {step} in {self.directory} is unreadable "
          f"({type(e).__name__}: {str(e)[:200]}); set aside as {step}.unreadable, falling back to an older one.",
          flush=True)
    self._set_aside(step, "unreadable")

  def _set_aside(self, step: int, suffix: str) -> None:
    """Renames step to `<step>.<suffix>` (`.1`, `.2`, … if taken), kept for inspection; the step can be re-saved."""
    if jax.process_index() == 0:
      path = epath.Path(self.directory) / str(step)
      if path.exists():
        target, n = path.parent / f"{step}.{suffix}", 0
        while target.exists():
          n += 1
          target = path.parent / f"{step}.{suffix}.{n}"
        path.rename(target)
    if jax.process_count() > 1:  # every host sees the renamed directory before it reloads.
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      multihost_utils.sync_global_devices(f"vpt_checkpoint_set_aside_{step}_{suffix}")
    self.manager.reload()

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def abstract_like(tree: Any, shardings: Any) -> Any:
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def overlay_params(params: Any, loaded: Any) -> Any:
  """`params` with every leaf that `loaded` has replaced (an HF init loads no LoRA adapters)."""
  flat = traverse_util.flatten_dict(params)
  flat.update(traverse_util.flatten_dict(loaded))
  return traverse_util.unflatten_dict(flat)


def load_learner_params(run_dir: str, abstract_params: Any, step: int | None = None) -> tuple[Any, int]:
  """The learner params of another vpt run (its newest checkpoint, or `step`), read straight into
  the shardings of `abstract_params` (ShapeDtypeStructs). Only the params are read (partial restore).

  `run_dir` may also be a Hugging Face directory (config.json + safetensors): its weights are
  imported slice by slice into the same shardings (vpt.interop.hf), as step 0, without the LoRA
  adapter leaves of `abstract_params` (overlay the result on the initialised params)."""
  from vpt.interop import hf  # pylint: disable=g-import-not-at-top (hf imports this module)
  if hf.is_hf_dir(run_dir):
    return hf.load_params(run_dir, abstract_params), 0
  restored, step = restore_state_fields(run_dir, {"params": abstract_params}, step, what="config.init_from=")
  return restored["params"], step


def restore_state_fields(run_dir: str, abstract: dict, step: int | None = None, *, what: str = "") -> tuple[dict, int]:
  """The top-level fields of another run's checkpointed state that `abstract` names (partial restore;
  its newest checkpoint, or `step`), read straight into the shardings of `abstract` (ShapeDtypeStructs)."""
  directory = os.path.join(os.path.abspath(run_dir), "checkpoints")  # orbax refuses relative paths
  steps = sorted(int(d) for d in (os.listdir(directory) if os.path.isdir(directory) else []) if d.isdigit())
  if not steps:
    raise FileNotFoundError(f"{what}{run_dir!r}: no checkpoint under {directory}")
  step = steps[-1] if step is None else step
  restore_args = jax.tree.map(lambda a: ocp.ArrayRestoreArgs(sharding=a.sharding, global_shape=a.shape,
                                                             dtype=a.dtype), abstract)
  with ocp.PyTreeCheckpointer() as checkpointer:
    restored = checkpointer.restore(os.path.join(directory, str(step), "state"), args=ocp.args.PyTreeRestore(
        item=abstract, restore_args=restore_args, partial_restore=True))
  return restored, step
