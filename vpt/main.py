"""Entry point: `python -m vpt.main --config experiments/<name>.py[:arg] --workdir DIR [--config.x=y]`."""

from __future__ import annotations

import sys

from absl import app, flags, logging
from ml_collections import config_flags

from vpt import config_lib

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file (get_config(arg)).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and the resolved config.")
flags.mark_flags_as_required(["config", "workdir"])

PREEMPTED_EXIT_CODE = 143  # 128 + SIGTERM: saved a checkpoint after a preemption notice.


def _unknown_override(argv: list[str]) -> str | None:
  """The first `--config.a.b=…` override that names no field of the config file's config."""
  spec_arg = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
  if spec_arg is None and "--config" in argv:
    spec_arg = argv[argv.index("--config") + 1]
  if not spec_arg:
    return None
  path, _, arg = spec_arg.partition(":")
  config = config_lib.load_config_file(path, arg or None)
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
  except (AttributeError, KeyError) as e:
    field = _unknown_override(argv)
    if field is None:
      raise
    sys.exit(f"Unknown config field: --config.{field} (no such field in the config; see "
             f"vpt/config_lib.py for the schema)")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  config = _CONFIG.value
  try:
    config_lib.validate(config)
  except ValueError as e:
    sys.exit(f"Invalid config: {e}")
  from vpt import train  # imported late so `--help` and config errors do not pay for JAX start-up.
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # orbax's INFO lines would drown the progress output.
  runner = train.run_with_baseline if config.compare_with_baseline else train.run
  summary = runner(config, _WORKDIR.value)
  logging.info("done at step %d", summary["step"])
  if summary["preempted"]:
    sys.exit(PREEMPTED_EXIT_CODE)  # non-zero, so launchers (launch/tpu.sh) know to re-run.


if __name__ == "__main__":
  app.run(main, flags_parser=_parse_flags)
