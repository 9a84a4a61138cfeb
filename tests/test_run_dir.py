"""A run directory is self-sufficient for resume: its tokenizer and HF config are copied in at the
first start, so a restart needs neither data.tokenizer_path nor config.init_from to exist."""

import json
import os
import shutil
import sys

import pytest

from vpt import train
from vpt.data import tokenizer as tok_lib

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_train import nano_config  # noqa: E402


@pytest.mark.slow
def test_resume_after_the_init_from_run_is_gone(tmp_path):
  base, cont = str(tmp_path / "base"), str(tmp_path / "cont")
  train.run(nano_config(num_steps=2), base)
  base_model = (tmp_path / "base" / "tokenizer" / "spm.model").read_bytes()
  ckpt = {"checkpoint.every_steps": 2}
  train.run(nano_config(num_steps=2, init_from=base, **ckpt), cont)
  os.rename(base, str(tmp_path / "base_moved"))
  resumed = train.run(nano_config(num_steps=4, init_from=base, **ckpt), cont)
  assert (resumed["start_step"], resumed["step"]) == (2, 4)
  assert (tmp_path / "cont" / "tokenizer" / "spm.model").read_bytes() == base_model  # the run's own copy


@pytest.mark.slow
def test_resume_after_the_init_from_hf_directory_is_gone(tmp_path):
  from test_hf_interop import _build, _write_tokenizer
  hf_dir, workdir = str(tmp_path / "qwen"), str(tmp_path / "run")
  _build("qwen2", hidden_size=48, num_attention_heads=4, num_key_value_heads=2, intermediate_size=96,
         vocab_size=320, tie_word_embeddings=True).save_pretrained(hf_dir)
  _write_tokenizer(hf_dir, 300)
  ckpt = {"checkpoint.every_steps": 2}
  train.run(nano_config(num_steps=2, init_from=hf_dir, **ckpt), workdir)
  assert (tmp_path / "run" / "tokenizer" / "tokenizer.json").read_bytes() == (
      tmp_path / "qwen" / "tokenizer.json").read_bytes()
  shutil.rmtree(hf_dir)
  resumed = train.run(nano_config(num_steps=4, init_from=hf_dir, **ckpt), workdir)  # shape from run/hf/config.json
  assert (resumed["start_step"], resumed["step"]) == (2, 4)
  assert json.loads((tmp_path / "run" / "config.json").read_text())["model"]["d_model"] == 48
  tok = tok_lib.run_tokenizer(workdir, nano_config().data)  # what export and the evals read
  assert isinstance(tok, tok_lib.HFTokenizer) and tok.vocab_size == 300


def test_adopted_tokenizer_is_the_run_copy_and_a_changed_one_is_refused(tmp_path):
  src = tmp_path / "a.model"
  src.write_bytes(b"first")
  run = str(tmp_path / "run")
  copy = tok_lib.adopt_tokenizer(str(src), run, what="data.tokenizer_path")
  assert copy == str(tmp_path / "run" / "tokenizer" / "spm.model") and open(copy, "rb").read() == b"first"
  assert tok_lib.adopt_tokenizer(str(src), run, what="data.tokenizer_path") == copy
  src.write_bytes(b"second")
  with pytest.raises(ValueError, match="data.tokenizer_path: .* differs from the tokenizer this run started with"):
    tok_lib.adopt_tokenizer(str(src), run, what="data.tokenizer_path")
  src.unlink()
  assert tok_lib.adopt_tokenizer(str(src), run, what="data.tokenizer_path") == copy  # the source is gone
  with pytest.raises(FileNotFoundError, match=r"the tokenizer of config.init_from='x'.*holds no copy"):
    tok_lib.adopt_tokenizer(str(src), str(tmp_path / "new"), what="the tokenizer of config.init_from='x'")
  assert tok_lib.adopt_tokenizer(None, run, what="") is None  # nothing named: the run trains its own
