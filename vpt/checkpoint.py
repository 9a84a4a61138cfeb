"""Orbax checkpointing of the whole training state and the data iterator.

A checkpoint holds `state` (learner params, optimizer state, step, RNG and, for V-Pretraining,
the designer) and one item per data iterator (`data`, and `feedback` for V-Pretraining: the
grain iterators' positions, one file per process).
Saves are asynchronous; orbax writes into a temporary directory and renames it when complete,
so a checkpoint directory without the commit marker is never picked up. If the newest finalised
checkpoint still fails to restore (e.g. a corrupt file), it is reported, renamed to
`<step>.unreadable`, and the previous one used.
"""

from __future__ import annotations

import os
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from etils import epath
from flax import traverse_util
from absl import logging

from vpt import paths


class Checkpointer:

  def __init__(self, directory: str, *, keep: int, async_save: bool = True,
               iterator_names: tuple[str, ...] = ("data",)):
    self.directory = paths.norm(directory)  # orbax refuses relative paths; gs:// stays a URL
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

  def restore_latest(self, abstract_state: Any, iterators: dict[str, Any]) -> tuple[Any, int] | tuple[None, None]:
    """Restores the newest checkpoint that loads; returns (state, step) or (None, None).

    `abstract_state` is a pytree of jax.ShapeDtypeStruct with shardings, so arrays are read
    straight into their target shardings. The iterators are restored in place.
    """
    for step in reversed(self.all_steps()):
      try:
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), **{
                name: grain.checkpoint.CheckpointRestore(iterators[name]) for name in self.iterator_names}))
      except Exception as e:  # noqa: BLE001 — any failure means this checkpoint is unusable.
        logging.error("Checkpoint at step %d in %s failed to restore (%s: %s); trying an older one.",
                      step, self.directory, type(e).__name__, e)
        print(f"WARNING: checkpoint step {step} in {self.directory} is unreadable "
              f"({type(e).__name__}: {str(e)[:200]}); falling back to an older one.", flush=True)
        self._set_aside(step)
        continue
      return restored["state"], step
    return None, None

  def _set_aside(self, step: int) -> None:
    """Renames an unreadable step to `<step>.unreadable` (kept for inspection) so the step can be re-saved."""
    if jax.process_index() == 0:
      path = epath.Path(self.directory) / str(step)
      if path.exists():
        path.rename(path.parent / f"{step}.unreadable")
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

  The result holds the leaves the checkpoint has: LoRA adapter leaves of `abstract_params` that it
  lacks (a LoRA run started from a full-parameter or imported run) are left out, to keep their
  initialisation (overlay the result on the initialised params). Any other difference in the tree
  or a shape is an error naming the leaf.

  `run_dir` may also be a Hugging Face directory (config.json + safetensors): its weights are
  imported slice by slice into the same shardings (vpt.interop.hf), as step 0, likewise without
  the LoRA adapter leaves."""
  from vpt.interop import hf  # pylint: disable=g-import-not-at-top (hf imports this module)
  if hf.is_hf_dir(run_dir):
    return hf.load_params(run_dir, abstract_params), 0
  what = "config.init_from="
  path, step = checkpoint_state_path(run_dir, step, what=what)
  stored = stored_params_metadata(path, what=f"{what}{run_dir!r}")
  flat = traverse_util.flatten_dict(abstract_params)
  missing = [k for k in flat if k not in stored]
  base_missing = [k for k in missing if k[-1] not in LORA_LEAVES]
  extra = [k for k in stored if k not in flat]
  if base_missing or extra:
    first, n = ((base_missing[0], len(base_missing)) if base_missing else (extra[0], len(extra)))
    where = "this model has but the checkpoint lacks" if base_missing else "the checkpoint has but this model lacks"
    hint = (" (a LoRA run: train with the same model.lora_rank and lora_targets, or export it to an HF directory, "
            "which folds the adapters in, and start from that)") if first[-1] in LORA_LEAVES else ""
    raise ValueError(f"{what}{run_dir!r}: parameter {'/'.join(map(str, first))!r} is one of {n} leaves {where} "
                     f"({path}){hint}")
  for k, a in flat.items():
    if k in stored and tuple(stored[k].shape) != tuple(a.shape):
      raise ValueError(f"{what}{run_dir!r}: parameter {'/'.join(map(str, k))!r} has shape {list(stored[k].shape)} "
                       f"in {path}, but this model's is {list(a.shape)} (config.model differs from the run's)")
  wanted = traverse_util.unflatten_dict({k: a for k, a in flat.items() if k in stored})
  restored, step = restore_state_fields(run_dir, {"params": wanted}, step, what=what)
  return restored["params"], step


LORA_LEAVES = ("lora_a", "lora_b")  # vpt.models.lora's adapter leaves.


def checkpoint_state_path(run_dir: str, step: int | None = None, *, what: str = "") -> tuple[str, int]:
  """(`RUN/checkpoints/<step>/state`, step) of a run's newest checkpoint, or of `step`."""
  directory = paths.path(run_dir) / "checkpoints"  # absolute: orbax refuses relative paths
  steps = sorted(int(d.name) for d in (directory.iterdir() if directory.is_dir() else []) if d.name.isdigit())
  if not steps:
    raise FileNotFoundError(f"{what}{run_dir!r}: no checkpoint under {directory}")
  if step is None:
    step = steps[-1]
  elif int(step) not in steps:
    raise FileNotFoundError(f"{what}{run_dir!r}: no checkpoint for step {step} in {directory} (have {steps})")
  return os.fspath(directory / str(int(step)) / "state"), int(step)


