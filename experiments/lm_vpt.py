"""V-Pretraining for language models, and the paper's ablations, on the embedded default.

    python -m vpt.main --config experiments/lm_vpt.py:tiny,value --workdir /tmp/vpt

The argument is `size[,variant]`: size as in lm_ntp.py (nano, tiny, small); variant one of

    ntp              baseline: one-hot targets, no designer, no meta step (== lm_ntp.py)
    value            V-Pretraining, dot-product value (default)
    value_cosine     V-Pretraining, exact cosine alignment
    random_feedback  g_down replaced by a random direction of the same norm
    uniform_topk     r uniform over the K candidates, fixed α
    self_distill     r = the learner's renormalised top-K probabilities, fixed α
"""

import os


from vpt.core import config as core_config

VARIANTS = {
    "ntp": dict(mode="ntp"),
    "value": dict(mode="value", align="dot"),
    "value_cosine": dict(mode="value", align="cosine"),
    "random_feedback": dict(mode="random_feedback", align="dot"),
    "uniform_topk": dict(mode="uniform_topk"),
    "self_distill": dict(mode="self_distill"),
}


def _ntp_config(size):
  return core_config.load_config_file(os.path.join(os.path.dirname(__file__), "lm_ntp.py"), size)


def get_config(arg: str = "tiny,value"):
  size, _, variant = (arg or "tiny,value").partition(",")
  variant = variant or "value"
  if variant not in VARIANTS:
    raise ValueError(f"variant {variant!r} unknown; expected one of {sorted(VARIANTS)}")
  config = _ntp_config(size or "tiny")
  config.vpt.update(VARIANTS[variant])
  # A designer much smaller than the learner (the paper's is 6×256 next to 0.5B–7B learners).
  d = config.vpt.designer
  if size == "nano":
    d.d_model, d.n_layers, d.n_heads, d.d_ff = 16, 1, 2, 32
    config.vpt.top_k = 8
    config.vpt.meta_every = 4
    config.feedback.batch_size = 8
    config.feedback.seq_len = 128
    d.learning_rate = 1e-3
  elif size in ("tiny", ""):
    d.d_model, d.n_layers, d.n_heads, d.d_ff = 64, 2, 4, 128
    config.vpt.top_k = 16
    config.feedback.seq_len = 128
    # Chosen on validation problems (experiments/toy_math/README.md): a designer step every 4 learner
    # steps at lr 3e-3 moved r to `####` at the answer decision; every 8 at 1e-3 had too few updates.
    config.vpt.meta_every = 4
    config.vpt.burn_in_steps = 20
    d.learning_rate = 3e-3
  else:
    d.d_model, d.n_layers, d.n_heads, d.d_ff = 128, 2, 4, 384
    d.learning_rate = 1e-3
  return config
