"""Vision evaluation on frozen features: linear probe, kNN, segmentation mIoU, depth metrics.

Every function takes feature arrays, not models, so one feature extraction serves
all probes and the functions work for any backbone:

  linear_probe_accuracy  global features [N, D] -> top-1 of a linear classifier
                         (standardised features, full-batch Adam, L2 penalty)
  knn_accuracy           global features -> DINO's weighted kNN (cosine, k=20, T=0.07)
  confusion_matrix / miou_from_confusion / segmentation_miou   (ignore index, absent classes)
  depth_metrics          RMSE, AbsRel, delta1 per image, averaged over images
  train_dense_heads      patch features [N, n, D] -> linear-BN seg / depth heads trained
                         on a labeled split and evaluated on another
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from vpt.vision.models import dense_heads

IGNORE_INDEX = dense_heads.IGNORE_INDEX


def _check_xy(x, y, name: str) -> tuple[np.ndarray, np.ndarray]:
  x, y = np.asarray(x), np.asarray(y)
  if x.ndim != 2 or y.shape != x.shape[:1]:
    raise ValueError(f"{name}: expected features [N, D] and labels [N], got {x.shape} and {y.shape}")
  if not x.shape[0]:
    raise ValueError(f"{name}: no examples")
  if not np.issubdtype(y.dtype, np.integer) or y.min() < 0:
    raise ValueError(f"{name} labels: expected non-negative integers, got {y.dtype} (min {y.min()})")
  return x, y


def _num_classes(num_classes, *labels) -> int:
  top = max(int(np.max(y)) for y in labels) + 1
  if num_classes is None:
    return top
  if top > num_classes:
    raise ValueError(f"label {top - 1} >= num_classes={num_classes}")
  return int(num_classes)


# --- classification ----------------------------------------------------------------


def train_linear_probe(train_x, train_y, *, num_classes: int | None = None, steps: int = 300,
                       learning_rate: float = 0.05, l2: float = 1e-4):
  """A linear classifier on standardised features; returns predict(x) -> int labels.

  Features are standardised with the train mean/std (the linear-BN probe at
  eval time); the weights minimise mean cross-entropy + l2/2 ||W||^2 with
  `steps` full-batch Adam steps from zero weights (deterministic: no seed).
  """
  x, y = _check_xy(train_x, train_y, "linear probe train")
  c = _num_classes(num_classes, y)
  mean, std = x.mean(0), x.std(0) + 1e-6
  xs = jnp.asarray((x - mean) / std, jnp.float32)
  params = {"w": jnp.zeros((x.shape[1], c), jnp.float32), "b": jnp.zeros((c,), jnp.float32)}
  opt = optax.adam(learning_rate)

  def loss_fn(p):
    logits = xs @ p["w"] + p["b"]
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.asarray(y)).mean()
    return ce + 0.5 * l2 * jnp.sum(jnp.square(p["w"]))

  @jax.jit
  def fit(p):
    def step(carry, _):
      p, s = carry
      g = jax.grad(loss_fn)(p)
      u, s = opt.update(g, s, p)
      return (optax.apply_updates(p, u), s), None
    (p, _), _ = jax.lax.scan(step, (p, opt.init(p)), None, length=steps)
    return p

  params = jax.device_get(fit(params))

  def predict(q):
    q = (np.asarray(q, np.float32) - mean) / std
    return np.argmax(q @ params["w"] + params["b"], axis=-1)

  return predict


def linear_probe_accuracy(train_x, train_y, eval_x, eval_y, **kwargs) -> float:
  """Top-1 accuracy on (eval_x, eval_y) of train_linear_probe(train_x, train_y, **kwargs)."""
  ex, ey = _check_xy(eval_x, eval_y, "linear probe eval")
  if kwargs.get("num_classes") is None:
    kwargs["num_classes"] = _num_classes(None, np.asarray(train_y), ey)
  predict = train_linear_probe(train_x, train_y, **kwargs)
  return float(np.mean(predict(ex) == ey))


def knn_predict(train_x, train_y, query_x, *, num_classes: int | None = None, k: int = 20,
                temperature: float = 0.07, chunk: int = 1024) -> np.ndarray:
  """DINO's weighted kNN: cosine similarity, the k nearest vote with weight exp(sim / T).

  Ties in the vote go to the lower class index.
  """
  x, y = _check_xy(train_x, train_y, "kNN train")
  q = np.asarray(query_x, np.float64)
  if q.ndim != 2 or q.shape[1] != x.shape[1]:
    raise ValueError(f"kNN query features: expected [M, {x.shape[1]}], got {q.shape}")
  if k < 1 or temperature <= 0:
    raise ValueError(f"kNN k={k}, temperature={temperature}: expected k >= 1, T > 0")
  c = _num_classes(num_classes, y)
  k = min(k, len(y))
  unit = lambda a: a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)
  xn, qn = unit(x.astype(np.float64)), unit(q)
  out = np.empty(len(q), np.int64)
  for s in range(0, len(q), chunk):
    sim = qn[s:s + chunk] @ xn.T
    top = np.argpartition(-sim, k - 1, axis=1)[:, :k]
    w = np.exp(np.take_along_axis(sim, top, axis=1) / temperature)
    votes = np.zeros((len(sim), c))
    np.add.at(votes, (np.arange(len(sim))[:, None], y[top]), w)
    out[s:s + chunk] = np.argmax(votes, axis=1)
  return out


def knn_accuracy(train_x, train_y, eval_x, eval_y, **kwargs) -> float:
  """Top-1 accuracy of knn_predict on (eval_x, eval_y)."""
  ex, ey = _check_xy(eval_x, eval_y, "kNN eval")
  if kwargs.get("num_classes") is None:
    kwargs["num_classes"] = _num_classes(None, np.asarray(train_y), ey)
  return float(np.mean(knn_predict(train_x, train_y, ex, **kwargs) == ey))


# --- segmentation -------------------------------------------------------------------


def confusion_matrix(pred, labels, num_classes: int, ignore_index: int = IGNORE_INDEX) -> np.ndarray:
  """[C, C] int64 counts, rows = ground truth, columns = prediction; ignore_index pixels skipped."""
  pred, labels = np.asarray(pred).ravel(), np.asarray(labels).ravel()
  if pred.shape != labels.shape:
    raise ValueError(f"confusion_matrix: pred has {pred.size} pixels, labels {labels.size}")
  keep = labels != ignore_index
  pred, labels = pred[keep].astype(np.int64), labels[keep].astype(np.int64)
  for name, a in (("labels", labels), ("pred", pred)):
    if a.size and (a.min() < 0 or a.max() >= num_classes):
      raise ValueError(f"confusion_matrix: {name} value {int(a.min() if a.min() < 0 else a.max())} "
                       f"outside [0, {num_classes}) (ignore index {ignore_index})")
  return np.bincount(labels * num_classes + pred, minlength=num_classes ** 2).reshape(
      num_classes, num_classes)


def miou_from_confusion(conf: np.ndarray) -> tuple[float, np.ndarray]:
  """(mIoU, per-class IoU). IoU = TP / (TP + FP + FN); classes absent from both ground
  truth and prediction (union 0) are NaN and excluded from the mean."""
  conf = np.asarray(conf, np.float64)
  tp = np.diag(conf)
  union = conf.sum(0) + conf.sum(1) - tp
  with np.errstate(invalid="ignore", divide="ignore"):
    iou = np.where(union > 0, tp / union, np.nan)
  return (float(np.nanmean(iou)) if np.any(union > 0) else float("nan")), iou


def segmentation_miou(pred, labels, num_classes: int, ignore_index: int = IGNORE_INDEX) -> float:
  """mIoU over all pixels of pred / labels (one confusion matrix for the whole set)."""
  return miou_from_confusion(confusion_matrix(pred, labels, num_classes, ignore_index))[0]


# --- depth --------------------------------------------------------------------------


def depth_errors_per_image(pred, depth, *, min_depth: float = 1e-3,
                           max_depth: float | None = None) -> np.ndarray:
  """[n, 3] (rmse, abs_rel, delta1) of each image with a valid pixel (depth > 0).

  Predictions are clipped to [min_depth, max_depth] first (as the NYUv2 protocol does).
  """
  pred, depth = np.asarray(pred, np.float64), np.asarray(depth, np.float64)
  if pred.shape != depth.shape:
    raise ValueError(f"depth metrics: pred {pred.shape} and depth {depth.shape} differ")
  if depth.ndim == 2:
    pred, depth = pred[None], depth[None]
  pred = np.clip(pred, min_depth, np.inf if max_depth is None else max_depth)
  rows = []
  for p, g in zip(pred, depth):
    v = g > 0
    if not v.any():
      continue
    p, g = p[v], g[v]
    rows.append((np.sqrt(np.mean((p - g) ** 2)), np.mean(np.abs(p - g) / g),
                 np.mean(np.maximum(p / g, g / p) < 1.25)))
  return np.asarray(rows, np.float64).reshape(-1, 3)


def depth_metrics(pred, depth, *, min_depth: float = 1e-3, max_depth: float | None = None) -> dict:
  """RMSE, AbsRel and delta1 (max(p/g, g/p) < 1.25) on valid pixels (depth > 0), computed per
  image and averaged over images (the NYUv2 / toolbox convention); [H, W] is one image."""
  rows = depth_errors_per_image(pred, depth, min_depth=min_depth, max_depth=max_depth)
  return _depth_summary(rows)


def _depth_summary(rows: np.ndarray) -> dict:
  if not len(rows):
    raise ValueError("depth metrics: no image has a valid depth pixel (depth > 0)")
  m = rows.mean(0)
  return {"rmse": float(m[0]), "abs_rel": float(m[1]), "delta1": float(m[2])}


# --- dense heads --------------------------------------------------------------------


def _optimizer(learning_rate, steps, warmup, weight_decay, clip):
  sched = optax.warmup_cosine_decay_schedule(0.0, learning_rate, max(warmup, 1), max(steps, warmup + 1))
  return optax.chain(optax.clip_by_global_norm(clip), optax.adamw(sched, weight_decay=weight_decay))


def _fit_head(head, loss_fn, feats, targets, grid, *, steps, batch_size, lr, warmup, weight_decay,
              clip, seed, chunk: int = 50):
  """Trains one head on (feats [N, n, D], targets [N, H, W]) with minibatches; returns variables.

  Epochs are reshuffled permutations (the remainder of an epoch is dropped); `chunk`
  steps run in one jitted lax.scan over minibatches gathered on the host.
  """
  out_size = targets.shape[1:3]
  rng = np.random.default_rng(seed)
  variables = dense_heads.init_head(head, jax.random.PRNGKey(seed), jnp.asarray(feats[:2]), grid,
                                    out_size)
  opt = _optimizer(lr, steps, warmup, weight_decay, clip)
  opt_state = jax.jit(opt.init)(variables["params"])

  def step(carry, batch):
    variables, opt_state = carry
    x, t = batch

    def loss(params):
      out, new = dense_heads.apply_head(head, {**variables, "params": params}, x, grid, out_size,
                                        train=True)
      return loss_fn(out, t), new

    (value, new), g = jax.value_and_grad(loss, has_aux=True)(variables["params"])
    updates, opt_state = opt.update(g, opt_state, variables["params"])
    new["params"] = optax.apply_updates(variables["params"], updates)
    return (new, opt_state), value

  run = jax.jit(lambda carry, xs, ts: jax.lax.scan(step, carry, (xs, ts)))
  bs = min(batch_size, len(feats))
  per_epoch = len(feats) // bs
  idx = np.concatenate([rng.permutation(len(feats))[:per_epoch * bs].reshape(per_epoch, bs)
                        for _ in range(-(-steps // per_epoch))])[:steps]
  carry = (variables, opt_state)
  for s in range(0, steps, chunk):
    block = np.sort(idx[s:s + chunk], axis=1)
    carry, _ = run(carry, jnp.asarray(feats[block]), jnp.asarray(targets[block]))
  return carry[0]


def _predict(head, variables, feats, grid, out_size, batch_size):
  """Yields (start, outputs) over feats in batches (the last one padded, then trimmed)."""
  fn = jax.jit(lambda v, x: dense_heads.apply_head(head, v, x, grid, out_size, train=False)[0])
  bs = min(batch_size, len(feats))
  for s in range(0, len(feats), bs):
    x = feats[s:s + bs]
    n = len(x)
    if n < bs:
      x = np.concatenate([x, np.zeros((bs - n,) + x.shape[1:], x.dtype)])
    yield s, np.asarray(fn(variables, jnp.asarray(x)))[:n]


def train_dense_heads(train_feats, eval_feats, grid, *, train_seg=None, eval_seg=None,
                      train_depth=None, eval_depth=None, num_classes: int | None = None,
                      ignore_index: int = IGNORE_INDEX, steps: int = 300, batch_size: int = 16,
                      seg_lr: float = 1e-2, depth_lr: float = 1e-2, warmup: int | None = None,
                      weight_decay: float = 0.05, clip: float = 1.0, seed: int = 0,
                      eval_batch_size: int = 64, min_depth: float = 1e-3,
                      max_depth: float | None = None) -> tuple[dict, dict]:
  """Trains linear-BN seg and/or depth heads on frozen patch features and evaluates them.

  train_feats / eval_feats: [N, n, D] patch tokens on the (gh, gw) `grid`; seg
  labels [N, H, W] int (ignore_index skipped), depth [N, H, W] metres (0 invalid).
  Heads train for `steps` AdamW steps (warmup + cosine, weight decay, gradient
  clipping, as the paper's probes; depth with L1 on valid pixels) on shuffled
  minibatches, and are evaluated with running BatchNorm statistics. The default
  learning rates suit these short CPU-scale schedules; the paper's probes use
  5e-4 (seg) / 1e-3 (depth) for 20k steps at batch 8.

  Returns (metrics, variables): metrics has 'miou' (with seg) and 'rmse',
  'abs_rel', 'delta1' (with depth); variables has the trained 'seg' / 'depth' heads.
  """
  train_feats, eval_feats = np.asarray(train_feats), np.asarray(eval_feats)
  for name, f in (("train_feats", train_feats), ("eval_feats", eval_feats)):
    if f.ndim != 3 or f.shape[1] != int(grid[0]) * int(grid[1]):
      raise ValueError(f"{name}: expected [N, {int(grid[0]) * int(grid[1])}, D] patch tokens for "
                       f"grid {tuple(grid)}, got {f.shape}")
  if (train_seg is None) != (eval_seg is None) or (train_depth is None) != (eval_depth is None):
    raise ValueError("train_dense_heads: give both train_seg and eval_seg (and both train_depth "
                     "and eval_depth), or neither")
  if train_seg is None and train_depth is None:
    raise ValueError("train_dense_heads: no targets (train_seg / train_depth) given")
  warmup = max(1, steps // 10) if warmup is None else warmup
  common = dict(steps=steps, batch_size=batch_size, warmup=warmup, weight_decay=weight_decay,
                clip=clip, seed=seed)
  metrics, variables = {}, {}
  if train_seg is not None:
    train_seg, eval_seg = np.asarray(train_seg), np.asarray(eval_seg)
    for name, f, t in (("train_seg", train_feats, train_seg), ("eval_seg", eval_feats, eval_seg)):
      if t.ndim != 3 or len(t) != len(f):
        raise ValueError(f"{name}: expected [{len(f)}, H, W] labels, got {t.shape}")
    labelled = [np.append(t[t != ignore_index], 0) for t in (train_seg, eval_seg)]
    if min(int(l.min()) for l in labelled) < 0:
      raise ValueError(f"seg labels: negative values (expected [0, C) or {ignore_index})")
    c = _num_classes(num_classes, *labelled)
    head = dense_heads.seg_head(c)
    loss = lambda out, t: dense_heads.seg_loss(out, t, ignore_index)
    v = _fit_head(head, loss, train_feats, train_seg.astype(np.int32), grid, lr=seg_lr, **common)
    conf = np.zeros((c, c), np.int64)
    for s, logits in _predict(head, v, eval_feats, grid, eval_seg.shape[1:], eval_batch_size):
      conf += confusion_matrix(logits.argmax(-1), eval_seg[s:s + len(logits)], c, ignore_index)
    metrics["miou"], _ = miou_from_confusion(conf)
    variables["seg"] = v
  if train_depth is not None:
    train_depth = np.asarray(train_depth, np.float32)
    eval_depth = np.asarray(eval_depth, np.float32)
    for name, f, t in (("train_depth", train_feats, train_depth), ("eval_depth", eval_feats, eval_depth)):
      if t.ndim != 3 or len(t) != len(f):
        raise ValueError(f"{name}: expected [{len(f)}, H, W] depth, got {t.shape}")
    valid = train_depth[train_depth > 0]
    if not valid.size:
      raise ValueError("train_depth: no valid pixel (depth > 0)")
    head = dense_heads.depth_head(init_depth=float(valid.mean()))
    v = _fit_head(head, dense_heads.depth_l1, train_feats, train_depth, grid, lr=depth_lr, **common)
    rows = [depth_errors_per_image(p, eval_depth[s:s + len(p)], min_depth=min_depth, max_depth=max_depth)
            for s, p in _predict(head, v, eval_feats, grid, eval_depth.shape[1:], eval_batch_size)]
    metrics.update(_depth_summary(np.concatenate(rows)))
    variables["depth"] = v
  return metrics, variables
