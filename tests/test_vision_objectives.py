"""The DINOv2 objective terms (vpt.vision.dinov2_terms) against explicit float64 references: iBOT's
masked-patch loss, KoLeo, Sinkhorn-Knopp; the masks; the objective with every term off is today's DINO
step bit for bit; the V-Pretraining value of the full objective by JVP == double backward; the HF mask
token; and a loop resume with iBOT on == an uninterrupted run."""

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vpt.core import alignment
from vpt.vision import dinov2_terms as terms, step as vs
from vpt.vision.models.unet import total_variation
from vpt.vision.models.vit import ViT

import test_vision_step as tvs  # the nano step config, batches and compiled-once helpers
from test_dino import _softmax  # the float64 reference softmax
from test_vision_step import fast_jit, unet_run  # noqa: F401 (a fixture)


def _log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _reference_sinkhorn(t, t_t, n_iterations=3):
  """DINOv2's sinkhorn_knopp_teacher, line by line in float64 NumPy; also the deviation of B × the column
  sums entering the last column normalisation (the iteration's tolerance)."""
  q = np.exp(t / t_t).T  # K × B
  b, k = q.shape[1], q.shape[0]
  q /= q.sum()
  tol = None
  for _ in range(n_iterations):
    q /= q.sum(axis=1, keepdims=True)
    q /= k
    tol = np.abs(b * q.sum(axis=0) - 1).max()
    q /= q.sum(axis=0, keepdims=True)
    q /= b
  return (q * b).T, tol


# ----------------------------------------------------------------------------- the terms against references


@pytest.mark.parametrize("centering", ["centering", "sinkhorn_knopp"])
def test_ibot_loss_and_centre_match_the_float64_reference(x64, centering):
  """Masked positions only; per image the mean over its masked patches, then the mean over all images
  (an unmasked image counts as 0, as in DINOv2's forward_masked); padding rows of the buffer take no part."""
  rng = np.random.default_rng(0)
  m, n, k, t_s, t_t = 6, 9, 7, 0.1, 0.04
  masks = rng.random((m, n)) < 0.4
  masks[2] = False  # an unmasked crop
  masks[4, :3] = True
  student, teacher = rng.normal(size=(m, n, k)), rng.normal(size=(m, n, k))
  center = 0.3 * rng.normal(size=(k,))
  upper = int(masks.sum()) + 3  # three padding rows

  @jax.jit
  def ours(student, teacher, center, masks):
    idx, valid, weights = terms.masked_positions(masks, upper, jnp.float64)
    s, t = student.reshape(-1, k)[idx], teacher.reshape(-1, k)[idx]
    q = terms.teacher_probs(t, center, t_t, centering, valid=valid)
    return (terms.ibot_loss(s, q, weights, m, t_s), terms.update_ibot_center(center, t, valid, 0.9), valid)

  loss, new_center, valid = ours(student, teacher, center, masks)
  assert loss.dtype == jnp.float64 and int(valid.sum()) == masks.sum() and valid.shape == (upper,)
  t_masked = teacher[masks]  # [n_masked, K], row-major = the order of the flat token indices
  if centering == "centering":
    q_all = _softmax((t_masked - center) / t_t)
  else:  # Sinkhorn-Knopp over the masked tokens of the whole batch (B = their count)
    q_all = _reference_sinkhorn(t_masked, t_t)[0]
  total, row = 0.0, 0
  for i in range(m):
    rows = []
    for p in range(n):
      if masks[i, p]:
        rows.append(-np.sum(q_all[row] * _log_softmax(student[i, p] / t_s)))
        row += 1
    if rows:
      total += np.mean(rows)
  np.testing.assert_allclose(loss, total / m, rtol=1e-12)
  np.testing.assert_allclose(new_center, 0.9 * center + 0.1 * t_masked.mean(0), rtol=1e-12)
  # No masked patch at all: the loss is 0 and the centre stays.
  none = np.zeros_like(masks)
  loss0, center0, _ = ours(student, teacher, center, none)
  assert float(loss0) == 0.0 and np.array_equal(center0, center)


