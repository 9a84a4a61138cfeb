"""A vpt run directory: its layout, and the one reader and writer of its config and checkpoint steps.

    WORKDIR/config.json               the config the run started with (written once, never overwritten)
    WORKDIR/config.<n>.json           a later start with a changed config (n = 1, 2, …): the history
    WORKDIR/checkpoints/<step>/state  the orbax checkpoints (vpt.core.checkpoint), one directory per step
    WORKDIR/tokenizer/                the run's own tokenizer: tokenizer.json (+ side files) or spm.model
    WORKDIR/hf/                       an HF checkpoint's files without the weights (runs imported or started
                                      from one: their tokenizer and the template of an export)

Every reader of a run (the loops' resume and init_from, the GSM8K eval, analysis, the vision eval, HF
export) goes through here. Invariants:
- config.json is the run's original config: evals, analysis and export read it; a restart with a
  different config adds config.<n>.json and never rewrites an earlier file.
- A checkpoint step is a directory named by digits alone: orbax renames its temporary directory into
  place when a save completes, and vpt.core.checkpoint sets damaged or replaced ones aside as
  `<step>.unreadable` / `<step>.replaced`, so neither is ever listed.
- A config read with `defaults` holds every field of that schema: a field added since the run was
  written keeps its default; the run's own values (and fields the schema no longer has) are kept.

This module reads files only: it imports neither the checkpointer nor the HF interop (which both
build on it), so there is no import cycle between them.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

import ml_collections
from etils import epath

from vpt.core import paths

CONFIG_NAME = "config.json"
CHECKPOINTS_SUBDIR = "checkpoints"
STATE_ITEM = "state"
TOKENIZER_SUBDIR = "tokenizer"
SPM_NAME = "spm.model"
HF_TOKENIZER_NAME = "tokenizer.json"
HF_SUBDIR = "hf"


class NoCheckpointError(FileNotFoundError, ValueError):
  """A run has no checkpoint (at the step asked for). A FileNotFoundError (the file is not there) and a
  ValueError (a `step` argument that names no checkpoint is a bad argument): callers catch either."""


# ----------------------------------------------------------------------------- config


def config_path(workdir: str) -> epath.Path:
  return paths.path(workdir) / CONFIG_NAME


def _config_files(workdir: str) -> list[str]:
  """The run's config history, oldest first: config.json, then config.1.json, config.2.json, …"""
  root = paths.path(workdir)
  names = [p.name for p in root.iterdir()] if root.is_dir() else []
  numbered = sorted(int(m.group(1)) for m in (re.fullmatch(r"config\.(\d+)\.json", n) for n in names) if m)
  return ([CONFIG_NAME] if CONFIG_NAME in names else []) + [f"config.{n}.json" for n in numbered]


def _read_json(path: epath.Path) -> dict:
  try:
    data = json.loads(path.read_text())
  except ValueError as e:
    raise ValueError(f"{path}: not valid JSON ({e}); a run writes its config atomically, so the file was "
                     "edited or damaged by hand") from e
  if not isinstance(data, dict):
    raise ValueError(f"{path}: expected a JSON object (a vpt run's config), got {type(data).__name__}")
  return data


def _merge(defaults: dict, saved: dict) -> dict:
  """`saved` over `defaults`, nested dicts merged key by key (a dict replaces a non-dict whole)."""
  out = dict(defaults)
  for key, value in saved.items():
    out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
  return out


