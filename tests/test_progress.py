"""Every training run reports progress; in a log (no terminal) as one plain line per logged step."""

import os
import re
import sys


from vpt.core import config as core_config
from vpt.language import train

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_train import REPO, nano_config  # noqa: E402


def test_the_paper_recipe_shows_progress():
  for setup in ("qwen2.5-0.5b-lora", "qwen1.5-7b,ntp"):
    assert core_config.load_config_file(os.path.join(REPO, "experiments", "qwen.py"), setup).progress_bar
  with open(os.path.join(REPO, "experiments", "README_qwen.md")) as f:
    assert "progress_bar=False" not in f.read()


def test_a_run_logs_a_progress_line_every_log_step(tmp_path, capsys):
  train.run(nano_config(num_steps=60, log_every_steps=2, eval_every_steps=60, progress_bar=True,
                        **{"checkpoint.every_steps": 60}), str(tmp_path))
  lines = [l for l in capsys.readouterr().err.splitlines() if l.startswith("train step")]  # stderr is no TTY here
  assert [int(re.match(r"train step (\d+)/60", l).group(1)) for l in lines] == list(range(2, 61, 2))
  for line in lines:
    assert re.search(r"loss=\d", line) and re.search(r"tok/s=\d", line) and "eta" in line, line
