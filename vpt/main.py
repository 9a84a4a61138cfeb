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


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  config = _CONFIG.value
  try:
    config_lib.validate(config)
  except ValueError as e:
    sys.exit(f"Invalid config: {e}")
  from vpt import train  # imported late so `--help` and config errors do not pay for JAX start-up.
  summary = train.run(config, _WORKDIR.value)
  logging.info("done at step %d", summary["step"])
  if summary["preempted"]:
    sys.exit(PREEMPTED_EXIT_CODE)  # non-zero, so launchers (launch/tpu.sh) know to re-run.


if __name__ == "__main__":
  app.run(main)
