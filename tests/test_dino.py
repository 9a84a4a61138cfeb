"""DINO continued SSL: the multi-crop loss, centering, EMA teacher and head against float64 references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import erf

from vpt.vision import dino
from vpt.vision.models.vit import vit_config


def _softmax(x):
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def _reference_loss(student, teacher, center, t_s, t_t, n_global):
  """DINO's loop (facebookresearch/dino DINOLoss.forward), in float64 NumPy."""
  total, terms = 0.0, 0
  for g in range(n_global):
    q = _softmax((teacher[g] - center) / t_t)
    for v in range(student.shape[0]):
      if v == g:
        continue
      log_p = np.log(_softmax(student[v] / t_s))
      total += np.mean(np.sum(-q * log_p, axis=-1))
      terms += 1
  return total / terms


@pytest.mark.parametrize("n_views", [2, 5])
def test_dino_loss_matches_the_reference_loop(x64, n_views):
  rng = np.random.default_rng(0)
  student = rng.normal(size=(n_views, 3, 7))
  teacher = rng.normal(size=(2, 3, 7))
  center = 0.3 * rng.normal(size=(7,))
  loss = dino.dino_loss(jnp.asarray(student), jnp.asarray(teacher), jnp.asarray(center), 0.1, 0.04, 2)
  assert loss.dtype == jnp.float64
  np.testing.assert_allclose(loss, _reference_loss(student, teacher, center, 0.1, 0.04, 2), rtol=1e-12)
  with pytest.raises(ValueError, match="n_global=3"):
    dino.dino_loss(jnp.asarray(student), jnp.asarray(teacher), jnp.asarray(center), 0.1, 0.04, 3)


def test_dino_loss_gradient_reaches_the_student_only(x64):
  rng = np.random.default_rng(1)
  s, t, c = (jnp.asarray(rng.normal(size=shape)) for shape in [(4, 3, 6), (2, 3, 6), (6,)])
  gs, gt, gc = jax.grad(lambda s, t, c: dino.dino_loss(s, t, c, 0.1, 0.04, 2), argnums=(0, 1, 2))(s, t, c)
  assert np.all(np.asarray(gt) == 0) and np.all(np.asarray(gc) == 0)
  assert np.abs(np.asarray(gs)).max() > 1e-3


def test_teacher_parameters_get_exactly_zero_gradient():
  """Through the whole objective (ViT + head, global and local crops at two resolutions)."""
  model = dino.DINOModel(vit_config("nano", n_layers=1), dino.DINOHeadConfig(out_dim=16, hidden_dim=32,
                                                                             bottleneck_dim=8))
  rng = np.random.default_rng(2)
  global_views = jnp.asarray(rng.uniform(size=(2, 2, 32, 32, 3)), jnp.float32)
  local_views = jnp.asarray(rng.uniform(size=(2, 2, 16, 16, 3)), jnp.float32)
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), global_views[0])
  student, teacher = (jax.tree.map(lambda a: jnp.asarray(0.3 * rng.normal(size=a.shape), jnp.float32), shapes)
                      for _ in range(2))
  center = jnp.zeros((16,))

  def objective(s, t):
    loss, teacher_out = dino.dino_objective(model.apply, s, t, center, global_views, local_views)
    # The split at block 1 (prefix once, then the alignment subset and the head) is the same network.
    h = model.apply(s, global_views[0], 1, method=dino.DINOModel.hidden_before)
    split = model.apply(s, h, 1, method=dino.DINOModel.from_hidden) - model.apply(s, global_views[0])
    return loss, (teacher_out, split)

  (loss, (teacher_out, split)), (g_student, g_teacher) = jax.jit(
      jax.value_and_grad(objective, argnums=(0, 1), has_aux=True))(student, teacher)
  assert teacher_out.shape == (2, 2, 16) and np.isfinite(loss)
  assert float(jnp.abs(split).max()) < 1e-6
  assert all(np.all(np.asarray(g) == 0) for g in jax.tree.leaves(g_teacher))
  assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(g_student["params"]["backbone"])) > 0
  assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(g_student["params"]["head"])) > 0


