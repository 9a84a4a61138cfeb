"""Inspecting gradient alignment: helpers for notebooks and scripts.

  load_run / tiny_run        a trained run from its workdir, or a tiny in-memory one
  lm_batches / feedback_batch  unlabeled batches B_u and (held-out) feedback batches
  per_layer_alignment        ‖g_down‖, ‖g_pre‖, ⟨g_down, g_pre⟩ and cosine per parameter group
  candidate_scores           s_t(v) = ⟨g_down, ∇ log p(v | x_<t)⟩ for every candidate (one JVP)
  target_breakdown           the designer's α, r and q per position, and how far q is from one-hot
  value_probe                predicted vs realised one-step drop of a held-out probe loss
  g_down_signal_quality      split-half cosine of g_down vs the feedback batch size: is the feedback informative?
  pearson_ci                 Pearson r with a Fisher-z confidence interval
  plot_*                     matplotlib figures of the above (matplotlib is imported lazily)

Everything here reads the learner; nothing writes a checkpoint.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import math
import os
import statistics
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import traverse_util

from vpt.core import alignment, run_dir
from vpt.core.optim import make_optimizer
from vpt.language import config_lib, value as value_lib
from vpt.language.data import sources as sources_lib
from vpt.language.data.feedback import heldout_records, make_feedback_iterator
from vpt.language.data.pipeline import make_lm_iterator
from vpt.language.data.tokenizer import SentencePieceTokenizer, Tokenizer, run_tokenizer, train_sentencepiece
from vpt.language.losses import downstream_nll
from vpt.language.models.designer import DesignerConfig, TaskDesigner
from vpt.language.models.lm import LMConfig, Transformer
from vpt.language.soft_targets import candidate_logprobs, candidates, soft_targets
from vpt.language.steps import init_train_state, make_train_step
from vpt.language.vpt_step import (designer_targets, g_down_average_init, init_designer_state,
                                   make_designer_optimizer, make_vpt_train_step, uses_designer)

Params = Any


# ----------------------------------------------------------------------------- runs


@dataclasses.dataclass
class Run:
  """A learner (and its designer, if any) ready to analyse."""

  config: ml_collections.ConfigDict
  tokenizer: Tokenizer
  model: Transformer
  params: Params
  opt_state: Any  # the learner's optax state (structured, so the real AdamW step can be applied)
  designer: TaskDesigner | None = None
  designer_params: Params | None = None
  step: int = 0
  workdir: str | None = None

  @property
  def vpt_cfg(self):
    return self.config.vpt

  def optimizer(self) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """The learner's optimizer and schedule, exactly as training built them."""
    return make_optimizer(self.config.optimizer, self.config.num_steps)


def load_run(workdir: str, step: int | None = None) -> Run:
  """Restores a vpt run directory (config.json, tokenizer, checkpoints/<step>/state); latest step by default."""
  workdir = os.path.abspath(workdir)
  config = run_dir.read_config(workdir, config_lib.base_config())  # fields added since keep their defaults
  tokenizer = run_tokenizer(workdir, config.data)
  model = Transformer(LMConfig.from_config(config.model, tokenizer.vocab_size))
  _, step = run_dir.state_path(workdir, step, what="analysis.load_run: ")  # the newest, or `step` checked
  # Restoring without a target would give the raw pytree, but only on the topology that saved it
  # (orbax refuses a mesh it cannot rebuild); a single-device target of the training state's shapes
  # restores from any topology, and into the optimizer's own types (so optax can step it).
  abstract, designer = _abstract_state(config, model)
  ckpt_dir = run_dir.checkpoint_dir(workdir)
  manager = ocp.CheckpointManager(ckpt_dir, item_names=("state",), options=ocp.CheckpointManagerOptions(create=False))
  try:
    state = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))["state"]
  except Exception as e:  # noqa: BLE001 — name the run and the likely cause.
    raise ValueError(f"{ckpt_dir}/{step}: the checkpoint does not match the state built from "
                     f"{run_dir.config_path(workdir)} ({type(e).__name__}: {str(e)[:300]})") from e
  finally:
    manager.close()
  return Run(config=config, tokenizer=tokenizer, model=model, params=state.params, opt_state=state.opt_state,
             designer=designer, designer_params=state.designer.params if designer is not None else None,
             step=step, workdir=workdir)