def fill_defaults(config: ml_collections.ConfigDict, defaults: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A copy of a run's `config` with every field of the schema `defaults` that it lacks at its default
  (a config written before the field existed); the run's values win."""
  return ml_collections.ConfigDict(_merge(defaults.to_dict(), config.to_dict()))


def read_config(workdir: str, defaults: ml_collections.ConfigDict | None = None) -> ml_collections.ConfigDict:
  """The config a run started with (WORKDIR/config.json), as it was written; with `defaults` (the task's
  schema, e.g. config_lib.base_config()) the fields added since keep their defaults (`fill_defaults`)."""
  path = config_path(workdir)
  if not path.is_file():
    raise FileNotFoundError(f"{path}: no such file (expected a vpt run directory, which holds the config "
                            "vpt.main writes when a run starts, or a directory made by `vpt.language.interop.hf import`)")
  config = ml_collections.ConfigDict(_read_json(path))
  return fill_defaults(config, defaults) if defaults is not None else config


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
  """{'a.b': leaf} of nested dicts (an empty dict is a leaf)."""
  if not isinstance(tree, dict) or not tree:
    return {prefix: tree}
  out = {}
  for key, sub in tree.items():
    out.update(_flat(sub, f"{prefix}.{key}" if prefix else key))
  return out


def config_changes(config: ml_collections.ConfigDict, workdir: str) -> tuple[str, list[str]]:
  """(the run's newest config file, ['key: old → new', …] for every field `config` changes in it);
  ("", []) for a directory without a config."""
  files = _config_files(workdir)
  if not files:
    return "", []
  saved = _flat(_read_json(paths.path(workdir) / files[-1]))
  new = _flat(json.loads(config.to_json_best_effort()))
  unset = "(unset)"
  return files[-1], [f"{k}: {saved.get(k, unset)!r} → {new.get(k, unset)!r}" for k in sorted(set(saved) | set(new))
                     if saved.get(k, unset) != new.get(k, unset)]


def write_config(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Records the config of a run that starts (call it once nothing more can fail on bad input, on one
  process).

  The first start writes config.json, the run's original config, which evals, analysis and export
  read. A later start with a different config (a longer schedule, a restart) adds config.<n>.json
  (n = 1, 2, …): the history is kept, the original never overwritten. An unchanged config adds nothing.
  """
  files = _config_files(workdir)
  text = config.to_json_best_effort(indent=2, sort_keys=True)
  if files and _read_json(paths.path(workdir) / files[-1]) == json.loads(text):
    return
  numbered = [int(f.split(".")[1]) for f in files if f != CONFIG_NAME]
  name = f"config.{max(numbered, default=0) + 1}.json" if CONFIG_NAME in files else CONFIG_NAME
  paths.write_atomic(paths.path(workdir) / name, text)


# ----------------------------------------------------------------------------- checkpoints


def checkpoint_dir(workdir: str) -> str:
  """WORKDIR/checkpoints, absolute (orbax refuses relative paths; gs:// stays a URL)."""
  return os.fspath(paths.path(workdir) / CHECKPOINTS_SUBDIR)


def checkpoint_steps(workdir: str) -> list[int]:
  """The steps of the run's complete checkpoints, ascending ([] when it has none)."""
  directory = paths.path(checkpoint_dir(workdir))
  if not directory.is_dir():
    return []
  return sorted(int(d.name) for d in directory.iterdir() if d.name.isdigit())


def latest_step(workdir: str) -> int | None:
  """The newest checkpoint's step, or None."""
  steps = checkpoint_steps(workdir)
  return steps[-1] if steps else None


def state_path(workdir: str, step: int | None = None, *, what: str = "") -> tuple[str, int]:
  """(WORKDIR/checkpoints/<step>/state, step) of the newest checkpoint, or of `step`; a NoCheckpointError
  naming the directory and the steps it has otherwise. `what` prefixes the message with the setting the
  directory came from (e.g. 'config.init_from=')."""
  steps = checkpoint_steps(workdir)
  directory = checkpoint_dir(workdir)
  if not steps:
    raise NoCheckpointError(f"{what}{workdir!r}: no checkpoint under {directory} (a run saves one every "
                            "config.checkpoint.every_steps and at its last step)")
  if step is None:
    step = steps[-1]
  elif int(step) not in steps:
    raise NoCheckpointError(f"{what}{workdir!r}: step={step}: no checkpoint at that step in {directory}; "
                            f"available: {steps}")
  return os.path.join(directory, str(int(step)), STATE_ITEM), int(step)


# ----------------------------------------------------------------------------- tokenizer


def tokenizer_file(workdir: str) -> str | None:
  """The tokenizer file the run holds, or None: the copy made at its first start (or the sentencepiece
  model it trained), WORKDIR/tokenizer/{tokenizer.json,spm.model}; else the tokenizer.json of WORKDIR/hf."""
  root = paths.path(workdir)
  for file in (root / TOKENIZER_SUBDIR / HF_TOKENIZER_NAME, root / TOKENIZER_SUBDIR / SPM_NAME,
               root / HF_SUBDIR / HF_TOKENIZER_NAME):
    if file.is_file():
      return os.fspath(file)
  return None
