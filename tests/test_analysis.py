"""vpt.language.analysis against explicit references: per-layer dots add up to the full dot, candidate scores are
per-candidate gradient dot products, the probe's first-order prediction matches the realised drop for a
small step, Pearson/Fisher CI against the textbook formulas, and load_run restores a saved state."""

import functools
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from vpt.core import alignment, checkpoint as ckpt_lib, sharding
from vpt.core.run_dir import write_config
from vpt.language import analysis, config_lib, value as value_lib
from vpt.language.losses import downstream_nll
from vpt.language.models.designer import DesignerConfig, TaskDesigner
from vpt.language.models.lm import LMConfig, Transformer
from vpt.language.steps import init_train_state, state_shardings
from vpt.language.vpt_step import init_designer_state, make_designer_optimizer

VOCAB, SEQ, LAYERS, K = 40, 9, 3, 5


def _batch(seed, b=3, dtype=jnp.float64):
  rng = np.random.default_rng(seed)
  toks = rng.integers(1, VOCAB, (b, SEQ + 1))
  mask = np.ones((b, SEQ))
  mask[:, :3] = 0  # a "prompt"
  return {"inputs": jnp.asarray(toks[:, :-1], jnp.int32), "targets": jnp.asarray(toks[:, 1:], jnp.int32),
          "loss_mask": jnp.asarray(mask, dtype), "segment_ids": jnp.ones((b, SEQ), jnp.int32),
          "positions": jnp.broadcast_to(jnp.arange(SEQ, dtype=jnp.int32), (b, SEQ))}


@functools.lru_cache(maxsize=None)
def _model(tie=False):
  """A small float64 learner with non-trivial (noised) parameters (call under x64)."""
  model = Transformer(LMConfig(vocab_size=VOCAB, d_model=16, n_layers=LAYERS, n_heads=2, n_kv_heads=1, d_ff=32,
                               tie_embeddings=tie, dtype="float64"))
  params = jax.jit(model.init)(jax.random.PRNGKey(0), _batch(0)["inputs"])["params"]  # op by op is slow
  rng = np.random.default_rng(1)  # host noise: compiling jax.random here costs seconds
  return model, jax.tree.map(lambda p: jnp.asarray(np.asarray(p, np.float64) + 0.1 * rng.normal(size=p.shape)),
                             params)


@pytest.mark.parametrize("tie,soft", [(False, True), (True, False)])
def test_per_layer_dots_sum_to_the_full_parameter_dot(x64, tie, soft):
  model, params = _model(tie)
  batch, fb = _batch(1), _batch(2)
  if soft:  # arbitrary soft targets over arbitrary candidates
    cand_ids = jnp.asarray(np.random.default_rng(3).integers(0, VOCAB, (3, SEQ, K)), jnp.int32)
    q = jax.nn.softmax(jnp.asarray(np.random.default_rng(4).normal(size=(3, SEQ, K))), axis=-1)
    rows = analysis.per_layer_alignment(model, params, batch, fb, q, cand_ids)
  else:  # q=None: one-hot next-token targets, the NTP gradient
    cand_ids, q = batch["targets"][..., None], jnp.ones((3, SEQ, 1))
    rows = analysis.per_layer_alignment(model, params, batch, fb)

  @jax.jit
  def reference(p):
    loss_pre = lambda p: value_lib.soft_loss_of_logits(cand_ids, q, batch["loss_mask"])(
        model.apply({"params": p}, batch["inputs"]))
    loss_down = lambda p: downstream_nll(model.apply({"params": p}, fb["inputs"]), fb["targets"], fb["loss_mask"])
    g_pre, g_down = jax.grad(loss_pre)(p), jax.grad(loss_down)(p)
    return alignment.tree_vdot(analysis._flat(g_down), analysis._flat(g_pre)), optax.tree.norm(g_pre)

  full, g_pre_norm = (float(x) for x in reference(params))
  expected_groups = ["embed_tokens"] + [f"layers_{i}" for i in range(LAYERS)] + ["norm"] + ([] if tie else ["lm_head"])
  assert [r["group"] for r in rows] == expected_groups
  assert abs(full) > 1e-6
  np.testing.assert_allclose(sum(r["dot"] for r in rows), full, rtol=1e-10)
  np.testing.assert_allclose(math.sqrt(sum(r["g_pre_norm"] ** 2 for r in rows)), g_pre_norm, rtol=1e-10)
  for r in rows:
    assert -1 - 1e-12 <= r["cosine"] <= 1 + 1e-12
    np.testing.assert_allclose(r["cosine"], r["dot"] / (r["g_down_norm"] * r["g_pre_norm"]), rtol=1e-10)