def _abstract_state(config, model):
  """Shapes of the training state vpt.language.train.run saves (learner, optimizer, designer), on one device."""
  optimizer, _ = make_optimizer(config.optimizer, config.num_steps)
  designer = TaskDesigner(DesignerConfig.from_config(config.vpt)) if uses_designer(config.vpt) else None

  def init_fn():
    state = init_train_state(model, optimizer, config.data.seq_len, config.seed)
    if designer is not None:
      state = state.replace(designer=init_designer_state(
          designer, make_designer_optimizer(config.vpt), state.params, config.data.seq_len, config.vpt.top_k,
          config.seed, g_down_average_init(config.vpt, state.params, model.cfg.n_layers)))
    return state

  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), jax.eval_shape(init_fn))
  return abstract, designer


def tiny_config(seed: int = 0, variant: str = "value") -> ml_collections.ConfigDict:
  """The `experiments/lm_vpt.py:nano,<variant>` configuration (learner 2×32, designer 1×16, K = 8)."""
  c = config_lib.base_config()
  c.seed = seed
  c.model = config_lib.model_config("nano")
  c.batch_size, c.num_steps = 8, 40
  c.optimizer.warmup_steps = 5
  c.data.tokenizer_train_examples = 2000  # in memory, well under a second.
  c.vpt.mode, c.vpt.align = ("ntp", "dot") if variant == "ntp" else ("value", "dot")
  d = c.vpt.designer
  d.d_model, d.n_layers, d.n_heads, d.d_ff, d.learning_rate = 16, 1, 2, 32, 1e-3
  c.vpt.top_k, c.vpt.meta_every = 8, 4
  c.feedback.batch_size, c.feedback.seq_len = 8, 128
  c.progress_bar = False
  c.mesh.num_devices = 1
  return c


def tiny_run(seed: int = 0, *, train_steps: int = 0, variant: str = "value", dtype: str = "float32") -> Run:
  """An in-memory nano learner + designer + tokenizer (no files), optionally trained a few V-Pretraining steps.

  `dtype="float64"` (needs `jax_enable_x64`) casts every parameter for float64 numerics checks.
  """
  config = tiny_config(seed, variant)
  if train_steps > config.num_steps:
    config.num_steps = train_steps
  source = sources_lib.make_source(config.data, "train")
  texts = [sources_lib.record_text(source[i]) for i in range(config.data.tokenizer_train_examples)]
  tokenizer = SentencePieceTokenizer(model_proto=train_sentencepiece(texts, config.data.vocab_size))
  model = Transformer(LMConfig.from_config(config.model, tokenizer.vocab_size))
  optimizer, schedule = make_optimizer(config.optimizer, config.num_steps)
  designer = TaskDesigner(DesignerConfig.from_config(config.vpt)) if uses_designer(config.vpt) else None

  def init_fn():  # jitted: op-by-op initialisation is several times slower on CPU.
    state = init_train_state(model, optimizer, config.data.seq_len, seed)
    if designer is None:
      return state
    return state.replace(designer=init_designer_state(designer, make_designer_optimizer(config.vpt), state.params,
                                                      config.data.seq_len, config.vpt.top_k, seed,
                                                      g_down_average_init(config.vpt, state.params, model.cfg.n_layers)))

  state = jax.jit(init_fn)()
  if train_steps:
    if designer is None:
      step_fn = jax.jit(lambda st, b, fb: make_train_step(model, optimizer, schedule)(st, b))
    else:
      step_fn = jax.jit(make_vpt_train_step(model, optimizer, schedule, config.vpt, config.optimizer))
    lm = make_lm_iterator(config.data, tokenizer, split="train", global_batch_size=config.batch_size,
                          seq_len=config.data.seq_len, seed=seed)
    fb = make_feedback_iterator(config.feedback, tokenizer, seed=seed) if designer is not None else None
    for _ in range(train_steps):
      state, _ = step_fn(state, next(lm), next(fb) if fb is not None else None)
  if dtype != "float32":
    with config.unlocked():
      config.model.dtype = dtype
    model = Transformer(LMConfig.from_config(config.model, tokenizer.vocab_size))
    designer = designer and TaskDesigner(dataclasses.replace(designer.cfg, dtype=dtype))
    state = jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, state)
  return Run(config=config, tokenizer=tokenizer, model=model, params=state.params, opt_state=state.opt_state,
             designer=designer, designer_params=state.designer.params if designer is not None else None,
             step=int(state.step))


def lm_batches(run: Run, n: int, *, seed: int = 1, split: str = "train", batch_size: int | None = None) -> list[dict]:
  """n consecutive unlabeled batches B_u of the run's stream (a fresh shuffle: `seed`)."""
  it = make_lm_iterator(run.config.data, run.tokenizer, split=split, seq_len=run.config.data.seq_len,
                        global_batch_size=batch_size or run.config.batch_size, seed=seed)
  return [next(it) for _ in range(n)]


