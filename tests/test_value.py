"""The value and the designer gradient in float64 against explicit references.

JVP value == ⟨g_down, ∇_S L_pre⟩; designer gradient == double backward == finite differences;
exact cosine gradient == finite differences of the explicit cosine; Adam geometry == ⟨P·g_down, g_pre⟩;
first order: L_down(θ) − L_down(θ − η g_pre) ≈ η·V as η → 0.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vpt.core import alignment
from vpt.core.optim import make_optimizer
from vpt.language import config_lib, value as value_lib, vpt_step
from vpt.language.losses import downstream_nll
from vpt.language.models.designer import DesignerConfig, TaskDesigner
from vpt.language.models.lm import LMConfig, Transformer
from vpt.language.vpt_step import init_designer_state, make_designer_optimizer, meta_objective

VOCAB, SEQ, LAYERS, K = 48, 10, 3, 6
pytestmark = pytest.mark.usefixtures("x64")  # every test here is float64


def _batch(seed, b=3):
  rng = np.random.default_rng(seed)
  toks = rng.integers(1, VOCAB, (b, SEQ + 1))
  mask = np.ones((b, SEQ))
  mask[:, :3] = 0  # a "prompt"
  return {"inputs": jnp.asarray(toks[:, :-1]), "targets": jnp.asarray(toks[:, 1:]),
          "loss_mask": jnp.asarray(mask), "segment_ids": jnp.ones((b, SEQ), jnp.int32),
          "positions": jnp.broadcast_to(jnp.arange(SEQ), (b, SEQ))}


def _vpt_cfg(**kw):
  c = config_lib.vpt_config()
  c.mode, c.top_k = "value", K
  c.designer.d_model, c.designer.n_layers, c.designer.n_heads, c.designer.d_ff = 16, 1, 2, 32
  c.update(kw)
  return c


def _setup(vpt_cfg, tie=False, gate_features=False):
  cfg = LMConfig(vocab_size=VOCAB, d_model=16, n_layers=LAYERS, n_heads=2, n_kv_heads=1, d_ff=32,
                 tie_embeddings=tie, dtype="float64")
  model = Transformer(cfg)
  params = model.init(jax.random.PRNGKey(0), _batch(0)["inputs"])["params"]
  noise = lambda p, i: p + 0.1 * jax.random.normal(jax.random.PRNGKey(i), p.shape, jnp.float64)
  params = jax.tree.map(noise, jax.tree.map(lambda p: p.astype(jnp.float64), params),
                        jax.tree.unflatten(jax.tree.structure(params), list(range(len(jax.tree.leaves(params))))))
  designer = TaskDesigner(DesignerConfig(d_model=16, n_layers=1, n_heads=2, d_ff=32, dtype="float64",
                                         gate_features=gate_features))
  dstate = init_designer_state(designer, make_designer_optimizer(vpt_cfg), params, SEQ, K, seed=0)
  dparams = jax.tree.map(lambda p: p.astype(jnp.float64) + 0.3 * jnp.ones_like(p, jnp.float64), dstate.params)
  opt_cfg = config_lib.base_config().optimizer
  optimizer, _ = make_optimizer(opt_cfg, 10)
  return model, params, designer, dparams, optimizer.init(params), opt_cfg


def _objective(vpt_cfg, tie=False, gate_features=False):
  model, params, designer, dparams, opt_state, opt_cfg = _setup(vpt_cfg, tie, gate_features)
  objective, info = meta_objective(params, opt_state, dparams, _batch(1), _batch(2), jax.random.PRNGKey(3),
                                   model=model, designer=designer, vpt_cfg=vpt_cfg, learner_opt_cfg=opt_cfg)
  return objective, info, dparams, (model, params, opt_state, opt_cfg)


def _explicit_gpre(info, q):
  mask = _batch(1)["loss_mask"]
  return value_lib.subset_grad(info["aligned"], info["subset"],
                               value_lib.soft_loss_of_logits(info["cand_ids"], q, mask))


@pytest.mark.parametrize("n_last,tie", [(2, False), (0, False), (1, True)])
def test_jvp_value_equals_explicit_dot_product(n_last, tie):
  objective, info, dparams, _ = _objective(_vpt_cfg(align_last_n_layers=n_last), tie)
  _, aux = objective(dparams)
  q = info["targets_of"](dparams)[2]
  explicit = alignment.tree_vdot(info["g_down"], _explicit_gpre(info, q))
  assert abs(float(explicit)) > 1e-6
  np.testing.assert_allclose(float(aux["value"]), float(explicit), rtol=1e-8)
  if n_last == 0:  # S = all parameters really is all of them.
    assert len(info["subset"]) == len(jax.tree.leaves(_setup(_vpt_cfg())[1]))
  else:
    assert all(k.startswith(("norm", "lm_head")) or int(k.split("/")[0].split("_")[1]) >= LAYERS - n_last
               for k in info["subset"])


@pytest.mark.parametrize("gate_features", [False, True])
def test_designer_gradient_matches_double_backward_and_finite_differences(gate_features):
  vpt_cfg = _vpt_cfg()
  objective, info, dparams, _ = _objective(vpt_cfg, gate_features=gate_features)
  assert ("gate_features_in" in dparams) == gate_features
  grad = jax.grad(lambda d: objective(d)[0])(dparams)
  mask = _batch(1)["loss_mask"]

  def reference_loss(d):
    q = info["targets_of"](d)[2]
    return -value_lib.reference_value(info["aligned"], info["subset"], info["tangent"], info["cand_ids"], q, mask)

  ref = jax.grad(reference_loss)(dparams)
  for a, b in zip(jax.tree.leaves(grad), jax.tree.leaves(ref)):
    np.testing.assert_allclose(a, b, rtol=1e-8, atol=1e-14)
  _check_finite_differences(lambda d: objective(d)[0], dparams, grad)


def _check_finite_differences(fn, dparams, grad, eps=1e-5, n_dirs=3):
  """Central differences along random directions == ⟨grad, direction⟩."""
  leaves, treedef = jax.tree.flatten(dparams)
  for i in range(n_dirs):
    keys = jax.random.split(jax.random.PRNGKey(100 + i), len(leaves))
    direction = jax.tree.unflatten(treedef, [jax.random.normal(k, l.shape, l.dtype) for k, l in zip(keys, leaves)])
    plus = jax.tree.map(lambda p, d: p + eps * d, dparams, direction)
    minus = jax.tree.map(lambda p, d: p - eps * d, dparams, direction)
    fd = (float(fn(plus)) - float(fn(minus))) / (2 * eps)
    analytic = sum(float(jnp.vdot(g, d)) for g, d in zip(jax.tree.leaves(grad), jax.tree.leaves(direction)))
    np.testing.assert_allclose(fd, analytic, rtol=1e-5, atol=1e-10)


def test_exact_cosine_gradient_matches_finite_differences_of_explicit_cosine():
  vpt_cfg = _vpt_cfg(align="cosine")
  objective, info, dparams, _ = _objective(vpt_cfg)
  mask = _batch(1)["loss_mask"]

  def explicit_cosine_loss(d):
    q = info["targets_of"](d)[2]
    g_pre = value_lib.subset_grad(info["aligned"], info["subset"],
                                  lambda logits: -jnp.sum(mask[..., None] * q * jax.nn.log_softmax(logits)[
                                      jnp.arange(3)[:, None, None], jnp.arange(SEQ)[None, :, None],
                                      info["cand_ids"]]) / jnp.sum(mask))
    return -alignment.tree_vdot(info["tangent"], g_pre) / (info["tangent_norm"] * alignment.tree_norm(g_pre))

  np.testing.assert_allclose(float(objective(dparams)[0]), float(explicit_cosine_loss(dparams)), rtol=1e-9)
  grad = jax.grad(lambda d: objective(d)[0])(dparams)
  ref = jax.grad(explicit_cosine_loss)(dparams)  # double backward through the explicit g_pre
  for a, b in zip(jax.tree.leaves(grad), jax.tree.leaves(ref)):
    np.testing.assert_allclose(a, b, rtol=1e-7, atol=1e-13)
  _check_finite_differences(lambda d: objective(d)[0], dparams, grad)


def test_adam_geometry_value_is_preconditioned_dot_product():
  vpt_cfg = _vpt_cfg(geometry="adam")
  model, params, designer, dparams, opt_state, opt_cfg = _setup(vpt_cfg)
  # Give the learner's Adam a history so v̂ is not trivial.
  optimizer, _ = make_optimizer(opt_cfg, 10)
  grads = jax.tree.map(lambda p: 0.3 * jnp.sin(3.0 * p), params)
  _, opt_state = optimizer.update(grads, opt_state, params)
  objective, info = meta_objective(params, opt_state, dparams, _batch(1), _batch(2), jax.random.PRNGKey(3),
                                   model=model, designer=designer, vpt_cfg=vpt_cfg, learner_opt_cfg=opt_cfg)
  v = objective(dparams)[1]["value"]
  adam = alignment._find_adam_state(opt_state)
  nu_s, _ = alignment.split_params(adam.nu, LAYERS, 2)
  vhat = {k: x / (1 - opt_cfg.b2) for k, x in nu_s.items()}
  q = info["targets_of"](dparams)[2]
  g_pre = _explicit_gpre(info, q)
  explicit = sum(jnp.vdot(info["g_down"][k] / (jnp.sqrt(vhat[k]) + opt_cfg.eps), g_pre[k]) for k in g_pre)
  np.testing.assert_allclose(float(v), float(explicit), rtol=1e-8)
  raw = alignment.tree_vdot(info["g_down"], g_pre)
  assert abs(float(explicit) - float(raw)) > 1e-3 * abs(float(raw))  # the geometry really changes V


def test_first_order_value_predicts_one_step_downstream_drop():
  vpt_cfg = _vpt_cfg()
  objective, info, dparams, (model, params, _, _) = _objective(vpt_cfg)
  v = float(objective(dparams)[1]["value"])
  q = info["targets_of"](dparams)[2]
  g_pre = _explicit_gpre(info, q)
  fb = _batch(2)
  subset, rest = alignment.split_params(params, LAYERS, vpt_cfg.align_last_n_layers)

  def l_down(sub):
    p = alignment.merge_params(sub, rest)
    logits = model.apply({"params": p}, fb["inputs"], fb["positions"], fb["segment_ids"])
    return float(downstream_nll(logits, fb["targets"], fb["loss_mask"]))

  base = l_down(subset)
  errors = []
  for eta in (1e-1, 1e-2, 1e-3, 1e-4):
    stepped = {k: subset[k] - eta * g_pre[k] for k in subset}
    errors.append(abs((base - l_down(stepped)) / (eta * v) - 1.0))
  assert errors[-1] < 1e-3, errors
  assert errors[-1] < errors[0], errors  # the ratio converges to 1 as η → 0


def test_trust_region_penalty_matches_explicit_gradients():
  """R = (‖g_ntp‖² − ⟨g_ntp, g_pre(q)⟩)/‖g_ntp‖²: the first-order NTP-loss increase q causes, relative
  to the one-hot step. Value and φ-gradient vs explicit gradients and double backward."""
  lam = 0.7
  objective, info, dparams, _ = _objective(_vpt_cfg(reg_trust_region=lam))
  mask = _batch(1)["loss_mask"]
  onehot = jnp.zeros((3, SEQ, K)).at[..., 0].set(1.0)
  g_ntp = _explicit_gpre(info, onehot)
  ntp_sq = alignment.tree_vdot(g_ntp, g_ntp)

  def explicit(d):
    q = info["targets_of"](d)[2]
    v = value_lib.reference_value(info["aligned"], info["subset"], info["tangent"], info["cand_ids"], q, mask)
    trust = (ntp_sq - value_lib.reference_value(info["aligned"], info["subset"], g_ntp, info["cand_ids"], q, mask)) / ntp_sq
    return -v + lam * jax.nn.relu(trust), trust

  loss, aux = objective(dparams)
  ref_loss, ref_trust = explicit(dparams)
  assert float(ref_trust) > 1e-4  # soft targets really cost some NTP progress
  np.testing.assert_allclose(float(aux["trust_region"]), float(ref_trust), rtol=1e-8)
  np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-8)
  grad = jax.grad(lambda d: objective(d)[0])(dparams)
  ref = jax.grad(lambda d: explicit(d)[0])(dparams)
  for a, b in zip(jax.tree.leaves(grad), jax.tree.leaves(ref)):
    np.testing.assert_allclose(a, b, rtol=1e-7, atol=1e-13)


@pytest.mark.parametrize("n_last", [2, 0])
def test_g_down_from_two_halves_equals_the_whole_batch_and_the_split_cosine_is_explicit(n_last):
  # The feedback batch's g_down is assembled from its even and odd rows; one row has no answer tokens,
  # so the halves hold different numbers of examples (the weighting must follow L_down's example mean).
  model, params, *_ = _setup(_vpt_cfg())
  fb = _batch(2, b=5)
  fb["loss_mask"] = fb["loss_mask"].at[2].set(0.0)
  g_down, split_cos = vpt_step.downstream_grad(model, params, fb, n_last)
  subset, rest = alignment.split_params(params, LAYERS, n_last)
  full = lambda s, b: model.apply({"params": alignment.merge_params(s, rest)}, b["inputs"], b["positions"],
                                  b["segment_ids"])
  grad_on = lambda b: jax.grad(lambda s: downstream_nll(full(s, b), b["targets"], b["loss_mask"]))(subset)
  whole = grad_on(fb)
  assert set(g_down) == set(whole)
  for k in whole:
    np.testing.assert_allclose(g_down[k], whole[k], rtol=1e-10, atol=1e-14)
  even, odd = (grad_on(jax.tree.map(lambda x, i=i: x[i::2], fb)) for i in (0, 1))
  explicit = alignment.tree_vdot(even, odd) / (alignment.tree_norm(even) * alignment.tree_norm(odd))
  np.testing.assert_allclose(split_cos, explicit, rtol=1e-10)
  assert -1.0 < float(split_cos) < 1.0


def test_gate_confidence_features_are_the_learners_explicit_statistics():
  from vpt.language.models.designer import confidence_features
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(2, 3, 6))
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True)) - 0.7  # candidates' log p (not normalised over K)
  feats = np.asarray(confidence_features(jnp.asarray(logp)))
  p = np.exp(logp) / np.exp(logp).sum(-1, keepdims=True)
  expected = np.stack([logp[..., 0], logp[..., 1:].max(-1), logp[..., 0] - logp[..., 1:].max(-1),
                       -(p * np.log(p)).sum(-1)], -1)
  np.testing.assert_allclose(feats, expected, rtol=1e-12)


def test_averaged_g_down_is_the_bias_corrected_running_mean_and_the_designer_aligns_with_it():
  # vpt.g_down_average = β: m_n = β m_{n−1} + (1 − β) g_n, the designer aligns with m_n / (1 − β^n).
  beta = 0.8
  vpt_cfg = _vpt_cfg(g_down_average=beta)
  model, params, designer, dparams, opt_state, opt_cfg = _setup(vpt_cfg)
  m = vpt_step.g_down_average_init(vpt_cfg, params, LAYERS)
  assert set(m) == set(alignment.split_params(params, LAYERS, vpt_cfg.align_last_n_layers)[0])
  assert all(not np.any(x) for x in jax.tree.leaves(m))
  raw = [vpt_step.downstream_grad(model, params, _batch(seed), vpt_cfg.align_last_n_layers)[0] for seed in (2, 5)]
  assert float(alignment.tree_vdot(raw[0], raw[1])) < 0.99 * float(alignment.tree_norm(raw[0]) * alignment.tree_norm(raw[1]))
  mask = _batch(1)["loss_mask"]
  for n, (fb_seed, g) in enumerate(zip((2, 5), raw), start=1):
    objective, info = meta_objective(params, opt_state, dparams, _batch(1), _batch(fb_seed), jax.random.PRNGKey(3),
                                     model=model, designer=designer, vpt_cfg=vpt_cfg, learner_opt_cfg=opt_cfg,
                                     g_down_avg=m, n_meta=jnp.asarray(n))
    explicit_m = {k: beta * m[k] + (1 - beta) * g[k] for k in g}
    explicit_avg = {k: explicit_m[k] / (1 - beta ** n) for k in g}
    for k in g:
      np.testing.assert_allclose(info["g_down_avg"][k], explicit_m[k], rtol=1e-12, atol=1e-16)
      np.testing.assert_allclose(info["tangent"][k], explicit_avg[k], rtol=1e-12, atol=1e-16)
    if n == 1:  # the first meta step's bias-corrected average is its own g_down
      for k in g:
        np.testing.assert_allclose(info["tangent"][k], g[k], rtol=1e-12, atol=1e-16)
    grad = jax.jit(jax.grad(lambda d: objective(d)[0]))(dparams)  # jitted: op by op takes minutes
    ref = jax.jit(jax.grad(lambda d: -value_lib.reference_value(
        info["aligned"], info["subset"], explicit_avg, info["cand_ids"], info["targets_of"](d)[2], mask)))(dparams)
    for a, b in zip(jax.tree.leaves(grad), jax.tree.leaves(ref)):
      np.testing.assert_allclose(a, b, rtol=1e-8, atol=1e-14)
    m = info["g_down_avg"]
