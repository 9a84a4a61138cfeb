"""The language task (vpt.core.tasks' entry points: main_run, run, evaluate_run): config, init or restore,
feeds, the jitted step programs (vpt_step, built by vpt.core.step), evaluators, the NTP baseline comparison;
vpt.core.loop runs the steps, evals, checkpoints and preemption."""

from __future__ import annotations

import copy
import json
import math
import os
from typing import Any

import jax
import ml_collections
import numpy as np
import optax
from absl import logging

from vpt.core import (checkpoint as ckpt_lib, loop as loop_lib, lora as lora_lib, meta as meta_lib,
                      metrics as metrics_lib, paths, run_dir as run_dir_lib, sharding)
from vpt.core.optim import make_optimizer
from vpt.language import base_model, config_lib, learner_source, vpt_step
from vpt.language.data import tokenizer as tokenizer_lib
from vpt.language.data.feedback import feedback_set_records, make_feedback_iterator
from vpt.language.data.pipeline import make_lm_iterator
from vpt.language.data.sources import has_eval_split
from vpt.language.data.tokenizer import load_or_train_tokenizer
from vpt.language.evals.downstream import make_downstream_eval
from vpt.language.interop import hf as hf_interop
from vpt.language.models import lm
from vpt.language.models.designer import DesignerConfig, TaskDesigner
from vpt.language.models.lm import LMConfig, Transformer, count_nonembedding_params, count_params
from vpt.language.steps import init_train_state, make_eval_step, make_train_step, state_shardings


FEEDBACK_FIELDS = {"inputs": np.int32, "targets": np.int32, "loss_mask": np.float32, "segment_ids": np.int32,
                   "positions": np.int32}


def feedback_iterator_name(fb_set) -> str:
  """The checkpoint item of a feedback set's iterator: 'feedback' for config.feedback (as before
  multitask feedback), 'feedback_<name>' for the sets of feedback.sets."""
  return "feedback" if fb_set.field == "feedback" else f"feedback_{fb_set.name}"


def feedback_shapes(config: ml_collections.ConfigDict, plan: vpt_step.FeedbackPlan) -> Any:
  """The feedback argument of the train step as {field: (global shape, dtype)}: one batch, or
  {set name: batch} for plan.sets (training and the --dry_run compile build the same pytree)."""
  blocks = {s.name: s.config for s in config_lib.feedback_sets(config.feedback)}
  shapes = lambda fb: {k: ((fb.batch_size, fb.seq_len), dt) for k, dt in FEEDBACK_FIELDS.items()}
  if plan.sets is None:
    return shapes(config.feedback)
  return {name: shapes(blocks[name]) for name, _ in plan.sets}


def make_feedback_iterators(config: ml_collections.ConfigDict, tokenizer, plan: vpt_step.FeedbackPlan) -> dict:
  """{checkpoint item name: feedback iterator} of the sets the step reads (config.feedback alone, or
  plan.sets), each over its own records (feedback.feedback_set_records: disjoint sets)."""
  fb_sets = config_lib.feedback_sets(config.feedback)
  wanted = {fb_sets[0].name} if plan.sets is None else {name for name, _ in plan.sets}
  records = feedback_set_records(fb_sets) if len(fb_sets) > 1 else {fb_sets[0].name: None}

  def iterator(fb_set):
    try:
      return make_feedback_iterator(fb_set.config, tokenizer, seed=config.seed, process_index=jax.process_index(),
                                    process_count=jax.process_count(), records=records[fb_set.name])
    except ValueError as e:
      if fb_set.field == "feedback":
        raise
      raise ValueError(f"config.{fb_set.field} (feedback set {fb_set.name!r}): {e}") from None

  return {feedback_iterator_name(s): iterator(s) for s in fb_sets if s.name in wanted}