def feedback_batch(run: Run, *, heldout: bool = False, batch_size: int | None = None, seed: int = 0) -> dict:
  """One feedback batch: from the feedback set D_fb, or (heldout) from problems never in it — or,
  for a run without held-out problems, from D_fb again with another seed (a printed note says so)."""
  fb_cfg = copy.deepcopy(run.config.feedback)
  with fb_cfg.unlocked():
    fb_cfg.batch_size = batch_size or fb_cfg.batch_size
  records = None
  if heldout:
    records = heldout_records(fb_cfg)
    if not records:  # e.g. gsm8k_jsonl feedback without feedback.eval_path: no problem was held out.
      print(f"feedback_batch(heldout=True): this run has no held-out problems (feedback.source="
            f"{fb_cfg.source!r}, feedback.eval_path empty), so the batch is drawn from the feedback set D_fb "
            "itself (another seed): it shows alignment with problems the designer saw, not generalisation; "
            "set feedback.eval_path for a held-out set.", flush=True)
      return next(make_feedback_iterator(fb_cfg, run.tokenizer, seed=seed + 1))
    if len(records) < fb_cfg.batch_size:
      raise ValueError(f"held-out batch of {fb_cfg.batch_size} rows but only {len(records)} held-out problems "
                       "(feedback.num_eval)")
  return next(make_feedback_iterator(fb_cfg, run.tokenizer, seed=seed, records=records))


# ----------------------------------------------------------------------------- gradients


@dataclasses.dataclass(frozen=True)
class _TargetSpec:
  """The fields of config.vpt that define the targets, hashable (a static argument of jitted helpers)."""

  mode: str
  top_k: int
  fixed_alpha: float
  learn_alpha: bool

  @classmethod
  def of(cls, vpt_cfg) -> "_TargetSpec":
    # Runs saved before `learn_alpha` existed learned α.
    return cls(str(vpt_cfg.mode), int(vpt_cfg.top_k), float(vpt_cfg.fixed_alpha),
               bool(vpt_cfg.get("learn_alpha", True)))


def _logits(model, params, batch):
  return model.apply({"params": params}, batch["inputs"], batch["positions"], batch["segment_ids"])


def _soft_ce(model, batch, cand_ids, q):
  """params ↦ L_pre(θ; q), the learner's loss (mean over loss tokens), q held constant."""
  loss = value_lib.soft_loss_of_logits(cand_ids, q, batch["loss_mask"])
  return lambda params: loss(_logits(model, params, batch))


def _onehot_targets(batch):
  cand_ids = jnp.asarray(batch["targets"])[..., None].astype(jnp.int32)
  return cand_ids, jnp.ones(cand_ids.shape, jnp.float32)


def downstream_grad(model, params, fb_batch: dict, n_last: int = 0) -> dict:
  """g_down = ∇ L_down(θ; B_fb) as a flat {path: array} dict: on S (last n_last blocks) or all (0)."""
  return _downstream_grad(model, n_last, params, fb_batch)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _downstream_grad(model, n_last, params, fb_batch):
  aligned, subset = value_lib.Aligned.build(model, params, fb_batch, n_last)
  return value_lib.subset_grad(aligned, subset,
                               lambda logits: downstream_nll(logits, fb_batch["targets"], fb_batch["loss_mask"]))


def g_down_signal_quality(run: Run, batch_sizes: Sequence[int] = (4, 8, 16, 32, 64), *, repeats: int = 4,
                          seed: int = 0) -> list[dict]:
  """How reproducible g_down is at the run's params, per feedback batch size b: the cosine between g_down
  on S of two *disjoint* batches of b problems (the two halves of one batch of 2b), mean and std over
  `repeats` draws. The training loop logs the same quantity for its own meta batch as
  `meta/g_down_split_cos`. Near 0, a meta step's g_down is mostly sampling noise and the designer is
  trained on noise; it grows roughly like √b while the per-problem gradients share a direction."""
  n_last = run.vpt_cfg.align_last_n_layers
  rows = []
  for b in batch_sizes:
    cosines = []
    for r in range(repeats):
      batch = feedback_batch(run, batch_size=2 * b, seed=seed + 1000 * r + b)
      halves = [jax.tree.map(lambda x, i=i: x[i * b:(i + 1) * b], batch) for i in range(2)]
      g = [downstream_grad(run.model, run.params, h, n_last) for h in halves]
      cosines.append(float(alignment.tree_vdot(g[0], g[1]) / (alignment.tree_norm(g[0]) * alignment.tree_norm(g[1]))))
    rows.append({"batch_size": b, "cos_mean": float(np.mean(cosines)), "cos_std": float(np.std(cosines)),
                 "repeats": repeats})
  return rows


