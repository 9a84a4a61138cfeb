"""Tests for vpt.core.metrics: writers, progress output, FLOP accounting, peaks and MFU."""

import glob
import io
import json
import math
import os
import struct
import types

import jax
import numpy as np
import pytest
from tensorboardX.proto import event_pb2
from tensorboardX.record_writer import masked_crc32c

from vpt.core import metrics
from vpt.language.models import lm
from vpt.vision import dino
from vpt.vision.models import vit


def read_tfrecords(path):
  """Minimal TFRecord reader: [len u64][crc u32][data][crc u32], CRCs checked."""
  with open(path, "rb") as f:
    buf = f.read()
  pos, records = 0, []
  while pos < len(buf):
    header = buf[pos:pos + 8]
    (length,) = struct.unpack("<Q", header)
    (header_crc,) = struct.unpack("<I", buf[pos + 8:pos + 12])
    assert header_crc == masked_crc32c(header)
    data = buf[pos + 12:pos + 12 + length]
    (data_crc,) = struct.unpack("<I", buf[pos + 12 + length:pos + 16 + length])
    assert data_crc == masked_crc32c(data)
    records.append(data)
    pos += 16 + length
  return records


def read_events(tb_dir):
  """{tag: [(step, value)]} for scalars and {tag: [(step, text)]} for text summaries."""
  scalars, texts = {}, {}
  files = glob.glob(os.path.join(tb_dir, "events.out.tfevents.*"))
  assert files, f"no event file in {tb_dir}"
  for path in files:
    for record in read_tfrecords(path):
      event = event_pb2.Event.FromString(record)
      for v in event.summary.value:
        if v.HasField("simple_value"):
          scalars.setdefault(v.tag, []).append((event.step, v.simple_value))
        elif v.tensor.string_val:
          texts.setdefault(v.tag, []).append((event.step, v.tensor.string_val[0].decode()))
  return scalars, texts


# ---------------------------------------------------------------------------- writer


def test_writer_jsonl_and_tensorboard_round_trip(tmp_path):
  workdir = str(tmp_path / "run")
  with metrics.MetricWriter(workdir) as w:
    w.write_scalars(1, {"loss": 2.5, "lr": np.float32(1e-3)}, prefix="train")
    w.write_scalars(2, {"loss": jax.numpy.asarray(2.25), "tokens": 4096}, prefix="train")
    w.write_scalars(2, {"loss": 3.0}, prefix="eval/")  # trailing slash tolerated.
    w.write_text(0, "config", "model:\n  d_model: 8")
    # A killed run keeps its lines: readable before close().
    assert len(metrics.read_jsonl(w.jsonl_path)) == 3

  rows = metrics.read_jsonl(os.path.join(workdir, "metrics.jsonl"))
  assert rows == [
      {"step": 1, "train/loss": 2.5, "train/lr": pytest.approx(1e-3)},
      {"step": 2, "train/loss": 2.25, "train/tokens": 4096.0},
      {"step": 2, "eval/loss": 3.0},
  ]
  assert all(type(v) is float for r in rows for k, v in r.items() if k != "step")

  scalars, texts = read_events(os.path.join(workdir, "tb"))
  assert scalars["train/loss"] == [(1, 2.5), (2, 2.25)]
  assert scalars["eval/loss"] == [(2, 3.0)]
  assert scalars["train/lr"] == [(1, pytest.approx(1e-3))]
  assert scalars["train/tokens"] == [(2, 4096.0)]
  assert texts["config/text_summary"] == [(0, "model:\n  d_model: 8")]
  assert metrics.read_jsonl(os.path.join(workdir, "text.jsonl")) == [
      {"step": 0, "name": "config", "text": "model:\n  d_model: 8"}]


def test_writer_nonfinite_values_are_valid_json(tmp_path):
  with metrics.MetricWriter(str(tmp_path)) as w:
    w.write_scalars(3, {"a": float("nan"), "b": float("inf"), "c": -np.inf, "d": 1.0})
  line = (tmp_path / "metrics.jsonl").read_text().strip()
  raw = json.loads(line, parse_constant=lambda c: pytest.fail(f"non-standard JSON {c}"))
  assert raw == {"step": 3, "a": "nan", "b": "inf", "c": "-inf", "d": 1.0}
  row = metrics.read_jsonl(str(tmp_path / "metrics.jsonl"))[0]
  assert math.isnan(row["a"]) and row["b"] == math.inf and row["c"] == -math.inf
  scalars, _ = read_events(str(tmp_path / "tb"))
  assert math.isnan(scalars["a"][0][1]) and scalars["b"] == [(3, math.inf)]


def test_writer_rejects_bad_input(tmp_path):
  with metrics.MetricWriter(str(tmp_path)) as w:
    with pytest.raises(ValueError, match="shape"):
      w.write_scalars(0, {"v": np.zeros(3)})
    with pytest.raises(ValueError, match="step"):
      w.write_scalars(0, {"step": 1.0})


