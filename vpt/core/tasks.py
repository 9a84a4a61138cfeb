"""The tasks the core trains: a config's `task` names the module that supplies it, imported on use
(so `--help`, a config error or a dry run's device flags come before any JAX start-up, and the core
imports no modality). `task` is a name registered below, or the dotted path of a task module — a new
modality is a package of its own plus an experiment config with `c.task = "mypackage.train"`; nothing
here changes for it.

A task module supplies
  main_run(config, workdir) -> summary   what `python -m vpt.main` runs: validates the config once
                                         (core_config.ConfigError naming the field), trains through
                                         vpt.core.loop, returns a summary with "step" and "preempted";
  run(config, workdir, stop_after=None)  the same loop for code (tests, notebooks, drivers);
  evaluate_run(workdir, split, step)     what `python -m vpt.main --eval_only --workdir RUN` runs: the
                                         run's evaluators on its newest (or `step`'s) checkpoint;
and `vpt.aot.dry_run` compiles its step programs (dispatched on the same name). Its step is built by
vpt.core.step from the task's StepTask, and its loop is vpt.core.loop.run_loop.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from vpt.core.config import ConfigError

TASKS = {"language": "vpt.language.train", "vision": "vpt.vision.train"}


def task_name(config) -> str:
  """config.task (configs without the field are language configs); ConfigError for one that names no task."""
  name = config.get("task", "language")
  if name not in TASKS and not (isinstance(name, str) and all(p.isidentifier() for p in name.split("."))):
    raise ConfigError(f"config.task={name!r}: expected one of {sorted(TASKS)} or a task module's dotted path")
  return name


def task_module(config) -> ModuleType:
  """The module of config.task, imported; ConfigError if it cannot be, or lacks an entry point."""
  name = task_name(config)
  try:
    module = importlib.import_module(TASKS.get(name, name))
  except ModuleNotFoundError as e:
    if name in TASKS or not e.name or not name.startswith(e.name):
      raise  # a registered task, or a task module whose own import failed: not a config problem
    raise ConfigError(f"config.task={name!r}: expected one of {sorted(TASKS)} or an importable task module "
                      f"({e})") from e
  missing = [f for f in ("main_run", "run") if not callable(getattr(module, f, None))]
  if missing:
    raise ConfigError(f"config.task={name!r}: module {module.__name__} lacks {missing} (vpt.core.tasks)")
  return module
