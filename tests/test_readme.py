"""The README's first screen: exactly two set-up commands, the test one identical to CI's."""

import importlib.util
import os
import re

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _first_screen_commands():
  text = open(os.path.join(REPO, "README.md")).read()
  first_screen = text.split("\n---\n")[0]
  return re.findall(r"```bash\n(.*?)\n```", first_screen, flags=re.S)


def test_two_setup_commands_and_ci_runs_the_readme_test_command():
  commands = _first_screen_commands()
  assert len(commands) == 2, commands
  main_job, tests = commands
  assert "python -m vpt.main" in main_job and "pip install -e ." in main_job
  ci = open(os.path.join(REPO, ".ci", "run")).read()
  test_cmd = tests.split("&&")[-1].strip()
  assert test_cmd == "python -m pytest -q"
  assert ci.strip().splitlines()[-1].strip() == test_cmd
  assert 'pip install -q -e ".[test]"' in ci


def test_main_job_config_resolves():
  main_job = _first_screen_commands()[0]
  spec_arg = re.search(r"--config (\S+)", main_job).group(1)
  path, _, arg = spec_arg.partition(":")
  spec = importlib.util.spec_from_file_location("main_job", os.path.join(REPO, path))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config(arg)
  assert config.vpt.mode == "value"
  from vpt.language import config_lib
  config_lib.validate(config)


def test_libtpu_on_a_host_without_a_tpu_runs_on_the_cpu_without_libtpus_errors():
  from vpt.main import cpu_only_platforms
  pick = lambda env={}, **kw: cpu_only_platforms(env, **{**dict(has_libtpu=True, has_tpu_devices=False,
                                                               has_cuda_plugin=False), **kw})
  assert pick() == "cpu"  # the test/tpu extras' libtpu on a CPU host
  assert pick(has_tpu_devices=True) is None  # a TPU VM: JAX picks the TPU
  assert pick(has_cuda_plugin=True) is None and pick(has_libtpu=False) is None
  assert pick({"JAX_PLATFORMS": "tpu"}) is None  # the user's explicit choice stands