class _FeedbackFeed:
  """Feedback batches for the step: a fresh one on meta steps, a resident placeholder otherwise.

  The jitted step reads the feedback batch only under its meta-step branch, so other steps pass
  the last batch again (no transfer) and the feedback iterators advance once per meta step —
  which keeps their checkpointed positions exact. With several sets (plan.sets) the batch is
  {set name: batch}, one from each set's iterator.
  """

  def __init__(self, iterators: dict, config, plan: vpt_step.FeedbackPlan, mesh):
    self.vpt_cfg, self.mesh, self.plan = config.vpt, mesh, plan
    self.shapes = feedback_shapes(config, plan) if iterators else None
    fb_sets = config_lib.feedback_sets(config.feedback)
    # set name -> its iterator, for the sets the step reads (one plain batch when plan.sets is None)
    self.iterators = {s.name: iterators[feedback_iterator_name(s)] for s in fb_sets
                      if feedback_iterator_name(s) in iterators}
    self.current = None

  def _next(self):
    if self.plan.sets is None:
      (iterator,) = self.iterators.values()  # the one set's iterator (a batch per next())
      return sharding.global_batch(next(iterator), self.mesh)
    return {name: sharding.global_batch(next(self.iterators[name]), self.mesh) for name, _ in self.plan.sets}

  def _zeros(self):
    local = lambda shape, dt: np.zeros((shape[0] // jax.process_count(), shape[1]), dt)
    zeros = jax.tree.map(lambda leaf: local(*leaf), self.shapes, is_leaf=lambda x: isinstance(x, tuple))
    if self.plan.sets is None:
      return sharding.global_batch(zeros, self.mesh)
    return {name: sharding.global_batch(batch, self.mesh) for name, batch in zeros.items()}

  def batch_for(self, step: int):
    if not self.iterators:
      return None
    if meta_lib.is_meta_step(step, self.vpt_cfg.burn_in_steps, self.vpt_cfg.meta_every):
      self.current = self._next()
    elif self.current is None:
      self.current = self._zeros()
    return self.current


def _generation_eval(config, model, tokenizer, mesh=None):
  """Greedy generation on held-out problems (vpt/language/evals/math_skills.py: strict and format-agnostic
  Pass@1, `####` rate, facts right, lines per solution), or None when switched off."""
  gen = config.eval_generation
  if gen.num_items <= 0:
    return None
  from vpt.language.data.feedback import heldout_records
  from vpt.language.evals import math_skills
  fb_cfg = copy.deepcopy(config.feedback)
  with fb_cfg.unlocked():
    fb_cfg.num_eval = gen.num_items
  records = heldout_records(fb_cfg, split=gen.split)
  if not records:
    raise ValueError("config.eval_generation.num_items > 0 needs held-out problems: feedback.source='synthetic' "
                     "or feedback.eval_path")
  return math_skills.make_generation_evaluator(model, tokenizer, records, max_new_tokens=gen.max_new_tokens,
                                               mesh=mesh)


EVAL_SPLITS = ("validation", "test")  # the held-out problems' halves (config.eval_generation.split)
EVAL_ONLY_ITEMS = 256  # eval-only on a run trained without the generation eval (eval_generation.num_items = 0)


def evaluate_run(workdir: str, split: str = "test", step: int | None = None) -> dict[str, Any]:
  """Eval-only (`python -m vpt.main --eval_only --workdir RUN`): greedy generation on the run's held-out
  problems (its config.eval_generation, on `split`) by the newest checkpoint's learner (or `step`'s);
  written to workdir/eval_<split>.json and metrics.jsonl (prefix eval_<split>/)."""
  from vpt.language.evals import gsm8k  # pylint: disable=g-import-not-at-top (generation: eval-only)
  if split not in EVAL_SPLITS:
    raise ValueError(f"split={split!r}: expected one of {EVAL_SPLITS}")
  config = run_dir_lib.read_config(workdir, config_lib.base_config())
  with config.unlocked():
    config.eval_generation.split = split
    config.eval_generation.num_items = config.eval_generation.num_items or EVAL_ONLY_ITEMS
  mesh = gsm8k.eval_mesh(workdir)
  model, params, tokenizer, step = learner_source.load_learner(workdir, step, mesh=mesh)
  results = {"step": step, **_generation_eval(config, model, tokenizer, mesh=mesh)(params)}
  if jax.process_index() == 0:
    paths.write_atomic(paths.path(workdir) / f"eval_{split}.json", json.dumps(results, indent=2, default=float))
    with metrics_lib.MetricWriter(workdir) as writer:
      writer.write_scalars(step, {k: v for k, v in results.items() if k != "step"}, prefix=f"eval_{split}")
  return results


def _evaluate(config, tokenizer, eval_step, params, mesh) -> dict[str, float]:
  if not has_eval_split(config.data):
    return {}  # file corpora have a held-out split only when data.eval_path names one.
  it = make_lm_iterator(config.data, tokenizer, split="eval", global_batch_size=config.batch_size,
                        seq_len=config.data.seq_len, seed=config.seed,
                        process_index=jax.process_index(), process_count=jax.process_count())
  loss_sum, count = 0.0, 0.0
  for _ in range(config.eval_batches):
    try:
      batch = next(it)
    except StopIteration:
      break
    out = jax.device_get(eval_step(params, sharding.global_batch(batch, mesh)))
    loss_sum += float(out["loss_sum"])
    count += float(out["loss_tokens"])
  loss = loss_sum / max(count, 1.0)
  return {"loss": loss, "perplexity": float(np.exp(min(loss, 30.0))), "loss_tokens": count}


def make_learner_optimizer(config: ml_collections.ConfigDict, model_cfg: LMConfig):
  """(optimizer, schedule) of the learner: AdamW from config.optimizer; with LoRA it updates the
  adapters alone (the base is frozen and has no optimizer state)."""
  optimizer, schedule = make_optimizer(config.optimizer, config.num_steps)
  if model_cfg.lora_rank > 0:
    optimizer = lora_lib.freeze_base(optimizer)
  return optimizer, schedule


def make_init_fn(config: ml_collections.ConfigDict, model: Transformer, optimizer: optax.GradientTransformation):
  """() -> the initial TrainState (learner, its optimizer state and, for V-Pretraining, the designer)."""
  vpt_cfg = config.vpt

  def init_fn():
    state = init_train_state(model, optimizer, config.data.seq_len, config.seed)
    if vpt_step.uses_designer(vpt_cfg):
      designer = TaskDesigner(DesignerConfig.from_config(vpt_cfg))
      state = state.replace(designer=vpt_step.init_designer_state(
          designer, vpt_step.make_designer_optimizer(vpt_cfg), state.params, config.data.seq_len,
          vpt_cfg.top_k, config.seed, vpt_step.g_down_average_init(vpt_cfg, state.params, model.cfg.n_layers)))
    return state

  return init_fn


def jit_train_step(config: ml_collections.ConfigDict, model: Transformer, optimizer: optax.GradientTransformation,
                   schedule: optax.Schedule, shardings: Any, mesh, meta: bool | None = None) -> Any:
  """The jitted step `(state, batch, fb_batch) -> (state, metrics)` with explicit shardings and the
  state donated; fb_batch is ignored (None) unless the mode has a designer. `meta`: None — the meta
  step under lax.cond; True / False — the host-dispatched meta / plain program (vpt.dispatch='host')."""
  vpt_cfg = config.vpt
  batch_sh = sharding.batch_sharding(mesh)
  out_sh = (shardings, sharding.replicated(mesh))
  if vpt_cfg.mode == "ntp":
    step_fn = make_train_step(model, optimizer, schedule, config.grad_accum_steps)
    return jax.jit(lambda st, b, fb: step_fn(st, b), in_shardings=(shardings, batch_sh, None),
                   out_shardings=out_sh, donate_argnums=(0,))
  step_fn = vpt_step.make_vpt_train_step(model, optimizer, schedule, vpt_cfg, config.optimizer,
                                         config.grad_accum_steps, plan=vpt_step.feedback_plan(config), meta=meta)
  fb_sh = batch_sh if vpt_step.uses_designer(vpt_cfg) else None
  return jax.jit(step_fn, in_shardings=(shardings, batch_sh, fb_sh), out_shardings=out_sh, donate_argnums=(0,))


def run(config: ml_collections.ConfigDict, workdir: str, *, stop_after: int | None = None) -> dict[str, Any]:
  """Trains to `config.num_steps` (resuming from `workdir` if it holds checkpoints).

  `stop_after`: stop (and checkpoint) after this step as a preemption would — for tests and
  time-sliced schedules; a later `run` resumes there. Returns a summary dict (final train/eval
  metrics, throughput, whether the run stopped early) with the final state under "state".
  """
  config_lib.validate(config)
  return _train(config, workdir, stop_after=stop_after)


def _train(config: ml_collections.ConfigDict, workdir: str, *, stop_after: int | None = None) -> dict[str, Any]:
  """`run` on a validated config."""
  sharding.maybe_initialize_distributed(config.multihost)
  workdir = paths.norm(workdir)  # local paths absolute; gs:// and other URLs through etils.epath
  paths.makedirs(workdir)
  is_main = jax.process_index() == 0

  # Everything that can fail on bad input (data files, tokenizer, model config, mesh) runs
  # before a checkpoint directory is created, so a bad start leaves no partial checkpoint; the
  # config is recorded after the restore, once the run is known to start.
  data_cfg = config.data
  hf_dir = None
  if config.init_from:
    own_hf = os.path.join(workdir, run_dir_lib.HF_SUBDIR)  # copied at the first start: init_from may be gone.
    hf_dir = own_hf if hf_interop.is_hf_dir(own_hf) else hf_interop.hf_files_dir(config.init_from)
    if hf_dir:  # its config.json sets the learner's shape; its files make this run self-contained.
      config = hf_interop.config_with_hf_model(config, hf_dir)
      if is_main:
        hf_interop.copy_hf_files(hf_dir, own_hf)
  # The run keeps its own copy of the tokenizer (WORKDIR/tokenizer/), so a restart needs neither
  # data.tokenizer_path nor init_from to exist; without either it trains one there.
  if data_cfg.tokenizer_path:
    source, what = data_cfg.tokenizer_path, "data.tokenizer_path"
  elif config.init_from:  # continue with the base run's tokenizer.
    init = config.init_from
    source = (init if learner_source.is_hf(init) else run_dir_lib.tokenizer_file(init)) or os.path.join(
        init, run_dir_lib.TOKENIZER_SUBDIR, run_dir_lib.SPM_NAME)
    what = f"the tokenizer of config.init_from={init!r}"
  else:
    source = what = None
  if hf_dir and paths.path(source).exists():  # size, special tokens and (with both files) encodings vs the
    hf_interop.check_tokenizer(tokenizer_lib.load_tokenizer(source), hf_dir)  # checkpoint's, before any copy
  own_tokenizer = tokenizer_lib.adopt_tokenizer(source, workdir, what=what)
  if own_tokenizer:
    data_cfg = copy.deepcopy(data_cfg)
    with data_cfg.unlocked():
      data_cfg.tokenizer_path = own_tokenizer
  tokenizer = load_or_train_tokenizer(data_cfg, workdir)
  model_cfg = LMConfig.from_config(config.model, tokenizer.vocab_size)
  mesh = sharding.make_mesh(config.mesh)
  model = Transformer(model_cfg, batch_sharding=sharding.batch_sharding(mesh))  # batch-sharded activations
  if config.batch_size % (mesh.shape["data"] * mesh.shape["fsdp"]):
    raise ValueError(f"config.batch_size={config.batch_size} is not divisible by the data-parallel size "
                     f"{mesh.shape['data'] * mesh.shape['fsdp']} (mesh.data × mesh.fsdp)")
  train_iter = make_lm_iterator(config.data, tokenizer, split="train", global_batch_size=config.batch_size,
                                seq_len=config.data.seq_len, seed=config.seed,
                                process_index=jax.process_index(), process_count=jax.process_count())
  first_batch = next(train_iter)  # surfaces data errors (e.g. an example longer than seq_len) now.

  vpt_cfg = config.vpt
  uses_designer = vpt_step.uses_designer(vpt_cfg)
  iterators = {"data": train_iter}
  plan = vpt_step.feedback_plan(config)
  if uses_designer:
    iterators.update(make_feedback_iterators(config, tokenizer, plan))

  optimizer, schedule = make_learner_optimizer(config, model_cfg)
  init_fn = make_init_fn(config, model, optimizer)

  abstract_state = jax.eval_shape(init_fn)
  shardings = state_shardings(abstract_state, mesh, optimizer)

  checkpointer = ckpt_lib.Checkpointer(run_dir_lib.checkpoint_dir(workdir), keep=config.checkpoint.keep,
                                       async_save=config.checkpoint.async_save, iterator_names=tuple(iterators))
  state, restored_step = loop_lib.restore_run(checkpointer, ckpt_lib.abstract_like(abstract_state, shardings),
                                              iterators, config, workdir)
  if state is None:
    state = jax.jit(init_fn, out_shardings=shardings)()
    if config.init_from:
      params, base_step = learner_source.load_params(  # a vpt run's checkpoint, or an HF directory's weights
          config.init_from, ckpt_lib.abstract_like(abstract_state.params, shardings.params))
      state = state.replace(params=ckpt_lib.overlay_params(state.params, params))
      print(f"Initialised the learner from {config.init_from} (step {base_step})", flush=True)
    pending_batch = first_batch
  else:
    logging.info("Resumed from step %d", restored_step)
    print(f"Resuming from checkpoint at step {restored_step}", flush=True)
    pending_batch = None  # the restored iterator continues where the checkpoint left it.

  n_params = count_params(abstract_state.params)
  n_nonembed = count_nonembedding_params(abstract_state.params)
  flops_per_token = lm.flops_per_token(
      n_params_nonembed=n_nonembed, n_layers=model_cfg.n_layers, d_model=model_cfg.d_model,
      seq_len=config.data.seq_len, vocab_size=model_cfg.vocab_size, n_heads=model_cfg.n_heads,
      head_dim=model_cfg.resolved_head_dim)
  peak_flops, peak_source = metrics_lib.device_peak_flops(dtype=model_cfg.dtype)

  batch_sh = sharding.batch_sharding(mesh)
  programs = {m: jit_train_step(config, model, optimizer, schedule, shardings, mesh, meta=m)
              for m in meta_lib.programs_for(config.vpt.dispatch, uses_designer)}
  feedback = _FeedbackFeed({k: v for k, v in iterators.items() if k != "data"}, config, plan, mesh)
  generation_eval = _generation_eval(config, model, tokenizer)
  downstream_eval = make_downstream_eval(model, config.feedback, tokenizer, mesh, seed=config.seed,
                                         num_batches=config.eval_batches)
  eval_step = jax.jit(make_eval_step(model), in_shardings=(shardings.params, batch_sh),
                      out_shardings=sharding.replicated(mesh))

  if is_main:  # nothing more fails on bad input: the run starts. config.json, or config.<n>.json if changed.
    run_dir_lib.write_config(config, workdir)
  writer = metrics_lib.MetricWriter(workdir, enabled=is_main)
  start_step = int(jax.device_get(state.step))
  if is_main and start_step == 0:
    print(f"Learner: {n_params:,} params ({n_nonembed:,} non-embedding); mesh {dict(mesh.shape)}; "
          f"{config.num_steps} steps of {config.batch_size}×{config.data.seq_len} tokens", flush=True)
  tokens_per_step = config.batch_size * config.data.seq_len
  rates = lambda steps, seconds: metrics_lib.throughput_stats(
      steps=steps, seconds=seconds, tokens=steps * tokens_per_step, flops_per_token=flops_per_token,
      peak_flops_per_device=peak_flops, num_devices=jax.device_count())

  def next_step(step: int) -> loop_lib.StepCall:
    nonlocal pending_batch
    batch, pending_batch = (pending_batch if pending_batch is not None else next(train_iter)), None
    meta = uses_designer and bool(meta_lib.is_meta_step(step, vpt_cfg.burn_in_steps, vpt_cfg.meta_every))
    key = meta_lib.program_key(programs, meta)
    return loop_lib.StepCall(key, programs[key], (sharding.global_batch(batch, mesh), feedback.batch_for(step)), meta)

  def evaluate(state, step: int) -> dict[str, float]:
    result = _evaluate(config, tokenizer, eval_step, state.params, mesh)
    result.update(downstream_eval(state.params))
    if generation_eval is not None and (step == config.num_steps or not config.eval_generation.final_only):
      result.update(generation_eval(jax.device_get(state.params)))
    return result

  loop_schedule = loop_lib.Schedule(config.num_steps, config.log_every_steps, config.eval_every_steps,
                                    config.checkpoint.every_steps, stop_after)
  result = loop_lib.run_loop(
      state, start_step, loop_schedule, next_step=next_step, evaluate=evaluate, rates=rates,
      progress_fields=lambda host: {"loss": host["loss"], "tok/s": host.get("tokens_per_sec", 0.0)},
      checkpointer=checkpointer, iterators=iterators, writer=writer, show_progress=is_main and config.progress_bar)
  state, step, timer, last_train = result.state, result.step, result.timer, result.last_train
  checkpointer.close()
  writer.close()
  summary: dict[str, Any] = {"preempted": result.preempted, "start_step": start_step}
  if result.last_eval is not None:
    summary["eval"] = result.last_eval
  summary.update(step=step, train=last_train, num_params=n_params, peak_flops=peak_flops, peak_source=peak_source)
  if timer.steps:
    summary["throughput"] = rates(timer.steps, timer.seconds)
  if uses_designer and data_cfg.source == "synthetic_math" and not summary["preempted"]:
    from vpt.language.evals import math_skills  # where the designer acted, by the class of the true token
    summary["designer"] = math_skills.designer_on_stream(
        config, model, jax.device_get(state.params), jax.device_get(state.designer.params), tokenizer)
  if is_main:
    loop_lib.print_summary(summary, summary_table({summary.get("name", "run"): summary}))
    paths.write_atomic(paths.path(workdir) / "summary.json", json.dumps(summary, indent=2, default=float))
  summary["state"] = state
  return summary


SUMMARY_ROWS = (  # (label, section, key, format); a key with a `<key>_se` beside it prints "value ± se".
    ("held-out strict Pass@1 (#### N)", "eval", "strict_pass@1", "{:.3f}"),
    ("held-out Pass@1 (format-agnostic)", "eval", "pass@1", "{:.3f}"),
    ("  `####` rate", "eval", "format_rate", "{:.3f}"),
    ("  arithmetic facts right", "eval", "facts_right", "{:.3f}"),
    ("  lines per solution", "eval", "lines_per_solution", "{:.2f}"),
    ("feedback-set loss L_down", "eval", "feedback_loss", "{:.4f}"),
    ("held-out downstream loss", "eval", "heldout_loss", "{:.4f}"),
    ("held-out pretraining perplexity", "eval", "perplexity", "{:.3f}"),
    ("train loss", "train", "loss", "{:.4f}"),
    ("α where the stream writes the answer marker", "designer", "alpha_format", "{:.3f}"),
    ("α on digits", "designer", "alpha_digit", "{:.3f}"),
    ("α on words", "designer", "alpha_word", "{:.3f}"),
    ("q(####) where the stream writes $\\boxed{", "designer", "q_hash_at_boxed", "{:.3f}"),
    ("mean α (training)", "train", "alpha_mean", "{:.4f}"),
    ("entropy of r", "train", "r_entropy", "{:.3f}"),
    ("value V (last meta step)", "train", "meta/value", "{:.3e}"),
    ("cos(g_down, g_pre)", "train", "meta/cosine", "{:.4f}"),
    ("g_down split-half cos (signal quality)", "train", "meta/g_down_split_cos", "{:.4f}"),
    ("share of time in meta steps", "train", "meta_time_fraction", "{:.3f}"),
    ("tokens/s", "throughput", "tokens_per_sec", "{:,.0f}"),
)


def summary_table(summaries: dict[str, dict[str, Any]]) -> str:
  """The language runs' table (SUMMARY_ROWS), one column per run."""
  return loop_lib.summary_table(summaries, SUMMARY_ROWS)


def verdict(vpt: dict[str, Any], ntp: dict[str, Any]) -> str:
  """One line per held-out accuracy: V-Pretraining − NTP ± the standard error of the difference
  (independent binomials on the same problems: conservative), and whether it is beyond 2 s.e."""
  lines = []
  for key, what in (("strict_pass@1", "strict Pass@1"), ("pass@1", "format-agnostic Pass@1"),
                    ("facts_right", "facts right")):
    a, b = vpt.get("eval", {}), ntp.get("eval", {})
    if key not in a or key not in b:
      continue
    diff, se = a[key] - b[key], math.hypot(a[f"{key}_se"], b[f"{key}_se"])
    call = ("V-Pretraining better" if diff > 2 * se else "NTP better" if diff < -2 * se
            else "no difference beyond noise")
    lines.append(f"  {what}: {diff:+.3f} ± {se:.3f} → {call}")
  return "\n".join(lines)


def main_run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """What `python -m vpt.main` runs for a language config (vpt.core.tasks): validate it (the one
  validation: the base's config and the baseline's are derived from it), build or reuse its base model
  (config.base), then train — with the NTP baseline beside it if asked."""
  config_lib.validate(config)
  config = base_model.with_base(config, _train)  # config.base: train (or reuse) the base, continue from it
  return (_run_with_baseline if config.compare_with_baseline else _train)(config, workdir)


def _run_with_baseline(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Runs `config` and then the NTP baseline (same data, steps, optimizer) in workdir/baseline_ntp,
  and prints both side by side. The baseline is skipped if `config` is itself NTP."""
  summary = _train(config, workdir)
  if config.vpt.mode == "ntp" or summary["preempted"]:
    return summary
  baseline = copy.deepcopy(config)
  with baseline.unlocked():
    baseline.vpt.mode = "ntp"
  print("\nNTP baseline (same data, steps and optimizer):", flush=True)
  base_summary = _train(baseline, os.path.join(workdir, "baseline_ntp"))
  if jax.process_index() == 0:
    print(f"\nV-Pretraining ({config.vpt.mode}, align={config.vpt.align}) vs the NTP baseline:")
    print(summary_table({"V-Pretraining": summary, "NTP baseline": base_summary}), flush=True)
    lines = verdict(summary, base_summary)
    if lines:
      n = int(summary["eval"].get("n_items", 0))
      print(f"\nV-Pretraining − NTP on {n} held-out {config.eval_generation.split} problems "
            f"(± s.e.; 2 s.e. ≈ 95 %):\n{lines}", flush=True)
  summary["baseline"] = base_summary
  return summary
