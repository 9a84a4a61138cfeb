"""Two real processes (jax.distributed on localhost, CPU, one device each) running the LM loop:
a preemption notice that reaches one host only still stops both at the same step, saved once."""

import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from vpt.core import metrics

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_STEPS = 40


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _launch(workdir, logdir, tag):
  """Both processes of one 2-host job; each writes its output to logdir/<tag>.<process>.log. The
  resumed job reuses the first one's compiled programs (a persistent XLA cache in logdir)."""
  port = _free_port()
  procs = []
  for pid in range(2):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=1",
           "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": str(pid),
           "JAX_COMPILATION_CACHE_DIR": str(logdir / "xla_cache"), "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
    log = open(logdir / f"{tag}.{pid}.log", "w")  # a file, not a pipe: a full pipe would stall the run.
    procs.append(subprocess.Popen(
        [sys.executable, "-m", "vpt.main", f"--config={REPO}/experiments/lm_ntp.py:nano", f"--workdir={workdir}",
         f"--config.num_steps={NUM_STEPS}", "--config.log_every_steps=1", "--config.checkpoint.every_steps=1000",
         "--config.eval_every_steps=1000", "--config.progress_bar=False", "--config.multihost=True"],
        cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT))
  return procs


def _logs(logdir, tag):
  return [(logdir / f"{tag}.{pid}.log").read_text() for pid in range(2)]


def _wait_all(procs, timeout):
  deadline = time.time() + timeout
  for p in procs:
    p.wait(timeout=max(1.0, deadline - time.time()))
  return [p.returncode for p in procs]


@pytest.mark.slow
def test_sigterm_to_one_host_stops_both_at_the_same_step_then_resumes(tmp_path):
  workdir, logdir = tmp_path / "run", tmp_path
  procs = _launch(workdir, logdir, "first")
  try:
    jsonl = workdir / "metrics.jsonl"  # written by process 0
    deadline = time.time() + 240
    while not (jsonl.exists() and any(r.get("step", 0) >= 3 for r in metrics.read_jsonl(str(jsonl)))):
      assert time.time() < deadline, _logs(logdir, "first")
      assert all(p.poll() is None for p in procs), _logs(logdir, "first")
      time.sleep(0.05)
    procs[1].send_signal(signal.SIGTERM)  # the notice reaches one host only
    try:
      codes = _wait_all(procs, 120)
    except subprocess.TimeoutExpired:
      pytest.fail(f"the hosts did not stop (deadlock?): {_logs(logdir, 'first')}")
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  logs = _logs(logdir, "first")
  assert codes == [143, 143], logs
  saved = sorted(int(d) for d in os.listdir(workdir / "checkpoints") if d.isdigit())
  assert len(saved) == 1 and 3 <= saved[0] < NUM_STEPS, (saved, logs)
  for log in logs:  # both hosts saved the same step
    assert f"saving at step {saved[0]}" in log, log

  procs = _launch(workdir, logdir, "resumed")
  try:
    codes = _wait_all(procs, 300)
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  logs = _logs(logdir, "resumed")
  assert codes == [0, 0], logs
  for log in logs:
    assert f"Resuming from checkpoint at step {saved[0]}" in log, log
  assert metrics.read_jsonl(str(workdir / "metrics.jsonl"))[-1]["step"] == NUM_STEPS


def test_second_sigterm_ends_the_process(tmp_path):
  """The first SIGTERM only raises the flag; a second one (the scheduler insisting, or a host stuck in
  a collective) ends the process even though the loop never polls again."""
  script = ("import os, signal, time\n"
            "from vpt.core.loop import Preemption\n"
            "with Preemption() as p:\n"
            "  os.kill(os.getpid(), signal.SIGTERM)\n"
            "  time.sleep(0.2)\n"
            "  print('flag', p.requested, flush=True)\n"
            "  os.kill(os.getpid(), signal.SIGTERM)\n"
            "  time.sleep(30)\n"
            "  print('still alive', flush=True)\n")
  out = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=60)
  assert out.returncode == -signal.SIGTERM, out.stdout + out.stderr
  assert "flag True" in out.stdout and "still alive" not in out.stdout
