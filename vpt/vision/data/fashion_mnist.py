"""Fashion-MNIST's idx files: reading (and writing, for stand-ins) the public format, and the two splits.

A leaf of vpt.vision.data: `scenes` builds its objects from these items and `images` serves them
as a source, and both import this module, never each other's way back (images → scenes → fashion_mnist).

Layout: <dir>/{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz] (Debian `dataset-fashion-mnist`, or the
directory in $VPT_FASHION_MNIST_DIR: FASHION_MNIST_DIR).
"""

from __future__ import annotations

import functools
import gzip
import os

import numpy as np

# The Debian package `dataset-fashion-mnist` installs the idx files here; VPT_FASHION_MNIST_DIR overrides
# (the tests point it at a generated stand-in: tests/fashion_stand_in.py).
FASHION_MNIST_DIR = os.environ.get("VPT_FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = ("t-shirt/top", "trouser", "pullover", "dress", "coat", "sandal",
                         "shirt", "sneaker", "bag", "ankle boot")

# idx type byte -> big-endian numpy dtype (http://yann.lecun.com/exdb/mnist/).
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


# --- idx files ---------------------------------------------------------------------


def _open_maybe_gz(path: str, mode: str):
  return gzip.open(path, mode) if path.endswith(".gz") else open(path, mode)


def read_idx(path: str) -> np.ndarray:
  """An idx file (optionally gzipped) as a numpy array in native byte order.

  Checks the magic number (two zero bytes, a known type byte, ndim >= 1) and
  that the payload has exactly prod(dims) items; errors name the file.
  """
  if not os.path.isfile(path):
    raise FileNotFoundError(f"idx file {path!r} does not exist")
  try:
    with _open_maybe_gz(path, "rb") as f:
      raw = f.read()
  except (OSError, EOFError) as e:  # gzip: bad header or truncated stream.
    raise ValueError(f"idx file {path!r} cannot be read: {e}") from e
  if len(raw) < 4:
    raise ValueError(f"idx file {path!r} is truncated: {len(raw)} bytes, no 4-byte magic number")
  if raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES or raw[3] == 0:
    raise ValueError(f"idx file {path!r} has a bad magic number {raw[:4].hex()}: expected "
                     f"00 00 <type in {sorted(hex(t) for t in _IDX_DTYPES)}> <ndim >= 1>")
  dtype, ndim = np.dtype(_IDX_DTYPES[raw[2]]), raw[3]
  header = 4 + 4 * ndim
  if len(raw) < header:
    raise ValueError(f"idx file {path!r} is truncated: the header needs {header} bytes, "
                     f"the file has {len(raw)}")
  dims = tuple(int(d) for d in np.frombuffer(raw, ">u4", ndim, 4))
  need = header + int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
  if len(raw) != need:
    what = "truncated" if len(raw) < need else "longer than its header says"
    raise ValueError(f"idx file {path!r} is {what}: dims {dims} of {dtype} need {need} bytes, "
                     f"the file has {len(raw)}")
  return np.frombuffer(raw, dtype, offset=header).reshape(dims).astype(dtype.newbyteorder("="))


def write_idx(path: str, array: np.ndarray) -> str:
  """Writes `array` as an idx file (gzipped if the path ends in .gz); the inverse of read_idx."""
  array = np.asarray(array)
  array = array.astype(array.dtype.newbyteorder("="))
  codes = {np.dtype(v).newbyteorder("="): k for k, v in _IDX_DTYPES.items()}
  if array.dtype not in codes or array.ndim < 1:
    raise ValueError(f"write_idx({path!r}): dtype {array.dtype} / ndim {array.ndim} cannot be "
                     f"stored in idx (types {sorted(str(d) for d in codes)}, ndim >= 1)")
  header = bytes([0, 0, codes[array.dtype], array.ndim]) + np.asarray(array.shape, ">u4").tobytes()
  with _open_maybe_gz(path, "wb") as f:
    f.write(header + array.astype(array.dtype.newbyteorder(">")).tobytes())
  return path


def _idx_path(directory: str, stem: str) -> str:
  for name in (stem + ".gz", stem):
    if os.path.isfile(os.path.join(directory, name)):
      return os.path.join(directory, name)
  raise FileNotFoundError(
      f"Fashion-MNIST file {stem}[.gz] not found in {directory!r}: install the Debian package "
      f"dataset-fashion-mnist (files under /usr/share/datasets/fashion-mnist), or set "
      "VPT_FASHION_MNIST_DIR or pass the directory holding the idx files")


@functools.lru_cache(maxsize=4)
def load_fashion_mnist(split: str = "train", data_dir: str = FASHION_MNIST_DIR
                       ) -> tuple[np.ndarray, np.ndarray]:
  """(images uint8 [N, 28, 28], labels uint8 [N]) of split 'train' (60k) or 'test' (10k).

  Cached per (split, dir); the arrays are read-only.
  """
  prefix = {"train": "train", "test": "t10k"}.get(split)
  if prefix is None:
    raise ValueError(f"Fashion-MNIST split={split!r}: expected 'train' or 'test'")
  img_path = _idx_path(data_dir, f"{prefix}-images-idx3-ubyte")
  lbl_path = _idx_path(data_dir, f"{prefix}-labels-idx1-ubyte")
  images, labels = read_idx(img_path), read_idx(lbl_path)
  if images.ndim != 3 or images.dtype != np.uint8:
    raise ValueError(f"{img_path!r}: expected uint8 images [N, H, W], got {images.dtype} "
                     f"{images.shape}")
  if labels.shape != images.shape[:1] or labels.dtype != np.uint8:
    raise ValueError(f"{lbl_path!r}: expected {images.shape[0]} uint8 labels (one per image in "
                     f"{img_path!r}), got {labels.dtype} {labels.shape}")
  if labels.size and labels.max() >= len(FASHION_MNIST_CLASSES):
    raise ValueError(f"{lbl_path!r}: label {int(labels.max())} out of range [0, 10)")
  images.flags.writeable = False
  labels.flags.writeable = False
  return images, labels
