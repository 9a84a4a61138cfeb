"""Vision data: idx files, Fashion-MNIST, the ImageNet / ADE20K / NYUv2 loaders on tiny
fixture trees in their public layouts, grain batching, and the procedural scenes."""

from __future__ import annotations

import gzip
import os
import pathlib
import pickle

import numpy as np
import pytest
from PIL import Image

from vpt.vision.data import fashion_mnist, images, scenes


# --- idx / Fashion-MNIST ------------------------------------------------------------


@pytest.mark.parametrize("name", ["a.idx", "a.idx.gz"])
@pytest.mark.parametrize("array", [
    np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4),
    np.array([[-70000, 5], [3, 2 ** 30]], np.int32),
    np.array([1.5, -2.25, 1e-3], np.float32),
    np.array([-3, 7], np.int16),
])
def test_idx_round_trip(tmp_path, name, array):
  path = fashion_mnist.write_idx(str(tmp_path / name), array)
  back = fashion_mnist.read_idx(path)
  assert back.dtype == array.dtype and back.shape == array.shape
  np.testing.assert_array_equal(back, array)


def test_idx_layout_is_the_mnist_one(tmp_path):
  """Header bytes as in the MNIST spec: 00 00 08 03, then big-endian dims, then the data."""
  path = fashion_mnist.write_idx(str(tmp_path / "x.idx"), np.arange(6, dtype=np.uint8).reshape(1, 2, 3))
  raw = pathlib.Path(path).read_bytes()
  assert raw == bytes([0, 0, 8, 3, 0, 0, 0, 1, 0, 0, 0, 2, 0, 0, 0, 3, 0, 1, 2, 3, 4, 5])


