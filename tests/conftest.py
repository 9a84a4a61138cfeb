"""Test set-up: 8 simulated CPU devices (for sharding tests) before JAX is imported."""

import contextlib
import os
import string

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Keep the measured-peak cache out of the user's home and avoid measuring in tests.
os.environ.setdefault("VPT_CPU_PEAK_FLOPS", "1e11")

# ../shared beside the repository holds data for tests (GSM8K); VPT_SHARED_DIR overrides.
SHARED_DIR = os.environ.get(
    "VPT_SHARED_DIR", os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..", "shared"))
GSM8K_DIR = os.path.join(SHARED_DIR, "data", "gsm8k")


# Fashion-MNIST for the vision tests without a manual install step: a generated stand-in in the real idx
# layout, unless VPT_FASHION_MNIST_DIR already names a directory (e.g. the Debian package's, for the real images).
if not os.environ.get("VPT_FASHION_MNIST_DIR"):
  import fashion_stand_in  # noqa: E402
  os.environ["VPT_FASHION_MNIST_DIR"] = fashion_stand_in.directory_for()  # before vpt.data.images reads it
  fashion_stand_in.ensure(os.environ["VPT_FASHION_MNIST_DIR"])

import pytest  # noqa: E402

from vpt.data.tokenizer import Tokenizer  # noqa: E402 (after XLA_FLAGS; imports no JAX)


class CharTokenizer(Tokenizer):
  """One token per printable character; 0 pad, 1 bos, 2 eos (generation and evaluator tests)."""

  def __init__(self):
    chars = sorted(set(string.printable))
    self.pad_id, self.bos_id, self.eos_id = 0, 1, 2
    self._ids = {c: i + 3 for i, c in enumerate(chars)}
    self._chars = {i: c for c, i in self._ids.items()}
    self.vocab_size = len(chars) + 3

  def encode(self, text):
    return [self._ids.get(c, self._ids["?"]) for c in text]

  def decode(self, ids):
    return "".join(self._chars.get(int(i), "") for i in ids)


def packed_segments(batches):
  """(inputs, targets, loss_mask) of every packed example of grain LM batches, in row order."""
  out = []
  for b in batches:
    for r in range(b["inputs"].shape[0]):
      seg = b["segment_ids"][r]
      for s in range(1, seg.max() + 1):
        m = seg == s
        out.append((b["inputs"][r][m], b["targets"][r][m], b["loss_mask"][r][m]))
  return out


def assert_batches_equal(xs, ys):
  """Two lists of host batches (dicts of numpy arrays) are identical, dtypes included."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  assert len(xs) == len(ys)
  for x, y in zip(xs, ys):
    assert x.keys() == y.keys()
    for k in x:
      assert x[k].dtype == y[k].dtype and np.array_equal(x[k], y[k]), k


@contextlib.contextmanager
def persistent_xla_cache(directory):
  """JAX's persistent compilation cache in `directory` for a block (a test module whose runs compile
  identical programs: each is compiled once); the previous settings afterwards."""
  import jax  # pylint: disable=g-import-not-at-top
  from jax._src import compilation_cache  # pylint: disable=g-import-not-at-top
  before = (jax.config.jax_compilation_cache_dir, jax.config.jax_persistent_cache_min_compile_time_secs)
  jax.config.update("jax_compilation_cache_dir", directory)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  compilation_cache.reset_cache()
  try:
    yield directory
  finally:
    jax.config.update("jax_compilation_cache_dir", before[0])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", before[1])
    compilation_cache.reset_cache()


@pytest.fixture
def x64():
  """Float64 for one test: the explicit references the math is checked against."""
  import jax  # pylint: disable=g-import-not-at-top (conftest imports no JAX before XLA_FLAGS is set)
  jax.config.update("jax_enable_x64", True)
  yield
  jax.config.update("jax_enable_x64", False)