@pytest.mark.parametrize("n_last,tie", [(1, False), (0, False), (2, True)])
def test_candidate_scores_are_per_candidate_gradient_dots(x64, n_last, tie):
  model, params = _model(tie)
  batch, fb = _batch(5), _batch(6)
  g_down = analysis.downstream_grad(model, params, fb, n_last)
  out = analysis.candidate_scores(model, params, batch, g_down, n_last, K)
  assert out["s"].shape == out["cand_ids"].shape == out["cand_logp"].shape == (3, SEQ, K)
  np.testing.assert_array_equal(out["cand_ids"][..., 0], np.asarray(batch["targets"]))  # the true token first

  aligned, subset = value_lib.Aligned.build(model, params, batch, n_last)
  assert set(subset) == set(g_down)

  @jax.jit
  def explicit(b, t, v):  # ⟨g_down, ∇_S log p(v | x_<t)⟩ by reverse mode, and log p itself
    logp = lambda s: jax.nn.log_softmax(aligned.logits(s)[b, t])[v]
    value, grad = jax.value_and_grad(logp)(subset)
    return alignment.tree_vdot(g_down, grad), value

  for b, t, k in [(0, 3, 0), (1, 5, 2), (2, 8, K - 1), (0, 0, 1)]:
    s, logp = explicit(b, t, int(out["cand_ids"][b, t, k]))
    np.testing.assert_allclose(out["s"][b, t, k], float(s), rtol=1e-9, atol=1e-13)
    np.testing.assert_allclose(out["cand_logp"][b, t, k], float(logp), rtol=1e-12)


def test_candidate_scores_decode_candidates():
  run = analysis.tiny_run(0)
  batch = analysis.lm_batches(run, 1)[0]
  g_down = analysis.downstream_grad(run.model, run.params, analysis.feedback_batch(run), 2)
  out = analysis.candidate_scores(run.model, run.params, batch, g_down, 2, 4, tokenizer=run.tokenizer)
  assert len(out["pieces"]) == batch["inputs"].shape[0] and len(out["pieces"][0][0]) == 4
  assert out["pieces"][1][7][0] == run.tokenizer.id_to_piece(int(batch["targets"][1, 7]))
  assert out["input_pieces"][1][7] == run.tokenizer.id_to_piece(int(batch["inputs"][1, 7]))


def test_probe_prediction_matches_realised_drop_for_a_small_step(x64):
  run = analysis.tiny_run(0, dtype="float64")
  assert run.params["norm"]["scale"].dtype == jnp.float64
  batch = analysis.lm_batches(run, 1)[0]
  probe = analysis.feedback_batch(run, heldout=True, batch_size=8)
  fb = analysis.feedback_batch(run)
  result = analysis.value_probe(run, [batch], probe, eta=1e-3, eta_factors=(0.1, 1.0), fb_batch=fb)
  rows = result["rows"]
  assert result["n"] == 1 and not result["correlations"]  # one batch: nothing to correlate
  assert abs(rows["pred_raw"][0]) > 1e-7
  ratio = rows["drop_sgd"][0] / rows["pred_raw"][0]
  assert abs(ratio - 1) < 1e-2, ratio
  small, large = sorted([s for s in result["eta_sweep"] if not s["is_learner_lr"]], key=lambda s: s["eta"])
  assert abs(small["mean_ratio"] - 1) < 1e-3, small
  assert abs(small["mean_ratio"] - 1) <= abs(large["mean_ratio"] - 1) + 1e-9  # first order: error ∝ η
  # The designer's value on S is the dot with the feedback-set gradient on S.
  assert np.isfinite(rows["value_fb_s"][0])


