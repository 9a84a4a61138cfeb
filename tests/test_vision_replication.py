"""The vision replication driver end to end at smoke scale: base, arms, test-split probes, table and plots."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DRIVER = os.path.join(REPO, "experiments", "vision_scenes", "replicate.py")


def _driver_module():
  spec = importlib.util.spec_from_file_location("vision_replicate", DRIVER)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_gate_needs_the_base_better_than_random_init_on_every_probe_by_the_margin():
  verdict = _driver_module().gate_verdict
  random_init = {"miou": 0.10, "linear_acc": 0.20, "rmse": 1.00}
  assert verdict(random_init, {"miou": 0.12, "linear_acc": 0.25, "rmse": 0.95}, 0.01) == (True, [])
  passed, reasons = verdict(random_init, {"miou": 0.105, "linear_acc": 0.25, "rmse": 1.02}, 0.01)
  assert not passed
  assert [r.split(":")[0] for r in reasons] == ["miou", "rmse"]  # RMSE: lower is better
  assert verdict(random_init, random_init, 0.0)[0]  # margin 0: equal is enough


@pytest.mark.slow
def test_vision_replication_refuses_to_run_arms_from_a_base_no_better_than_random_init(tmp_path):
  # No base clears a margin of 1 (mIoU and accuracy are at most 1), so the gate (on val) must stop the sweep
  # before any arm.
  out = subprocess.run([sys.executable, DRIVER, "--out", str(tmp_path), "--smoke", "--arms", "dino",
                        "--gate_margin", "1.0",
                        "--xla_cache", os.environ["JAX_COMPILATION_CACHE_DIR"]],  # conftest's cache
                       cwd=REPO, capture_output=True, text=True, timeout=900)
  assert out.returncode == 1, out.stdout[-3000:] + out.stderr[-3000:]
  assert "not better than a randomly initialised ViT on val" in out.stderr and "--ignore_gate" in out.stderr
  saved = json.load(open(tmp_path / "results.json"))
  assert saved["gate"]["passed"] is False and saved["gate"]["split"] == "val"
  assert set(saved["gate"]["random_init"]) >= {"miou", "linear_acc", "rmse"}
  assert [r["arm"] for r in saved["results"]] == ["base"]
  assert not os.path.exists(tmp_path / "runs" / "dino-s0")


@pytest.mark.slow
def test_vision_replication_smoke_writes_table_and_plots(tmp_path):
  out = subprocess.run([sys.executable, DRIVER, "--out", str(tmp_path), "--smoke", "--arms", "dino,unet",
                        "--ignore_gate",
                        "--xla_cache", os.environ["JAX_COMPILATION_CACHE_DIR"]],  # conftest's cache
                       cwd=REPO, capture_output=True, text=True, timeout=900)
  assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
  table = (tmp_path / "table.md").read_text()
  assert "| base |" in table and "| dino |" in table and "| unet |" in table and "Paired differences" in table
  assert "Gate (val split, margin 0.01)" in table
  for png in ("results.png", "curves.png", "masks.png"):
    assert (tmp_path / png).stat().st_size > 10_000
  results = json.load(open(tmp_path / "results.json"))["results"]
  assert [(r["arm"], r["seed"]) for r in results] == [("base", 0), ("dino", 0), ("unet", 0)]
  for r in results:
    f = r["final"]
    assert 0.0 <= f["miou"] <= 1.0 and f["rmse"] > 0 and 0.0 <= f["linear_acc"] <= 1.0, f
  unet = results[2]
  assert 0.0 < unet["final"]["mask_mean"] < 1.0
  # the designer arm logged its meta steps; the continued runs started from the base run's checkpoint.
  assert any(m.get("train/meta/is_meta_step") == 1.0 for m in unet["train"])
  assert "Initialised the student, teacher and centre from" in out.stdout
