"""Procedural scenes: the CPU-scale stand-in for ADE20K (segmentation) and NYUv2 (depth).

Example i of a split is a pure function of (seed, split, i). A scene is a tilted
ground plane (class 0, per-pixel depth from the plane: inverse depth is linear
in the row, 4.5-9 m) seen through a pinhole camera, with 2-5 fronto-parallel
objects at depths 1-4 m composited far-to-near (nearer objects occlude farther
ones; perspective scales each object's size by 1/depth). Objects are
Fashion-MNIST items (their silhouettes, thresholded; class 1 + the Fashion label)
or simple shapes (disc, square, triangle). Every example has

  image  uint8 [S, S, 3]    the rendered RGB scene
  seg    uint8 [S, S]       exact class per pixel, in [0, NUM_CLASSES)
  depth  float32 [S, S]     metres; every pixel is valid (> 0)
  label  int32 []           class of the largest visible object - 1, in [0, NUM_IMAGE_CLASSES)

NUM_CLASSES = 14 pixel classes (CLASS_NAMES): 0 background, 1-10 the Fashion-MNIST
classes, 11 disc, 12 square, 13 triangle; image labels are those minus 1 (13 classes).

Splits are disjoint index ranges of one generator, so no scene is shared:
  test           [0, 2^24)        objects from Fashion-MNIST t10k
  val            [2^24, 2^25)     objects from Fashion-MNIST t10k
  labeled_meta   [2^25, 3*2^24)   objects from Fashion-MNIST train (g_down batches)
  labeled_train  [3*2^24, 2^26)   objects from Fashion-MNIST train (head training)
  train          [2^32, ...)      objects from Fashion-MNIST train (unlabeled SSL stream)
Evaluation scenes (val/test) thus show Fashion items never seen in training scenes.
The Fashion-MNIST idx files are required (Debian `dataset-fashion-mnist`, or the directory
in $VPT_FASHION_MNIST_DIR); there is no fallback.
"""

from __future__ import annotations

import grain
import ml_collections
import numpy as np
from PIL import Image

from vpt.vision.data import fashion_mnist

CLASS_NAMES = ("background",) + fashion_mnist.FASHION_MNIST_CLASSES + ("disc", "square", "triangle")
NUM_CLASSES = len(CLASS_NAMES)  # 14
NUM_IMAGE_CLASSES = NUM_CLASSES - 1  # 13: image labels are object classes - 1.
BACKGROUND = 0
SHAPE_CLASSES = {"disc": 11, "square": 12, "triangle": 13}

SPLITS = ("train", "labeled_train", "labeled_meta", "val", "test")
_BLOCK = 1 << 24
_SPLIT_START = {"test": 0, "val": _BLOCK, "labeled_meta": 2 * _BLOCK,
                "labeled_train": 3 * _BLOCK, "train": 1 << 32}
_SPLIT_CAPACITY = {**{s: _BLOCK for s in SPLITS}, "train": 1 << 48}
_FASHION_SPLIT = {"test": "test", "val": "test", "labeled_meta": "train",
                  "labeled_train": "train", "train": "train"}

# Geometry (metres) and appearance constants.
OBJECT_DEPTH = (1.0, 4.0)
GROUND_DEPTH_FAR = (7.0, 9.0)  # at the top row
GROUND_DEPTH_NEAR = (4.5, 5.5)  # at the bottom row
_SILHOUETTE_THRESHOLD = 0.15  # of the Fashion item's max intensity (1.0)


