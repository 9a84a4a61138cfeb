"""The V-Pretraining step for language: designer-built soft targets for the learner every step, and
every `meta_every` steps (after a burn-in) one designer step that maximises the value.

One jitted program: `lax.cond` on the step counter runs the meta update (downstream gradient on
S, one JVP, designer step) and then the learner step uses the updated designer. The predicate is a
function of `state.step` only, so a resumed run takes meta steps exactly where an uninterrupted
one would.

Isolation: the feedback batch only ever reaches `g_down`, which only enters the designer's
objective. The learner's loss reads the designer's targets through `stop_gradient`, so no
∇θ L_down exists anywhere in the learner's update.

Modes (config.vpt.mode): 'value' (V-Pretraining; with vpt.feedback_direction='random' — or the older
mode name 'random_feedback' — g_down is replaced by a random direction of equal norm, the control), 'uniform_topk' (r uniform over C_t, α fixed), 'self_distill' (r = the
learner's renormalised top-K, α fixed). 'ntp' is `steps.make_train_step`, untouched.

Multitask feedback (the paper's v2; `FeedbackPlan`, built from the config by `feedback_plan`). With
several feedback sets j of weights ω_j (config.feedback and feedback.sets), fb_batch is a dict
{set name: batch} and

    g_down = Σ_j ω_j g_j,    g_j = sg ∇_S L_down(θ; batch of set j).

A lone set of weight 1 keeps today's plain batch and program (`FeedbackPlan()`). With
vpt.alignment='domain_matched' every stream domain d (the LM batch's `domain_ids`: the synthetic
stream's math / filler, a mixture's components) that is paired with a feedback set j(d) is aligned
with that set alone, and the designer minimises

    −(1/|D|) Σ_{d∈D} Align(g_down,d, g_pre,d),   g_down,d = ω_j(d) g_j(d),
    g_pre,d = ∇_S L_pre(θ; q_φ) on the loss tokens of domain d only (their own token mean),

D = the paired domains (fixed by the config; a domain absent from a meta batch adds 0). Tokens of
unpaired domains (filler) enter no alignment term. Each set needs one JVP (one vmapped JVP for all);
the regularisers and the trust region stay on the whole batch. Isolation is unchanged: every g_j is
read only by the designer's objective.

Averaged feedback (vpt.g_down_average = β > 0). The meta step's g_down comes from one small feedback
batch, and its per-token signal is mostly sampling noise there (`meta/g_down_split_cos`). With β > 0
the designer aligns with a running average over the meta steps instead, at no extra compute:

    m_n = β·m_{n−1} + (1 − β)·g_down,n,    ḡ_n = m_n / (1 − β^n),    m_0 = 0,

n = the meta steps taken so far, this one included (a function of `state.step`: a resumed run
continues the same average). ḡ_n weights the last ≈ 1/(1 − β) feedback batches; their gradients were
taken at slightly older learner parameters (an EMA of gradients, as Adam's first moment is). m lives in
`DesignerState.g_down_avg` (None with β = 0: today's state, and its checkpoints, unchanged). Random
feedback replaces g_down,n before it is averaged. Pooled alignment only.

LoRA: S is the adapters of the last blocks (vpt.core.alignment.split_params), the learner steps on the adapters
only, and adapter dropout is on in the learner step and off in the meta step (g_down, the JVP and
g_pre are taken at the deterministic network, the direction the learner moves along on average).
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from vpt.core import alignment, config as core_config, meta as meta_lib, step as core_step
from vpt.core.meta import DesignerState
from vpt.language import config_lib, value as value_lib
from vpt.language.losses import downstream_nll
from vpt.language.models.designer import DesignerConfig, TaskDesigner
from vpt.language.steps import TrainState, apply_lm, learner_update, step_dropout_rng
from vpt.language.soft_targets import (candidate_logprobs, candidates, soft_ce_sum, soft_targets, target_stat_sums,
                                       target_stats)

DESIGNER_MODES = ("value", "random_feedback")
META_METRICS = ("value", "cosine", "g_down_norm", "g_pre_norm", "designer_loss", "designer_grad_norm",
                "trust_region", "g_down_split_cos")


def uses_designer(vpt_cfg) -> bool:
  return vpt_cfg.mode in DESIGNER_MODES


@dataclasses.dataclass(frozen=True)
class FeedbackPlan:
  """The layout of the feedback batch and how it enters the meta objective.

  sets: ((name, ω), ...) — fb_batch is {name: batch} and g_down = Σ ω g; None — fb_batch is one plain
    batch and g_down its gradient (a lone set of weight 1: today's program).
  domains: ((domain id, set name), ...) — domain-matched alignment over these pairs; () — pooled.
  """
  sets: tuple[tuple[str, float], ...] | None = None
  domains: tuple[tuple[int, str], ...] = ()


def feedback_plan(config) -> FeedbackPlan:
  """The FeedbackPlan of a (validated) LM config. Domain-matched: only the sets paired with a stream
  domain are read (sets paired with none would add nothing to the objective)."""
  from vpt.language.data import sources  # pylint: disable=g-import-not-at-top (keeps vpt_step's imports light)
  fb_sets = config_lib.feedback_sets(config.feedback)
  if uses_designer(config.vpt) and config.vpt.get("alignment", "pooled") == "domain_matched":
    pairs = tuple((dom.id, dom.feedback_set) for dom in sources.stream_domains(config.data, fb_sets[0].name)
                  if dom.feedback_set is not None)
    used = {name for _, name in pairs}
    return FeedbackPlan(sets=tuple((s.name, float(s.weight)) for s in fb_sets if s.name in used), domains=pairs)
  if len(fb_sets) == 1 and fb_sets[0].weight == 1.0:
    return FeedbackPlan()
  return FeedbackPlan(sets=tuple((s.name, float(s.weight)) for s in fb_sets))


def make_designer_optimizer(vpt_cfg) -> optax.GradientTransformation:
  d = vpt_cfg.designer
  return meta_lib.designer_optimizer(d.learning_rate, d.grad_clip_norm, d.weight_decay)


def g_down_average_init(vpt_cfg, learner_params, n_layers: int):
  """m_0 = 0 on S when vpt.g_down_average > 0, else None (no running average in the state)."""
  if not vpt_cfg.get("g_down_average", 0.0):
    return None
  subset, _ = alignment.split_params(learner_params, n_layers, vpt_cfg.align_last_n_layers)
  return jax.tree.map(jnp.zeros_like, subset)


def init_designer_state(designer: TaskDesigner, optimizer: optax.GradientTransformation, learner_params,
                        seq_len: int, top_k: int, seed: int, g_down_avg=None) -> DesignerState:
  """g_down_avg: `g_down_average_init`'s m_0 (None: no running average)."""
  embedding = learner_params["embed_tokens"]["embedding"]
  tokens = jnp.zeros((1, seq_len), jnp.int32)
  cands = jnp.zeros((1, seq_len, top_k), jnp.int32)
  params = designer.init(jax.random.PRNGKey(seed + 7919), embedding, tokens, tokens, tokens, tokens + 1, cands,
                         jnp.zeros(cands.shape, jnp.float32))["params"]
  return DesignerState(params=params, opt_state=optimizer.init(params),
                       last_meta={k: jnp.zeros((), jnp.float32) for k in META_METRICS}, g_down_avg=g_down_avg)


def designer_targets(vpt_cfg, designer: TaskDesigner | None, designer_params, embedding, batch, cand_ids,
                     cand_logp):
  """(α [B, T], r [B, T, K]) for the configured mode."""
  cand_logp = jax.lax.stop_gradient(cand_logp)
  if vpt_cfg.mode in DESIGNER_MODES:
    scores, alpha = designer.apply({"params": designer_params}, embedding, batch["inputs"], batch["targets"],
                                   batch["positions"], batch["segment_ids"], cand_ids, cand_logp)
    if not vpt_cfg.learn_alpha:
      alpha = jnp.full_like(alpha, vpt_cfg.fixed_alpha)
    return alpha, jax.nn.softmax(scores, axis=-1)
  alpha = jnp.full(cand_ids.shape[:-1], vpt_cfg.fixed_alpha, cand_logp.dtype)
  if vpt_cfg.mode == "uniform_topk":
    return alpha, jnp.full(cand_ids.shape, 1.0 / cand_ids.shape[-1], cand_logp.dtype)
  if vpt_cfg.mode == "self_distill":
    return alpha, jax.nn.softmax(cand_logp, axis=-1)
  raise ValueError(f"config.vpt.mode={vpt_cfg.mode!r} has no soft targets")


def soft_target_loss_fn(model: nn.Module, vpt_cfg, designer, designer_params) -> Callable:
  """Learner loss against stop_gradient(q_φ): params, batch -> (loss_sum, aux with target statistics)."""

  def loss_fn(params, batch, dropout_rng=None):
    logits = apply_lm(model, params, batch, dropout_rng)
    cand_ids = candidates(logits, batch["targets"], vpt_cfg.top_k)
    cand_logp = candidate_logprobs(logits, cand_ids)
    embedding = jax.lax.stop_gradient(params["embed_tokens"]["embedding"])
    alpha, r = designer_targets(vpt_cfg, designer, designer_params, embedding, batch, cand_ids, cand_logp)
    q = jax.lax.stop_gradient(soft_targets(alpha, r))
    loss_sum, count = soft_ce_sum(cand_logp, q, batch["loss_mask"])
    sums, maxes = target_stat_sums(alpha, r, q, batch["loss_mask"])
    return loss_sum, {"count": count, "sums": sums, "maxes": maxes}

  return loss_fn


def _downstream_halves(model, params, fb_batch: dict, n_last: int) -> tuple[list[dict], list[jax.Array]]:
  """([∇_S L_down on the even rows, … on the odd rows], [examples with answer tokens in each half])."""
  grads, counts = [], []
  for i in (0, 1):
    half = jax.tree.map(lambda x: x[i::2], fb_batch)
    aligned, subset = value_lib.Aligned.build(model, params, half, n_last)
    grads.append(value_lib.subset_grad(
        aligned, subset, lambda logits: downstream_nll(logits, half["targets"], half["loss_mask"])))
    counts.append(jnp.sum(jnp.any(half["loss_mask"] > 0, axis=-1)).astype(jax.tree.leaves(grads[-1])[0].dtype))
  return grads, counts


def downstream_grad(model, params, fb_batch: dict, n_last: int) -> tuple[dict, jax.Array]:
  """(g_down, split-half cosine). g_down = sg ∇_S L_down(θ; B_fb) — the only place the feedback labels
  are read — assembled from the even and the odd rows of the batch: L_down is a mean over the examples
  that have answer tokens, so g_down = (n_even·g_even + n_odd·g_odd) / (n_even + n_odd) exactly.

  cos(g_even, g_odd) is the signal-quality metric: how reproducible the feedback direction is
  between two disjoint halves of one feedback batch (near 0: g_down is mostly sampling noise, the
  designer's per-token signal is too; near 1: every half points the same way). Even/odd rows keep
  each device's share of a data-sharded batch local.
  """
  grads, counts = _downstream_halves(model, params, fb_batch, n_last)
  total = jnp.maximum(counts[0] + counts[1], 1.0)
  g_down = {k: (counts[0] * grads[0][k] + counts[1] * grads[1][k]) / total for k in grads[0]}
  return jax.lax.stop_gradient(g_down), jax.lax.stop_gradient(alignment.cosine(*grads))


def feedback_grads(model, params, fb_batch: dict, n_last: int,
                   sets: tuple[tuple[str, float], ...]) -> tuple[dict, dict, jax.Array]:
  """({name: ω_j g_j}, g_down = Σ_j ω_j g_j, split-half cosine) for fb_batch = {name: batch of set j}.

  g_j is downstream_grad's, exactly. The signal-quality cosine is that of the pooled halves
  Σ_j ω_j g_j,even and Σ_j ω_j g_j,odd. A weight of 1 multiplies nothing (a lone set of weight 1 is
  today's program, bit for bit).
  """
  if set(fb_batch) != {name for name, _ in sets}:
    raise ValueError(f"feedback batch has sets {sorted(fb_batch)}, the plan {sorted(n for n, _ in sets)}")
  scaled = lambda w, g: g if w == 1.0 else {k: w * v for k, v in g.items()}
  add = lambda a, b: b if a is None else {k: a[k] + b[k] for k in a}
  weighted, halves = {}, [None, None]
  for name, w in sets:
    grads, counts = _downstream_halves(model, params, fb_batch[name], n_last)
    total = jnp.maximum(counts[0] + counts[1], 1.0)
    weighted[name] = scaled(w, {k: (counts[0] * grads[0][k] + counts[1] * grads[1][k]) / total for k in grads[0]})
    halves = [add(halves[i], scaled(w, grads[i])) for i in (0, 1)]
  # The same operations in the same order as downstream_grad's for one set of weight 1.
  weighted = jax.lax.stop_gradient(weighted)
  pooled = None
  for g in weighted.values():
    pooled = add(pooled, g)
  return weighted, pooled, jax.lax.stop_gradient(alignment.cosine(*halves))


def meta_objective(params, learner_opt_state, designer_params, batch: dict, fb_batch: dict, rng: jax.Array, *,
                   model, designer, vpt_cfg, learner_opt_cfg, plan: FeedbackPlan | None = None,
                   g_down_avg=None, n_meta=None):
  """The designer's loss φ ↦ −Align(g_down, g_pre(q_φ)) + λ·R(φ), everything learner-side precomputed.

  With plan.domains (domain-matched alignment) the alignment term is the mean over the paired domains
  d of Align(ω_j(d) g_j(d), g_pre,d(q_φ)), each on the loss tokens of domain d (the module docstring);
  the reported value is the same mean of the values. Everything else (regularisers, trust region,
  cosine variants, Adam geometry, random feedback) is the pooled objective's code, per term.

  g_down_avg, n_meta: the running average's m_{n−1} and n (vpt.g_down_average > 0; the module
  docstring): the designer then aligns with ḡ_n, and info["g_down_avg"] is m_n.

  Returns (objective, info): objective(φ) -> (loss, aux) is what the designer step differentiates
  (a backward through q_φ only); info holds the gradients and norms computed on the way.
  """
  plan = plan or FeedbackPlan()
  n_last = vpt_cfg.align_last_n_layers
  mask = batch["loss_mask"]
  n_tokens = jnp.maximum(jnp.sum(mask), 1.0)

  if plan.sets is None:
    g_down, split_cos = downstream_grad(model, params, fb_batch, n_last)
    set_grads = None
  else:
    set_grads, g_down, split_cos = feedback_grads(model, params, fb_batch, n_last, plan.sets)
  if core_config.random_feedback(vpt_cfg):
    if plan.domains:  # every set's direction replaced, each keeping its norm
      set_grads = {name: alignment.random_like(jax.random.fold_in(rng, j), g, alignment.tree_norm(g))
                   for j, (name, g) in enumerate(set_grads.items())}
      g_down = jax.tree.map(lambda *xs: sum(xs), *set_grads.values())
    else:
      g_down = alignment.random_like(rng, g_down, alignment.tree_norm(g_down))
  if g_down_avg is not None:
    beta = vpt_cfg.g_down_average
    g_down_avg = jax.tree.map(lambda m, g: beta * m + (1 - beta) * g.astype(m.dtype), g_down_avg, g_down)
    debias = 1 - jnp.asarray(beta, jax.tree.leaves(g_down_avg)[0].dtype) ** n_meta
    g_down = jax.tree.map(lambda m, g: (m / debias).astype(g.dtype), g_down_avg, g_down)
  geometry = lambda g: g
  if vpt_cfg.geometry == "adam":
    precond = alignment.adam_preconditioner(learner_opt_state, n_last, model.cfg.n_layers,
                                            learner_opt_cfg.eps, learner_opt_cfg.b2)
    geometry = lambda g: {k: precond[k] * v for k, v in g.items()}
  tangent = geometry(g_down)

  # One JVP on the unlabeled batch gives every candidate's s_t(v); one per feedback set, vmapped, for
  # domain-matched alignment (the primal is computed once).
  aligned, subset = value_lib.Aligned.build(model, params, batch, n_last)
  if not plan.domains:
    logits, dlogits = value_lib.logits_jvp(aligned, subset, tangent)
    set_tangents = {None: tangent}
    term_specs = [(None, mask)]  # (set name, loss mask of the term)
  else:
    if "domain_ids" not in batch:
      raise ValueError("vpt.alignment='domain_matched' needs the LM batch's 'domain_ids' (the data pipeline "
                       f"adds them; this batch has {sorted(batch)})")
    set_tangents = {name: geometry(set_grads[name]) for name, _ in plan.sets}
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *set_tangents.values())
    logits, stacked_d = jax.vmap(lambda t: value_lib.logits_jvp(aligned, subset, t), out_axes=(None, 0))(stacked)
    dlogits_of = {name: stacked_d[j] for j, name in enumerate(set_tangents)}
    in_domain = lambda d: (batch["domain_ids"] == d).astype(mask.dtype)
    term_specs = [(name, mask * in_domain(d)) for d, name in plan.domains]
  cand_ids = candidates(logits, batch["targets"], vpt_cfg.top_k)
  cand_logp = candidate_logprobs(logits, cand_ids)
  embedding = params["embed_tokens"]["embedding"]

  def targets_of(dparams):
    alpha, r = designer_targets(vpt_cfg, designer, dparams, embedding, batch, cand_ids, cand_logp)
    return alpha, r, soft_targets(alpha, r)

  q_now = jax.lax.stop_gradient(targets_of(designer_params)[2])
  terms = []
  for name, term_mask in term_specs:
    t = {"mask": term_mask, "tangent_norm": alignment.tree_norm(set_tangents[name])}
    t["s"] = value_lib.logprob_tangents(logits, dlogits if name is None else dlogits_of[name], cand_ids)
    t["n_tokens"] = n_tokens if name is None else jnp.maximum(jnp.sum(term_mask), 1.0)
    if vpt_cfg.align in ("cosine", "cosine_cheap"):
      # g_pre at the current φ (a backward through S only), for the cosine's normaliser.
      g_pre = value_lib.subset_grad(aligned, subset, value_lib.soft_loss_of_logits(cand_ids, q_now, term_mask))
      t["g_pre_norm"] = alignment.tree_norm(g_pre)
    if vpt_cfg.align == "cosine":
      # J g_pre: one more JVP, along g_pre (see the exact cosine below).
      _, u = value_lib.logits_jvp(aligned, subset, g_pre)
      t["u_cand"] = jnp.take_along_axis(u, cand_ids, axis=-1)
    terms.append(t)
  if vpt_cfg.reg_trust_region > 0:
    # First-order NTP-loss change of a step along g_pre(q), relative to the one-hot step.
    onehot = (jnp.arange(vpt_cfg.top_k) == 0).astype(q_now.dtype) * jnp.ones_like(q_now)
    g_ntp = value_lib.subset_grad(aligned, subset, value_lib.soft_loss_of_logits(cand_ids, onehot, mask))
    _, d_ntp = value_lib.logits_jvp(aligned, subset, g_ntp)
    s_ntp = value_lib.logprob_tangents(logits, d_ntp, cand_ids)
    ntp_sq = jnp.maximum(alignment.tree_vdot(g_ntp, g_ntp), 1e-30)

  def term_align(q, t):
    """(V, Align) of one term: its tangent against g_pre(q) on its tokens."""
    v = value_lib.value_from_tangents(q, t["s"], t["mask"])
    g_pre_norm = t.get("g_pre_norm")
    if vpt_cfg.align == "cosine":
      # Exact cosine. ‖g_pre(q)‖² is quadratic in q; its first-order expansion around q_now has the
      # exact value and φ-gradient at the current φ: ∇_q ‖g_pre‖² = −(2/N)·m·(J g_pre) on C_t.
      norm_sq = t["g_pre_norm"] ** 2 - 2.0 / t["n_tokens"] * jnp.sum(t["mask"][..., None] * (q - q_now) * t["u_cand"])
      g_pre_norm = jnp.sqrt(jnp.maximum(norm_sq, 1e-30))
    return v, alignment.align_from_value(v, vpt_cfg.align, t["tangent_norm"], g_pre_norm)

  def objective(dparams):
    alpha, r, q = targets_of(dparams)
    values, aligns = zip(*(term_align(q, t) for t in terms))
    if len(terms) == 1:
      v, align = values[0], aligns[0]
    else:  # domain-matched: the mean over the paired domains
      v, align = sum(values) / len(terms), sum(aligns) / len(terms)
    stats = target_stats(alpha, r, q, mask)
    loss = -align + vpt_cfg.reg_alpha * stats["alpha_mean"] - vpt_cfg.reg_entropy * stats["r_entropy"]
    trust = jnp.zeros((), v.dtype)
    if vpt_cfg.reg_trust_region > 0:
      trust = (ntp_sq - value_lib.value_from_tangents(q, s_ntp, mask)) / ntp_sq
      loss = loss + vpt_cfg.reg_trust_region * jax.nn.relu(trust)
    return loss, {"value": v, "trust_region": trust}

  info = {"g_down": g_down, "g_down_avg": g_down_avg, "g_down_split_cos": split_cos, "tangent": tangent,
          "tangent_norm": alignment.tree_norm(tangent), "set_grads": set_grads, "cand_ids": cand_ids,
          "aligned": aligned, "subset": subset, "targets_of": targets_of}
  return objective, info