def param_groups(params) -> list[str]:
  """Top-level parameter groups in network order: embedding, blocks, final norm, head."""
  order = lambda k: (0, 0) if k == "embed_tokens" else (1, int(k.split("_")[1])) if k.startswith("layers_") \
      else (2, 0) if k == "norm" else (3, 0)
  return sorted(params, key=order)


def per_layer_alignment(model, params, batch: dict, fb_batch: dict, q=None, cand_ids=None) -> list[dict]:
  """Per parameter group: ‖g_down‖, ‖g_pre‖, ⟨g_down, g_pre⟩ and their cosine (full parameters).

  g_pre = ∇ L_pre(θ; q) on the unlabeled `batch` (q over `cand_ids`; None: one-hot next-token
  targets), g_down = ∇ L_down(θ; fb_batch). The dots add up to the full-parameter ⟨g_down, g_pre⟩.
  With tied embeddings `embed_tokens` is also the LM head.
  """
  if q is None:
    cand_ids, q = _onehot_targets(batch)
  stats = jax.device_get(_group_stats(model, params, batch, fb_batch, cand_ids, q))
  rows = []
  for name in param_groups(params):
    dot, nd, npre = (float(x) for x in stats[name])
    rows.append({"group": name, "n_params": int(sum(x.size for x in jax.tree.leaves(params[name]))),
                 "g_down_norm": nd, "g_pre_norm": npre, "dot": dot, "cosine": dot / max(nd * npre, 1e-30)})
  return rows


@functools.partial(jax.jit, static_argnums=0)
def _group_stats(model, params, batch, fb_batch, cand_ids, q):
  """{group: (⟨g_down, g_pre⟩, ‖g_down‖, ‖g_pre‖)} on the full parameters."""
  g_pre = jax.grad(_soft_ce(model, batch, cand_ids, q))(params)
  g_down = jax.grad(lambda p: downstream_nll(_logits(model, p, fb_batch), fb_batch["targets"],
                                              fb_batch["loss_mask"]))(params)
  return {name: (alignment.tree_vdot(_flat(g_down[name]), _flat(g_pre[name])), optax.tree.norm(g_down[name]),
                 optax.tree.norm(g_pre[name])) for name in params}


def candidate_scores(model, params, batch: dict, g_down_subset: dict, n_last: int, top_k: int,
                     tokenizer: Tokenizer | None = None) -> dict:
  """Per position and candidate: s_t(v) = ⟨g_down, ∇_S log p(v | x_<t)⟩ (one JVP along g_down on S).

  Returns cand_ids [B, T, K] (the true token first), cand_logp, s, and with a tokenizer the
  candidates' pieces [B][T][K] and the input pieces [B][T]. s < 0: raising p(v) is predicted to
  lower the downstream loss, so the designer is pushed to put mass on v.
  """
  out = jax.device_get(_candidate_scores(model, n_last, top_k, params, batch, g_down_subset))
  if tokenizer is not None:
    piece = getattr(tokenizer, "id_to_piece", lambda i: tokenizer.decode([i]))
    out["pieces"] = [[[piece(int(v)) for v in pos] for pos in row] for row in out["cand_ids"]]
    out["input_pieces"] = [[piece(int(v)) for v in row] for row in np.asarray(batch["inputs"])]
  return out


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _candidate_scores(model, n_last, top_k, params, batch, g_down_subset):
  aligned, subset = value_lib.Aligned.build(model, params, batch, n_last)
  logits, dlogits = value_lib.logits_jvp(aligned, subset, g_down_subset)
  cand_ids = candidates(logits, batch["targets"], top_k)
  return {"cand_ids": cand_ids, "cand_logp": candidate_logprobs(logits, cand_ids),
          "s": value_lib.logprob_tangents(logits, dlogits, cand_ids)}


def _targets(model, vpt_cfg, designer, params, designer_params, batch):
  """(cand_ids, cand_logp, α, r, q) of the run's task construction; NTP: K = 1, α = 0."""
  logits = _logits(model, params, batch)
  if vpt_cfg.mode == "ntp":
    cand_ids, q = _onehot_targets(batch)
    return cand_ids, candidate_logprobs(logits, cand_ids), jnp.zeros(cand_ids.shape[:-1], q.dtype), q, q
  cand_ids = candidates(logits, batch["targets"], vpt_cfg.top_k)
  cand_logp = candidate_logprobs(logits, cand_ids)
  alpha, r = designer_targets(vpt_cfg, designer, designer_params, params["embed_tokens"]["embedding"], batch,
                              cand_ids, cand_logp)
  return cand_ids, cand_logp, alpha, r, jax.lax.stop_gradient(soft_targets(alpha, r))


