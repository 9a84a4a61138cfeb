"""The tasks the core trains: a config's `task` names the module that supplies it, imported on use
(so `--help`, a config error or a dry run's device flags come before any JAX start-up, and the core
imports no modality).

A task module supplies
  main_run(config, workdir) -> summary   what `python -m vpt.main` runs: validates the config once
                                         (config_lib.ConfigError naming the field), trains through
                                         vpt.core.loop, returns a summary with "step" and "preempted";
  run(config, workdir, stop_after=None)  the same loop for code (tests, notebooks, drivers);
and `vpt.aot.dry_run` compiles its step programs (dispatched on the same name).
"""

from __future__ import annotations

import importlib
from types import ModuleType

TASKS = {"language": "vpt.train", "vision": "vpt.train_vision"}


def task_name(config) -> str:
  """config.task (configs without the field are language configs); ValueError for an unknown one."""
  name = config.get("task", "language")
  if name not in TASKS:
    raise ValueError(f"config.task={name!r}: expected one of {sorted(TASKS)}")
  return name


def task_module(config) -> ModuleType:
  return importlib.import_module(TASKS[task_name(config)])
