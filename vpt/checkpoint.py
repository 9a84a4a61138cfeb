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
  directory = paths.path(run_dir) / "checkpoints"  # absolute: orbax refuses relative paths
  steps = sorted(int(d.name) for d in (directory.iterdir() if directory.is_dir() else []) if d.name.isdigit())
  if not steps:
    raise FileNotFoundError(f"{what}{run_dir!r}: no checkpoint under {directory}")
  step = steps[-1] if step is None else step
  restore_args = jax.tree.map(lambda a: ocp.ArrayRestoreArgs(sharding=a.sharding, global_shape=a.shape,
                                                             dtype=a.dtype), abstract)
  with ocp.PyTreeCheckpointer() as checkpointer:
    restored = checkpointer.restore(directory / str(step) / "state", args=ocp.args.PyTreeRestore(
        item=abstract, restore_args=restore_args, partial_restore=True))
  return restored, step
