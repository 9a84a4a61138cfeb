"""The base model that continued pretraining starts from, trained once and cached.

The paper continues a pretrained checkpoint (Qwen) on a stream that differs from the downstream
task; every arm (NTP, V-Pretraining, the controls) starts from the same weights. On the embedded
default there is no checkpoint to download, so `config.base` describes one: `base.num_steps` of
plain next-token prediction on a *general* mix — the clean synthetic-math generator (downstream
format, correct facts) with a share `base.irrelevant_fraction` of off-domain filler — at the
learner size and tokenizer settings of the run. Its result is a vpt run directory, used exactly as
`config.init_from` uses any other run (its newest learner params and its tokenizer).

Cache: `base.cache_dir/<key>/`, where `key` hashes everything that determines the base's weights
(the derived base config, minus the knobs that do not: progress output, logging). A second run,
another arm or another seed with the same base settings reuses it. The directory counts as built
only once `BASE_DONE.json` is written after training finished; an interrupted build resumes from its
own checkpoints on the next call; concurrent callers on one machine take turns through a lock file.

Invariants: with `base.num_steps == 0` (the schema's default) nothing happens; an explicit
`config.init_from` always wins (the user named a base); the continued run's own data, optimizer,
vpt and eval settings never enter the base.
"""

from __future__ import annotations

import copy
import fcntl
import hashlib
import json
import os
from typing import Callable

import ml_collections

from vpt.core import paths
from vpt.language import config_lib

DONE_FILE = "BASE_DONE.json"
# What sets the base's weights: its cache key. Not the mesh (it only lays the weights out: up to float
# rounding of the reductions, a base trained on 8 devices is the one trained on 1), nor the evals,
# feedback, designer or logging settings an NTP run never trains on.
_KEY_FIELDS = ("seed", "model", "data", "batch_size", "num_steps", "grad_accum_steps", "optimizer")


def default_cache_dir() -> str:
  """$VPT_CACHE_DIR/base, else ~/.cache/vpt/base."""
  root = os.environ.get("VPT_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "vpt")
  return os.path.join(root, "base")


def base_run_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The NTP run that trains the base for `config`: same learner, tokenizer settings, batch and
  sequence length; the clean generator plus filler as its data; `config.base`'s steps and optimizer."""
  b = config.base
  base = config_lib.base_config()
  with base.unlocked():
    base.model = copy.deepcopy(config.model)
    base.seed = int(b.seed)
    base.batch_size = config.batch_size
    base.num_steps = int(b.num_steps)
    base.mesh = copy.deepcopy(config.mesh)
    base.data.seq_len = config.data.seq_len
    base.data.vocab_size = config.data.vocab_size
    base.data.tokenizer_path = config.data.tokenizer_path
    base.data.truncate_long_examples = config.data.truncate_long_examples
    base.data.synthetic.seed = int(b.data_seed)
    base.data.synthetic.irrelevant_fraction = float(b.irrelevant_fraction)
    base.optimizer.learning_rate = float(b.learning_rate)
    base.optimizer.warmup_steps = max(1, int(b.num_steps) // 10)
    base.eval_every_steps = base.checkpoint.every_steps = max(1, int(b.num_steps))
    base.checkpoint.keep = 1
    base.progress_bar = config.progress_bar
  config_lib.validate(base)
  return base


def cache_key(base: ml_collections.ConfigDict) -> str:
  """A hash of what determines the base's weights (12 hex digits)."""
  fields = {k: v for k, v in base.to_dict().items() if k in _KEY_FIELDS}
  return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:12]


def base_dir(config: ml_collections.ConfigDict, base: ml_collections.ConfigDict | None = None) -> str:
  """Where the base of `config` (its `base_run_config`, if already built) is, or will be, cached."""
  base = base_run_config(config) if base is None else base
  return os.path.join(paths.norm(config.base.cache_dir or default_cache_dir()), cache_key(base))


def is_built(run_dir: str) -> bool:
  return os.path.isfile(os.path.join(run_dir, DONE_FILE))


def ensure_base(config: ml_collections.ConfigDict, train_run: Callable[..., dict]) -> str:
  """The base run directory of `config`, training it with `train_run` (vpt.language.train.run) first unless the
  cache already has it."""
  base = base_run_config(config)
  run_dir = base_dir(config, base)
  if is_built(run_dir):
    print(f"Base model: reusing {run_dir}", flush=True)
    return run_dir
  os.makedirs(run_dir, exist_ok=True)
  with open(os.path.join(run_dir, ".lock"), "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)  # another process may be building the same base: wait for it.
    if not is_built(run_dir):
      print(f"Base model: {base.num_steps} NTP steps on the clean generator with "
            f"{base.data.synthetic.irrelevant_fraction:.0%} filler, cached in {run_dir}", flush=True)
      summary = train_run(base, run_dir)
      if summary["preempted"]:
        raise SystemExit(143)  # resumes from the base's checkpoints on the next call.
      paths.write_atomic(os.path.join(run_dir, DONE_FILE), json.dumps(
          {"step": summary["step"], "eval": summary.get("eval", {}), "config_key": os.path.basename(run_dir)},
          indent=1, default=float))
  return run_dir


def with_base(config: ml_collections.ConfigDict, train_run: Callable[..., dict]) -> ml_collections.ConfigDict:
  """`config` continuing from its cached base (built with `train_run`, vpt.language.train.run, if missing);
  unchanged without a base or with an explicit init_from."""
  if config.base.num_steps <= 0 or config.init_from:
    return config
  run_dir = ensure_base(config, train_run)
  config = copy.deepcopy(config)
  with config.unlocked():
    config.init_from = run_dir
  return config
