"""A Fashion-MNIST stand-in for the tests: procedural garment silhouettes in the real idx layout.

The tests must pass on a fresh machine where the Debian package `dataset-fashion-mnist` is not
installed, so tests/conftest.py writes this set once per machine (under the system temp directory)
and points `VPT_FASHION_MNIST_DIR` at it, unless the caller already set that variable (e.g. to
/usr/share/datasets/fashion-mnist, to run the vision tests on the real images). The files go through
the same loader as the real ones (`vpt.vision.data.fashion_mnist.load_fashion_mnist`): idx3 images, idx1 labels,
gzipped, {train,t10k}-*. Ten classes in Fashion-MNIST's order, each a distinct silhouette with random
scale, position, brightness and texture; balanced, like the real set. Not a substitute for the real
images in experiments: only for tests of the code paths.
"""

from __future__ import annotations

import os
import tempfile

import numpy as np

VERSION = 1
SIZES = {"train": 6000, "t10k": 1000}  # balanced: a tenth per class


def _masks(cls: int, u: np.ndarray, v: np.ndarray) -> np.ndarray:
  """Silhouette of class `cls` on normalised coordinates u (across), v (down) in [-1, 1]."""
  au = np.abs(u)
  body = lambda half_w, top, bottom: (au <= half_w) & (v >= top) & (v <= bottom)
  if cls == 0:  # t-shirt/top: body and short sleeves
    return body(0.45, -0.6, 0.8) | ((au <= 0.85) & (v >= -0.6) & (v <= -0.2))
  if cls == 1:  # trouser: two legs joined at the waist
    return body(0.45, -0.8, -0.4) | ((au >= 0.08) & (au <= 0.45) & (v >= -0.4) & (v <= 0.9))
  if cls == 2:  # pullover: body and long sleeves
    return body(0.42, -0.6, 0.8) | ((au >= 0.42) & (au <= 0.75) & (v >= -0.6) & (v <= 0.7))
  if cls == 3:  # dress: a trapezoid widening downwards
    return (au <= 0.2 + 0.35 * (v + 0.8)) & (v >= -0.8) & (v <= 0.9)
  if cls == 4:  # coat: long body, long sleeves, open front
    return (body(0.45, -0.7, 0.9) & (au >= 0.04)) | ((au >= 0.45) & (au <= 0.78) & (v >= -0.7) & (v <= 0.8))
  if cls == 5:  # sandal: thin straps over a sole
    return ((v >= 0.3) & (v <= 0.45) & (au <= 0.85)) | ((np.abs(np.sin(6 * u)) < 0.3) & (v >= -0.1) & (v < 0.3)
                                                        & (au <= 0.8))
  if cls == 6:  # shirt: body, sleeves and a collar notch
    return (body(0.42, -0.7, 0.8) | ((au <= 0.8) & (v >= -0.7) & (v <= 0.1))) & ~((au <= 0.1) & (v <= -0.45))
  if cls == 7:  # sneaker: a low shoe rising at the ankle
    return (v <= 0.5) & (v >= 0.1 - 0.4 * (u < -0.2)) & (au <= 0.9)
  if cls == 8:  # bag: a box with a handle
    return body(0.7, -0.1, 0.8) | ((np.hypot(u, (v + 0.1) / 0.7) <= 0.45) & (np.hypot(u, (v + 0.1) / 0.7) >= 0.3)
                                   & (v <= -0.1))
  if cls == 9:  # ankle boot: an L-shape
    return ((u >= -0.6) & (u <= 0.0) & (v >= -0.8) & (v <= 0.6)) | ((u >= -0.6) & (u <= 0.85) & (v >= 0.2)
                                                                    & (v <= 0.6))
  raise ValueError(cls)


def make_split(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """(images uint8 [n, 28, 28], labels uint8 [n]): n/10 of each class, shuffled, deterministic in seed."""
  rng = np.random.default_rng(seed)
  labels = rng.permutation(np.repeat(np.arange(10, dtype=np.uint8), n // 10))
  grid = (np.arange(28) + 0.5) / 14.0 - 1.0
  images = np.zeros((len(labels), 28, 28), np.uint8)
  for i, cls in enumerate(labels):
    scale = rng.uniform(0.8, 1.1)
    du, dv = rng.uniform(-0.1, 0.1, 2)
    u = (grid[None, :] - du) / scale
    v = (grid[:, None] - dv) / scale
    mask = _masks(int(cls), u, v)
    texture = rng.uniform(120, 230) + rng.normal(0.0, 18.0, (28, 28))
    images[i] = np.where(mask, np.clip(texture, 1, 255), 0).astype(np.uint8)
  return images, labels


def directory_for(root: str | None = None) -> str:
  return os.path.join(root or tempfile.gettempdir(), f"vpt-fashion-mnist-stand-in-v{VERSION}")


def ensure(directory: str) -> str:
  """Writes the stand-in into `directory` once (atomically: concurrent test workers may race)."""
  from vpt.vision.data.fashion_mnist import write_idx
  if os.path.isdir(directory):
    return directory
  os.makedirs(os.path.dirname(directory), exist_ok=True)
  staging = tempfile.mkdtemp(prefix="vpt-fashion-staging-", dir=os.path.dirname(directory))
  for split, seed in (("train", 0), ("t10k", 1)):
    images, labels = make_split(SIZES[split], seed)
    write_idx(os.path.join(staging, f"{split}-images-idx3-ubyte.gz"), images)
    write_idx(os.path.join(staging, f"{split}-labels-idx1-ubyte.gz"), labels)
  try:
    os.rename(staging, directory)
  except OSError:  # another worker finished first: theirs is identical.
    import shutil
    shutil.rmtree(staging, ignore_errors=True)
  return directory
