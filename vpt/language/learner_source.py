"""The LM learner from a source path: a vpt run directory or a Hugging Face model directory.

This is the one place that decides which of the two a path is (`is_hf`: its config.json names
`architectures` or `model_type`, as an HF checkpoint's does; a vpt run's config.json is a vpt config)
and reads it through the matching reader: vpt.core.checkpoint (checkpoints/<step>/state) or vpt.language.interop.hf
(safetensors). The training loop (`config.init_from`) and the evals (`--workdir`) call it. It sits
above both readers, so vpt.core.checkpoint never imports the HF interop, and the HF interop imports the
checkpointer at its top (for `import` / `export`) without a cycle.

An HF directory has one set of weights, read as step 0.
"""

from __future__ import annotations

from typing import Any

import jax

from vpt.core import checkpoint as ckpt_lib, run_dir as run_dir_lib
from vpt.language import config_lib
from vpt.language.data.tokenizer import HFTokenizer, run_tokenizer
from vpt.language.interop import hf
from vpt.language.models.lm import SHARDING_RULES, LMConfig, Transformer


def is_hf(source: str) -> bool:
  """Whether `source` is a Hugging Face model directory (else it is read as a vpt run directory)."""
  return hf.is_hf_dir(source)


def _hf_step(source: str, step: int | None, what: str) -> None:
  if step not in (None, 0):
    raise ValueError(f"{what}{source!r}: step={step}, but a Hugging Face directory holds one set of weights "
                     "(step 0); leave the step unset")


def load_params(source: str, abstract_params: Any, step: int | None = None, *,
                what: str = "config.init_from=") -> tuple[Any, int]:
  """(params, step) of `source` (newest checkpoint, or `step`) read straight into the shapes and
  shardings of `abstract_params` (ShapeDtypeStructs), to start a run from. The LoRA adapter leaves of
  `abstract_params` that the source lacks (always, for HF) are left out: overlay the result on the
  initialised params (vpt.core.checkpoint.overlay_params) so they keep their initialisation."""
  if is_hf(source):
    _hf_step(source, step, what)
    return hf.load_params(source, abstract_params), 0
  return ckpt_lib.load_learner_params(source, abstract_params, step)


def load_learner(source: str, step: int | None = None, *, mesh: jax.sharding.Mesh | None = None,
                 what: str = "--workdir=") -> tuple[Transformer, Any, Any, int]:
  """(model, params, tokenizer, step) to evaluate: a vpt run directory's config, tokenizer and checkpoint
  (newest, or `step`; whatever its tree, LoRA leaves included), or an HF directory's config, weights and
  tokenizer.json (step 0). Params are sharded over `mesh` by vpt.core.sharding's rules (else on one device)."""
  if is_hf(source):
    _hf_step(source, step, what)
    tokenizer = HFTokenizer(source)
    hf.check_tokenizer(tokenizer, source)
    params, cfg = hf.import_params(source, mesh=mesh)
    return Transformer(cfg), params, tokenizer, 0
  config = run_dir_lib.read_config(source, config_lib.base_config())  # new fields keep their defaults
  tokenizer = run_tokenizer(source, config.data)
  model = Transformer(LMConfig.from_config(config.model, tokenizer.vocab_size))
  params, step = ckpt_lib.restore_learner_params(source, step, mesh=mesh, rules=SHARDING_RULES, what=what)
  return model, params, tokenizer, step