def test_pearson_and_fisher_interval_match_the_explicit_formulas():
  x, y = [1, 2, 3, 4, 5], [2, 4, 5, 4, 5]
  got = analysis.pearson_ci(x, y)
  r = 6 / math.sqrt(60)  # Σdxdy = 6, Σdx² = 10, Σdy² = 6
  z, se, zc = 0.5 * math.log((1 + r) / (1 - r)), 1 / math.sqrt(5 - 3), 1.959963984540054
  tanh = lambda u: (math.exp(2 * u) - 1) / (math.exp(2 * u) + 1)
  np.testing.assert_allclose([got["r"], got["lo"], got["hi"]], [r, tanh(z - zc * se), tanh(z + zc * se)], rtol=1e-12)
  assert got["n"] == 5

  rng = np.random.default_rng(0)
  a = rng.normal(size=50)
  b = 0.5 * a + rng.normal(size=50)
  n = len(a)
  sxy, sx, sy, sxx, syy = (a * b).sum(), a.sum(), b.sum(), (a * a).sum(), (b * b).sum()
  r = (n * sxy - sx * sy) / math.sqrt((n * sxx - sx ** 2) * (n * syy - sy ** 2))
  z, se, z90 = math.atanh(r), 1 / math.sqrt(n - 3), 1.6448536269514722
  got = analysis.pearson_ci(a, b, confidence=0.90)
  np.testing.assert_allclose([got["r"], got["lo"], got["hi"]],
                             [r, math.tanh(z - z90 * se), math.tanh(z + z90 * se)], rtol=1e-10)
  with pytest.raises(ValueError, match="at least 4"):
    analysis.pearson_ci([1, 2, 3], [1, 2, 3])


def test_load_run_restores_a_saved_state(tmp_path):
  run = analysis.tiny_run(0)
  config, model = run.config, run.model
  optimizer, _ = run.optimizer()
  designer = TaskDesigner(DesignerConfig.from_config(config.vpt))

  def init():  # the training state as vpt.language.train builds it, one optimizer update in (non-trivial moments)
    state = init_train_state(model, optimizer, config.data.seq_len, seed=3)
    state = state.replace(designer=init_designer_state(designer, make_designer_optimizer(config.vpt), state.params,
                                                       config.data.seq_len, config.vpt.top_k, seed=3))
    grads = jax.tree.map(jnp.ones_like, state.params)
    _, opt_state = optimizer.update(grads, state.opt_state, state.params)
    return state.replace(step=jnp.asarray(7, jnp.int32), opt_state=opt_state)

  # Saved sharded over the 8 test devices (FSDP), as a multi-device run would: loads onto one device.
  mesh_cfg = config_lib.base_config().mesh
  mesh_cfg.data, mesh_cfg.fsdp = 1, 8
  mesh = sharding.make_mesh(mesh_cfg)
  state = jax.jit(init, out_shardings=state_shardings(jax.eval_shape(init), mesh, optimizer))()
  assert any(len(x.sharding.device_set) == 8 for x in jax.tree.leaves(state.params))
  checkpointer = ckpt_lib.Checkpointer(str(tmp_path / "checkpoints"), keep=2, async_save=False, iterator_names=())
  checkpointer.save(7, state, {}, force=True)
  checkpointer.close()
  write_config(config, str(tmp_path))
  os.makedirs(tmp_path / "tokenizer")
  (tmp_path / "tokenizer" / "spm.model").write_bytes(run.tokenizer.proto)

  loaded = analysis.load_run(str(tmp_path))
  assert loaded.step == 7 and loaded.vpt_cfg.mode == "value" and loaded.model.cfg == model.cfg
  assert loaded.tokenizer.vocab_size == run.tokenizer.vocab_size
  for want, got in [(state.params, loaded.params), (state.opt_state, loaded.opt_state),
                    (state.designer.params, loaded.designer_params)]:
    assert jax.tree.structure(want) == jax.tree.structure(got)
    for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert int(alignment._find_adam_state(loaded.opt_state).count) == 1
  assert all(len(x.sharding.device_set) == 1 for x in jax.tree.leaves((loaded.params, loaded.opt_state)))
  with pytest.raises(ValueError, match="no checkpoint at that step"):
    analysis.load_run(str(tmp_path), step=3)
  with pytest.raises(FileNotFoundError, match="config.json"):
    analysis.load_run(str(tmp_path / "checkpoints"))
  with open(tmp_path / "config.json") as f:
    assert json.load(f)["vpt"]["top_k"] == config.vpt.top_k