def test_koleo_matches_the_float64_reference(x64):
  rng = np.random.default_rng(1)
  x = rng.normal(size=(7, 5)) * rng.uniform(0.5, 3.0, size=(7, 1))  # not normalised: the loss normalises
  x[5] = x[2]  # a duplicate: distance 0

  def reference(x, eps=1e-8):
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    d = np.linalg.norm(xn[:, None] - xn[None, :], axis=-1)
    np.fill_diagonal(d, np.inf)
    return -np.mean(np.log(d.min(axis=1) + eps))

  loss, grad = jax.jit(jax.value_and_grad(terms.koleo_loss))(jnp.asarray(x))
  # The duplicate's distance under jit is rounding noise (~1e-17, two fusions normalise it) beside ε = 1e-8.
  np.testing.assert_allclose(loss, reference(x), rtol=1e-12, atol=1e-8)
  assert np.all(np.isfinite(np.asarray(grad)))  # the zero distance has a (sub)gradient, not NaN
  y = np.delete(x, 5, axis=0)  # distinct rows: the gradient is the reference's (nearest neighbours held fixed)
  np.testing.assert_allclose(terms.koleo_loss(jnp.asarray(y)), reference(y), rtol=1e-12)
  g = np.asarray(jax.grad(terms.koleo_loss)(jnp.asarray(y)))
  eps = 1e-6
  for i, j in [(0, 1), (3, 4), (5, 0)]:
    d = np.zeros_like(y)
    d[i, j] = eps
    np.testing.assert_allclose((reference(y + d) - reference(y - d)) / (2 * eps), g[i, j], rtol=1e-6)


def test_sinkhorn_knopp_matches_the_reference_and_is_doubly_stochastic_up_to_its_tolerance(x64):
  rng = np.random.default_rng(2)
  b, k, t_t = 12, 5, 0.1
  t = 0.2 * rng.normal(size=(b, k))  # spread enough for 3 iterations to bring the columns within 20 %
  q = np.asarray(jax.jit(lambda t: terms.sinkhorn_knopp(t, t_t))(jnp.asarray(t)))
  ref, tol = _reference_sinkhorn(t, t_t)
  np.testing.assert_allclose(q, ref, rtol=1e-12)
  np.testing.assert_allclose(q.sum(axis=1), 1.0, rtol=1e-12)  # each sample's assignment sums to 1
  # Each prototype's mass is B/K up to what the last column step moved: |K/B·Σ_i q_ik − 1| ≤ e/(1 − e), e the
  # deviation of B × the column sums entering it; more iterations shrink it.
  rows = np.abs(q.sum(axis=0) * k / b - 1).max()
  assert 0 < rows <= tol / (1 - tol) + 1e-12
  errs = [np.abs(np.asarray(terms.sinkhorn_knopp(jnp.asarray(t), t_t, n)).sum(0) * k / b - 1).max()
          for n in (1, 2, 3, 100)]
  assert errs[0] > errs[1] > errs[2] > errs[3] and errs[3] < 1e-10
  # Padding rows (valid False) take no part: the valid rows are the reference on them alone.
  valid = np.ones(b + 4, bool)
  valid[[1, 6, 9, 15]] = False
  padded = np.zeros((b + 4, k))
  padded[valid] = t
  padded[~valid] = 50.0  # would dominate exp() if it took part
  q_pad = np.asarray(terms.sinkhorn_knopp(jnp.asarray(padded), t_t, valid=jnp.asarray(valid)))
  np.testing.assert_allclose(q_pad[valid], ref, rtol=1e-12)
  assert np.all(q_pad[~valid] == 0)
  # The DINO loss from Sinkhorn-Knopp targets: the pairs of dino.dino_loss, teacher probabilities given.
  student, teacher = rng.normal(size=(4, 3, k)), rng.normal(size=(2, 3, k))
  q2 = _reference_sinkhorn(teacher.reshape(6, k), 0.04)[0].reshape(2, 3, k)
  want = np.mean([np.mean(-np.sum(q2[g] * _log_softmax(student[v] / 0.1), -1))
                  for g in range(2) for v in range(4) if v != g])
  got = terms.dino_pairs_loss(terms.teacher_probs(jnp.asarray(teacher), jnp.zeros(k), 0.04, "sinkhorn_knopp"),
                              jnp.asarray(student), 0.1, 2)
  np.testing.assert_allclose(got, want, rtol=1e-12)