_targets_jit = jax.jit(_targets, static_argnums=(0, 1, 2))


def target_breakdown(model, params, batch: dict, vpt_cfg, designer=None, designer_params=None) -> dict:
  """How the task construction reshapes the targets: α [B, T], r and q [B, T, K] and their difference from one-hot.

  `tv_from_onehot` = ½‖q − onehot‖₁ = 1 − q(true) = α·(1 − r(true)) per position; `loss_mask` says which
  positions the learner is trained on.
  """
  cand_ids, cand_logp, alpha, r, q = jax.device_get(
      _targets_jit(model, _TargetSpec.of(vpt_cfg), designer, params, designer_params, batch))
  mask = np.asarray(batch["loss_mask"])
  tv = 1.0 - np.asarray(q[..., 0])
  n = max(mask.sum(), 1.0)
  return {"cand_ids": np.asarray(cand_ids), "cand_logp": np.asarray(cand_logp), "alpha": np.asarray(alpha),
          "r": np.asarray(r), "q": np.asarray(q), "loss_mask": mask, "tv_from_onehot": tv,
          "mean_alpha": float((np.asarray(alpha) * mask).sum() / n), "mean_tv": float((tv * mask).sum() / n)}


# ----------------------------------------------------------------------------- statistics


def pearson_ci(x: Sequence[float], y: Sequence[float], confidence: float = 0.95) -> dict:
  """Pearson r with its Fisher-z confidence interval: tanh(atanh r ± z_{(1+c)/2}/√(n−3))."""
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  n = len(x)
  if n != len(y) or n < 4:
    raise ValueError(f"pearson_ci needs two equally long samples of at least 4 (got {len(x)} and {len(y)})")
  dx, dy = x - x.mean(), y - y.mean()
  r = float(np.sum(dx * dy) / math.sqrt(np.sum(dx * dx) * np.sum(dy * dy)))
  z = math.atanh(min(max(r, -1 + 1e-15), 1 - 1e-15))
  half = statistics.NormalDist().inv_cdf(0.5 + confidence / 2) / math.sqrt(n - 3)
  return {"r": r, "lo": math.tanh(z - half), "hi": math.tanh(z + half), "n": n, "confidence": confidence}


# ----------------------------------------------------------------------------- the one-step value probe

# (name, predicted, realised, label); the first four are the probe's main result.
PROBE_PAIRS = (
    ("raw_vs_sgd", "pred_raw", "drop_sgd", "η⟨g_probe, g_pre⟩ vs SGD step"),
    ("raw_vs_adamw", "pred_raw", "drop_adamw", "η⟨g_probe, g_pre⟩ vs AdamW step"),
    ("adam_vs_sgd", "pred_adam", "drop_sgd", "lr⟨P·g_probe, g_pre⟩ vs SGD step"),
    ("adam_vs_adamw", "pred_adam", "drop_adamw", "lr⟨P·g_probe, g_pre⟩ vs AdamW step"),
    ("exact_first_order_vs_adamw", "pred_step", "drop_adamw", "−⟨g_probe, Δθ_AdamW⟩ vs AdamW step"),
    ("designer_value_vs_sgd", "value_fb_s", "drop_sgd", "⟨g_down(B_fb)|S, g_pre|S⟩ vs SGD step"),
    ("designer_value_vs_adamw", "value_fb_s", "drop_adamw", "⟨g_down(B_fb)|S, g_pre|S⟩ vs AdamW step"),
)
MAIN_PAIRS = PROBE_PAIRS[:4]


def _flat(tree):
  return traverse_util.flatten_dict(tree, sep="/")