def meta_update(state: TrainState, batch: dict, fb_batch: dict, rng: jax.Array, *, model, designer, vpt_cfg,
                designer_opt, learner_opt_cfg, plan: FeedbackPlan | None = None) -> tuple[DesignerState, dict]:
  """One designer step on the meta objective; returns (new DesignerState, the g_down it aligned with, on S)."""
  dstate = state.designer
  rows = vpt_cfg.meta_batch_size or batch["inputs"].shape[0]
  cols = vpt_cfg.meta_seq_len or batch["inputs"].shape[1]
  # The meta step's slice of the unlabeled batch: `rows` evenly spaced rows (every device, holding a
  # contiguous block of the batch, contributes its share, so the slice needs no resharding).
  stride = batch["inputs"].shape[0] // rows if batch["inputs"].shape[0] % rows == 0 else 1
  batch = jax.tree.map(lambda x: x[::stride][:rows, :cols], batch)
  n_meta = None
  if dstate.g_down_avg is not None:  # meta steps so far, this one included: a function of the step alone
    n_meta = meta_lib.meta_index(state.step, vpt_cfg.burn_in_steps, vpt_cfg.meta_every)
  objective, info = meta_objective(state.params, state.opt_state, dstate.params, batch, fb_batch, rng, model=model,
                                   designer=designer, vpt_cfg=vpt_cfg, learner_opt_cfg=learner_opt_cfg, plan=plan,
                                   g_down_avg=dstate.g_down_avg, n_meta=n_meta)
  (loss, aux), grads = jax.value_and_grad(objective, has_aux=True)(dstate.params)
  updates, opt_state = designer_opt.update(grads, dstate.opt_state, dstate.params)
  metrics = dict(dstate.last_meta)
  metrics.update(value=aux["value"], g_down_norm=alignment.tree_norm(info["g_down"]), designer_loss=loss,
                 designer_grad_norm=optax.tree.norm(grads), trust_region=aux["trust_region"],
                 g_down_split_cos=info["g_down_split_cos"])
  new = DesignerState(params=optax.apply_updates(dstate.params, updates), opt_state=opt_state,
                      last_meta={k: jnp.asarray(v, jnp.float32) for k, v in metrics.items()},
                      g_down_avg=info["g_down_avg"])
  return new, info["g_down"]


