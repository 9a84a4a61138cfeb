"""The CPU-scale replication driver end to end at smoke scale: runs, evaluates, writes table and plots."""

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_replication_smoke_writes_table_and_plots(tmp_path):
  # Matched updates first; then --resume adds the matched wall-clock runs and keeps the others.
  drive = lambda *flags: subprocess.run([sys.executable, os.path.join(REPO, "experiments", "toy_math", "replicate.py"),
                                         "--out", str(tmp_path), "--smoke", "--arms", "ntp,value", *flags],
                                        cwd=REPO, capture_output=True, text=True, timeout=1800)
  out = drive("--skip_wallclock")
  assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
  first = json.load(open(tmp_path / "results.json"))["results"]
  assert {(r["arm"], r["protocol"]) for r in first} == {("ntp", "steps"), ("value", "steps")}
  out = drive("--resume")
  assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
  assert "--resume: 2 runs kept" in out.stdout
  kept = [r for r in json.load(open(tmp_path / "results.json"))["results"] if r["protocol"] == "steps"]
  assert kept == first
  mismatch = drive("--resume", "--stream", "skill")
  assert mismatch.returncode != 0 and "--stream format (now skill)" in mismatch.stderr
  table = (tmp_path / "table.md").read_text()
  assert "Matched learner updates" in table and "Matched wall-clock" in table and "| value |" in table
  assert "Paired differences to NTP" in table
  for png in ("curves.png", "alpha_value.png", "tradeoff.png"):
    assert (tmp_path / png).stat().st_size > 10_000
  results = json.load(open(tmp_path / "results.json"))["results"]
  assert {(r["arm"], r["protocol"]) for r in results} == {
      (a, p) for a in ("ntp", "value") for p in ("steps", "wallclock")}
  value = next(r for r in results if r["arm"] == "value")["final"]
  assert 0.0 <= value["pass@1"] <= 1.0 and value["alpha_digit"] >= 0.0 and value["pretrain_perplexity"] > 1.0
  assert 0.0 <= value["facts_right"] <= 1.0
  step_time = json.load(open(tmp_path / "results.json"))["step_time_s"]
  assert set(step_time) == {"ntp", "value"} and all(t > 0 for t in step_time.values())
