"""A `gs://` workdir, data and feedback through the real cloud code paths, on a fake bucket.

The fake: fsspec's `gs`/`gcs` protocols (what etils.epath uses for gs://, normally gcsfs) map
`gs://bucket/x` to `<tmp>/bucket/x`. Orbax reaches GCS past fsspec in three places, which are
redirected to the same directory: the tensorstore `gcs` kvstore of the arrays (a `file` kvstore
instead), the bucket's hierarchical-namespace lookup and its bulk delete (google-cloud-storage
clients). tensorboardX writes gs:// with its own google-cloud-storage writer; the fake registers
an epath-backed writer for `gs` there. Everything else — epath, orbax's step directories, commit
markers and retention, grain's iterator state, vpt's own writes — runs unchanged on `gs://` URLs.
"""

import json
import os
import sys

import fsspec
import pytest
from etils.epath import backend as epath_backend
from fsspec.implementations.dirfs import DirFileSystem
from fsspec.implementations.local import LocalFileSystem

from vpt.core import metrics, paths
from vpt.language import train
from vpt.language.data import feedback as feedback_lib, sources
from vpt.vision import train as train_vision

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_train import nano_config  # noqa: E402
from test_train_vision import nano_config as vision_nano_config  # noqa: E402


class _Writer:
  def __init__(self, path):
    self.path, self.buffer = path, b""

  def write(self, data):
    self.buffer += data

  def flush(self):
    paths.path(self.path).write_bytes(self.buffer)  # an object is rewritten whole, as tensorboardX's GCS writer does.

  def close(self):
    self.flush()


class _WriterFactory:
  def open(self, path):
    return _Writer(path)

  def directory_check(self, path):
    pass


@pytest.fixture
def bucket(tmp_path, monkeypatch):
  """The local directory behind gs://; the test runs in an empty cwd to catch local `gs:` dirs."""
  root = tmp_path / "gcs"
  root.mkdir()

  class FakeGCS(DirFileSystem):
    protocol = ("gs", "gcs")
    cachable = False

    def __init__(self, *args, **kwargs):  # gcsfs options (finalize_on_close, ...) are not needed.
      super().__init__(path=str(root), fs=LocalFileSystem(auto_mkdir=True))

    @classmethod
    def _strip_protocol(cls, path):
      if isinstance(path, list):
        return [cls._strip_protocol(p) for p in path]
      for prefix in ("gs://", "gcs://"):
        path = path[len(prefix):] if path.startswith(prefix) else path
      return path.rstrip("/")

  originals = {p: fsspec.get_filesystem_class(p) for p in ("gs", "gcs")}
  for p in originals:
    fsspec.register_implementation(p, FakeGCS, clobber=True)
  epath_backend.fsspec_backend._get_filesystem.cache_clear()

  from orbax.checkpoint._src.path import gcs_utils
  from tensorboardX import record_writer

  def kvstore(path):
    bucket_name, blob = gcs_utils.split_gcs_path(path)
    return {"driver": "file", "path": f"{root}/{bucket_name}/{blob}"}

  def rmtree(path, *, missing_ok=False):
    if not missing_ok or paths.path(path).exists():
      paths.path(path).rmtree()

  monkeypatch.setattr(gcs_utils, "get_kvstore_for_gcs", kvstore)
  monkeypatch.setattr(gcs_utils, "is_hierarchical_namespace_enabled", lambda path: False)
  monkeypatch.setattr(gcs_utils, "rmtree", rmtree)
  monkeypatch.setitem(record_writer.REGISTERED_FACTORIES, "gs", _WriterFactory())
  cwd = tmp_path / "cwd"
  cwd.mkdir()
  monkeypatch.chdir(cwd)
  yield root
  for p, cls in originals.items():
    fsspec.register_implementation(p, cls, clobber=True)
  epath_backend.fsspec_backend._get_filesystem.cache_clear()
  assert not os.listdir(cwd), "a cloud path was written as a local directory"


