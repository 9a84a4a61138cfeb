"""The alignment notebook's held-out probe works on any run: without held-out problems it falls back
to the feedback set and says so."""

import json
import types

import numpy as np

from conftest import CharTokenizer
from vpt.language import analysis


def test_heldout_feedback_batch_falls_back_to_the_feedback_set(tmp_path, capsys):
  path = tmp_path / "train.jsonl"
  path.write_text("".join(json.dumps({"question": f"{a}+{a}?", "answer": f"{2 * a}\n#### {2 * a}"}) + "\n"
                          for a in range(20)))
  config = analysis.tiny_config()
  config.feedback.source, config.feedback.path, config.feedback.eval_path = "gsm8k_jsonl", str(path), ""
  run = types.SimpleNamespace(config=config, tokenizer=CharTokenizer())
  batch = analysis.feedback_batch(run, heldout=True, batch_size=4)
  note = capsys.readouterr().out
  assert "no held-out problems" in note and "feedback set D_fb itself" in note
  assert batch["inputs"].shape == (4, config.feedback.seq_len) and np.any(batch["loss_mask"])
  fb = analysis.feedback_batch(run, batch_size=4)
  assert not np.array_equal(batch["inputs"], fb["inputs"])  # another draw than the training-side batch