def test_masks_are_deterministic_block_wise_and_within_their_budget():
  """DINOv2's recipe: ⌊M·mask_prob⌋ crops masked, stratified ratios in (min, max), shuffled; every draw
  from the key alone (two separately compiled programs agree), at most the static upper bound."""
  grid, m, ratio, prob = (6, 6), 16, (0.1, 0.5), 0.5
  draw = lambda key: terms.ibot_masks(key, m, grid, ratio, prob)
  a = jax.jit(draw)(jax.random.PRNGKey(3))
  b = jax.jit(lambda key: draw(key) & True)(jax.random.PRNGKey(3))  # another program, same key
  c = jax.jit(draw)(jax.random.PRNGKey(4))
  assert a.shape == (m, 36) and a.dtype == jnp.bool_
  assert np.array_equal(a, b) and not np.array_equal(a, c)
  counts = np.asarray(a).sum(-1)
  bins = terms.mask_ratio_bins(m, ratio, prob)
  assert (counts > 0).sum() == int(m * prob) == len(bins) - 1
  caps = sorted(int(36 * p) for p in bins[1:])
  assert all(x <= cap for x, cap in zip(sorted(counts[counts > 0]), caps))
  assert counts.sum() <= terms.mask_upperbound(m, 36, ratio, prob)
  assert counts.max() >= 10  # the large bins are (mostly) filled: DINOv2's 10 tries per rectangle
  # Block-wise: a masked patch has a masked 4-neighbour, unless its rectangle is 1 × 1 (rare).
  grid_masks = np.asarray(a).reshape(m, 6, 6)
  pad = np.pad(grid_masks, ((0, 0), (1, 1), (1, 1)))
  neighbours = pad[:, :-2, 1:-1] | pad[:, 2:, 1:-1] | pad[:, 1:-1, :-2] | pad[:, 1:-1, 2:]
  assert (grid_masks & neighbours).sum() >= 0.9 * grid_masks.sum()
  idx, valid, weights = terms.masked_positions(a, terms.mask_upperbound(m, 36, ratio, prob))
  assert int(valid.sum()) == counts.sum()
  np.testing.assert_array_equal(np.asarray(idx)[np.asarray(valid)], np.flatnonzero(np.asarray(a)))
  np.testing.assert_allclose(np.asarray(weights)[np.asarray(valid)],
                             1 / counts[np.flatnonzero(np.asarray(a)) // 36], rtol=1e-6)


# ----------------------------------------------------------------------------- the objective in the step


def _with_objective(setup, state, centering="centering"):
  """The float64 math fixture with iBOT (shared head) + KoLeo on: a non-zero mask token and iBOT centre."""
  setup = dataclasses.replace(setup, ibot_weight=1.0, koleo_weight=0.1, centering=centering,
                              vit_cfg=dataclasses.replace(setup.vit_cfg, mask_token=True))
  d = setup.vit_cfg.d_model
  token = 0.3 * jnp.sin(jnp.arange(d, dtype=jnp.float64))[None]
  student = {**state.student, "backbone": {**state.student["backbone"], "mask_token": token}}
  teacher = {**state.teacher, "backbone": {**state.teacher["backbone"], "mask_token": 0.5 * token}}
  ibot_center = 0.1 * jnp.cos(jnp.arange(setup.head_cfg.out_dim, dtype=jnp.float64))
  return setup, state.replace(student=student, teacher=teacher, ibot_center=ibot_center)


# ~20 s CPU each beside the shared fixture's ~25 s: the Sinkhorn-Knopp case runs with the slow set.
@pytest.mark.parametrize("centering", ["centering", pytest.param("sinkhorn_knopp", marks=pytest.mark.slow)])
def test_meta_value_of_the_full_objective_by_jvp_equals_double_backward(unet_run, x64, centering):
  """The existing equality test (test_vision_step: reverse-over-JVP == double backward == finite
  differences) with iBOT + KoLeo on: the designer's views change the DINO, iBOT and KoLeo terms, and
  the prefix-once split of the meta problem computes the learner's full objective on the same masks."""
  setup, state = _with_objective(*tvs._math_state(unet_run), centering)
  gv, lv = tvs._views(2)
  subset, _ = alignment.split_params(state.student["backbone"], 2, setup.n_last)
  g_down = tvs._random_like(subset, 3)
  phi = state.designer.params
  mask_key = jax.random.PRNGKey(7)

  def problem():
    return vs.SSLProblem.build(setup, state.student, state.teacher, state.center, 0, lv, state.ibot_center, mask_key)

  def objective(phi):  # the meta step's objective (reverse-over-JVP)
    p, subset = problem()
    loss, aux = vs.unet_meta_objective(setup, p, gv, subset, g_down, phi)(phi)
    return loss, aux["value"]

  def reference(phi):  # explicit ⟨g_down, ∇_S L⟩ (nested grad), regularisers written out
    p, subset = problem()
    views, mu = vs.unet_views(setup, phi, gv)
    v = alignment.reference_value(p.loss_fn(views), subset, g_down)
    return -v + 0.3 * jnp.mean((jnp.mean(mu, axis=(1, 2)) - 0.6) ** 2) + 0.2 * total_variation(mu), v

  @fast_jit
  def pieces(phi):
    p, subset = problem()
    views = vs.unet_views(setup, phi, gv)[0]
    masks = vs.draw_masks(setup, mask_key, 6, (4, 4))
    whole, aux = vs.full_learner_loss(setup, state.student, state.teacher, state.center, state.ibot_center, views,
                                      lv, 0, masks)
    plain = dataclasses.replace(setup, ibot_weight=0.0, koleo_weight=0.0, centering="centering")
    p0, _ = vs.SSLProblem.build(plain, state.student, state.teacher, state.center, 0, lv)
    return (p.loss_fn(views)(subset), whole, aux["parts"], masks["valid"].sum(),
            alignment.reference_value(p0.loss_fn(views), subset, g_down))

  split_loss, whole, parts, n_masked, v_dino = pieces(phi)
  np.testing.assert_allclose(split_loss, whole, rtol=1e-12)
  assert int(n_masked) > 0 and float(parts["ibot_loss"]) > 0 and abs(float(parts["koleo_loss"])) > 0
  value_and_grad = fast_jit(jax.value_and_grad(objective, has_aux=True))
  (loss, v), grad = value_and_grad(phi)
  (loss_ref, v_ref), grad_ref = fast_jit(jax.value_and_grad(reference, has_aux=True))(phi)
  assert abs(float(v) - float(v_dino)) > 1e-6 * abs(float(v))  # the new terms move the value
  np.testing.assert_allclose(v, v_ref, rtol=1e-10)
  np.testing.assert_allclose(loss, loss_ref, rtol=1e-10)
  scale = max(float(jnp.abs(g).max()) for g in jax.tree.leaves(grad_ref))
  for (path, g), r in zip(jax.tree_util.tree_flatten_with_path(grad)[0], jax.tree.leaves(grad_ref)):
    np.testing.assert_allclose(g, r, rtol=1e-8, atol=1e-10 * scale, err_msg=jax.tree_util.keystr(path))
  eps, phi_np = 1e-7, jax.device_get(phi)
  d = tvs._random_like(phi_np, 50)
  plus = jax.tree.map(lambda p, u: p + eps * u, phi_np, d)
  minus = jax.tree.map(lambda p, u: p - eps * u, phi_np, d)
  fd = (float(value_and_grad(plus)[0][0]) - float(value_and_grad(minus)[0][0])) / (2 * eps)
  analytic = sum(np.vdot(g, u) for g, u in zip(jax.tree.leaves(jax.device_get(grad)), jax.tree.leaves(d)))
  np.testing.assert_allclose(fd, analytic, rtol=1e-6)


def test_every_term_off_is_todays_dino_step_bit_for_bit(unet_run):
  """ibot_weight = koleo_weight = 0 with centering='centering' (whatever the other iBOT knobs say) is the
  paper's DINO objective on the original code path: same state tree (no mask token, no iBOT centre, no
  iBOT head) and bit-identical steps (a meta step, then a plain one) to the schema's defaults (all off)."""
  cfg, state, step, _ = unet_run
  off = tvs.vision_config("unet", **{"vpt.designer.learning_rate": 0.0, "dino.n_local_crops": 0,
                                     "vpt.designer.depth": 1})
  off.dino.update(dict(ibot_weight=0.0, koleo_weight=0.0, centering="centering", ibot_separate_head=True,
                       ibot_out_dim=48, ibot_mask_prob=1.0, ibot_mask_ratio=(0.2, 0.3)))
  assert cfg.dino.ibot_weight == cfg.dino.koleo_weight == 0 and vs.VisionSetup.from_config(off).plain_dino
  shapes = jax.eval_shape(lambda: vs.init_vision_state(off, jax.random.PRNGKey(0), tvs._batch(0)["image"]))
  assert jax.tree.structure(shapes) == jax.tree.structure(state)
  assert state.ibot_center is None and "mask_token" not in state.student["backbone"]
  off_step = fast_jit(vs.make_vision_train_step(off))
  a = b = state
  for i in range(2):
    batches = tvs._batches(30 + i)
    a, ma = step(a, *batches)
    b, mb = off_step(b, *batches)
    assert tvs._leaves_equal(a, b) and ma.keys() == mb.keys()
    assert all(np.array_equal(ma[k], mb[k]) for k in ma)


# ----------------------------------------------------------------------------- the mask token from Hugging Face


@pytest.mark.parametrize("name", ["dinov2", "dinov3"])
def test_hf_mask_token_is_imported_and_masked_forward_matches_hf(tmp_path, name):
  """load_dinov2(mask_token=True) takes the checkpoint's iBOT mask token; the ViT with masks equals HF's
  forward with bool_masked_pos. Without it (mask_token=False) the tensor is skipped as before; a
  checkpoint that lacks it leaves the token at DINOv2's zero init."""
  import torch  # noqa: PLC0415 (torch only for this test)
  from safetensors.numpy import load_file, save_file  # noqa: PLC0415
  from test_vit import _forward, _hf_model, _images, _save  # noqa: PLC0415
  from vpt.vision.interop import dinov2  # noqa: PLC0415

  model = _hf_model(name)  # every parameter perturbed, the mask token too
  path = _save(model, tmp_path / "hf")
  cfg, params = dinov2.load_dinov2(path, mask_token=True)
  hf_token = model.embeddings.mask_token.detach().numpy().reshape(1, -1)
  assert cfg.mask_token and np.abs(hf_token).max() > 0.05
  np.testing.assert_array_equal(params["mask_token"], hf_token)
  x = _images((28, 28))
  masks = np.random.default_rng(0).random((2, 16)) < 0.4
  with torch.no_grad():
    ref = model(torch.tensor(x), bool_masked_pos=torch.tensor(masks)).last_hidden_state.numpy()
    unmasked = model(torch.tensor(x)).last_hidden_state.numpy()
  out = jax.jit(lambda p, x, m: ViT(cfg).apply({"params": p}, x, masks=m))(
      params, jnp.asarray(x.transpose(0, 2, 3, 1)), jnp.asarray(masks))
  np.testing.assert_allclose(out["cls"], ref[:, 0], atol=1e-4, rtol=0)
  np.testing.assert_allclose(out["patches"], ref[:, cfg.n_prefix:], atol=1e-4, rtol=0)
  assert np.abs(ref - unmasked).max() > 1e-2  # the masks matter
  cfg0, params0 = dinov2.load_dinov2(path)
  assert not cfg0.mask_token and "mask_token" not in params0
  np.testing.assert_allclose(_forward(cfg0, params0, x)["cls"], unmasked[:, 0], atol=1e-4, rtol=0)
  state = load_file(os.path.join(path, "model.safetensors"))
  del state["embeddings.mask_token"]
  os.makedirs(tmp_path / "no_token")
  save_file(state, str(tmp_path / "no_token" / "model.safetensors"))
  with open(os.path.join(path, "config.json")) as f, open(tmp_path / "no_token" / "config.json", "w") as g:
    g.write(f.read())
  _, params1 = dinov2.load_dinov2(str(tmp_path / "no_token"), mask_token=True)
  assert np.all(np.asarray(params1["mask_token"]) == 0)


# ----------------------------------------------------------------------------- the loop


@pytest.mark.slow
def test_loop_resume_with_ibot_equals_uninterrupted(tmp_path):
  """experiments/vision_dino.py:nano,unet,dinov2 (DINO + iBOT + KoLeo + Sinkhorn-Knopp, U-Net designer):
  stopped at step 3 (not a meta step) and resumed through meta step 4, the state — the iBOT centre
  beside the DINO centre, the mask token, heads, designer, optimizer — equals an uninterrupted run's,
  bit for bit; the masks come from the step's rng, so the resumed steps draw the same ones."""
  from test_train_vision import _assert_same_state, nano_config  # noqa: PLC0415
  from vpt.core import metrics
  from vpt.vision import train as train_vision  # noqa: PLC0415
  config = nano_config("unet,dinov2", num_steps=6, **{"eval.num_train": 0, "checkpoint.every_steps": 1000,
                                                      "log_every_steps": 1})
  assert config.dino.ibot_weight > 0 and config.dino.koleo_weight > 0 and config.dino.centering == "sinkhorn_knopp"
  straight = train_vision.run(config, str(tmp_path / "straight"))
  train_vision.run(config, str(tmp_path / "resumed"), stop_after=3)
  resumed = train_vision.run(config, str(tmp_path / "resumed"))
  assert resumed["start_step"] == 3 and resumed["step"] == 6
  _assert_same_state(resumed["state"], straight["state"])
  for name in ("ibot_center", "step", "rng"):
    np.testing.assert_array_equal(jax.device_get(getattr(resumed["state"], name)),
                                  jax.device_get(getattr(straight["state"], name)), err_msg=name)
  assert "mask_token" in straight["state"].student["backbone"]
  records = metrics.read_jsonl(os.path.join(tmp_path, "straight", "metrics.jsonl"))
  assert [r["train/meta/is_meta_step"] for r in records] == [1.0, 0.0, 1.0, 0.0, 1.0, 0.0]
  assert all(r["train/masked_patches"] > 0 and np.isfinite(r["train/ibot_loss"] + r["train/koleo_loss"])
             for r in records)
  resumed_records = metrics.read_jsonl(os.path.join(tmp_path, "resumed", "metrics.jsonl"))
  for a, b in zip(records[3:], [r for r in resumed_records if r["step"] > 3]):
    assert a["train/loss"] == b["train/loss"] and a["train/masked_patches"] == b["train/masked_patches"]


def test_a_checkpoint_from_before_the_ibot_centre_field_still_restores(tmp_path):
  """VisionState gained `ibot_center` (None without iBOT): a state checkpointed without the field (every
  run before it) restores into today's state with the field None; with iBOT on, the missing centre is a
  mismatch naming it."""
  import flax.struct  # noqa: PLC0415
  from typing import Any  # noqa: PLC0415
  from vpt.core import checkpoint as ckpt_lib  # noqa: PLC0415

  @flax.struct.dataclass
  class Before:  # VisionState as it was
    step: jax.Array
    student: Any
    teacher: Any
    center: jax.Array
    opt_state: Any
    heads: Any
    designer: Any
    rng: jax.Array

  w = {"backbone": {"w": jnp.arange(6.0).reshape(2, 3)}}
  before = Before(jnp.asarray(7, jnp.int32), w, jax.tree.map(lambda x: x + 1, w), jnp.arange(4.0),
                  (jnp.zeros(()), {"mu": w}), None, None, jnp.asarray([1, 2], jnp.uint32))
  checkpointer = ckpt_lib.Checkpointer(str(tmp_path / "ckpt"), keep=2, iterator_names=())
  checkpointer.save(7, before, {}, force=True)
  checkpointer.close()
  now = vs.VisionState(**{f.name: getattr(before, f.name) for f in dataclasses.fields(before)}, ibot_center=None)
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), now)
  restored, step = ckpt_lib.Checkpointer(str(tmp_path / "ckpt"), keep=2, iterator_names=()).restore_latest(abstract,
                                                                                                            {})
  assert step == 7 and isinstance(restored, vs.VisionState) and restored.ibot_center is None
  assert tvs._leaves_equal(restored, now) and jax.tree.structure(restored) == jax.tree.structure(now)
  with_ibot = abstract.replace(ibot_center=jax.ShapeDtypeStruct((4,), jnp.float32))
  with pytest.raises(ckpt_lib.CheckpointMismatchError, match="ibot_center"):
    ckpt_lib.Checkpointer(str(tmp_path / "ckpt"), keep=2, iterator_names=()).restore_latest(with_ibot, {})
