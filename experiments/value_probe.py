"""One-step value probe: does the value predict the realised drop of a held-out downstream loss?

    python experiments/value_probe.py --out_dir /tmp/value_probe                 # trains tiny,value first
    python experiments/value_probe.py --workdir RUN_DIR --out_dir /tmp/probe     # an existing run

For n unlabeled batches B_u of the stream, with the run's targets q (the designer's; one-hot for
NTP): predicted first-order drops of the loss on a fixed batch of held-out downstream problems
(never in the feedback set), raw η⟨g_probe, g_pre⟩ and Adam-preconditioned lr⟨P·g_probe, g_pre⟩,
against the realised drops after an SGD step θ − η·g_pre on all parameters and after the learner's
real AdamW step from its checkpointed optimizer state (paper, v1 A.6 / v2 C.1: r = 0.657 for raw vs
SGD on a GSM8K probe batch). Prints a table; writes probe.json and probe.png to --out_dir.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time

import matplotlib

matplotlib.use("Agg")  # headless

import jax  # noqa: E402  pylint: disable=wrong-import-position

from vpt.language import analysis  # noqa: E402  pylint: disable=wrong-import-position


def _lm_vpt_config(arg: str):
  spec = importlib.util.spec_from_file_location("lm_vpt", os.path.join(os.path.dirname(__file__), "lm_vpt.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def train_run(workdir: str, size: str, variant: str, steps: int) -> None:
  """A briefly trained run to probe (resumed, or left as is, if `workdir` already holds it)."""
  from vpt.language import train  # pylint: disable=import-outside-toplevel
  config = _lm_vpt_config(f"{size},{variant}")
  config.num_steps = steps
  config.checkpoint.every_steps = steps
  config.eval_every_steps = steps
  config.eval_batches = 2
  config.progress_bar = False
  config.mesh.num_devices = 1
  train.run(config, workdir)


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--workdir", default="", help="an existing vpt run; empty: train --size,--variant into OUT/run")
  p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
  p.add_argument("--out_dir", default="/tmp/vpt_value_probe")
  p.add_argument("--size", default="tiny", help="learner size when training (nano, tiny, small)")
  p.add_argument("--variant", default="value", help="lm_vpt.py variant when training (value, ntp, ...)")
  p.add_argument("--train_steps", type=int, default=150)
  p.add_argument("--n", type=int, default=64, help="number of unlabeled batches B_u")
  p.add_argument("--eta", type=float, default=None,
                 help="SGD step size (default: median ‖Δθ_AdamW‖/‖g_pre‖, a step as long as the real one)")
  p.add_argument("--probe_rows", type=int, default=16, help="held-out problems in the probe batch")
  p.add_argument("--seed", type=int, default=1, help="shuffle of the B_u stream (training used the run's seed)")
  args = p.parse_args(argv)

  os.makedirs(args.out_dir, exist_ok=True)
  start = time.time()
  workdir = args.workdir
  if not workdir:
    workdir = os.path.join(args.out_dir, "run")
    print(f"Training {args.size},{args.variant} for {args.train_steps} steps in {workdir}", flush=True)
    train_run(workdir, args.size, args.variant, args.train_steps)
  run = analysis.load_run(workdir, args.step)
  m = run.model.cfg
  print(f"Probing {workdir} at step {run.step}: learner {m.n_layers}×{m.d_model}, targets {run.vpt_cfg.mode}, "
        f"{args.n} batches of {run.config.batch_size}×{run.config.data.seq_len}", flush=True)

  batches = analysis.lm_batches(run, args.n, seed=args.seed + 1000)
  probe = analysis.feedback_batch(run, heldout=True, batch_size=args.probe_rows)
  fb = analysis.feedback_batch(run)  # the designer's g_down comes from the feedback set, not the probe
  result = analysis.value_probe(run, batches, probe, eta=args.eta, fb_batch=fb)
  seconds = time.time() - start

  print(analysis.probe_table(result), flush=True)
  setup = {"workdir": os.path.abspath(workdir), "step": run.step, "model": run.config.model.to_dict(),
           "mode": run.vpt_cfg.mode, "align_last_n_layers": run.vpt_cfg.align_last_n_layers,
           "batch": [run.config.batch_size, run.config.data.seq_len], "probe_rows": args.probe_rows,
           "sgd_on": "all parameters", "seed": args.seed, "seconds": seconds, "backend": jax.default_backend()}
  with open(os.path.join(args.out_dir, "probe.json"), "w") as f:
    json.dump({"setup": setup, **analysis.probe_json(result)}, f, indent=2)
  fig = analysis.plot_probe(result, analysis.PROBE_PAIRS[:4] + analysis.PROBE_PAIRS[4:5])
  fig.savefig(os.path.join(args.out_dir, "probe.png"), dpi=110)
  print(f"Wrote {args.out_dir}/probe.json and probe.png ({seconds:.0f} s)", flush=True)
  return result


if __name__ == "__main__":
  main(sys.argv[1:])