def test_read_jsonl_skips_truncated_last_line(tmp_path):
  path = tmp_path / "m.jsonl"
  path.write_text('{"step": 1, "x": 1.0}\n{"step": 2, "x"')
  assert metrics.read_jsonl(str(path)) == [{"step": 1, "x": 1.0}]


def test_disabled_writer_writes_nothing(tmp_path):
  workdir = tmp_path / "run"
  w = metrics.MetricWriter(str(workdir), enabled=False)
  w.write_scalars(1, {"loss": 1.0}, prefix="train")
  w.write_text(1, "note", "hi")
  w.flush()
  w.close()
  assert not workdir.exists()


# ---------------------------------------------------------------------------- progress


def test_progress_lines_mode_is_compact():
  out = io.StringIO()  # not a TTY -> lines mode.
  bar = metrics.ProgressBar(100, initial_step=0, enabled=True, file=out, print_every=25)
  assert bar.mode == "lines"
  for step in range(1, 101):
    bar.update(step, {"loss": 1.0 / step, "tok/s": 12345.0})
  bar.close()
  lines = out.getvalue().splitlines()
  assert "\r" not in out.getvalue()
  # First update, every 25 steps after it, and the last step.
  assert [int(l.split()[2].split("/")[0]) for l in lines] == [1, 26, 51, 76, 100]
  assert "tok/s=12.3k" in lines[0] and "loss=1" in lines[0] and "eta" in lines[0]
  assert "step 100/100 (100.0%)" in lines[-1]


def test_progress_bar_mode_and_disabled():
  out = io.StringIO()
  bar = metrics.ProgressBar(10, initial_step=2, enabled=True, file=out, mode="bar")
  for step in range(3, 11):
    bar.update(step, {"loss": 0.5})
  bar.close()
  assert "10/10" in out.getvalue() and "loss=0.5" in out.getvalue()

  out = io.StringIO()
  for mode in ("bar", "lines"):
    bar = metrics.ProgressBar(10, 0, False, file=out, mode=mode)
    bar.update(5, {"loss": 1.0})
    bar.close()
  assert out.getvalue() == ""


# ---------------------------------------------------------------------------- FLOPs


def test_flops_per_token_hand_count():
  # Tiny Llama-style config with GQA: 2 query heads share 1 kv head.
  d, layers, heads, kv_heads, hd, ff, vocab, seq = 8, 2, 2, 1, 4, 16, 32, 16
  block_matrices = [  # (in, out) of every weight matrix in one block
      (d, heads * hd), (d, kv_heads * hd), (d, kv_heads * hd), (heads * hd, d),  # q k v o
      (d, ff), (d, ff), (ff, d)]  # gate up down
  n_nonembed = layers * sum(i * o for i, o in block_matrices)
  assert n_nonembed == 2 * (64 + 32 + 32 + 64 + 128 + 128 + 128)
  # Forward FLOPs for a whole sequence, from the shapes of the matmuls it performs.
  weights = seq * layers * sum(2 * i * o for i, o in block_matrices)
  lm_head = seq * 2 * d * vocab
  scores = layers * heads * 2 * seq * seq * hd  # (T, hd) @ (hd, T) per head
  values = layers * heads * 2 * seq * seq * hd  # (T, T) @ (T, hd) per head
  full_fwd_per_token = (weights + lm_head + scores + values) / seq
  causal_fwd_per_token = (weights + lm_head + (scores + values) / 2) / seq
  assert full_fwd_per_token == 2304 + 512 + 1024

  kw = dict(n_params_nonembed=n_nonembed, n_layers=layers, d_model=d, seq_len=seq,
            vocab_size=vocab, n_heads=heads, head_dim=hd)
  assert lm.flops_per_token(**kw, training=False, causal=False) == full_fwd_per_token
  assert lm.flops_per_token(**kw, training=False) == causal_fwd_per_token
  assert lm.flops_per_token(**kw) == 3 * causal_fwd_per_token == 9984
  assert lm.flops_per_token(**kw, causal=False) == 3 * full_fwd_per_token


def test_vit_and_dino_flops_hand_count():
  # A ViT of 2 blocks, d 8, MLP 16, patch 4 on RGB; a 16×16 crop: 16 patches + cls + 1 register = 18 tokens.
  d, layers, ff, patch, tokens, patches = 8, 2, 16, 4, 18, 16
  block_matrices = [(d, d)] * 4 + [(d, ff), (ff, d)]  # q k v o, fc1 fc2
  n_blocks = layers * sum(i * o for i, o in block_matrices)
  head = [(d, 12), (12, 6)]
  weights = tokens * layers * sum(2 * i * o for i, o in block_matrices)
  embed = patches * 2 * (patch * patch * 3) * d
  attention = layers * 2 * (2 * tokens * tokens * d)  # scores and values: (T, d)@(d, T), (T, T)@(T, d)
  head_flops = sum(2 * i * o for i, o in head)  # the class token only
  kw = dict(n_params_blocks=n_blocks, n_layers=layers, d_model=d, patch_params=patch * patch * 3 * d,
            head_params=sum(i * o for i, o in head))
  forward = vit.forward_flops(n_tokens=tokens, n_patches=patches, **kw)
  assert forward == weights + embed + attention + head_flops == 70_224
  # DINO: 2 global 16×16 crops and 3 local 8×8 ones (4 patches + 2 tokens); the student trains on all 5
  # (3 forwards each), the teacher runs forward on the 2 global ones.
  local = vit.forward_flops(n_tokens=6, n_patches=4, **kw)
  image = dino.flops_per_image(crops=[(18, 16)] * 2 + [(6, 4)] * 3, n_teacher_crops=2, **kw)
  assert image == 3 * (2 * forward + 3 * local) + 2 * forward