def make_vpt_train_step(model: nn.Module, optimizer: optax.GradientTransformation, schedule: optax.Schedule,
                        vpt_cfg, learner_opt_cfg, accum_steps: int = 1, plan: FeedbackPlan | None = None,
                        meta: bool | None = None) -> Callable:
  """(state, batch, fb_batch) -> (state, metrics); fb_batch is read only on meta steps.

  fb_batch is one batch, or {set name: batch} when plan.sets names the feedback sets (FeedbackPlan).
  `meta=None`: the meta step under `lax.cond` on the step counter; True / False: always / never (the
  loop dispatches on the host's step count, vpt.dispatch='host'; vpt.core.meta). The step's order and
  bookkeeping are vpt.core.step's; this module supplies the language meta update and learner step.
  """
  designer = TaskDesigner(DesignerConfig.from_config(vpt_cfg)) if uses_designer(vpt_cfg) else None
  designer_opt = make_designer_optimizer(vpt_cfg) if designer is not None else None
  n_layers, n_last = model.cfg.n_layers, vpt_cfg.align_last_n_layers

  def learner(state: TrainState, batch: dict, fb_batch: dict | None = None):
    del fb_batch  # the learner never reads the feedback
    designer_params = None if designer is None else state.designer.params
    return learner_update(state, batch, soft_target_loss_fn(model, vpt_cfg, designer, designer_params), optimizer,
                          schedule, accum_steps, dropout_rng=step_dropout_rng(model, state),
                          lora_only=model.cfg.lora_rank > 0)

  def designer_update(state: TrainState, batch: dict, fb_batch: dict | None = None):
    rng = jax.random.fold_in(state.rng, state.step)
    new_designer, g_down = meta_update(state, batch, fb_batch, rng, model=model, designer=designer, vpt_cfg=vpt_cfg,
                                       designer_opt=designer_opt, learner_opt_cfg=learner_opt_cfg, plan=plan)
    return {"designer": new_designer}, g_down

  return core_step.make_train_step(core_step.StepTask(
      learner_update=learner, uses_designer=designer is not None,
      is_meta_step=lambda step: meta_lib.is_meta_step(step, vpt_cfg.burn_in_steps, vpt_cfg.meta_every),
      meta_update=designer_update, on_subset=lambda grads: alignment.split_params(grads, n_layers, n_last)[0],
      subset_zeros=lambda state: alignment.subset_zeros(state.params, n_layers, n_last)), meta)
