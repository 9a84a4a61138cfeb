"""What a math learner can do, judged on its greedy generations and on where the designer acted.

Generation (held-out problems, greedy, no checkpoint selection):
  - strict Pass@1: the `#### N` line holds the gold answer (the downstream format);
  - format-agnostic Pass@1: the last number written is the gold answer (the skill without the format);
  - `####` rate: share of solutions that end in the downstream format at all;
  - facts right: share of the `a op b = c` facts written in all solutions that are arithmetically
    right — a measure of skill with 2–4 samples per problem instead of one;
  - lines per solution: a truncated or run-on solution shows here before it shows in Pass@1.
Each rate comes with its binomial standard error sqrt(p(1−p)/n) over its n trials.

Designer (a batch of the *training* stream, the stream the designer shapes; held-out text is clean):
  α by the class of the true next token (`format`: the answer markers `####` / `$\\boxed{`), and the
  mass q puts on `####` where the stream writes `$\\boxed{` — the downstream format the designer can
  restore: q(####) = (1 − α)·[y = ####] + α·r(####).
Teacher-forced: the answer NLL on held-out problems split into format and content tokens.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from vpt.language.data import synthetic_math
from vpt.language.evals import gsm8k

TOKEN_CLASSES = ("format", "digit", "operator", "newline", "word")


def token_class(piece: str) -> str:
  """The class of a tokenizer piece: the answer markers ('####', '$\\boxed{' and pieces of them) are
  'format'; else digit, operator, newline or word."""
  if "#" in piece or "boxed" in piece:
    return "format"
  if any(c.isdigit() for c in piece):
    return "digit"
  if any(c in "+-*/=" for c in piece):
    return "operator"
  if "\n" in piece:
    return "newline"
  return "word"


def binomial_se(p: float, n: int) -> float:
  return math.sqrt(max(p * (1.0 - p), 0.0) / n) if n > 0 else float("nan")


def fact_counts(texts: Sequence[str]) -> tuple[int, int]:
  """(facts right, facts written) over all `a op b = c` facts in `texts`."""
  facts = [f for text in texts for f in synthetic_math.extract_equations(text)]
  return sum(synthetic_math.evaluate(a, op, b) == c for a, op, b, c in facts), len(facts)


def lines_per_solution(texts: Sequence[str]) -> float:
  return float(np.mean([sum(bool(line.strip()) for line in t.splitlines()) for t in texts])) if texts else 0.0


def generation_scores(scores: dict, predictions: Sequence[dict]) -> dict[str, float]:
  """The metrics of the module docstring from `gsm8k.evaluate(..., return_predictions=True)`."""
  texts = [p["generated"] for p in predictions]
  n = len(predictions)
  right, written = fact_counts(texts)
  out = {"pass@1": scores["pass@1"], "strict_pass@1": scores["strict_pass@1"], "format_rate": scores["format_rate"],
         "facts_right": right / max(written, 1), "facts_written": float(written),
         "lines_per_solution": lines_per_solution(texts), "n_items": float(n)}
  for key, trials in (("pass@1", n), ("strict_pass@1", n), ("format_rate", n), ("facts_right", written)):
    out[f"{key}_se"] = binomial_se(out[key], trials)
  return out


def make_generation_evaluator(model, tokenizer, records: Sequence[dict], *, max_new_tokens: int,
                              batch_size: int = 32, mesh=None) -> Callable[[Any], dict[str, float]]:
  """params -> `generation_scores` on fixed held-out records (greedy Pass@1)."""
  records = list(records)

  def evaluate_params(params, out_path: str | None = None) -> dict[str, float]:
    scores, predictions = gsm8k.evaluate(model, params, tokenizer, records, max_new_tokens=max_new_tokens,
                                         batch_size=batch_size, mesh=mesh, out_path=out_path,
                                         return_predictions=True)
    return generation_scores(scores, predictions)

  return evaluate_params


def _piece_classes(tokenizer) -> np.ndarray:
  return np.array([TOKEN_CLASSES.index(token_class(tokenizer.id_to_piece(i))) for i in range(tokenizer.vocab_size)])


def _marker_ids(tokenizer, marker: str) -> list[int]:
  """The ids of the pieces that spell `marker` whole (with or without sentencepiece's word-start '▁')."""
  return [i for i in range(tokenizer.vocab_size) if tokenizer.id_to_piece(i).lstrip("\u2581") == marker]


def designer_by_class(alpha, r, cand_ids, targets, loss_mask, tokenizer) -> dict[str, float]:
  """Mean α per class of the true next token, and the mean q(####) where the stream writes `$\\boxed{`
  (NaN where a class or the marker does not occur). Arrays: α, targets, mask [B, T]; r, cand [B, T, K]."""
  alpha, r, cand_ids = np.asarray(alpha, np.float64), np.asarray(r, np.float64), np.asarray(cand_ids)
  targets, mask = np.asarray(targets), np.asarray(loss_mask) > 0
  classes = _piece_classes(tokenizer)[targets]
  out = {}
  for k, name in enumerate(TOKEN_CLASSES):
    sel = mask & (classes == k)
    out[f"alpha_{name}"] = float(alpha[sel].mean()) if sel.any() else float("nan")
  hashes, boxed = _marker_ids(tokenizer, "####"), _marker_ids(tokenizer, "$\\boxed{")
  at_boxed = mask & np.isin(targets, boxed)
  if at_boxed.any() and hashes:
    r_hash = (r * np.isin(cand_ids, hashes)).sum(-1)
    out["q_hash_at_boxed"] = float((alpha * r_hash)[at_boxed].mean())  # y = boxed there, so no one-hot term.
  else:
    out["q_hash_at_boxed"] = float("nan")
  return out


def answer_nll_by_class(model, params, tokenizer, batches) -> dict[str, float]:
  """Mean answer-token NLL over feedback-format `batches`, split into format and content tokens."""
  classes = _piece_classes(tokenizer) == TOKEN_CLASSES.index("format")
  logp_fn = jax.jit(lambda p, b: jnp.take_along_axis(jax.nn.log_softmax(model.apply(
      {"params": p}, b["inputs"], b["positions"], b["segment_ids"])), b["targets"][..., None], -1)[..., 0])
  sums, counts = {"format": 0.0, "content": 0.0}, {"format": 0.0, "content": 0.0}
  for b in batches:
    nll = -np.asarray(logp_fn(params, b), np.float64)
    mask = np.asarray(b["loss_mask"]) > 0
    is_format = classes[np.asarray(b["targets"])]
    for name, sel in (("format", mask & is_format), ("content", mask & ~is_format)):
      sums[name] += float(nll[sel].sum())
      counts[name] += float(sel.sum())
  return {f"answer_nll_{k}": sums[k] / max(counts[k], 1.0) for k in sums}


def designer_on_stream(config, model, params, designer_params, tokenizer, *, seed: int = 12_345) -> dict[str, float]:
  """`designer_by_class` on one fresh batch of the run's *training* stream (styled as it trains; the
  held-out stream is clean and shows no answer-format decision to make)."""
  from vpt.language import vpt_step  # pylint: disable=g-import-not-at-top (vpt_step imports the models)
  from vpt.language.data.pipeline import make_lm_iterator  # pylint: disable=g-import-not-at-top
  from vpt.language.models.designer import DesignerConfig, TaskDesigner  # pylint: disable=g-import-not-at-top
  from vpt.language.soft_targets import candidate_logprobs, candidates  # pylint: disable=g-import-not-at-top
  vpt_cfg = config.vpt
  designer = TaskDesigner(DesignerConfig.from_config(vpt_cfg)) if vpt_step.uses_designer(vpt_cfg) else None
  batch = jax.tree.map(jnp.asarray, next(make_lm_iterator(
      config.data, tokenizer, split="train", global_batch_size=config.batch_size, seq_len=config.data.seq_len,
      seed=seed)))

  @jax.jit
  def targets(params, designer_params, b):
    logits = model.apply({"params": params}, b["inputs"], b["positions"], b["segment_ids"])
    cand = candidates(logits, b["targets"], vpt_cfg.top_k)
    alpha, r = vpt_step.designer_targets(vpt_cfg, designer, designer_params, params["embed_tokens"]["embedding"],
                                         b, cand, candidate_logprobs(logits, cand))
    return alpha, r, cand

  alpha, r, cand = jax.device_get(targets(params, designer_params, batch))
  return designer_by_class(alpha, r, cand, batch["targets"], batch["loss_mask"], tokenizer)