# ---------------------------------------------------------------------------- peaks


@pytest.mark.parametrize("kind, dtype, expected", [
    ("TPU v4", "bfloat16", 275e12),
    ("TPU v5 lite", "bfloat16", 197e12),
    ("TPU v5e", "bfloat16", 197e12),
    ("TPU v5", "bfloat16", 459e12),
    ("TPU v5p", "bfloat16", 459e12),
    ("TPU v6 lite", "bfloat16", 918e12),
    ("TPU v6 lite", "float32", 918e12),
    ("NVIDIA A100-SXM4-40GB", "bfloat16", 312e12),
    ("NVIDIA A100-SXM4-40GB", "float32", 156e12),  # TF32 tensor cores.
    ("NVIDIA A100 80GB PCIe", np.float32, 156e12),
    ("NVIDIA H100 80GB HBM3", "bfloat16", 989.4e12),
    ("NVIDIA H100 80GB HBM3", "float32", 494.7e12),
    ("NVIDIA H100 PCIe", "bfloat16", 756e12),
    ("NVIDIA H200", "bfloat16", 989.4e12),
    ("NVIDIA L4", "bfloat16", 121e12),
    ("NVIDIA L4", jax.numpy.bfloat16, 121e12),
])
def test_device_peak_flops_table(kind, dtype, expected):
  peak, source = metrics.device_peak_flops(kind, dtype=dtype)
  assert peak == expected
  assert kind in source
  platform = "gpu" if "NVIDIA" in kind else "tpu"
  fake_device = types.SimpleNamespace(device_kind=kind, platform=platform)
  assert metrics.device_peak_flops(fake_device, dtype=dtype)[0] == expected


def test_device_peak_flops_unknown_and_lookalikes():
  assert metrics.peak_flops_for_device_kind("NVIDIA L40S") is None  # not an L4.
  peak, source = metrics.device_peak_flops("Some Future Accelerator")
  assert math.isnan(peak) and "unknown" in source


def test_cpu_peak_env_override_split_over_local_devices(monkeypatch):
  monkeypatch.setenv(metrics.CPU_PEAK_ENV, "8e10")
  n_local = len(jax.local_devices(backend="cpu"))
  peak, source = metrics.device_peak_flops(jax.devices("cpu")[0])
  assert peak == pytest.approx(8e10 / n_local)
  assert metrics.CPU_PEAK_ENV in source
  assert metrics.device_peak_flops("cpu")[0] == peak
  monkeypatch.setenv(metrics.CPU_PEAK_ENV, "fast")
  with pytest.raises(ValueError, match=metrics.CPU_PEAK_ENV):
    metrics.cpu_peak_flops()


def test_cpu_peak_measured_once_and_cached(monkeypatch, tmp_path):
  monkeypatch.delenv(metrics.CPU_PEAK_ENV, raising=False)
  monkeypatch.setattr(metrics, "_cpu_peak_memo", {})
  calls = []

  def fake_measure(n, repeats):
    calls.append(n)
    return 1.25e11

  monkeypatch.setattr(metrics, "measure_cpu_matmul_peak", fake_measure)
  cache = str(tmp_path / "cpu_peak.json")
  assert metrics.cpu_peak_flops(cache_path=cache, n=64)[0] == 1.25e11
  monkeypatch.setattr(metrics, "_cpu_peak_memo", {})  # as if in a new process
  peak, source = metrics.cpu_peak_flops(cache_path=cache, n=64)
  assert peak == 1.25e11 and "cached" in source
  assert calls == [64]
  (entry,) = json.load(open(cache)).values()
  assert entry["flops"] == 1.25e11 and entry["n"] == 64


def test_measure_cpu_matmul_peak_real():
  flops = metrics.measure_cpu_matmul_peak(n=256, repeats=3)
  assert math.isfinite(flops) and flops > 0


# ---------------------------------------------------------------------------- MFU


def test_throughput_stats_arithmetic():
  s = metrics.throughput_stats(steps=10, seconds=2.0, tokens=10 * 4096, flops_per_token=6e6,
                               num_devices=4, peak_flops_per_device=1e12)
  assert s["steps_per_sec"] == 5.0
  assert s["step_time_s"] == 0.2
  assert s["tokens_per_sec"] == 20480.0
  model_flops = 6e6 * 20480.0  # 1.2288e11 FLOP/s over all devices
  assert s["tflops_per_device"] == pytest.approx(model_flops / 4 / 1e12)
  assert s["mfu"] == pytest.approx(model_flops / 4e12)  # = 0.03072
