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

import dataclasses
import json
import re
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from etils import epath
from flax import traverse_util
from absl import logging

from vpt.core import paths, run_dir as run_dir_lib, sharding as sharding_lib
from vpt.core.lora import LORA_LEAVES

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


def _rebuild(template: Any, restored: Any) -> Any:
  """`restored` (the dicts `_restore_target` made of the dataclasses of `template`) as `template`'s
  dataclasses again, None in the fields it lacks."""
  if not dataclasses.is_dataclass(template) or not isinstance(restored, dict):
    return restored
  return type(template)(**{f.name: _rebuild(getattr(template, f.name), restored[f.name]) if f.name in restored
                           else None for f in dataclasses.fields(template)})


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
        stored = self._stored_state_tree(step)
        differences = self._differences(step, stored, abstract_state)
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
        target, added = self._restore_target(stored, abstract_state)
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(target), **{
                name: grain.checkpoint.CheckpointRestore(iterators[name]) for name in self.iterator_names}))
      except Exception as e:  # noqa: BLE001 — classified as above.
        if not is_damaged_checkpoint_error(e):
          logging.error("Checkpoint at step %d in %s failed to restore (%s: %s); left in place.",
                        step, self.directory, type(e).__name__, e)
          raise
        self._report_damaged(step, e)
        continue
      if added:  # the dataclasses back, with None in the fields the checkpoint predates
        return _rebuild(abstract_state, restored["state"]), step
      return restored["state"], step
    return None, None

  def _restore_target(self, stored: Any, abstract_state: Any) -> tuple[Any, list[str]]:
    """(what to restore into, the state's fields the checkpoint predates). A checkpoint written before a
    dataclass field was added — at any depth, e.g. VisionState.ibot_center without iBOT, or
    DesignerState.g_down_avg without a running g_down average — and that holds no array in this run
    (`_differences` found no array leaf missing) restores into the fields it has, every dataclass of
    the state as a dict; `_rebuild` then puts None in the others. `stored`: the checkpoint's state tree."""
    added = []

    def strip(node, stored_node, path):
      if not dataclasses.is_dataclass(node) or not isinstance(stored_node, dict):
        return node
      out = {}
      for f in dataclasses.fields(node):
        value = getattr(node, f.name)
        if f.name in stored_node:
          out[f.name] = strip(value, stored_node[f.name], f"{path}{f.name}.")
        elif not jax.tree.leaves(value):
          added.append(path + f.name)
        else:  # an array the checkpoint lacks: a real mismatch (reported by _differences)
          return node
      return out

    target = strip(abstract_state, stored, "")
    return (target, added) if added else (abstract_state, [])

  def _stored_state_tree(self, step: int) -> Any:
    """The state tree of checkpoint `step` as its metadata records it (no array is read)."""
    handler = ocp.StandardCheckpointHandler()
    try:
      return handler.metadata(epath.Path(self.directory) / str(step) / "state").tree
    finally:
      handler.close()

  def _differences(self, step: int, stored: Any, abstract_state: Any) -> list[str]:
    """The checkpoint's items and state leaves (`stored`: its state tree) that differ from this run's."""
    step_dir = epath.Path(self.directory) / str(step)
    saved = ocp.tree.to_flat_dict(stored)
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

  The result holds the leaves the checkpoint has: LoRA adapter leaves of `abstract_params` that it
  lacks (a LoRA run started from a full-parameter or imported run) are left out, to keep their
  initialisation (overlay the result on the initialised params). Any other difference in the tree
  or a shape is an error naming the leaf.

  A vpt run directory only: a Hugging Face directory is imported by vpt.language.learner_source, which picks."""
  what = "config.init_from="
  path, step = run_dir_lib.state_path(run_dir, step, what=what)
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




class _NoStepMetadataWarning(logging.logging.Filter):
  """Drops orbax's "Metadata file does not exist: …/<step>/<item>/_CHECKPOINT_METADATA" warning: pointed
  at one item of a step (…/<step>/state, to read another run's params alone), a PyTreeCheckpointer looks
  for the step's metadata file inside the item, where it never is (it lives one level up, unneeded here)."""

  def filter(self, record):
    return not record.getMessage().startswith("Metadata file does not exist")


def _item_checkpointer() -> ocp.PyTreeCheckpointer:
  logger = logging.get_absl_logger()
  if not any(isinstance(f, _NoStepMetadataWarning) for f in logger.filters):
    logger.addFilter(_NoStepMetadataWarning())
  return ocp.PyTreeCheckpointer()


def stored_params_metadata(state_path: str, *, what: str = "") -> dict[tuple, Any]:
  """{parameter path (tuple of keys): orbax ArrayMetadata (shape, dtype)} of the `params` a
  checkpointed state holds (read from its metadata file; no array is read)."""
  with _item_checkpointer() as checkpointer:
    tree = checkpointer.metadata(state_path).item_metadata.tree
  params = tree.get("params") if isinstance(tree, dict) else None
  if not isinstance(params, dict):
    raise ValueError(f"{what or state_path}: the checkpointed state at {state_path} has no params")
  return traverse_util.flatten_dict(params)


def restore_state_fields(run_dir: str, abstract: dict, step: int | None = None, *, what: str = "") -> tuple[dict, int]:
  """The top-level fields of another run's checkpointed state that `abstract` names (partial restore;
  its newest checkpoint, or `step`), read straight into the shardings of `abstract` (ShapeDtypeStructs).
  Only those fields are read: the rest of the state (optimizer, designer) stays on disk."""
  path, step = run_dir_lib.state_path(run_dir, step, what=what)
  restore_args = jax.tree.map(lambda a: ocp.ArrayRestoreArgs(sharding=a.sharding, global_shape=a.shape,
                                                             dtype=a.dtype), abstract)
  with _item_checkpointer() as checkpointer:
    restored = checkpointer.restore(path, args=ocp.args.PyTreeRestore(
        item=abstract, restore_args=restore_args, partial_restore=True))
  return restored, step


def restore_learner_params(run_dir: str, step: int | None = None, *, mesh: jax.sharding.Mesh | None = None,
                           rules: sharding_lib.Rules = (), what: str = "") -> tuple[Any, int]:
  """(params, step) of a run's checkpoint, whatever its tree (LoRA leaves included), reading nothing
  else: sharded over `mesh` by the task's sharding `rules`, or on this process's first device."""
  path, step = run_dir_lib.state_path(run_dir, step, what=what)
  stored = stored_params_metadata(path, what=what)
  abstract = traverse_util.unflatten_dict({k: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype) for k, m in stored.items()})
  if mesh is not None:
    shardings = sharding_lib.param_shardings(abstract, mesh, rules)
  else:
    shardings = jax.tree.map(lambda _: jax.sharding.SingleDeviceSharding(jax.local_devices()[0]), abstract)
  restored, step = restore_state_fields(run_dir, {"params": abstract_like(abstract, shardings)}, step, what=what)
  return restored["params"], step
