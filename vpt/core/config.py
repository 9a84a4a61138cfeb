"""What every task's config shares: the optimizer, mesh and checkpoint blocks with their checks, the
error type validators raise, and reading / overriding an experiment file.

A task's schema (vpt/language/config_lib.py, vpt/vision/config.py) builds on these blocks, so a field
common to every task has one default and one check. `config.task` names the task
(vpt.core.tasks); `vpt.main` validates the config once, through the task.
"""

from __future__ import annotations

import copy
import os

import ml_collections


def optimizer_config() -> ml_collections.ConfigDict:
  """AdamW with linear warmup and cosine decay (vpt.core.optim)."""
  c = ml_collections.ConfigDict()
  c.learning_rate = 3e-3
  c.warmup_steps = 100
  c.end_lr_fraction = 0.1  # cosine decays to this fraction of the peak.
  c.b1 = 0.9
  c.b2 = 0.95
  c.eps = 1e-8
  c.weight_decay = 0.1
  c.grad_clip_norm = 1.0  # <= 0 disables clipping.
  return c


def mesh_config() -> ml_collections.ConfigDict:
  """The device mesh's axis sizes (vpt.core.sharding)."""
  c = ml_collections.ConfigDict()
  # Sizes of the mesh axes; one may be -1 (fills the remaining devices).
  c.data = -1
  c.fsdp = 1
  c.tensor = 1
  c.num_devices = 0  # 0: all devices; N: the first N (debugging, tests).
  return c


def checkpoint_config() -> ml_collections.ConfigDict:
  """Orbax checkpoints (vpt.core.checkpoint)."""
  c = ml_collections.ConfigDict()
  c.every_steps = 200
  c.keep = 3
  c.async_save = True
  # A resume whose checkpoint holds another state (a changed model/designer size, another vpt.mode):
  # 'error' stops before touching anything; 'restart' starts over, the old checkpoints kept as <step>.replaced.
  c.on_mismatch = "error"
  return c


class ConfigError(ValueError):
  """A config value the schema rejects (raised by the validators; vpt.main prints it as "Invalid config")."""


def requirement(config: ml_collections.ConfigDict):
  """need(cond, field, expected): raises ConfigError naming the field, its value and what was expected."""

  def need(cond, field, expected):
    if not cond:
      raise ConfigError(f"config.{field}={get_field(config, field)!r}: expected {expected}")

  return need


def is_number(x) -> bool:
  return isinstance(x, (int, float)) and not isinstance(x, bool)


def validate_optimizer(config: ml_collections.ConfigDict) -> None:
  """The learner's optimizer block (`optimizer_config`'s fields): only known fields, each a number in its
  range."""
  need = requirement(config)
  o = config.optimizer
  known = sorted(optimizer_config().keys())
  unknown = sorted(set(o.keys()) - set(known))
  if unknown:
    raise ConfigError(f"config.optimizer has unknown fields {unknown}: expected some of {known} (a misspelt "
                      "name? the optimizer is AdamW with warmup + cosine decay, vpt/core/optim.py)")
  missing = sorted(set(known) - set(o.keys()))
  if missing:
    raise ConfigError(f"config.optimizer lacks {missing}: start the config from its task's schema (e.g. "
                      "config_lib.base_config) so every field has its default")
  for key in known:
    need(is_number(o[key]), f"optimizer.{key}", "a number")
  need(o.learning_rate >= 0, "optimizer.learning_rate", ">= 0")
  need(o.warmup_steps >= 0, "optimizer.warmup_steps", ">= 0")
  need(0 <= o.end_lr_fraction <= 1, "optimizer.end_lr_fraction", "in [0, 1] (a fraction of the peak learning rate)")
  need(0 <= o.b1 < 1, "optimizer.b1", "in [0, 1)")
  need(0 <= o.b2 < 1, "optimizer.b2", "in [0, 1)")
  need(o.eps > 0, "optimizer.eps", "> 0")
  need(o.weight_decay >= 0, "optimizer.weight_decay", ">= 0")
  # grad_clip_norm: any number; <= 0 disables clipping.


def validate_mesh_and_checkpoint(config: ml_collections.ConfigDict) -> None:
  """The mesh and checkpoint blocks."""
  need = requirement(config)
  axes = [config.mesh.data, config.mesh.fsdp, config.mesh.tensor]
  need(sum(a == -1 for a in axes) <= 1 and all(a == -1 or a >= 1 for a in axes), "mesh",
       "positive axis sizes with at most one -1")
  need(config.mesh.num_devices >= 0, "mesh.num_devices", ">= 0 (0 = all devices)")
  need(config.checkpoint.every_steps > 0, "checkpoint.every_steps", "> 0")
  need(config.checkpoint.keep >= 1, "checkpoint.keep", ">= 1")
  need(config.checkpoint.get("on_mismatch", "error") in ("error", "restart"), "checkpoint.on_mismatch",
       "'error' or 'restart'")  # (get: a config.json written before the field existed)


def random_feedback(vpt_cfg: ml_collections.ConfigDict) -> bool:
  """Whether the meta step aligns with a random direction of g_down's norm instead of g_down (the
  control): `vpt.feedback_direction='random'` with any designer, or the older spelling
  `vpt.mode='random_feedback'` (the task's default designer)."""
  return vpt_cfg.mode == "random_feedback" or vpt_cfg.get("feedback_direction", "feedback") == "random"


def get_field(config, dotted):
  node = config
  for part in dotted.split("."):
    node = node[part]
  return node


def load_config_file(path: str, arg: str | None = None) -> ml_collections.ConfigDict:
  """`get_config(arg)` of an experiment file (what `--config path[:arg]` does), unlocked."""
  import importlib.util
  spec = importlib.util.spec_from_file_location(f"_vpt_config_{abs(hash(path))}", path)
  if spec is None or not os.path.isfile(path):
    raise FileNotFoundError(f"config file {path!r} not found")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg) if arg else module.get_config()


def with_overrides(config: ml_collections.ConfigDict, overrides: dict) -> ml_collections.ConfigDict:
  """A copy of `config` with dotted-key overrides, e.g. {"vpt.mode": "ntp", "num_steps": 10}."""
  config = copy.deepcopy(config)
  for key, value in overrides.items():
    node = config
    *parents, leaf = key.split(".")
    for part in parents:
      node = node[part]
    if leaf not in node:
      raise KeyError(f"config has no field {key!r}")
    node[leaf] = value
  return config