def test_idx_errors_name_the_file(tmp_path):
  good = np.zeros((2, 5), np.uint8)
  bad_magic = tmp_path / "bad_magic.idx"
  bad_magic.write_bytes(b"\x01\x02\x08\x02" + b"\x00" * 18)
  with pytest.raises(ValueError, match=r"bad_magic\.idx.*bad magic number 01020802"):
    fashion_mnist.read_idx(str(bad_magic))
  unknown_type = tmp_path / "type.idx"
  unknown_type.write_bytes(b"\x00\x00\x07\x01\x00\x00\x00\x01\x00")
  with pytest.raises(ValueError, match=r"type\.idx.*bad magic"):
    fashion_mnist.read_idx(str(unknown_type))
  raw = pathlib.Path(fashion_mnist.write_idx(str(tmp_path / "ok.idx"), good)).read_bytes()
  (tmp_path / "short.idx").write_bytes(raw[:-1])
  with pytest.raises(ValueError, match=r"short\.idx.*truncated.*need 22 bytes, the file has 21"):
    fashion_mnist.read_idx(str(tmp_path / "short.idx"))
  (tmp_path / "header.idx").write_bytes(raw[:6])
  with pytest.raises(ValueError, match=r"header\.idx.*truncated: the header"):
    fashion_mnist.read_idx(str(tmp_path / "header.idx"))
  (tmp_path / "long.idx").write_bytes(raw + b"\x00")
  with pytest.raises(ValueError, match=r"long\.idx.*longer than its header"):
    fashion_mnist.read_idx(str(tmp_path / "long.idx"))
  gz = gzip.compress(raw)
  (tmp_path / "cut.idx.gz").write_bytes(gz[:len(gz) // 2])
  with pytest.raises(ValueError, match=r"cut\.idx\.gz.*cannot be read"):
    fashion_mnist.read_idx(str(tmp_path / "cut.idx.gz"))
  with pytest.raises(FileNotFoundError, match=r"nothere\.idx"):
    fashion_mnist.read_idx(str(tmp_path / "nothere.idx"))


def test_fashion_mnist_files_of_the_configured_directory():
  # FASHION_MNIST_DIR: the Debian package's files, or the generated stand-in that tests/conftest.py
  # points VPT_FASHION_MNIST_DIR at on a machine without them (both in the real idx layout).
  x, y = fashion_mnist.load_fashion_mnist("train")
  assert x.ndim == 3 and x.shape[1:] == (28, 28) and x.dtype == np.uint8
  assert y.shape == x.shape[:1] and y.min() == 0 and y.max() == 9
  np.testing.assert_array_equal(np.bincount(y), [len(y) // 10] * 10)  # Fashion-MNIST is balanced.
  xt, yt = fashion_mnist.load_fashion_mnist("test")
  assert xt.shape[1:] == (28, 28) and yt.shape == xt.shape[:1] and len(yt) < len(y)
  np.testing.assert_array_equal(np.bincount(yt), [len(yt) // 10] * 10)
  assert x[0].max() > 100 and not x.flags.writeable  # real pixels; the cache cannot be mutated.
  src = images.FashionMNISTSource("test", image_size=32, rgb=True)
  r = src[3]
  assert r["image"].shape == (32, 32, 3) and r["image"].dtype == np.uint8 and r["label"] == yt[3]


def test_fashion_mnist_directory_override_and_missing(tmp_path):
  imgs = np.arange(4 * 28 * 28, dtype=np.uint8).reshape(4, 28, 28)
  fashion_mnist.write_idx(str(tmp_path / "t10k-images-idx3-ubyte"), imgs)  # uncompressed also works
  fashion_mnist.write_idx(str(tmp_path / "t10k-labels-idx1-ubyte.gz"), np.array([3, 1, 4, 1], np.uint8))
  x, y = fashion_mnist.load_fashion_mnist("test", str(tmp_path))
  np.testing.assert_array_equal(x, imgs)
  np.testing.assert_array_equal(y, [3, 1, 4, 1])
  with pytest.raises(FileNotFoundError, match=r"train-images-idx3-ubyte.*dataset-fashion-mnist"):
    fashion_mnist.load_fashion_mnist("train", str(tmp_path))
  fashion_mnist.write_idx(str(tmp_path / "train-images-idx3-ubyte"), imgs)
  fashion_mnist.write_idx(str(tmp_path / "train-labels-idx1-ubyte"), np.array([3, 1, 4], np.uint8))
  with pytest.raises(ValueError, match=r"train-labels-idx1-ubyte.*expected 4 uint8 labels"):
    fashion_mnist.load_fashion_mnist("train", str(tmp_path))


# --- real-layout loaders on fixtures ------------------------------------------------


def _save(path, array, **kw):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.fromarray(array).save(path, **kw)


def test_imagenet_folder_layout(tmp_path):
  rng = np.random.default_rng(0)
  root = tmp_path / "imagenet"
  for wnid, n in (("n02", 2), ("n01", 3), ("n10", 1)):
    for k in range(n):
      _save(str(root / "train" / wnid / f"{wnid}_{k}.JPEG"), rng.integers(0, 255, (20, 30, 3), np.uint8))
  _save(str(root / "val" / "n10" / "ILSVRC2012_val_1.JPEG"), np.full((40, 24, 3), 200, np.uint8))
  gray = np.full((16, 16), 90, np.uint8)
  _save(str(root / "val" / "n01" / "ILSVRC2012_val_2.JPEG"), gray)  # grayscale JPEG -> RGB
  train = images.ImageNetFolderSource(str(root), "train", image_size=16)
  assert train.wnids == ["n01", "n02", "n10"] and len(train) == 6
  assert [train[i]["label"] for i in range(6)] == [0, 0, 0, 1, 1, 2]
  assert all(train[i]["image"].shape == (16, 16, 3) for i in range(6))
  val = images.ImageNetFolderSource(str(root), "val", image_size=(8, 12))
  assert [int(val[i]["label"]) for i in range(2)] == [0, 2]  # class ids from the train wnids
  assert val[0]["image"].shape == (8, 12, 3) and abs(int(val[0]["image"].mean()) - 90) <= 2
  with pytest.raises(FileNotFoundError, match=r"ImageNet val split.*nope.*val"):
    images.ImageNetFolderSource(str(tmp_path / "nope"), "val")
  _save(str(root / "val" / "n99" / "x.JPEG"), gray)
  with pytest.raises(ValueError, match=r"class folder 'n99'.*not among the 3 classes"):
    images.ImageNetFolderSource(str(root), "val")


def test_fit_image_scales_to_cover_then_center_crops():
  # A 20x40 label map: left half 3, right half 7. To 16x16: scale 0.8 -> 16x32, keep
  # columns 8..24, i.e. 8 columns of each label; nearest neighbour creates no new values.
  lab = np.zeros((20, 40), np.uint8)
  lab[:, :20], lab[:, 20:] = 3, 7
  out = np.asarray(images.fit_image(Image.fromarray(lab), (16, 16), Image.Resampling.NEAREST))
  assert out.shape == (16, 16)
  np.testing.assert_array_equal(out[:, :8], 3)
  np.testing.assert_array_equal(out[:, 8:], 7)


def _ade_fixture(root):
  base = root / "ADEChallengeData2016"
  ann = np.zeros((20, 30), np.uint8)
  ann[:10, :15], ann[:10, 15:], ann[10:, :15] = 1, 150, 75  # bottom right stays 0
  for split, name in (("training", "ADE_train_00000001"), ("validation", "ADE_val_00000001")):
    _save(str(base / "images" / split / f"{name}.jpg"), np.full((20, 30, 3), 128, np.uint8))
    _save(str(base / "annotations" / split / f"{name}.png"), ann)
  return base, ann


def test_ade20k_layout_and_label_mapping(tmp_path):
  base, ann = _ade_fixture(tmp_path)
  src = images.ADE20KSource(str(tmp_path), "train", image_size=None)
  r = src[0]
  assert r["image"].shape == (20, 30, 3) and r["seg"].dtype == np.uint8
  expected = np.full((20, 30), 255, np.uint8)
  expected[:10, :15], expected[:10, 15:], expected[10:, :15] = 0, 149, 74
  np.testing.assert_array_equal(r["seg"], expected)
  np.testing.assert_array_equal(images.ade20k_labels(np.arange(151)),
                                np.r_[255, np.arange(150)].astype(np.uint8))
  # Resized (the root may also be ADEChallengeData2016 itself): nearest keeps the label set.
  val = images.ADE20KSource(str(base), "val", image_size=10)[0]
  assert val["image"].shape == (10, 10, 3) and val["seg"].shape == (10, 10)
  assert set(np.unique(val["seg"])) == {0, 74, 149, 255}
  os.remove(base / "annotations" / "training" / "ADE_train_00000001.png")
  with pytest.raises(FileNotFoundError, match=r"ADE_train_00000001\.jpg.*no annotation"):
    images.ADE20KSource(str(tmp_path), "train")
  with pytest.raises(FileNotFoundError, match=r"ADE20K train images.*missing"):
    images.ADE20KSource(str(tmp_path / "missing"), "train")
  with pytest.raises(ValueError, match=r"ADE20K annotation value 151"):
    images.ade20k_labels(np.array([151]))


def _nyu_fixture(root, h=48, w=64):
  depth = np.full((h, w), 2500, np.uint16)  # 2.5 m
  depth[0, 0], depth[h // 2, w // 2], depth[h // 2, w // 2 + 1] = 0, 12000, 1234  # invalid, >10 m, 1.234 m
  lines = {"train": [], "test": []}
  for split, scene in (("train", "kitchen_0028b"), ("test", "bathroom")):
    for k in range(2):
      _save(str(root / scene / f"rgb_{k:05d}.jpg"), np.full((h, w, 3), 60 * (k + 1), np.uint8))
      _save(str(root / scene / f"sync_depth_{k:05d}.png"), depth + k)
      lines[split].append(f"/{scene}/rgb_{k:05d}.jpg /{scene}/sync_depth_{k:05d}.png 518.8579")
  (root / "nyu_train.txt").write_text("\n".join(lines["train"]) + "\n/scene/rgb_9.jpg None 518.8579\n")
  (root / "nyu_test.txt").write_text("\n".join(lines["test"]) + "\n")
  return depth


def test_nyu_layout_and_depth_scaling(tmp_path):
  raw = _nyu_fixture(tmp_path)
  with Image.open(tmp_path / "bathroom" / "sync_depth_00000.png") as png:
    assert png.mode.startswith("I")  # a 16-bit PNG
  train = images.NYUv2Source(str(tmp_path), "train", image_size=None)
  assert len(train) == 2  # the 'None' depth line is skipped, like the toolbox does
  r = train[0]
  assert r["image"].shape == (48, 64, 3) and r["depth"].dtype == np.float32
  expected = raw.astype(np.float64) / 1000.0
  expected[24, 32] = 0.0  # 12 m is beyond max_depth 10 m
  np.testing.assert_allclose(r["depth"], expected, rtol=1e-6)
  assert r["depth"][24, 33] == pytest.approx(1.234) and r["depth"][0, 0] == 0
  assert abs(int(r["image"].mean()) - 60) <= 2 and abs(int(train[1]["image"].mean()) - 120) <= 2
  test = images.NYUv2Source(str(tmp_path), "test", image_size=None)[0]
  # Eigen crop (45:471, 41:601 on 480x640) scaled to 48x64: rows 4:47 (round(4.5) = 4), cols 4:60.
  inside = np.zeros((48, 64), bool)
  inside[4:47, 4:60] = True
  assert np.all(test["depth"][~inside] == 0)
  assert test["depth"][10, 10] == pytest.approx(2.5)
  resized = images.NYUv2Source(str(tmp_path), "test", image_size=(24, 32))[0]
  assert resized["image"].shape == (24, 32, 3) and resized["depth"].shape == (24, 32)
  assert set(np.unique(resized["depth"])) <= set(np.unique(test["depth"]))  # nearest: no mixing
  with pytest.raises(FileNotFoundError, match=r"split file .*nyu_test\.txt"):
    images.NYUv2Source(str(tmp_path / "kitchen_0028b"), "test")
  (tmp_path / "bad.txt").write_text("/bathroom/rgb_00000.jpg /bathroom/sync_depth_00007.png\n")
  with pytest.raises(FileNotFoundError, match=r"bad\.txt:1: file .*sync_depth_00007\.png"):
    images.NYUv2Source(str(tmp_path), "train", split_file=str(tmp_path / "bad.txt"))
  with pytest.raises(FileNotFoundError, match=r"NYUv2 root.*absent"):
    images.NYUv2Source(str(tmp_path / "absent"), "train")


def test_nyu_depth_validity_range():
  raw = np.array([[0, 1, 2, 9999, 10000, 10001]], np.uint16)
  d = images.nyu_depth_metres(raw, eigen_crop=False)
  np.testing.assert_allclose(d, [[0, 0, 0.002, 9.999, 0, 0]], rtol=1e-6)  # (1e-3, 10) exclusive


# --- batching -----------------------------------------------------------------------


def test_train_iterator_batches_and_resumes(tmp_path):
  _ade_fixture(tmp_path)
  src = scenes.SceneSource("labeled_train", 10, image_size=16)
  it = images.make_image_iterator(src, batch_size=4, seed=3, train=True)
  b = next(it)
  assert b["image"].shape == (4, 16, 16, 3) and b["image"].dtype == np.float32
  assert 0.0 <= b["image"].min() and b["image"].max() <= 1.0
  assert b["seg"].dtype == np.int32 and b["depth"].shape == (4, 16, 16) and b["label"].shape == (4,)
  np.testing.assert_array_equal(b["mask"], 1)
  state = it.get_state()
  after = [next(it) for _ in range(4)]  # crosses an epoch boundary (10 records, batches of 4)
  it2 = images.make_image_iterator(src, batch_size=4, seed=3, train=True)
  it2.set_state(state)
  for a, c in zip(after, [next(it2) for _ in range(4)]):
    for k in a:
      np.testing.assert_array_equal(a[k], c[k])
  other = next(images.make_image_iterator(src, batch_size=4, seed=4, train=True))
  assert not np.array_equal(other["image"], b["image"])  # the seed changes the order


def test_eval_iterator_reads_each_record_once_and_pads(tmp_path):
  src = scenes.SceneSource("val", 5, image_size=16)
  batches = list(images.make_image_iterator(src, batch_size=2, train=False))
  assert len(batches) == 3
  np.testing.assert_array_equal(np.concatenate([b["mask"] for b in batches]), [1, 1, 1, 1, 1, 0])
  np.testing.assert_array_equal(np.concatenate([b["label"] for b in batches])[:5],
                                [src[i]["label"] for i in range(5)])
  last = batches[-1]
  assert np.all(last["seg"][1] == 255) and np.all(last["depth"][1] == 0) and last["label"][1] == -1
  # Two processes split the records.
  p0 = list(images.make_image_iterator(src, batch_size=2, train=False, process_index=0, process_count=2))
  assert sum(b["mask"].sum() for b in p0) == 3


def test_batching_different_sizes_is_a_clear_error(tmp_path):
  root = tmp_path / "in"
  _save(str(root / "train" / "n01" / "a.JPEG"), np.zeros((8, 8, 3), np.uint8))
  _save(str(root / "train" / "n01" / "b.JPEG"), np.zeros((8, 9, 3), np.uint8))
  src = images.ImageNetFolderSource(str(root), "train", image_size=None)
  with pytest.raises(ValueError, match=r"field 'image' of different shapes.*image_size"):
    next(images.make_image_iterator(src, batch_size=2, train=False))


# --- procedural scenes --------------------------------------------------------------


def test_scenes_are_deterministic_per_seed_and_index():
  a = scenes.ProceduralScenes("train", seed=1, image_size=24)
  b = scenes.ProceduralScenes("train", seed=1, image_size=24)
  for i in (0, 7, 123456):
    ra, rb = a.render(i), b.render(i)
    for k in ("image", "seg", "depth", "label"):
      np.testing.assert_array_equal(ra[k], rb[k])
  assert not np.array_equal(a.render(0)["image"], a.render(1)["image"])
  c = scenes.ProceduralScenes("train", seed=2, image_size=24)
  assert not np.array_equal(a.render(0)["image"], c.render(0)["image"])


def test_scene_splits_are_disjoint():
  ranges = []
  for split in scenes.SPLITS:
    sc = scenes.ProceduralScenes(split, image_size=16)
    cap = scenes._SPLIT_CAPACITY[split]
    ranges.append((sc.global_index(0), sc.global_index(cap - 1), split))
    with pytest.raises(IndexError, match=split):
      sc.global_index(cap)
  ranges.sort()
  for (_, hi, s1), (lo, _, s2) in zip(ranges, ranges[1:]):
    assert hi < lo, (s1, s2)
  # Scenes with the same local index in different splits differ.
  imgs = {s: scenes.ProceduralScenes(s, image_size=16).render(3)["image"].tobytes() for s in scenes.SPLITS}
  assert len(set(imgs.values())) == len(scenes.SPLITS)
  with pytest.raises(ValueError, match=r"size=2000000000.*disjoint"):
    scenes.SceneSource("val", 2_000_000_000, image_size=16)


def test_scene_depth_is_consistent_with_occlusion():
  sc = scenes.ProceduralScenes("labeled_train", image_size=32)
  overlaps = 0
  for i in range(40):
    r = sc.render(i, return_layers=True)
    layers = r["layers"]
    assert 2 <= len(layers) <= 5
    depth, seg = r["depth"], r["seg"]
    assert np.all(depth > 0)
    nearest = np.full(depth.shape, np.inf)
    nearest_cls = np.zeros(depth.shape, np.int64)
    for lay in layers:
      closer = lay["mask"] & (lay["depth"] < nearest)
      nearest[closer], nearest_cls[closer] = lay["depth"], lay["class"]
    covered = np.isfinite(nearest)
    # The labelled depth and class at every covered pixel are those of the nearest object there.
    np.testing.assert_allclose(depth[covered], nearest[covered], rtol=1e-6)
    np.testing.assert_array_equal(seg[covered], nearest_cls[covered])
    assert np.all(seg[~covered] == scenes.BACKGROUND)
    assert np.all(depth[~covered] > scenes.OBJECT_DEPTH[1])  # the ground is behind every object
    count = sum(lay["mask"].astype(int) for lay in layers)
    overlaps += int((count > 1).sum())
    # The image label is the class of an object with the most visible pixels.
    visible = [int(((seg == lay["class"]) & lay["mask"] & (depth == lay["depth"])).sum()) for lay in layers]
    assert r["label"] + 1 in {lay["class"] for lay, v in zip(layers, visible) if v == max(visible)}
  assert overlaps > 100  # occlusion actually happened


def test_scene_classes_in_range_and_all_present():
  src = scenes.SceneSource("val", 300, image_size=32)
  recs = [src[i] for i in range(300)]
  seg = np.stack([r["seg"] for r in recs])
  labels = np.array([r["label"] for r in recs])
  assert seg.max() < scenes.NUM_CLASSES and labels.min() >= 0 and labels.max() < scenes.NUM_IMAGE_CLASSES
  assert np.all(np.bincount(seg.ravel(), minlength=scenes.NUM_CLASSES) > 0)
  assert np.all(np.bincount(labels, minlength=scenes.NUM_IMAGE_CLASSES) > 0)
  assert scenes.NUM_CLASSES == 14 == len(scenes.CLASS_NAMES)
  r = recs[0]
  assert r["image"].shape == (32, 32, 3) and r["image"].dtype == np.uint8
  assert r["depth"].dtype == np.float32 and r["seg"].dtype == np.uint8


def test_scene_config_and_missing_fashion_files(tmp_path):
  cfg = scenes.scene_config()
  cfg.image_size, cfg.num_labeled_meta = 16, 7
  src = scenes.make_scene_source(cfg, "labeled_meta")
  assert len(src) == 7 and src[6]["image"].shape == (16, 16, 3)
  assert "labeled_meta" in src.describe(6)
  with pytest.raises(FileNotFoundError, match=r"t10k-images-idx3-ubyte.*dataset-fashion-mnist"):
    scenes.ProceduralScenes("test", fashion_dir=str(tmp_path))
  with pytest.raises(ValueError, match=r"split='dev'"):
    scenes.make_scene_source(cfg, "dev")


def test_scene_appearance_knobs():
  """object_size scales the objects, ground_color / object_tint bound the colours; bad values name the field."""
  def object_share(**kw):
    sc = scenes.ProceduralScenes("val", image_size=32, min_objects=1, max_objects=1, **kw)
    return np.mean([(sc.render(i)["seg"] != scenes.BACKGROUND).mean() for i in range(40)])
  assert object_share(object_size=1.2) > 2 * object_share(object_size=0.4)
  sc = scenes.ProceduralScenes("val", image_size=32, ground_color=(0.0, 0.2), object_tint=(0.6, 1.0))
  r = sc.render(0)
  ground = r["image"][r["seg"] == scenes.BACKGROUND].astype(np.float64) / 255
  assert ground.max() < 0.2 * 1.2 + 0.15  # the ground's colour range, its ±20 % stripes and texture noise
  with pytest.raises(ValueError, match=r"object_size=0"):
    scenes.ProceduralScenes("val", object_size=0)
  with pytest.raises(ValueError, match=r"ground_color=\(0.5, 0.2\)"):
    scenes.ProceduralScenes("val", ground_color=(0.5, 0.2))
  with pytest.raises(ValueError, match=r"object_tint=\(0.0, 1.5\)"):
    scenes.ProceduralScenes("val", object_tint=(0.0, 1.5))


def test_scene_source_pickles_without_the_fashion_arrays():
  """grain worker processes receive the source pickled: it must stay small and identical."""
  src = scenes.SceneSource("labeled_train", 4, image_size=16)
  blob = pickle.dumps(src)
  assert len(blob) < 10_000
  back = pickle.loads(blob)
  for k in ("image", "seg", "depth"):
    np.testing.assert_array_equal(back[2][k], src[2][k])


def test_make_image_source_from_config(tmp_path):
  cfg = images.image_data_config()
  cfg.image_size = 16
  cfg.scenes.num_val = 3
  src = images.make_image_source(cfg, "val")
  assert len(src) == 3 and src[0]["image"].shape == (16, 16, 3)
  cfg.source = "fashion_mnist"
  assert images.make_image_source(cfg, "test")[0]["image"].shape == (16, 16, 3)
  _ade_fixture(tmp_path)
  cfg.source, cfg.root = "ade20k", str(tmp_path)
  assert images.make_image_source(cfg, "val")[0]["seg"].shape == (16, 16)
  cfg.root = ""
  with pytest.raises(ValueError, match=r"'ade20k' needs its dataset root"):
    images.make_image_source(cfg, "val")
  cfg.source = "cifar"
  with pytest.raises(ValueError, match=r"source='cifar'"):
    images.make_image_source(cfg, "val")