def test_center_ema_and_momentum_schedule_follow_their_formulas(x64):
  rng = np.random.default_rng(3)
  center = rng.normal(size=(5,))
  teacher_out = rng.normal(size=(2, 4, 5))
  np.testing.assert_allclose(dino.update_center(jnp.asarray(center), jnp.asarray(teacher_out), 0.9),
                             0.9 * center + 0.1 * teacher_out.reshape(8, 5).mean(0), rtol=1e-12)
  t = {"a": rng.normal(size=(3,)), "b": {"c": rng.normal(size=(2, 2))}}
  s = {"a": rng.normal(size=(3,)), "b": {"c": rng.normal(size=(2, 2))}}
  new = dino.ema_update(jax.tree.map(jnp.asarray, t), jax.tree.map(jnp.asarray, s), 0.996)
  np.testing.assert_allclose(new["a"], 0.996 * t["a"] + 0.004 * s["a"], rtol=1e-12)
  np.testing.assert_allclose(new["b"]["c"], 0.996 * t["b"]["c"] + 0.004 * s["b"]["c"], rtol=1e-12)
  np.testing.assert_allclose(dino.momentum_schedule(0, 100), 0.996, rtol=1e-6)
  np.testing.assert_allclose(dino.momentum_schedule(100, 100), 1.0, rtol=1e-6)
  np.testing.assert_allclose(dino.momentum_schedule(50, 100), 0.998, rtol=1e-6)
  np.testing.assert_allclose(dino.momentum_schedule(25, 100), 1 - 0.002 * (1 + np.cos(np.pi / 4)), rtol=1e-6)
  steps = np.arange(0, 101, 10)
  assert np.all(np.diff(np.asarray([dino.momentum_schedule(k, 100) for k in steps])) > 0)
  np.testing.assert_allclose(dino.teacher_temperature(5, 10, 0.04, 0.07), 0.055, rtol=1e-6)
  np.testing.assert_allclose(dino.teacher_temperature(50, 10, 0.04, 0.07), 0.07, rtol=1e-6)


def test_head_is_mlp_l2norm_then_weight_normalised_prototypes(x64):
  cfg = dino.DINOHeadConfig(out_dim=11, hidden_dim=9, bottleneck_dim=5)
  head = dino.DINOHead(cfg, "float64")
  x = jnp.asarray(np.random.default_rng(4).normal(size=(3, 6)))
  p = jax.tree.map(lambda a: jnp.asarray(np.random.default_rng(5).normal(size=a.shape)),
                   jax.eval_shape(head.init, jax.random.PRNGKey(0), x))
  apply = jax.jit(head.apply)
  gelu = lambda z: 0.5 * z * (1 + erf(z / np.sqrt(2)))
  pp = jax.tree.map(np.asarray, p["params"])
  h = gelu(np.asarray(x) @ pp["mlp_0"]["kernel"] + pp["mlp_0"]["bias"])
  h = gelu(h @ pp["mlp_1"]["kernel"] + pp["mlp_1"]["bias"])
  z = h @ pp["mlp_2"]["kernel"] + pp["mlp_2"]["bias"]
  z = z / np.linalg.norm(z, axis=-1, keepdims=True)
  v = pp["last_layer_v"]
  np.testing.assert_allclose(apply(p, x), z @ (v / np.linalg.norm(v, axis=0)), rtol=1e-10)
  # The gain is fixed: rescaling a prototype's direction vector leaves the output unchanged.
  scaled = jax.tree.map(lambda a: a, p)
  scaled["params"]["last_layer_v"] = p["params"]["last_layer_v"] * jnp.arange(1, 12)
  np.testing.assert_allclose(apply(scaled, x), apply(p, x), rtol=1e-10)
