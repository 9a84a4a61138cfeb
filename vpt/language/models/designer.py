"""The language task designer φ: a small causal transformer that scores the K candidates of every
position and gates how much target mass leaves the true token.

Token embeddings. A 150k-token vocabulary × width 256 would be a 39M-parameter table per designer
(plus two Adam moments) — larger than the rest of the designer. Instead the designer reads the
learner's own embedding table, stop-gradient, through learned projections into its width: its
parameter count is independent of the vocabulary, and candidates are scored by a bilinear form
between the designer's state at t and the (projected) learner embedding of each candidate id. It
also sees the learner's stop-gradient log-probability of each candidate, so "follow the learner"
(self-distillation) is one weight away and the designer can learn where to deviate from it.

Gate features (`vpt.designer.gate_features`, off by default as in the paper): the gate α_t then also reads
the learner's confidence at t — log p(y_t), the best other candidate's log-probability, their gap, and the
entropy of the learner over the K candidates (all stop-gradient) — so it can locate where the stream's
token is one the learner doubts (a corrupted fact, a format it rarely writes) instead of inferring that
from the context alone.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from vpt.language.models.lm import Block, LMConfig, RMSNorm, attention_mask


@dataclasses.dataclass(frozen=True)
class DesignerConfig:
  d_model: int = 256
  n_layers: int = 6
  n_heads: int = 4
  d_ff: int = 1024
  alpha_max: float = 0.5
  alpha_init_logit: float = -2.0  # α starts at α_max·sigmoid(−2) ≈ 0.12·α_max: near one-hot.
  gate_features: bool = False  # the gate also reads the learner's confidence at t (module docstring).
  dtype: str = "float32"  # the paper trains the designer in fp32 even when the learner is bf16.

  @classmethod
  def from_config(cls, vpt_cfg) -> "DesignerConfig":
    d = vpt_cfg.designer
    return cls(d_model=d.d_model, n_layers=d.n_layers, n_heads=d.n_heads, d_ff=d.d_ff,
               alpha_max=vpt_cfg.alpha_max, alpha_init_logit=d.get("alpha_init_logit", cls.alpha_init_logit),
               gate_features=bool(d.get("gate_features", cls.gate_features)))

  def block_config(self) -> LMConfig:
    return LMConfig(vocab_size=1, d_model=self.d_model, n_layers=self.n_layers, n_heads=self.n_heads,
                    n_kv_heads=self.n_heads, d_ff=self.d_ff, qkv_bias=False, dtype=self.dtype)


def confidence_features(cand_logp: jax.Array) -> jax.Array:
  """[B, T, 4]: log p(y), the best other candidate's log p, their gap, and the entropy of the learner's
  distribution renormalised over the K candidates (candidate 0 is the true token y)."""
  logp = jax.lax.stop_gradient(cand_logp)
  true, other = logp[..., 0], jnp.max(logp[..., 1:], axis=-1)
  renorm = jax.nn.log_softmax(logp, axis=-1)
  entropy = -jnp.sum(jnp.exp(renorm) * renorm, axis=-1)
  return jnp.stack([true, other, true - other, entropy], axis=-1)


class TaskDesigner(nn.Module):
  """(context, true next token, candidates) -> (candidate scores [B, T, K], gate α [B, T])."""

  cfg: DesignerConfig

  @nn.compact
  def __call__(self, embedding, inputs, targets, positions, segment_ids, cand_ids, cand_logp):
    cfg = self.cfg
    embedding = jax.lax.stop_gradient(embedding)  # the learner's table is read, never trained here.
    dense = lambda f, name, **kw: nn.Dense(f, dtype=cfg.dtype, param_dtype=jnp.float32, name=name, **kw)
    x = dense(cfg.d_model, "context_in")(embedding[inputs]) + dense(cfg.d_model, "target_in")(embedding[targets])
    mask = attention_mask(segment_ids)
    block_cfg = cfg.block_config()
    for i in range(cfg.n_layers):
      x = Block(block_cfg, name=f"layers_{i}")(x, positions, mask)
    h = RMSNorm(1e-6, name="norm")(x)

    query = dense(cfg.d_model, "query")(h)  # [B, T, d]
    # Keys of the candidates: project-then-gather or gather-then-project, whichever multiplies fewer
    # rows (the whole vocabulary, or the B·T·K candidates); both give the same numbers.
    # No bias: it would add the same query·bias to every candidate's score (softmax-invariant), so
    # its gradient is exactly zero and Adam would only amplify rounding noise into it.
    project = dense(cfg.d_model, "candidate_in", use_bias=False)
    if embedding.shape[0] <= cand_ids.size:
      keys = project(embedding)[cand_ids]  # [B, T, K, d]
    else:
      keys = project(embedding[cand_ids])
    scores = jnp.einsum("btd,btkd->btk", query, keys) / jnp.sqrt(cfg.d_model).astype(query.dtype)
    logp_weight = self.param("logp_weight", nn.initializers.zeros, (), jnp.float32)
    true_bias = self.param("true_token_bias", nn.initializers.zeros, (), jnp.float32)
    is_true = (jnp.arange(cand_ids.shape[-1]) == 0).astype(scores.dtype)
    scores = scores + logp_weight * jax.lax.stop_gradient(cand_logp) + true_bias * is_true

    gate_in = h
    if cfg.gate_features:
      gate_in = h + dense(cfg.d_model, "gate_features_in")(confidence_features(cand_logp).astype(h.dtype))
    gate = dense(1, "gate", bias_init=nn.initializers.constant(cfg.alpha_init_logit))(gate_in)[..., 0]
    alpha = cfg.alpha_max * jax.nn.sigmoid(gate)
    return scores, alpha
