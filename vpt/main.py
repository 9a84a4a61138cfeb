"""Entry point: `python -m vpt.main --config experiments/<name>.py[:arg] --workdir DIR [--config.x=y]`.

`--dry_run` compiles the train step for the config without allocating weights or reading data and
prints the per-device memory (vpt/aot.py); `--dry_run_devices N` simulates N host devices for it, and
`--dry_run_topology v5e-16` compiles the real TPU program for that slice (libtpu, no TPU needed).

`python -m vpt.main --eval_only --workdir RUN [--eval_split test] [--eval_step N]` evaluates a run's
newest (or step N's) checkpoint with its task's evaluators, whatever the task (the config is the run's
own config.json): held-out Pass@1 for language, frozen-feature probes for vision.
"""

from __future__ import annotations

import json
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags


from vpt.core import config as core_config, tasks

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file (get_config(arg)).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and the resolved config.")
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "Compile the train step ahead of time and print its per-device "
                             "memory; allocates no weights, reads no data, needs no --workdir.")
_DRY_RUN_DEVICES = flags.DEFINE_integer("dry_run_devices", 0, "With --dry_run: compile for N simulated host (CPU) "
                                        "devices instead of the local ones (0: the local devices).")
_DRY_RUN_HBM_GB = flags.DEFINE_float("dry_run_hbm_gb", 0.0, "With --dry_run: per-device memory budget in GB "
                                     "(GiB) to check the peak against (0: no check).")
_DRY_RUN_TOPOLOGY = flags.DEFINE_string("dry_run_topology", "", "With --dry_run: compile for this TPU slice instead, "
                                        "named as Cloud TPU names it (v4-32, v5p-64: TensorCores; v5e-16, v6e-8: "
                                        "chips). Needs libtpu (pip install -e '.[tpu]'), not a TPU.")
_DRY_RUN_TOPOLOGY_SHAPE = flags.DEFINE_string("dry_run_topology_shape", "", "With --dry_run_topology: the slice's "
                                              "chip grid (4x4, 4x4x12) when it is not the standard one.")
_DRY_RUN_SLICES = flags.DEFINE_integer("dry_run_slices", 1, "With --dry_run_topology: N such slices joined by "
                                       "the data-center network (the mesh's data axis spans them).")
_DRY_RUN_ESTIMATE = flags.DEFINE_bool("dry_run_estimate", True, "With --dry_run_topology: also compile the "
                                      "programs of the throughput estimate (forced meta / plain steps and the "
                                      "baseline: up to 4 compiles); false: the memory verdict only (1–2 compiles).")
_EVAL_ONLY = flags.DEFINE_bool("eval_only", False, "Evaluate the run in --workdir (its newest checkpoint, with "
                               "its own config.json; no --config) and write WORKDIR/eval_<split>.json.")
_EVAL_SPLIT = flags.DEFINE_string("eval_split", "test", "With --eval_only: the held-out split (language: "
                                  "validation | test; vision: val | test).")
_EVAL_STEP = flags.DEFINE_integer("eval_step", -1, "With --eval_only: the checkpoint step (-1: the newest).")
flags.register_validator("config", lambda v: v is not None or flags.FLAGS["eval_only"].value,
                         message="--config is required (except with --eval_only, which reads the run's own)")
flags.register_validator("workdir", lambda v: bool(v) or flags.FLAGS["dry_run"].value,
                         message="--workdir is required (except with --dry_run)")

def cpu_only_platforms(environ, *, has_libtpu: bool, has_tpu_devices: bool, has_cuda_plugin: bool) -> str | None:
  """JAX_PLATFORMS to set before JAX starts, or None to leave the choice to JAX.

  With libtpu installed (the `tpu` or `test` extra, for compile-only dry runs) on a host with no TPU
  and no CUDA plugin, JAX would still try to bring up the TPU backend at start-up: it fails, falls
  back to the CPU, and libtpu prints errors about TPU_ACCELERATOR_TYPE / TPU_WORKER_HOSTNAMES on
  every run. The CPU is the only backend such a host has, so ask for it. An explicit JAX_PLATFORMS,
  a TPU VM (/dev/accel*, /dev/vfio) or a CUDA plugin leaves JAX's own choice alone.
  """
  if environ.get("JAX_PLATFORMS") or not has_libtpu or has_tpu_devices or has_cuda_plugin:
    return None
  return "cpu"