def stored_params_metadata(state_path: str, *, what: str = "") -> dict[tuple, Any]:
  """{parameter path (tuple of keys): orbax ArrayMetadata (shape, dtype)} of the `params` a
  checkpointed state holds (read from its metadata file; no array is read)."""
  with ocp.PyTreeCheckpointer() as checkpointer:
    tree = checkpointer.metadata(state_path).item_metadata.tree
  params = tree.get("params") if isinstance(tree, dict) else None
  if not isinstance(params, dict):
    raise ValueError(f"{what or state_path}: the checkpointed state at {state_path} has no params")
  return traverse_util.flatten_dict(params)


def restore_state_fields(run_dir: str, abstract: dict, step: int | None = None, *, what: str = "") -> tuple[dict, int]:
  """The top-level fields of another run's checkpointed state that `abstract` names (partial restore;
  its newest checkpoint, or `step`), read straight into the shardings of `abstract` (ShapeDtypeStructs).
  Only those fields are read: the rest of the state (optimizer, designer) stays on disk."""
  path, step = checkpoint_state_path(run_dir, step, what=what)
  restore_args = jax.tree.map(lambda a: ocp.ArrayRestoreArgs(sharding=a.sharding, global_shape=a.shape,
                                                             dtype=a.dtype), abstract)
  with ocp.PyTreeCheckpointer() as checkpointer:
    restored = checkpointer.restore(path, args=ocp.args.PyTreeRestore(
        item=abstract, restore_args=restore_args, partial_restore=True))
  return restored, step


def restore_learner_params(run_dir: str, step: int | None = None, *, mesh: jax.sharding.Mesh | None = None,
                           what: str = "") -> tuple[Any, int]:
  """(params, step) of a run's checkpoint, whatever its tree (LoRA leaves included), reading nothing
  else: sharded over `mesh` by vpt.sharding's rules, or on this process's first device."""
  from vpt import sharding as sharding_lib  # pylint: disable=g-import-not-at-top

  path, step = checkpoint_state_path(run_dir, step, what=what)
  stored = stored_params_metadata(path, what=what)
  abstract = traverse_util.unflatten_dict({k: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype) for k, m in stored.items()})
  if mesh is not None:
    shardings = sharding_lib.param_shardings(abstract, mesh)
  else:
    shardings = jax.tree.map(lambda _: jax.sharding.SingleDeviceSharding(jax.local_devices()[0]), abstract)
  restored, step = restore_state_fields(run_dir, {"params": abstract_like(abstract, shardings)}, step, what=what)
  return restored["params"], step
