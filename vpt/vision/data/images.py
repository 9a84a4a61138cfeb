"""Image datasets for the vision path: Fashion-MNIST idx files, ImageNet, ADE20K, NYUv2.

Every source is a grain RandomAccessDataSource (`__len__`, `__getitem__`) with
`describe(i)` for error messages, and yields dict records of numpy arrays:

  image  uint8 [H, W, C]   C = 3 (Fashion-MNIST: 1)
  label  int32 []          classification (Fashion-MNIST, ImageNet)
  seg    uint8 [H, W]      class per pixel, IGNORE_INDEX (255) where unlabeled (ADE20K)
  depth  float32 [H, W]    metres, 0 where invalid (NYUv2)

Sources resize to `image_size` in the loader: an int is a square, a pair is
(height, width); the image is scaled (bilinear) so it covers that size, then
center-cropped, and the label maps get the same geometry with nearest neighbour.
`make_image_dataset` / `make_image_iterator` turn a source into grain batches:
float32 NHWC images in [0, 1] plus the label arrays, with a checkpointable iterator.

Layouts (the public ones):
  Fashion-MNIST  <dir>/{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]
                 (Debian `dataset-fashion-mnist`, or $VPT_FASHION_MNIST_DIR: FASHION_MNIST_DIR;
                 read by vpt.vision.data.fashion_mnist)
  ImageNet       <root>/{train,val}/<wnid>/*.JPEG; class = index of the wnid in the
                 sorted wnids of <root>/train (of the split's own folder if no train/)
  ADE20K         <root>/ADEChallengeData2016/{images,annotations}/{training,validation}/
                 ADE_*.jpg + ADE_*.png (SceneParse150); 0 -> 255 (ignore), k -> k - 1
  NYUv2          the Monocular-Depth-Estimation-Toolbox layout that DINOv2 (and most
                 DINO-style depth probes) evaluate with: <root>/nyu_train.txt and
                 <root>/nyu_test.txt, one "rgb_path depth_path [focal]" line per frame
                 (BTS/Eigen split: 24,231 train frames, the 654 official test frames),
                 paths relative to <root>, e.g. kitchen_0028b/rgb_00045.jpg and
                 kitchen_0028b/sync_depth_00045.png: 16-bit PNG depth in mm (/ 1000)
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import grain
import ml_collections
import numpy as np
from PIL import Image

from vpt.vision.data import scenes
from vpt.vision.data.fashion_mnist import FASHION_MNIST_DIR, load_fashion_mnist  # its own module: scenes reads it too

IGNORE_INDEX = 255
ADE20K_NUM_CLASSES = 150
# NYUv2 depth PNGs store millimetres; valid range and Eigen crop (on 480x640) as in the toolbox.
NYU_DEPTH_SCALE = 1000.0
NYU_MIN_DEPTH, NYU_MAX_DEPTH = 1e-3, 10.0
NYU_EIGEN_CROP = (45, 471, 41, 601)  # top, bottom, left, right on a 480x640 frame.
_IMAGE_EXTS = (".jpeg", ".jpg", ".png")


# --- resizing ----------------------------------------------------------------------


def _size_hw(image_size) -> tuple[int, int] | None:
  if image_size is None:
    return None
  if isinstance(image_size, (int, np.integer)):
    h = w = int(image_size)
  else:
    h, w = (int(s) for s in image_size)
  if h < 1 or w < 1:
    raise ValueError(f"image_size={image_size!r}: expected a positive int or (height, width)")
  return h, w


def _fit_box(hw_in: tuple[int, int], hw_out: tuple[int, int]):
  """(resized (w, h), crop box) that scales to cover hw_out and center-crops it."""
  (h, w), (th, tw) = hw_in, hw_out
  scale = max(th / h, tw / w)
  nh, nw = max(th, round(h * scale)), max(tw, round(w * scale))
  top, left = (nh - th) // 2, (nw - tw) // 2
  return (nw, nh), (left, top, left + tw, top + th)


def fit_image(img: Image.Image, size_hw: tuple[int, int] | None, resample) -> Image.Image:
  """Scale `img` to cover size_hw (keeping its aspect ratio), then center-crop to it."""
  if size_hw is None:
    return img
  new, box = _fit_box((img.height, img.width), size_hw)
  if new != img.size:
    img = img.resize(new, resample)
  return img.crop(box)


def _open(path: str, what: str) -> Image.Image:
  try:
    img = Image.open(path)
    img.load()
  except (OSError, SyntaxError) as e:  # Missing, truncated or not an image.
    raise ValueError(f"{what} {path!r} cannot be decoded: {e}") from e
  return img


def _rgb(path: str, size_hw) -> np.ndarray:
  img = _open(path, "image").convert("RGB")  # ImageNet has a few CMYK / grayscale JPEGs.
  return np.asarray(fit_image(img, size_hw, Image.Resampling.BILINEAR), np.uint8)


def _require_dir(path: str, what: str) -> str:
  if not os.path.isdir(path):
    raise FileNotFoundError(f"{what}: directory {path!r} does not exist")
  return path


def _images_in(directory: str) -> list[str]:
  return sorted(os.path.join(directory, f) for f in os.listdir(directory)
                if f.lower().endswith(_IMAGE_EXTS))


# --- sources -----------------------------------------------------------------------


class FashionMNISTSource(grain.sources.RandomAccessDataSource):
  """Fashion-MNIST as {'image': uint8 [H, W, 1 or 3], 'label': int32}."""

  def __init__(self, split: str = "train", data_dir: str = FASHION_MNIST_DIR,
               image_size=None, rgb: bool = False):
    self.images, self.labels = load_fashion_mnist(split, data_dir)
    self.split, self.data_dir, self.rgb = split, data_dir, rgb
    self.size_hw = _size_hw(image_size)

  def __len__(self) -> int:
    return len(self.labels)

  def __getitem__(self, i: int) -> dict:
    i = int(i)
    img = self.images[i]
    if self.size_hw is not None and self.size_hw != img.shape:
      img = np.asarray(fit_image(Image.fromarray(img), self.size_hw, Image.Resampling.BILINEAR))
    img = img[..., None]
    if self.rgb:
      img = np.repeat(img, 3, axis=-1)
    return {"image": np.ascontiguousarray(img), "label": np.int32(self.labels[i])}

  def describe(self, i: int) -> str:
    return f"fashion_mnist({self.data_dir!r}, {self.split})[{i}]"


class ImageNetFolderSource(grain.sources.RandomAccessDataSource):
  """ImageNet-1K folder layout as {'image': uint8 [H, W, 3], 'label': int32}."""

  def __init__(self, root: str, split: str = "train", image_size=224):
    if split not in ("train", "val"):
      raise ValueError(f"ImageNet split={split!r}: expected 'train' or 'val'")
    split_dir = _require_dir(os.path.join(root, split), f"ImageNet {split} split")
    class_dir = os.path.join(root, "train") if os.path.isdir(os.path.join(root, "train")) else split_dir
    self.wnids = sorted(d for d in os.listdir(class_dir) if os.path.isdir(os.path.join(class_dir, d)))
    if not self.wnids:
      raise FileNotFoundError(f"ImageNet: no class folders <wnid>/ in {class_dir!r}")
    index = {w: k for k, w in enumerate(self.wnids)}
    self.files: list[tuple[str, int]] = []
    for wnid in sorted(os.listdir(split_dir)):
      if not os.path.isdir(os.path.join(split_dir, wnid)):
        continue
      if wnid not in index:
        raise ValueError(f"ImageNet {split}: class folder {wnid!r} in {split_dir!r} is not among "
                         f"the {len(self.wnids)} classes of {class_dir!r}")
      self.files += [(p, index[wnid]) for p in _images_in(os.path.join(split_dir, wnid))]
    if not self.files:
      raise FileNotFoundError(f"ImageNet {split}: no images (*.JPEG/*.jpg/*.png) under {split_dir!r}")
    self.size_hw = _size_hw(image_size)

  def __len__(self) -> int:
    return len(self.files)

  def __getitem__(self, i: int) -> dict:
    path, label = self.files[int(i)]
    return {"image": _rgb(path, self.size_hw), "label": np.int32(label)}

  def describe(self, i: int) -> str:
    return self.files[int(i)][0]


def ade20k_labels(raw: np.ndarray) -> np.ndarray:
  """SceneParse150 annotation values -> training labels: 0 -> 255 (ignore), k -> k - 1."""
  raw = np.asarray(raw)
  if raw.size and raw.max() > ADE20K_NUM_CLASSES:
    raise ValueError(f"ADE20K annotation value {int(raw.max())} > {ADE20K_NUM_CLASSES}")
  out = raw.astype(np.int16) - 1
  return np.where(out < 0, IGNORE_INDEX, out).astype(np.uint8)


class ADE20KSource(grain.sources.RandomAccessDataSource):
  """ADE20K / SceneParse150 as {'image': uint8 [H, W, 3], 'seg': uint8 [H, W]}."""

  def __init__(self, root: str, split: str = "train", image_size=512):
    sub = {"train": "training", "training": "training", "val": "validation",
           "validation": "validation"}.get(split)
    if sub is None:
      raise ValueError(f"ADE20K split={split!r}: expected 'train' or 'val'")
    base = os.path.join(root, "ADEChallengeData2016")
    base = base if os.path.isdir(base) else root
    img_dir = _require_dir(os.path.join(base, "images", sub), f"ADE20K {split} images")
    ann_dir = _require_dir(os.path.join(base, "annotations", sub), f"ADE20K {split} annotations")
    self.files = []
    for img in _images_in(img_dir):
      ann = os.path.join(ann_dir, os.path.splitext(os.path.basename(img))[0] + ".png")
      if not os.path.isfile(ann):
        raise FileNotFoundError(f"ADE20K: image {img!r} has no annotation {ann!r}")
      self.files.append((img, ann))
    if not self.files:
      raise FileNotFoundError(f"ADE20K {split}: no images in {img_dir!r}")
    self.size_hw = _size_hw(image_size)

  def __len__(self) -> int:
    return len(self.files)

  def __getitem__(self, i: int) -> dict:
    img_path, ann_path = self.files[int(i)]
    image = _rgb(img_path, self.size_hw)
    ann = _open(ann_path, "ADE20K annotation")
    if ann.mode not in ("L", "P"):
      raise ValueError(f"ADE20K annotation {ann_path!r}: expected an 8-bit PNG, got mode {ann.mode}")
    ann = np.asarray(fit_image(ann, self.size_hw, Image.Resampling.NEAREST))
    if ann.shape != image.shape[:2]:
      raise ValueError(f"ADE20K: annotation {ann_path!r} is {ann.shape}, image {img_path!r} is "
                       f"{image.shape[:2]} (sizes must match)")
    return {"image": image, "seg": ade20k_labels(ann)}

  def describe(self, i: int) -> str:
    return self.files[int(i)][0]


def nyu_depth_metres(raw_mm: np.ndarray, *, eigen_crop: bool, min_depth: float = NYU_MIN_DEPTH,
                     max_depth: float = NYU_MAX_DEPTH) -> np.ndarray:
  """16-bit NYUv2 depth (mm) -> metres, 0 outside (min_depth, max_depth) and the Eigen crop.

  The Eigen crop is given on 480x640 frames and scaled to other frame sizes.
  """
  depth = np.asarray(raw_mm, np.float64) / NYU_DEPTH_SCALE  # float64: exact range checks
  valid = (depth > min_depth) & (depth < max_depth)
  if eigen_crop:
    h, w = depth.shape
    t, b, l, r = NYU_EIGEN_CROP
    crop = np.zeros_like(valid)
    crop[round(t * h / 480):round(b * h / 480), round(l * w / 640):round(r * w / 640)] = True
    valid &= crop
  return np.where(valid, depth, 0.0).astype(np.float32)


class NYUv2Source(grain.sources.RandomAccessDataSource):
  """NYUv2 (toolbox / BTS Eigen split) as {'image': uint8 [H, W, 3], 'depth': float32 [H, W]}.

  split 'train' reads <root>/nyu_train.txt, 'test' <root>/nyu_test.txt (or `split_file`).
  Depth is in metres with 0 marking invalid pixels: outside (min_depth, max_depth),
  and outside the Eigen crop when `eigen_crop` (default: on for 'test', as evaluated).
  """

  def __init__(self, root: str, split: str = "train", image_size=(480, 640),
               split_file: str | None = None, eigen_crop: bool | None = None,
               min_depth: float = NYU_MIN_DEPTH, max_depth: float = NYU_MAX_DEPTH):
    if split not in ("train", "test"):
      raise ValueError(f"NYUv2 split={split!r}: expected 'train' or 'test'")
    _require_dir(root, "NYUv2 root")
    split_file = split_file or os.path.join(root, f"nyu_{split}.txt")
    if not os.path.isfile(split_file):
      raise FileNotFoundError(f"NYUv2 {split}: split file {split_file!r} does not exist (lines "
                              "'rgb_path depth_path [focal]', paths relative to the root)")
    self.files = []
    with open(split_file, encoding="utf-8") as f:
      for n, line in enumerate(f, 1):
        parts = line.split()
        if not parts:
          continue
        if len(parts) < 2:
          raise ValueError(f"{split_file}:{n}: expected 'rgb_path depth_path [focal]', got "
                           f"{line.strip()!r}")
        if parts[1] == "None":  # Frames without depth in the BTS lists.
          continue
        rgb, dep = (os.path.join(root, p.lstrip("/\\")) for p in parts[:2])
        for p in (rgb, dep):
          if not os.path.isfile(p):
            raise FileNotFoundError(f"{split_file}:{n}: file {p!r} does not exist")
        self.files.append((rgb, dep))
    if not self.files:
      raise ValueError(f"NYUv2 {split}: split file {split_file!r} lists no frames")
    self.files.sort()  # The toolbox sorts by file name; keep the same order.
    self.size_hw = _size_hw(image_size)
    self.eigen_crop = (split == "test") if eigen_crop is None else bool(eigen_crop)
    self.min_depth, self.max_depth = float(min_depth), float(max_depth)

  def __len__(self) -> int:
    return len(self.files)

  def __getitem__(self, i: int) -> dict:
    rgb_path, dep_path = self.files[int(i)]
    image = _rgb(rgb_path, self.size_hw)
    raw = _open(dep_path, "NYUv2 depth")
    if raw.mode not in ("I", "I;16", "I;16B"):
      raise ValueError(f"NYUv2 depth {dep_path!r}: expected a 16-bit PNG in mm, got mode {raw.mode}")
    depth = nyu_depth_metres(np.asarray(raw), eigen_crop=self.eigen_crop,
                             min_depth=self.min_depth, max_depth=self.max_depth)
    depth = np.asarray(fit_image(Image.fromarray(depth), self.size_hw, Image.Resampling.NEAREST))
    if depth.shape != image.shape[:2]:
      raise ValueError(f"NYUv2: depth {dep_path!r} is {depth.shape}, image {rgb_path!r} is "
                       f"{image.shape[:2]} (sizes must match)")
    return {"image": image, "depth": depth.astype(np.float32)}

  def describe(self, i: int) -> str:
    return self.files[int(i)][0]


# --- configuration -----------------------------------------------------------------


def image_data_config() -> ml_collections.ConfigDict:
  """Which image source to read and where from (paths default to the public layouts)."""
  c = ml_collections.ConfigDict()
  c.source = "scenes"  # 'scenes' | 'fashion_mnist' | 'imagenet' | 'ade20k' | 'nyuv2'
  c.root = ""  # imagenet / ade20k / nyuv2: the dataset root (see the module docstring).
  c.fashion_dir = FASHION_MNIST_DIR
  c.image_size = 32
  c.scenes = scenes.scene_config()
  return c


def make_image_source(cfg, split: str):
  """The data source named by cfg.source for `split` (that source's own split names)."""
  size = cfg.image_size
  if cfg.source == "scenes":
    sc = cfg.scenes.copy_and_resolve_references()
    sc.image_size, sc.fashion_dir = size, cfg.fashion_dir
    return scenes.make_scene_source(sc, split)
  if cfg.source == "fashion_mnist":
    return FashionMNISTSource(split, cfg.fashion_dir, image_size=size, rgb=True)
  if cfg.source in ("imagenet", "ade20k", "nyuv2"):
    if not cfg.root:
      raise ValueError(f"data source {cfg.source!r} needs its dataset root: set root")
    cls = {"imagenet": ImageNetFolderSource, "ade20k": ADE20KSource, "nyuv2": NYUv2Source}
    return cls[cfg.source](cfg.root, split, image_size=size)
  raise ValueError(f"source={cfg.source!r}: expected 'scenes', 'fashion_mnist', 'imagenet', "
                   "'ade20k' or 'nyuv2'")


# --- batching ----------------------------------------------------------------------


_PAD_VALUE = {"label": -1, "seg": IGNORE_INDEX, "depth": 0.0}
_OUT_DTYPE = {"label": np.int32, "seg": np.int32, "depth": np.float32}


class _Collate:
  """Records -> batch: float32 images in [0, 1], int32 labels; pads a short batch.

  Padding rows have image 0, label -1, seg 255, depth 0 (so losses skip them) and
  mask 0; real rows have mask 1.
  """

  def __init__(self, batch_size: int):
    self.batch_size = batch_size

  def __call__(self, records: Sequence[dict]) -> dict:
    n = len(records)
    out = {}
    for key in records[0]:
      vals = [r[key] for r in records]
      shapes = {np.shape(v) for v in vals}
      if len(shapes) > 1:
        raise ValueError(f"cannot batch field {key!r} of different shapes {sorted(shapes)}: set "
                         "image_size so every record is resized to the same size")
      arr = np.stack(vals)
      if key == "image":
        arr = arr.astype(np.float32) / np.float32(255.0)
      elif key in _OUT_DTYPE:
        arr = arr.astype(_OUT_DTYPE[key])
      if n < self.batch_size:
        pad = np.full((self.batch_size - n,) + arr.shape[1:], _PAD_VALUE.get(key, 0), arr.dtype)
        arr = np.concatenate([arr, pad])
      out[key] = arr
    out["mask"] = (np.arange(self.batch_size) < n).astype(np.float32)
    return out


def make_image_dataset(source, *, batch_size: int, seed: int = 0, train: bool = True,
                       num_epochs: int | None = None, process_index: int = 0,
                       process_count: int = 1) -> grain.MapDataset:
  """Batches of `source` as a grain MapDataset (see make_image_iterator)."""
  if batch_size < 1:
    raise ValueError(f"batch_size={batch_size}: expected >= 1")
  if process_count < 1 or not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index}, process_count={process_count}: expected "
                     "0 <= process_index < process_count")
  if num_epochs is not None and num_epochs < 1:
    raise ValueError(f"num_epochs={num_epochs}: expected >= 1 or None")
  ds = grain.MapDataset.source(source)[process_index::process_count]
  if not len(ds):
    raise ValueError(f"the source has {len(source)} records, fewer than the {process_count} "
                     f"processes: process {process_index} gets none")
  if train:
    ds = ds.shuffle(seed=int(np.random.SeedSequence(int(seed)).generate_state(1)[0]))
  ds = ds.repeat(num_epochs if num_epochs is not None else (None if train else 1))
  # Train batches are always full; an eval pass ends with a padded batch (mask 0).
  return ds.batch(batch_size, drop_remainder=train, batch_fn=_Collate(batch_size))


def make_image_iterator(source, *, batch_size: int, seed: int = 0, train: bool = True,
                        num_epochs: int | None = None, process_index: int = 0,
                        process_count: int = 1, read_threads: int = 0) -> grain.DatasetIterator:
  """A checkpointable iterator of image batches for this process.

  Batches are dicts: image float32 [B, H, W, C] in [0, 1], the source's label
  fields (label int32 [B], seg int32 [B, H, W], depth float32 [B, H, W]) and
  mask float32 [B]. train=True shuffles with `seed` (reshuffled every epoch) and
  repeats forever unless num_epochs is set; train=False reads the source once in
  order, ending with a padded batch. `get_state()` / `set_state()` resume
  exactly. Each process reads records process_index::process_count.
  """
  ds = make_image_dataset(source, batch_size=batch_size, seed=seed, train=train,
                          num_epochs=num_epochs, process_index=process_index,
                          process_count=process_count)
  opts = grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=4 if read_threads else 0)
  return iter(ds.to_iter_dataset(opts))