def value_probe(run: Run, batches: Sequence[dict], probe_batch: dict, *, eta: float | None = None,
                eta_factors: Sequence[float] = (0.1, 1.0), fb_batch: dict | None = None,
                n_last: int | None = None) -> dict:
  """Predicted vs realised one-step drop of a held-out probe loss, over unlabeled batches B_u.

  For every B_u: g_pre = ∇ L_pre(θ; q) with the run's targets q (the designer's, or one-hot for
  NTP), on all parameters. Realised drops of L_probe (the downstream loss on the fixed held-out
  `probe_batch`): after the SGD step θ − η·g_pre (all parameters), and after the learner's real
  AdamW step (`run.optimizer()` applied to `run.opt_state`, clipping, momentum and weight decay
  included). Predictions: raw η⟨g_probe, g_pre⟩ and Adam-preconditioned lr_t⟨P·g_probe, g_pre⟩
  (P = 1/(√v̂+ε) from the learner's Adam state, lr_t its next learning rate); also the exact first
  order of the AdamW step −⟨g_probe, Δθ⟩ and, with `fb_batch`, the value the designer maximises,
  ⟨g_down(B_fb), g_pre⟩ on S. η=None: the median ‖Δθ_AdamW‖/‖g_pre‖ over the first batches (an
  SGD step as long as the real one: a tiny η would make the comparison trivially first order).
  `eta_sweep` also correlates raw vs SGD at η·f for f in `eta_factors` and at η = lr_t.
  The Adam prediction's scale leaves out momentum (AdamW moves (1−β₁)·P·g_pre for the new
  gradient, plus the old momentum, the same for every B_u) and clipping: compare correlations, not slopes.

  Returns {"rows": per-batch arrays, "correlations": {name: pearson_ci}, "eta", "lr", ...}.
  """
  model, vpt_cfg, designer = run.model, _TargetSpec.of(run.vpt_cfg), run.designer
  n_last = run.vpt_cfg.align_last_n_layers if n_last is None else n_last
  optimizer, schedule = run.optimizer()
  adam = alignment._find_adam_state(run.opt_state)  # pylint: disable=protected-access
  if adam is None:
    raise ValueError("run.opt_state holds no Adam state: the probe needs the learner's AdamW optimizer state")
  if not batches:
    raise ValueError("value_probe needs at least one unlabeled batch")
  opt = run.config.optimizer
  lr = float(schedule(adam.count))  # the learning rate of the learner's next step
  precond = alignment.adam_preconditioner(run.opt_state, 0, model.cfg.n_layers, opt.eps, opt.b2)

  def probe_loss(params, pb):
    return downstream_nll(_logits(model, params, pb), pb["targets"], pb["loss_mask"])

  loss0, g_probe = jax.jit(jax.value_and_grad(probe_loss))(run.params, probe_batch)
  g_probe = _flat(g_probe)
  g_fb = downstream_grad(model, run.params, fb_batch, n_last) if fb_batch is not None else None
  if g_fb is not None and run.vpt_cfg.get("geometry", "raw") == "adam":  # what an Adam-geometry designer maximises
    g_fb = {k: precond[k] * v for k, v in g_fb.items()}

  def grads_and_step(params, opt_state, dparams, batch):
    cand_ids, _, _, _, q = _targets(model, vpt_cfg, designer, params, dparams, batch)
    g_pre = jax.grad(_soft_ce(model, batch, cand_ids, q))(params)
    updates, _ = optimizer.update(g_pre, opt_state, params)
    return g_pre, updates

  # Everything large is an argument, not a closed-over constant baked into the program.
  @jax.jit
  def probe_one(params, opt_state, dparams, batch, pb, g_probe, precond, g_fb, etas):
    g_pre, updates = grads_and_step(params, opt_state, dparams, batch)
    flat_g = _flat(g_pre)
    drop = lambda p: loss0 - probe_loss(p, pb)
    out = {"dot_raw": alignment.tree_vdot(g_probe, flat_g),
           "pred_adam": lr * alignment.tree_vdot({k: precond[k] * v for k, v in g_probe.items()}, flat_g),
           "pred_step": -alignment.tree_vdot(g_probe, _flat(updates)),
           "drop_adamw": drop(optax.apply_updates(params, updates)),
           "drop_sgd_eta": jax.vmap(lambda e: drop(jax.tree.map(lambda p, g: p - e * g, params, g_pre)))(etas),
           "g_pre_norm": optax.tree.norm(g_pre), "step_norm": optax.tree.norm(updates)}
    if g_fb is not None:
      out["value_fb_s"] = alignment.tree_vdot(g_fb, {k: flat_g[k] for k in g_fb})
    return out

  args = (run.params, run.opt_state, run.designer_params)
  run_one = lambda b, etas: jax.device_get(probe_one(*args, b, probe_batch, g_probe, precond, g_fb,
                                                     jnp.asarray(etas, jnp.result_type(float))))
  factors = sorted({float(f) for f in eta_factors} | {1.0})
  n_etas = len(factors) + (lr > 0)  # and an SGD step at the learner's own learning rate
  if eta is None:  # a first look at a few batches (same shapes, so the same compiled program)
    first = [run_one(b, [0.0] * n_etas) for b in batches[:4]]
    eta = float(np.median([p["step_norm"] / max(p["g_pre_norm"], 1e-30) for p in first]))
  if lr > 0:
    factors.append(lr / eta)
  per = [run_one(b, [eta * f for f in factors]) for b in batches]
  rows = {k: np.array([np.asarray(p[k], np.float64) for p in per]) for k in per[0]}
  sgd = rows.pop("drop_sgd_eta")  # [n, len(etas)]
  rows["pred_raw"] = eta * rows["dot_raw"]
  rows["drop_sgd"] = sgd[:, factors.index(1.0)]
  corr = {name: pearson_ci(rows[pred], rows[real]) for name, pred, real, _ in PROBE_PAIRS
          if pred in rows and len(batches) >= 4}
  sweep = []
  for i, f in enumerate(factors):
    pred = eta * f * rows["dot_raw"]
    entry = {"eta": eta * f, "factor": f, "is_learner_lr": i == len(factors) - 1 and lr > 0,
             "mean_ratio": float(np.mean(sgd[:, i]) / np.mean(pred))}
    if len(batches) >= 4:
      entry.update(pearson_ci(pred, sgd[:, i]))
    sweep.append(entry)
  return {"rows": rows, "correlations": corr, "eta": eta, "eta_sweep": sweep, "lr": lr, "n": len(batches),
          "probe_loss": float(loss0), "n_last": n_last, "adam_count": int(adam.count), "targets": vpt_cfg.mode}


