"""Plain next-token-prediction continued pretraining (the V-Pretraining baseline).

    python -m vpt.main --config experiments/lm_ntp.py:tiny --workdir /tmp/ntp

The argument picks the learner size: nano (CI), tiny (~1M params, default), small (~25M).
"""

from vpt.language import config_lib


def continued_pretraining_default(config):
  """The README's main job: a base model, then continued pretraining on a stream that mismatches the
  downstream task as NuminaMath-CoT does GSM8K (the paper continues Qwen on NuminaMath-CoT, judged on
  GSM8K). A few minutes on 2 CPU cores, the base included.

  Base (trained once, cached; vpt/language/base_model.py): 600 NTP steps (lr 3e-3) on the clean generator — every
  solution ends `#### N` — with 60 % off-domain filler. Continued: 200 steps at lr 1e-3 on a stream of 30 % filler, and only 30 %
  of the solutions end `#### N`, the rest NuminaMath's `$\\boxed{N}$`. The feedback set (and the
  held-out test) are clean GSM8K format, so NTP drifts to `$\\boxed{` while the downstream wants `####`.

  How the mix was chosen (experiments/toy_math/README.md has the table): on 200 *validation* problems
  (never the test half), format share 0.15 left NTP and V-Pretraining both at 0 strict Pass@1 (the
  designer's α·r could not flip a 0.85 : 0.15 decision), 0.3 gave the designer a decision it can turn;
  the 256 held-out problems the main job reports come from the test half.
  """
  config.num_steps = 200
  config.optimizer.learning_rate = 1e-3
  config.optimizer.warmup_steps = 10
  config.eval_every_steps = 100
  config.checkpoint.every_steps = 100
  config.data.synthetic.seed = 202  # the base read seed 101: a continued stream it has not seen.
  config.data.synthetic.irrelevant_fraction = 0.3
  config.data.synthetic.downstream_format_fraction = 0.3
  config.base.num_steps = 600
  config.base.irrelevant_fraction = 0.6
  config.base.learning_rate = 3e-3
  config.eval_generation.num_items = 256
  config.eval_generation.max_new_tokens = 96
  config.eval_generation.final_only = True


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
    continued_pretraining_default(config)
  elif arg == "small":
    config.data.vocab_size = 4096
    config.data.seq_len = 256
    config.batch_size = 16
    config.optimizer.learning_rate = 1e-3
  return config