def test_the_fake_bucket_is_reached_through_gs_urls(bucket):
  p = paths.path("gs://b/x/y.txt")
  paths.write_atomic(p, "hi")
  assert (bucket / "b" / "x" / "y.txt").read_text() == "hi"
  assert paths.norm("gs://b/x") == "gs://b/x" and paths.norm("file:///tmp/a") == "/tmp/a"


@pytest.mark.slow
def test_training_run_with_a_gs_workdir_writes_there_and_resumes(bucket):
  workdir = "gs://bucket/run"
  config = nano_config(num_steps=4, log_every_steps=1, eval_every_steps=4, **{"checkpoint.every_steps": 2})
  first = train.run(config, workdir)
  run = bucket / "bucket" / "run"
  assert json.loads((run / "config.json").read_text())["num_steps"] == 4
  assert json.loads((run / "summary.json").read_text())["step"] == 4
  assert (run / "tokenizer" / "spm.model").is_file()
  assert [r["step"] for r in metrics.read_jsonl(f"{workdir}/metrics.jsonl")] == [1, 2, 3, 4, 4]
  assert any(n.startswith("events") for n in os.listdir(run / "tb"))
  assert (run / "checkpoints" / "4" / "state").is_dir()

  resumed = train.run(nano_config(num_steps=6, log_every_steps=1, eval_every_steps=6,
                                  **{"checkpoint.every_steps": 2}), workdir)
  assert first["step"] == 4 and resumed["start_step"] == 4 and resumed["step"] == 6
  rows = metrics.read_jsonl(f"{workdir}/metrics.jsonl")  # appended to, not replaced
  assert [r["step"] for r in rows] == [1, 2, 3, 4, 4, 5, 6, 6]
  assert sorted(int(d) for d in os.listdir(run / "checkpoints") if d.isdigit())[-1] == 6


@pytest.mark.slow
def test_vision_run_with_a_gs_workdir_writes_there_and_evaluates_from_it(bucket):
  workdir = "gs://bucket/vision"
  summary = train_vision.run(vision_nano_config("dino", num_steps=2, **{"checkpoint.every_steps": 2}), workdir)
  run = bucket / "bucket" / "vision"
  assert summary["step"] == 2 and json.loads((run / "summary.json").read_text())["step"] == 2
  assert json.loads((run / "config.json").read_text())["task"] == "vision"
  assert (run / "checkpoints" / "2" / "state").is_dir()
  assert train_vision.load_run_config(workdir).num_steps == 2


def test_metric_writer_on_gs_keeps_earlier_lines(bucket):
  with metrics.MetricWriter("gs://bucket/m") as w:
    w.write_scalars(1, {"loss": 1.0})
  with metrics.MetricWriter("gs://bucket/m") as w:
    w.write_scalars(2, {"loss": 0.5})
    assert [r["step"] for r in metrics.read_jsonl(w.jsonl_path)] == [1, 2]  # durable after each write
  assert [r["step"] for r in metrics.read_jsonl(str(bucket / "bucket" / "m" / "metrics.jsonl"))] == [1, 2]


def test_data_and_feedback_files_on_gs(bucket):
  for name in ("a", "b"):
    paths.write_atomic(f"gs://bucket/data/{name}.jsonl", "".join(
        json.dumps({"text": f"{name} record {i}"}) + "\n\n" for i in range(3)))
  files = sources.resolve_paths("gs://bucket/data/*.jsonl", "data.train_path")
  assert files == ["gs://bucket/data/a.jsonl", "gs://bucket/data/b.jsonl"]
  src = sources.JsonlSource("gs://bucket/data/*.jsonl", sources._Fields("text", "", ""))
  assert [sources.record_text(src[i]) for i in range(len(src))] == [
      f"{n} record {i}" for n in "ab" for i in range(3)]
  with pytest.raises(FileNotFoundError, match="data.train_path"):
    sources.resolve_paths("gs://bucket/data/*.parquet", "data.train_path")

  paths.write_atomic("gs://bucket/gsm8k/train.jsonl", json.dumps(
      {"question": "1+1?", "answer": "2\n#### 2"}) + "\n")
  assert feedback_lib.load_gsm8k_jsonl("gs://bucket/gsm8k/train.jsonl")[0]["final"] == "2"