def probe_table(result: dict) -> str:
  """The probe's correlations as a text table (the main four first)."""
  lines = [f"  {'prediction vs realised drop':44s} {'r':>7s}  {'95% CI':>17s}  {'n':>4s}"]
  for i, (name, _, _, label) in enumerate(PROBE_PAIRS):
    if name not in result["correlations"]:
      continue
    if i == len(MAIN_PAIRS):
      lines.append("  diagnostics:")
    c = result["correlations"][name]
    lines.append(f"  {label:44s} {c['r']:7.3f}  [{c['lo']:6.3f}, {c['hi']:6.3f}]  {c['n']:4d}")
  lines.append(f"  η (SGD) = {result['eta']:.4g}, AdamW lr_t = {result['lr']:.3g}, probe loss = "
               f"{result['probe_loss']:.4f}, targets: {result['targets']}")
  lines.append("  raw vs SGD as η varies (realised/predicted: mean ratio):")
  for s in sorted(result["eta_sweep"], key=lambda s: s["eta"]):
    note = "  (the learner's lr_t)" if s["is_learner_lr"] else "  (η above)" if s["factor"] == 1.0 else ""
    lines.append(f"    η = {s['eta']:9.3g}: r = {s.get('r', float('nan')):6.3f}, ratio {s['mean_ratio']:7.3f}{note}")
  return "\n".join(lines)


def probe_json(result: dict) -> dict:
  """A JSON-serialisable copy of a value_probe result."""
  out = {k: v for k, v in result.items() if k != "rows"}
  out["rows"] = {k: [float(x) for x in v] for k, v in result["rows"].items()}
  return out


# ----------------------------------------------------------------------------- plots


def _shown(piece: str) -> str:
  """A sentencepiece piece on one line: '▁' (a leading space) as '·', newlines as '\\n'."""
  return piece.replace("▁", "·").replace("\n", "\\n")


def plot_probe(result: dict, pairs=MAIN_PAIRS, axes=None):
  """Scatter plots of predicted vs realised probe-loss drops, one panel per pair, r and CI in the title."""
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  if axes is None:
    cols = min(len(pairs), 2)
    fig, axes = plt.subplots((len(pairs) + cols - 1) // cols, cols, figsize=(5 * cols, 4 * ((len(pairs) + 1) // 2)),
                             squeeze=False)
  axes = np.ravel(axes)
  for ax, (name, pred, real, label) in zip(axes, pairs):
    x, y = result["rows"][pred], result["rows"][real]
    c = result["correlations"][name]
    ax.scatter(x, y, s=12, alpha=0.7)
    ax.set_title(f"{label}\nr = {c['r']:.3f} [{c['lo']:.3f}, {c['hi']:.3f}], n = {c['n']}", fontsize=9)
    ax.set_xlabel("predicted drop")
    ax.set_ylabel("realised drop")
    ax.ticklabel_format(style="sci", scilimits=(-3, 3))
  for ax in axes[len(pairs):]:
    ax.set_visible(False)
  axes[0].figure.tight_layout()
  return axes[0].figure