def _pick_platforms() -> None:
  import glob  # pylint: disable=g-import-not-at-top
  import importlib.util  # pylint: disable=g-import-not-at-top
  platforms = cpu_only_platforms(
      os.environ, has_libtpu=importlib.util.find_spec("libtpu") is not None,
      has_tpu_devices=bool(glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*")),
      has_cuda_plugin=any(importlib.util.find_spec(f"jax_cuda{v}_plugin") is not None for v in (12, 13)))
  if platforms:
    os.environ["JAX_PLATFORMS"] = platforms
    if "jax" in sys.modules:  # imported by a config file: still in time, no backend is up yet.
      sys.modules["jax"].config.update("jax_platforms", platforms)


PREEMPTED_EXIT_CODE = 143  # 128 + SIGTERM: saved a checkpoint after a preemption notice.


def _unknown_override(argv: list[str]) -> str | None:
  """The first `--config.a.b=…` override that names no field of the config file's config."""
  spec_arg = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
  if spec_arg is None and "--config" in argv:
    spec_arg = argv[argv.index("--config") + 1]
  if not spec_arg:
    return None
  path, _, arg = spec_arg.partition(":")
  config = core_config.load_config_file(path, arg or None)
  for a in argv:
    if a.startswith("--config."):
      field = a[len("--config."):].split("=", 1)[0]
      node = config
      for part in field.split("."):
        if not hasattr(node, "keys") or part not in node:
          return field
        node = node[part]
  return None


def _parse_flags(argv: list[str]):
  try:
    return flags.FLAGS(argv)
  except (AttributeError, KeyError):
    field = _unknown_override(argv)
    if field is None:
      raise
    sys.exit(f"Unknown config field: --config.{field} (no such field in the config; see "
             f"vpt/language/config_lib.py for the schema)")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if _EVAL_ONLY.value:
    return _eval_only()
  config = _CONFIG.value
  try:
    task = tasks.task_name(config)
  except core_config.ConfigError as e:
    sys.exit(f"Invalid config: {e}")
  try:
    if _DRY_RUN.value:  # before any task module: a dry run sets its own devices before JAX starts
      return _dry_run(config)
    _pick_platforms()
    module = tasks.task_module(config)  # imported now: `--help` and an unknown task pay no JAX start-up
    if not flags.FLAGS["verbosity"].present:
      logging.set_verbosity(logging.WARNING)  # orbax's INFO lines would drown the progress output.
    summary = module.main_run(config, _WORKDIR.value)  # validates the config once, then trains
  except core_config.ConfigError as e:
    sys.exit(f"Invalid config: {e}")
  logging.info("%s run done at step %d", task, summary["step"])
  if summary["preempted"]:
    sys.exit(PREEMPTED_EXIT_CODE)  # non-zero, so launchers (launch/tpu.sh) know to re-run.


def _eval_only():
  from vpt.core import run_dir  # pylint: disable=g-import-not-at-top (no JAX before the platforms are picked)
  if _CONFIG.value is not None:
    sys.exit("--eval_only evaluates with the run's own config (WORKDIR/config.json): drop --config")
  try:
    config = run_dir.read_config(_WORKDIR.value)
    _pick_platforms()
    module = tasks.task_module(config)
    if not callable(getattr(module, "evaluate_run", None)):
      sys.exit(f"--eval_only: task {tasks.task_name(config)!r} ({module.__name__}) has no evaluate_run")
    if not flags.FLAGS["verbosity"].present:
      logging.set_verbosity(logging.WARNING)
    results = module.evaluate_run(_WORKDIR.value, _EVAL_SPLIT.value, _EVAL_STEP.value if _EVAL_STEP.value >= 0 else None)
  except (FileNotFoundError, ValueError) as e:
    sys.exit(f"Eval failed: {e}")
  print(json.dumps(results, indent=2, default=float))


def _jax_backends_started() -> bool:
  """Whether JAX has brought up its backends (a vision config file imports jax without doing so)."""
  if "jax" not in sys.modules:
    return False
  from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top
  started = getattr(xla_bridge, "backends_are_initialized", None)
  return started() if started is not None else True  # unknown JAX: assume the worst


def _dry_run(config):
  n = _DRY_RUN_DEVICES.value
  if n > 0 and _DRY_RUN_TOPOLOGY.value:
    sys.exit("--dry_run_devices and --dry_run_topology name two different targets: set one of them")
  if _DRY_RUN_TOPOLOGY.value:
    # The TPU program is compiled by libtpu for compile-only devices; the process itself needs no
    # accelerator, so JAX's default backend stays the host's (a TPU VM would otherwise claim its chips).
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
  if n > 0:
    if _jax_backends_started():  # the flag is read when the backend starts (importing jax is not enough)
      sys.exit("--dry_run_devices must be set before JAX starts its backends (run vpt.main as a program)")
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={n}".strip()
    os.environ["JAX_PLATFORMS"] = "cpu"
    if config.mesh.num_devices not in (0, n):
      sys.exit(f"--dry_run_devices={n} but config.mesh.num_devices={config.mesh.num_devices}: set one of them")
  from vpt import aot  # after the device flags
  spec = flags.FLAGS["config"].config_filename if hasattr(flags.FLAGS["config"], "config_filename") else ""
  try:
    aot.dry_run(config, hbm_gb=_DRY_RUN_HBM_GB.value, label=spec, topology=_DRY_RUN_TOPOLOGY.value,
                topology_shape=_DRY_RUN_TOPOLOGY_SHAPE.value, num_slices=_DRY_RUN_SLICES.value,
                estimate=_DRY_RUN_ESTIMATE.value)
  except core_config.ConfigError:
    raise  # the dry run validates the config: "Invalid config" (main)
  except (ValueError, RuntimeError) as e:
    sys.exit(f"Dry run failed: {e}")


if __name__ == "__main__":
  app.run(main, flags_parser=_parse_flags)
