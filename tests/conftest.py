"""Test set-up: 8 simulated CPU devices (for sharding tests) and a persistent XLA compilation cache,
both before JAX is imported.

The cache: most of the suite's time is XLA compiling, and many tests compile the same program more
than once — a resume test compiles it in the preempted subprocess, in the resumed run and in the
uninterrupted one. One cache directory per test worker (pytest-xdist), inherited by the subprocesses
the tests start, compiles each program once (tests/test_tpu_compile.py turns it off: libtpu's
compile-only client cannot load a cached executable back). A cached executable is the one XLA built for the same
program, options and devices, so results are bit-identical; a developer's own JAX_COMPILATION_CACHE_DIR
is respected.
"""

import atexit
import os
import shutil
import signal
import string
import subprocess
import sys
import tempfile
import time

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Keep the measured-peak cache out of the user's home and avoid measuring in tests.
os.environ.setdefault("VPT_CPU_PEAK_FLOPS", "1e11")
if "JAX_COMPILATION_CACHE_DIR" not in os.environ or "VPT_TEST_XLA_CACHE_ROOT" in os.environ:
  _root = os.environ.get("VPT_TEST_XLA_CACHE_ROOT")
  if _root is None:  # pytest's main process makes the root; its xdist workers inherit it, each its own subdirectory
    _root = tempfile.mkdtemp(prefix="vpt-xla-cache-")
    atexit.register(shutil.rmtree, _root, ignore_errors=True)
    os.environ["VPT_TEST_XLA_CACHE_ROOT"] = _root
  os.environ["JAX_COMPILATION_CACHE_DIR"] = os.path.join(_root, os.environ.get("PYTEST_XDIST_WORKER", "main"))
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
  # A size bound makes JAX lock the directory around reads and writes (a test and the subprocesses it
  # starts may compile at once); it is far above what the suite writes.
  os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(32 << 30))

# ../shared beside the repository holds data for tests (GSM8K); VPT_SHARED_DIR overrides.
SHARED_DIR = os.environ.get(
    "VPT_SHARED_DIR", os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..", "shared"))
GSM8K_DIR = os.path.join(SHARED_DIR, "data", "gsm8k")


# Fashion-MNIST for the vision tests without a manual install step: a generated stand-in in the real idx
# layout, unless VPT_FASHION_MNIST_DIR already names a directory (e.g. the Debian package's, for the real images).
if not os.environ.get("VPT_FASHION_MNIST_DIR"):
  import fashion_stand_in  # noqa: E402
  os.environ["VPT_FASHION_MNIST_DIR"] = fashion_stand_in.directory_for()  # before vpt.vision.data.images reads it
  fashion_stand_in.ensure(os.environ["VPT_FASHION_MNIST_DIR"])

import pytest  # noqa: E402

from vpt.language.data.tokenizer import Tokenizer  # noqa: E402 (after XLA_FLAGS; imports no JAX)


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


def preempt_run(argv, workdir, after_step: int, *, timeout: float = 180.0, cwd=None):
  """Starts `python -m vpt.main --workdir=workdir *argv` as a real process, sends it SIGTERM once its
  metrics.jsonl has logged `after_step` (or a later step), and returns (exit code, its output). The
  process is killed if it ends early, never gets there within `timeout` s, or the test fails."""
  from vpt.core import metrics  # pylint: disable=g-import-not-at-top (conftest imports no JAX before XLA_FLAGS is set)
  jsonl = os.path.join(str(workdir), "metrics.jsonl")
  reached = lambda: os.path.exists(jsonl) and any(r.get("step", 0) >= after_step for r in metrics.read_jsonl(jsonl))

  with tempfile.TemporaryFile("w+") as log:  # a file, not a pipe: a full pipe would stall the run
    proc = subprocess.Popen([sys.executable, "-m", "vpt.main", f"--workdir={workdir}", *argv], cwd=cwd,
                            env=dict(os.environ), stdout=log, stderr=subprocess.STDOUT, text=True)
    output = lambda: (log.seek(0), log.read())[1]
    try:
      deadline = time.time() + timeout
      while not reached():
        if proc.poll() is not None or time.time() > deadline:
          raise AssertionError(f"the run ended or stalled before step {after_step}:\n{output()}")
        time.sleep(0.02)
      proc.send_signal(signal.SIGTERM)
      proc.wait(timeout=120)
    finally:
      if proc.poll() is None:
        proc.kill()
        proc.wait()
    return proc.returncode, output()


@pytest.fixture
def x64():
  """Float64 for one test: the explicit references the math is checked against."""
  import jax  # pylint: disable=g-import-not-at-top (conftest imports no JAX before XLA_FLAGS is set)
  jax.config.update("jax_enable_x64", True)
  yield
  jax.config.update("jax_enable_x64", False)
