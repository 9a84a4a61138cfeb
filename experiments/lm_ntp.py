"""Plain next-token-prediction continued pretraining (the V-Pretraining baseline).

    python -m vpt.main --config experiments/lm_ntp.py:tiny --workdir /tmp/ntp

The argument picks the learner size: nano (CI), tiny (~1M params, default), small (~25M).
"""

from vpt import config_lib


def get_config(arg: str = "tiny"):
  config = config_lib.base_config()
  config.model = config_lib.model_config(arg or "tiny")
  # A rare synthetic problem outgrows seq_len (how rare depends on the trained tokenizer): truncate it
  # rather than stop a run. User corpora keep the default (an error naming the example).
  config.data.truncate_long_examples = True
  if arg == "nano":
    config.batch_size = 8
    config.num_steps = 40
    config.optimizer.warmup_steps = 5
    config.log_every_steps = 5
    config.eval_every_steps = 20
    config.eval_batches = 2
    config.checkpoint.every_steps = 20
  elif arg in ("tiny", ""):
    config.num_steps = 400  # the README's main job: a few minutes on 2 CPU cores.
    config.optimizer.warmup_steps = 40
    config.eval_every_steps = 100
    config.checkpoint.every_steps = 100
  elif arg == "small":
    config.data.vocab_size = 4096
    config.data.seq_len = 256
    config.batch_size = 16
    config.optimizer.learning_rate = 1e-3
  return config
