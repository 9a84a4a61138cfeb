"""The vision replication driver end to end at smoke scale: base, arms, test-split probes, table and plots."""

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_vision_replication_smoke_writes_table_and_plots(tmp_path):
  out = subprocess.run([sys.executable, os.path.join(REPO, "experiments", "vision_scenes", "replicate.py"),
                        "--out", str(tmp_path), "--smoke", "--arms", "dino,unet",
                        "--xla_cache", str(tmp_path / "xla_cache")],
                       cwd=REPO, capture_output=True, text=True, timeout=900)
  assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
  table = (tmp_path / "table.md").read_text()
  assert "| base |" in table and "| dino |" in table and "| unet |" in table and "Paired differences" in table
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