def plot_signal_quality(rows: list[dict], meta_batch_size: int | None = None, ax=None):
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  ax = ax or plt.subplots(figsize=(5, 3.5))[1]
  b = [r["batch_size"] for r in rows]
  ax.errorbar(b, [r["cos_mean"] for r in rows], yerr=[r["cos_std"] for r in rows], marker="o", capsize=3)
  if meta_batch_size:
    ax.axvline(meta_batch_size, color="k", ls=":", lw=1, label=f"the run's feedback batch ({meta_batch_size})")
    ax.legend(fontsize=8)
  ax.set(xscale="log", xlabel="feedback problems per half", ylabel="cos(g_down half 1, half 2)",
         title="Signal quality of g_down (split-half cosine on S)")
  ax.axhline(0, color="k", lw=0.5)
  ax.grid(alpha=0.3)
  return ax


def plot_layer_alignment(rows: list[dict], ax=None):
  """Bar chart of cos(g_down, g_pre) per parameter group."""
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  if ax is None:
    _, ax = plt.subplots(figsize=(1.0 + 0.8 * len(rows), 3.2))
  names = [r["group"] for r in rows]
  cos = [r["cosine"] for r in rows]
  ax.bar(names, cos, color=["tab:green" if c > 0 else "tab:red" for c in cos])
  ax.axhline(0, color="k", lw=0.8)
  ax.set_ylabel("cos(g_down, g_pre)")
  ax.tick_params(axis="x", rotation=30)
  ax.figure.tight_layout()
  return ax


def plot_candidate_heatmap(scores: dict, row: int = 0, start: int = 0, length: int = 20, ax=None):
  """s_t(v) over positions (x: the input token) and the K candidates (y, the true token on top), annotated."""
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  s = scores["s"][row, start:start + length].T  # [K, L]
  if ax is None:
    _, ax = plt.subplots(figsize=(0.75 * s.shape[1] + 2, 0.35 * s.shape[0] + 1.5))
  lim = float(np.max(np.abs(s))) or 1.0
  im = ax.imshow(s, cmap="coolwarm", vmin=-lim, vmax=lim, aspect="auto")
  if "pieces" in scores:
    pieces = scores["pieces"][row][start:start + length]
    for t, cands in enumerate(pieces):
      for k, p in enumerate(cands):
        ax.text(t, k, _shown(p), ha="center", va="center", fontsize=6)
    inputs = scores["input_pieces"][row][start:start + length]
    ax.set_xticks(range(s.shape[1]), [_shown(p) for p in inputs], rotation=90, fontsize=7)
  ax.set_yticks(range(s.shape[0]), ["true"] + [f"top {k}" for k in range(1, s.shape[0])], fontsize=7)
  ax.set_xlabel("input token x_t (candidates are for the next token)")
  ax.figure.colorbar(im, ax=ax, label="s_t(v)  (< 0: more p(v) lowers L_down)")
  ax.figure.tight_layout()
  return ax


def plot_targets(breakdown: dict, row: int = 0, positions: Sequence[int] = (), tokenizer=None, axes=None):
  """α per position (loss positions only) and, for a few positions, q against one-hot over the candidates."""
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  positions = list(positions)
  if axes is None:
    _, axes = plt.subplots(1, 1 + len(positions), figsize=(5 + 2.6 * len(positions), 3),
                           gridspec_kw={"width_ratios": [2] + [1] * len(positions)}, squeeze=False)
    axes = axes[0]
  mask = breakdown["loss_mask"][row] > 0
  t = np.arange(len(mask))
  axes[0].plot(t[mask], breakdown["alpha"][row][mask], ".", ms=3, label="α (mass moved off the true token)")
  axes[0].plot(t[mask], breakdown["tv_from_onehot"][row][mask], ".", ms=3, label="TV(q, one-hot)")
  axes[0].set_xlabel("position")
  axes[0].legend(fontsize=7)
  for ax, pos in zip(axes[1:], positions):
    k = breakdown["q"].shape[-1]
    ids = breakdown["cand_ids"][row, pos]
    names = [_shown(tokenizer.id_to_piece(int(i))) if tokenizer else str(int(i)) for i in ids]
    ax.bar(np.arange(k) - 0.2, np.eye(k)[0], width=0.4, label="one-hot")
    ax.bar(np.arange(k) + 0.2, breakdown["q"][row, pos], width=0.4, label="q")
    ax.set_xticks(range(k), names, rotation=90, fontsize=7)
    ax.set_title(f"t = {pos}, α = {breakdown['alpha'][row, pos]:.3f}", fontsize=8)
  if positions:
    axes[1].legend(fontsize=7)
  axes[0].figure.tight_layout()
  return axes
