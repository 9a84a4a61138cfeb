"""Vision evaluation: metrics against hand-computed values, kNN and linear probes on toy
features, the linear-BN dense heads and their losses, and dense-head training on scenes."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from vpt.vision import evals as vision
from vpt.vision.data import scenes
from vpt.vision.models import dense_heads


# --- segmentation metrics -----------------------------------------------------------


def test_miou_hand_computed_with_ignore_and_absent_classes():
  labels = np.array([[0, 0, 1, 1], [2, 255, 255, 1]])
  pred = np.array([[0, 1, 1, 1], [0, 3, 2, 3]])
  conf = vision.confusion_matrix(pred, labels, num_classes=4)
  expected = np.zeros((4, 4), np.int64)
  expected[0, 0], expected[0, 1], expected[1, 1], expected[2, 0], expected[1, 3] = 1, 1, 2, 1, 1
  np.testing.assert_array_equal(conf, expected)  # the two 255 pixels are not counted
  miou, iou = vision.miou_from_confusion(conf)
  # class 0: TP 1, FP 1, FN 1; class 1: TP 2, FP 1, FN 1; class 2: FN 1; class 3: FP 1.
  np.testing.assert_allclose(iou, [1 / 3, 2 / 4, 0.0, 0.0])
  assert miou == pytest.approx((1 / 3 + 1 / 2 + 0 + 0) / 4)
  # Without the stray prediction of class 3, class 3 is absent from both and excluded.
  pred2 = pred.copy()
  pred2[1, 3] = 1
  miou2, iou2 = vision.miou_from_confusion(vision.confusion_matrix(pred2, labels, 4))
  assert np.isnan(iou2[3])
  np.testing.assert_allclose(iou2[:3], [1 / 3, 3 / 4, 0.0])
  assert miou2 == pytest.approx((1 / 3 + 3 / 4 + 0) / 3)
  assert vision.segmentation_miou(pred2, labels, 4) == pytest.approx(miou2)
  assert vision.segmentation_miou(labels, labels, 4) == 1.0


def test_confusion_matrix_rejects_out_of_range_values():
  with pytest.raises(ValueError, match=r"labels value 7 outside \[0, 4\)"):
    vision.confusion_matrix(np.zeros(3), np.array([0, 7, 255]), 4)
  with pytest.raises(ValueError, match=r"pred value -1"):
    vision.confusion_matrix(np.array([0, -1, 0]), np.array([0, 1, 255]), 4)


# --- depth metrics ------------------------------------------------------------------


def test_depth_metrics_hand_computed():
  gt = np.array([[[1.0, 2.0], [0.0, 4.0]],     # one invalid pixel
                 [[2.0, 2.0], [2.0, 2.0]],
                 [[0.0, 0.0], [0.0, 0.0]]])    # no valid pixel: skipped
  pred = np.array([[[1.1, 2.0], [5.0, 2.0]],
                   [[2.0, 2.0], [2.0, 3.0]],
                   [[9.0, 9.0], [9.0, 9.0]]])
  m = vision.depth_metrics(pred, gt)
  rmse = (np.sqrt((0.01 + 0 + 4) / 3) + np.sqrt(1 / 4)) / 2
  abs_rel = ((0.1 / 1 + 0 + 2 / 4) / 3 + (1 / 2) / 4) / 2
  delta1 = (2 / 3 + 3 / 4) / 2  # 1.1 and 1.0 pass, 4/2 = 2 fails; 3/2 = 1.5 fails
  assert m["rmse"] == pytest.approx(rmse, rel=1e-12)
  assert m["abs_rel"] == pytest.approx(abs_rel, rel=1e-12)
  assert m["delta1"] == pytest.approx(delta1, rel=1e-12)
  # Predictions are clipped to [min_depth, max_depth] before the errors.
  c = vision.depth_metrics(np.array([[-1.0, 30.0]]), np.array([[1.0, 8.0]]), max_depth=10.0)
  assert c["abs_rel"] == pytest.approx((0.999 / 1 + 2 / 8) / 2)
  with pytest.raises(ValueError, match="no image has a valid depth pixel"):
    vision.depth_metrics(np.ones((2, 2)), np.zeros((2, 2)))


# --- kNN and linear probe -----------------------------------------------------------


def _clusters(rng, n_per, centers, scale=0.3):
  x = np.concatenate([c + scale * rng.normal(size=(n_per, len(c))) for c in centers])
  return x, np.repeat(np.arange(len(centers)), n_per)


def test_knn_separable_toy_set_is_perfect():
  rng = np.random.default_rng(0)
  centers = 3 * np.eye(5)[:4] + 1.0
  tx, ty = _clusters(rng, 30, centers)
  ex, ey = _clusters(rng, 10, centers)
  assert vision.knn_accuracy(tx, ty, ex, ey) == 1.0


def test_knn_votes_are_temperature_weighted():
  """Cosines 0.9 (class 0) vs 0.8, 0.8 (class 1): majority says 1, DINO's weights at T=0.07
  say 0 (e^{0.9/0.07} = 4.2 e^{0.8/0.07} > 2 e^{0.8/0.07}); at T=1, 1 wins (2.46 < 2 x 2.23)."""
  angle = lambda c: np.array([c, np.sqrt(1 - c * c)])
  train = np.stack([angle(0.9), angle(0.8), angle(0.8) * [1, -1], 5 * angle(0.1)])
  labels = np.array([0, 1, 1, 0])
  query = np.array([[2.0, 0.0]])  # scale does not matter: cosine similarity
  assert vision.knn_predict(train, labels, query, k=3, temperature=0.07)[0] == 0
  assert vision.knn_predict(train, labels, query, k=3, temperature=1.0)[0] == 1
  # k larger than the training set uses all points: 0.9 + 0.1 vs 0.8 + 0.8 at T = 1.
  assert vision.knn_predict(train, labels, query, k=20, temperature=1.0)[0] == 1
  assert vision.knn_predict(train, labels, query, k=1)[0] == 0


def test_linear_probe_separates_linear_classes_and_not_xor():
  rng = np.random.default_rng(1)
  centers = rng.normal(size=(4, 16)) * 2
  tx, ty = _clusters(rng, 40, centers, scale=0.5)
  ex, ey = _clusters(rng, 20, centers, scale=0.5)
  assert vision.linear_probe_accuracy(tx, ty, ex, ey, steps=200) >= 0.95
  # XOR is not linearly separable: a linear probe cannot beat ~3/4.
  xor_c = np.array([[1, 1], [-1, -1], [1, -1], [-1, 1]], np.float64) * 3
  xx, xc = _clusters(rng, 40, xor_c, scale=0.3)
  ex2, ec2 = _clusters(rng, 20, xor_c, scale=0.3)
  assert vision.linear_probe_accuracy(xx, xc // 2, ex2, ec2 // 2, steps=200) <= 0.8
  with pytest.raises(ValueError, match=r"linear probe train: expected features \[N, D\]"):
    vision.linear_probe_accuracy(tx[:, :, None], ty, ex, ey)


# --- heads and losses ---------------------------------------------------------------


def test_seg_loss_matches_reference_and_ignores_255(x64):
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(2, 5, 6, 4))
  labels = rng.integers(0, 4, (2, 5, 6))
  labels[0, :2] = 255
  labels[1, 3, 4] = 255
  valid = labels != 255
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  ref = -np.take_along_axis(logp, np.where(valid, labels, 0)[..., None], -1)[..., 0][valid].mean()
  loss = float(dense_heads.seg_loss(jnp.asarray(logits), jnp.asarray(labels)))
  assert loss == pytest.approx(ref, rel=1e-12)
  other = logits.copy()
  other[~valid] = rng.normal(size=(int((~valid).sum()), 4)) * 10  # change ignored pixels only
  assert float(dense_heads.seg_loss(jnp.asarray(other), jnp.asarray(labels))) == loss
  relabeled = np.where(valid, labels, 1)  # the same pixels, no longer ignored
  assert float(dense_heads.seg_loss(jnp.asarray(logits), jnp.asarray(relabeled))) != pytest.approx(loss)
  g = jax.grad(dense_heads.seg_loss)(jnp.asarray(logits), jnp.asarray(labels))
  assert np.all(np.asarray(g)[~valid] == 0)
  assert float(dense_heads.seg_loss(jnp.asarray(logits), jnp.full((2, 5, 6), 255))) == 0.0


def test_depth_l1_ignores_invalid_pixels(x64):
  rng = np.random.default_rng(0)
  depth = rng.uniform(0.5, 5, (2, 4, 4))
  depth[0, 0] = 0.0
  pred = rng.uniform(0.5, 5, (2, 4, 4))
  valid = depth > 0
  l1 = float(dense_heads.depth_l1(jnp.asarray(pred), jnp.asarray(depth)))
  assert l1 == pytest.approx(np.abs(pred - depth)[valid].mean(), rel=1e-12)
  pred2 = np.where(valid, pred, 100.0)
  assert float(dense_heads.depth_l1(jnp.asarray(pred2), jnp.asarray(depth))) == l1
  assert float(dense_heads.depth_l2(jnp.asarray(pred), jnp.asarray(depth))) == pytest.approx(
      np.square(pred - depth)[valid].mean(), rel=1e-12)
  g = jax.grad(dense_heads.depth_l1)(jnp.asarray(pred), jnp.asarray(depth))
  assert np.all(np.asarray(g)[~valid] == 0)


def test_linear_bn_head_matches_torch_reference():
  """BatchNorm (batch stats), 1x1 linear, bilinear upsampling as torch align_corners=False."""
  rng = np.random.default_rng(0)
  b, gh, gw, d, c = 2, 3, 4, 5, 6
  tokens = jnp.asarray(rng.normal(size=(b, gh * gw, d)) * 2 + 1, jnp.float32)
  head = dense_heads.seg_head(c)
  v = dense_heads.init_head(head, jax.random.PRNGKey(0), tokens, (gh, gw), (12, 16))
  v["params"]["linear"]["kernel"] = jnp.asarray(rng.normal(size=(d, c)), jnp.float32)
  v["params"]["linear"]["bias"] = jnp.asarray(rng.normal(size=(c,)), jnp.float32)
  out, new = dense_heads.apply_head(head, v, tokens, (gh, gw), (12, 16), train=True)
  assert out.shape == (b, 12, 16, c)
  t = torch.tensor(np.asarray(tokens)).reshape(b, gh, gw, d).permute(0, 3, 1, 2)
  bn = torch.nn.BatchNorm2d(d, eps=1e-5, momentum=0.1)
  bn.train()
  x = bn(t)
  conv = torch.nn.functional.conv2d(
      x, torch.tensor(np.asarray(v["params"]["linear"]["kernel"]).T[..., None, None]),
      torch.tensor(np.asarray(v["params"]["linear"]["bias"])))
  ref = torch.nn.functional.interpolate(conv, size=(12, 16), mode="bilinear", align_corners=False)
  np.testing.assert_allclose(np.asarray(out), ref.permute(0, 2, 3, 1).detach().numpy(), atol=1e-5)
  # Running mean moved by (1 - momentum) towards the batch mean; eval uses the running stats.
  np.testing.assert_allclose(new["batch_stats"]["bn"]["mean"], 0.1 * np.asarray(tokens).mean((0, 1)),
                             rtol=1e-5)
  ev, same = dense_heads.apply_head(head, new, tokens, (gh, gw), (12, 16), train=False)
  assert same is new and not np.allclose(ev, out)
  with pytest.raises(ValueError, match=r"grid 4x4 = 16 patches, but the tokens have N = 12"):
    dense_heads.init_head(head, jax.random.PRNGKey(0), tokens, (4, 4), (8, 8))


def test_head_loss_and_gradient_sharded_match_single_device():
  """Batch-sharded over 8 devices, BatchNorm statistics and the loss are over the global batch."""
  devices = np.array(jax.devices())
  assert len(devices) == 8
  mesh = jax.sharding.Mesh(devices, ("data",))
  rng = np.random.default_rng(0)
  tokens = jnp.asarray(rng.normal(size=(8, 4, 6)), jnp.float32)
  labels = jnp.asarray(rng.integers(0, 3, (8, 4, 4)).astype(np.int32)).at[0, 0].set(255)
  head = dense_heads.seg_head(3)
  v = dense_heads.init_head(head, jax.random.PRNGKey(1), tokens, (2, 2), (4, 4))

  def loss(params, x, t):
    out, new = dense_heads.apply_head(head, {**v, "params": params}, x, (2, 2), (4, 4), train=True)
    return dense_heads.seg_loss(out, t), new["batch_stats"]

  fn = jax.jit(jax.value_and_grad(loss, has_aux=True))
  (l1, s1), g1 = fn(v["params"], tokens, labels)
  shard = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  (l8, s8), g8 = fn(v["params"], jax.device_put(tokens, shard), jax.device_put(labels, shard))
  np.testing.assert_allclose(l8, l1, rtol=1e-6)
  for a, b in zip(jax.tree.leaves((s1, g1)), jax.tree.leaves((s8, g8))):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_depth_head_is_positive_and_starts_at_init_depth():
  tokens = jnp.asarray(np.random.default_rng(0).normal(size=(2, 4, 3)), jnp.float32)
  head = dense_heads.depth_head(init_depth=3.0)
  v = dense_heads.init_head(head, jax.random.PRNGKey(0), tokens, (2, 2), (4, 4))
  v["params"]["linear"]["kernel"] = jnp.zeros_like(v["params"]["linear"]["kernel"])
  out, _ = dense_heads.apply_head(head, v, tokens, (2, 2), (4, 4))
  assert out.shape == (2, 4, 4)
  np.testing.assert_allclose(out, 3.0, rtol=1e-5)


# --- dense-head training on procedural scenes ---------------------------------------


def _scene_features(split, n, patch=4, noise=0.1):
  """Patch features that carry the answer linearly (majority class one-hot, mean depth) plus
  the raw pixels and noise: a probe that trains and evaluates correctly must score well."""
  src = scenes.SceneSource(split, n, image_size=32)
  recs = [src[i] for i in range(n)]
  img = np.stack([r["image"] for r in recs]).astype(np.float32) / 255
  seg = np.stack([r["seg"] for r in recs]).astype(np.int32)
  depth = np.stack([r["depth"] for r in recs])
  g = 32 // patch
  patches = lambda a: a.reshape(n, g, patch, g, patch, -1).transpose(0, 1, 3, 2, 4, 5).reshape(n, g * g, -1)
  pix, sp, dp = patches(img), patches(seg[..., None]), patches(depth[..., None])
  maj = np.apply_along_axis(lambda r: np.bincount(r, minlength=scenes.NUM_CLASSES).argmax(), 2, sp)
  f = np.concatenate([pix, 3 * np.eye(scenes.NUM_CLASSES)[maj], dp.mean(-1, keepdims=True)], -1)
  f += noise * np.random.default_rng(0).normal(size=f.shape)
  seg[:, :2] = 255  # some ignored rows
  return f.astype(np.float32), seg, depth, (g, g)


def test_train_dense_heads_learns_seg_and_depth():
  tf, ts, td, grid = _scene_features("labeled_train", 96)
  ef, es, ed, _ = _scene_features("val", 32)
  metrics, variables = vision.train_dense_heads(
      tf, ef, grid, train_seg=ts, eval_seg=es, train_depth=td, eval_depth=ed,
      num_classes=scenes.NUM_CLASSES, steps=150, batch_size=16)
  assert set(variables) == {"seg", "depth"}
  # Majority-class-per-patch upsampled scores ~0.55 mIoU here; chance is ~0.05.
  assert metrics["miou"] > 0.4
  const = vision.depth_metrics(np.full_like(ed, td.mean()), ed)
  assert metrics["rmse"] < 0.7 * const["rmse"] and metrics["delta1"] > const["delta1"]
  with pytest.raises(ValueError, match=r"eval_feats: expected \[N, 64, D\]"):
    vision.train_dense_heads(tf, ef[:, :10], grid, train_seg=ts, eval_seg=es)
  with pytest.raises(ValueError, match=r"label 14 >= num_classes=14"):
    vision.train_dense_heads(tf, ef, grid, train_seg=np.full_like(ts, 14), eval_seg=es,
                             num_classes=scenes.NUM_CLASSES)
  with pytest.raises(ValueError, match=r"both train_seg and eval_seg"):
    vision.train_dense_heads(tf, ef, grid, train_seg=ts)