def scene_config() -> ml_collections.ConfigDict:
  """Defaults for the procedural scenes (CPU scale)."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.image_size = 32
  c.min_objects = 2
  c.max_objects = 5
  c.object_size = 0.6  # object side in image widths at 1 m (times a 0.8-1.2 physical size)
  c.ground_color = (0.1, 0.9)  # range of the ground's RGB channels (a gradient between two draws)
  c.object_tint = (0.15, 1.0)  # range of an object's RGB tint
  c.fashion_dir = fashion_mnist.FASHION_MNIST_DIR
  c.num_train = 1 << 30  # virtual: scenes are generated on demand.
  c.num_labeled_train = 2000  # paper: ADE20K 2,000 train + 512 meta.
  c.num_labeled_meta = 512
  c.num_val = 512
  c.num_test = 1024
  return c


def _ground(rng: np.random.Generator, s: int, color_range: tuple[float, float]) -> tuple[np.ndarray, np.ndarray]:
  """Background image [s, s, 3] float and its depth [s, s] (a plane: 1/depth linear in row)."""
  far, near = rng.uniform(*GROUND_DEPTH_FAR), rng.uniform(*GROUND_DEPTH_NEAR)
  t = np.arange(s, dtype=np.float64) / max(s - 1, 1)
  row_depth = 1.0 / ((1 - t) / far + t / near)
  depth = np.repeat(row_depth[:, None], s, axis=1)
  top, bottom = rng.uniform(*color_range, 3), rng.uniform(*color_range, 3)
  color = (1 - t)[:, None] * top + t[:, None] * bottom  # [s, 3] gradient
  # Stripes at a fixed spacing on the ground: they crowd together with distance.
  period, phase = rng.uniform(0.5, 1.0), rng.uniform(0, 2 * np.pi)
  stripes = 1.0 + 0.2 * np.sin(2 * np.pi * row_depth / period + phase)
  img = np.repeat((color * stripes[:, None])[:, None, :], s, axis=1)
  img = img + rng.normal(0, 0.03, img.shape)  # fine texture
  return img, depth


def _shape_mask(kind: str, n: int) -> np.ndarray:
  y, x = np.mgrid[:n, :n] + 0.5
  if kind == "disc":
    return (x - n / 2) ** 2 + (y - n / 2) ** 2 <= (n / 2) ** 2
  if kind == "square":
    return np.ones((n, n), bool)
  return np.abs(x - n / 2) <= y / 2  # triangle, apex up


class ProceduralScenes:
  """The scene generator for one split: scenes[i] is a function of (seed, split, i)."""

  def __init__(self, split: str, *, seed: int = 0, image_size: int = 32, min_objects: int = 2,
               max_objects: int = 5, object_size: float = 0.6,
               ground_color: tuple[float, float] = (0.1, 0.9), object_tint: tuple[float, float] = (0.15, 1.0),
               fashion_dir: str = fashion_mnist.FASHION_MNIST_DIR):
    if split not in SPLITS:
      raise ValueError(f"scenes split={split!r}: expected one of {SPLITS}")
    if seed < 0:
      raise ValueError(f"scenes seed={seed}: expected >= 0")
    if int(image_size) < 8:
      raise ValueError(f"scenes image_size={image_size}: expected >= 8")
    if not 1 <= min_objects <= max_objects:
      raise ValueError(f"scenes min_objects={min_objects}, max_objects={max_objects}: expected "
                       "1 <= min_objects <= max_objects")
    if not object_size > 0:
      raise ValueError(f"scenes object_size={object_size}: expected > 0 (image widths at 1 m)")
    self.split, self.seed, self.size = split, int(seed), int(image_size)
    self.object_size = float(object_size)
    for name, (lo, hi) in (("ground_color", ground_color), ("object_tint", object_tint)):
      if not 0.0 <= lo <= hi <= 1.0:
        raise ValueError(f"scenes {name}=({lo}, {hi}): expected 0 <= low <= high <= 1")
    self.ground_color, self.object_tint = tuple(map(float, ground_color)), tuple(map(float, object_tint))
    self.min_objects, self.max_objects = int(min_objects), int(max_objects)
    self.fashion_dir = fashion_dir
    self._load()

  def _load(self):
    imgs, labels = fashion_mnist.load_fashion_mnist(_FASHION_SPLIT[self.split], self.fashion_dir)
    self._fashion = imgs
    self._by_label = [np.flatnonzero(labels == k) for k in range(len(fashion_mnist.FASHION_MNIST_CLASSES))]

  def __getstate__(self):  # grain workers reload the (cached) idx files instead of pickling them.
    return {k: v for k, v in self.__dict__.items() if k not in ("_fashion", "_by_label")}

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._load()

  def global_index(self, i: int) -> int:
    i = int(i)
    if not 0 <= i < _SPLIT_CAPACITY[self.split]:
      raise IndexError(f"scenes {self.split} index {i} out of range [0, {_SPLIT_CAPACITY[self.split]})")
    return _SPLIT_START[self.split] + i

  def _object(self, rng: np.random.Generator, cls: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(mask [n, n] bool, colour [n, n, 3]) of one object of class `cls`, n pixels wide."""
    tint = rng.uniform(*self.object_tint, 3)
    if cls in SHAPE_CLASSES.values():
      kind = next(k for k, v in SHAPE_CLASSES.items() if v == cls)
      mask = _shape_mask(kind, n)
      shade = 1.0 - 0.35 * (np.arange(n) + 0.5) / n  # lit from above
      color = tint[None, None, :] * shade[:, None, None] * np.ones((1, n, 1))
    else:
      pool = self._by_label[cls - 1]
      item = self._fashion[pool[rng.integers(len(pool))]]
      gray = np.asarray(Image.fromarray(item).resize((n, n), Image.Resampling.BILINEAR),
                        np.float64) / 255.0
      mask = gray > _SILHOUETTE_THRESHOLD
      color = tint[None, None, :] * (0.35 + 0.65 * gray[..., None])
    if not mask.any():
      mask[n // 2, n // 2] = True
    return mask, color

  def render(self, i: int, return_layers: bool = False) -> dict:
    """Scene i of this split; with return_layers also 'layers': per object (class, depth, full-frame mask)."""
    g = self.global_index(i)
    rng = np.random.default_rng([self.seed, g])
    s = self.size
    img, depth = _ground(rng, s, self.ground_color)
    seg = np.full((s, s), BACKGROUND, np.uint8)
    objects = []
    for _ in range(int(rng.integers(self.min_objects, self.max_objects + 1))):
      cls = int(rng.integers(1, NUM_CLASSES))
      z = float(rng.uniform(*OBJECT_DEPTH))
      n = int(round(self.object_size * s * rng.uniform(0.8, 1.2) / z))
      n = int(np.clip(n, max(4, round(0.15 * s)), s))
      cy, cx = rng.uniform(0, s, 2)
      top, left = int(round(cy - n / 2)), int(round(cx - n / 2))
      mask, color = self._object(rng, cls, n)
      full = np.zeros((s, s), bool)
      rgb = np.zeros((s, s, 3))
      ys, xs = slice(max(top, 0), min(top + n, s)), slice(max(left, 0), min(left + n, s))
      oy, ox = slice(ys.start - top, ys.stop - top), slice(xs.start - left, xs.stop - left)
      full[ys, xs] = mask[oy, ox]
      rgb[ys, xs] = color[oy, ox]
      objects.append((z, cls, full, rgb))
    # Far to near (stable on ties): each nearer object overwrites what it covers.
    order = sorted(range(len(objects)), key=lambda k: -objects[k][0])
    for k in order:
      z, cls, full, rgb = objects[k]
      img[full] = rgb[full]
      seg[full] = cls
      depth[full] = z
    owner = np.full((s, s), -1)
    for k in order:
      owner[objects[k][2]] = k
    visible = np.bincount(owner[owner >= 0], minlength=len(objects))
    # Largest visible object; ties go to the nearer one.
    best = max(range(len(objects)), key=lambda k: (visible[k], -objects[k][0]))
    out = {
        "image": np.clip(np.round(img * 255), 0, 255).astype(np.uint8),
        "seg": seg,
        "depth": depth.astype(np.float32),
        "label": np.int32(objects[best][1] - 1),
    }
    if return_layers:
      out["layers"] = [{"class": objects[k][1], "depth": objects[k][0], "mask": objects[k][2]}
                       for k in range(len(objects))]
    return out


class SceneSource(grain.sources.RandomAccessDataSource):
  """`size` procedural scenes of one split as a grain data source (records: see module doc)."""

  def __init__(self, split: str, size: int, **scene_kwargs):
    self.scenes = ProceduralScenes(split, **scene_kwargs)
    if not 1 <= size <= _SPLIT_CAPACITY[split]:
      raise ValueError(f"scenes {split} size={size}: expected in [1, {_SPLIT_CAPACITY[split]}] "
                       "(splits are disjoint index ranges of that capacity)")
    self.size = int(size)

  def __len__(self) -> int:
    return self.size

  def __getitem__(self, i: int) -> dict:
    i = int(i)
    if not 0 <= i < self.size:
      raise IndexError(f"scenes {self.scenes.split} index {i} out of range [0, {self.size})")
    return self.scenes.render(i)

  def describe(self, i: int) -> str:
    sc = self.scenes
    return f"scenes(seed={sc.seed}, {sc.split})[{i}] (global index {sc.global_index(i)})"


def make_scene_source(cfg: ml_collections.ConfigDict, split: str) -> SceneSource:
  """The SceneSource of `split` configured by `cfg` (see scene_config)."""
  sizes = {"train": cfg.num_train, "labeled_train": cfg.num_labeled_train,
           "labeled_meta": cfg.num_labeled_meta, "val": cfg.num_val, "test": cfg.num_test}
  if split not in sizes:
    raise ValueError(f"scenes split={split!r}: expected one of {SPLITS}")
  return SceneSource(split, int(sizes[split]), seed=cfg.seed, image_size=cfg.image_size,
                     min_objects=cfg.min_objects, max_objects=cfg.max_objects,
                     object_size=cfg.object_size, ground_color=tuple(cfg.ground_color),
                     object_tint=tuple(cfg.object_tint), fashion_dir=cfg.fashion_dir)
