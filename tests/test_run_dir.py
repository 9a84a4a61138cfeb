"""A run directory (vpt.core.run_dir): one reader of its config history and checkpoint steps; and it is
self-sufficient for resume: its tokenizer and HF config are copied in at the first start, so a restart
needs neither data.tokenizer_path nor config.init_from to exist."""

import json
import os
import re
import shutil
import subprocess
import sys

import pytest

from vpt.core import run_dir
from vpt.language import train
from vpt.language.data import tokenizer as tok_lib

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


# ----------------------------------------------------------------------------- vpt.core.run_dir: the one reader


def _lm_config(**overrides):
  from vpt.language import config_lib
  from vpt.core import config as core_config
  config = config_lib.base_config()
  config.model = config_lib.model_config("nano")
  return core_config.with_overrides(config, overrides)


def test_config_round_trip_and_history(tmp_path):
  workdir = str(tmp_path / "run")
  config = _lm_config(num_steps=10)
  run_dir.write_config(config, workdir)
  assert run_dir.read_config(workdir).to_dict() == json.loads(config.to_json_best_effort())
  assert run_dir.config_changes(config, workdir) == ("config.json", [])
  run_dir.write_config(config, workdir)  # unchanged: nothing added
  assert sorted(os.listdir(workdir)) == ["config.json"]
  longer = _lm_config(num_steps=20)
  assert run_dir.config_changes(longer, workdir) == ("config.json", ["num_steps: 10 → 20"])
  run_dir.write_config(longer, workdir)
  run_dir.write_config(_lm_config(num_steps=30), workdir)
  assert sorted(os.listdir(workdir)) == ["config.1.json", "config.2.json", "config.json"]
  assert run_dir.read_config(workdir).num_steps == 10  # the original: what evals, analysis and export read
  assert json.loads((tmp_path / "run" / "config.2.json").read_text())["num_steps"] == 30
  assert run_dir.config_changes(longer, workdir) == ("config.2.json", ["num_steps: 30 → 20"])  # vs the newest


def test_missing_config_names_the_path(tmp_path):
  with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "nowhere" / "config.json")) + ": no such file"):
    run_dir.read_config(str(tmp_path / "nowhere"))
  (tmp_path / "config.json").write_text("[1, 2]")
  with pytest.raises(ValueError, match="config.json: expected a JSON object"):
    run_dir.read_config(str(tmp_path))


def test_latest_step_among_several(tmp_path):
  workdir = str(tmp_path)
  assert run_dir.checkpoint_steps(workdir) == [] and run_dir.latest_step(workdir) is None
  with pytest.raises(FileNotFoundError, match="no checkpoint under"):
    run_dir.state_path(workdir, what="config.init_from=")
  # set aside, replaced and unfinished (orbax's temporary) directories are not checkpoints
  for name in ("2", "10", "3", "11.unreadable", "4.replaced", "12.orbax-checkpoint-tmp-1"):
    (tmp_path / "checkpoints" / name / "state").mkdir(parents=True)
  assert run_dir.checkpoint_steps(workdir) == [2, 3, 10] and run_dir.latest_step(workdir) == 10
  assert run_dir.state_path(workdir) == (str(tmp_path / "checkpoints" / "10" / "state"), 10)
  assert run_dir.state_path(workdir, 3) == (str(tmp_path / "checkpoints" / "3" / "state"), 3)
  for error in (ValueError, FileNotFoundError):  # a bad step argument, and a file that is not there
    with pytest.raises(error, match=r"step=7: no checkpoint at that step .*available: \[2, 3, 10\]"):
      run_dir.state_path(workdir, 7)


def test_config_from_before_a_schema_field_reads_with_its_default(tmp_path):
  from vpt.language import config_lib
  old = json.loads(_lm_config(num_steps=7).to_json_best_effort())
  del old["model"]["lora_rank"], old["vpt"]["designer"]["gate_features"], old["checkpoint"]["on_mismatch"]
  old["retired_field"] = 1  # a field the schema has dropped since: kept, as written
  (tmp_path / "config.json").write_text(json.dumps(old))
  assert "lora_rank" not in run_dir.read_config(str(tmp_path)).model  # as written, without a schema
  config = run_dir.read_config(str(tmp_path), config_lib.base_config())
  assert (config.model.lora_rank, config.vpt.designer.gate_features, config.checkpoint.on_mismatch) == (0, False, "error")
  assert (config.num_steps, config.model.d_model, config.retired_field) == (7, old["model"]["d_model"], 1)
  config_lib.validate(config)


def test_vision_run_config_fills_new_fields_and_refuses_an_lm_run(tmp_path):
  from vpt.vision import train as train_vision
  from vpt.vision import config as vision_config
  old = vision_config.vision_base_config().to_dict()
  del old["eval"]["knn_k"]
  (tmp_path / "config.json").write_text(json.dumps(old))
  assert train_vision.load_run_config(str(tmp_path)).eval.knn_k == vision_config.eval_config().knn_k
  run_dir.write_config(_lm_config(), str(tmp_path / "lm"))
  with pytest.raises(ValueError, match="task='language', not a vision run"):
    train_vision.load_run_config(str(tmp_path / "lm"))


def test_an_hf_directory_has_one_step_and_checkpoint_does_not_import_the_hf_interop(tmp_path):
  from vpt.language import learner_source
  (tmp_path / "config.json").write_text(json.dumps({"architectures": ["Qwen2ForCausalLM"]}))
  assert learner_source.is_hf(str(tmp_path)) and not learner_source.is_hf(str(tmp_path / "nowhere"))
  with pytest.raises(ValueError, match="step=3, but a Hugging Face directory holds one set of weights"):
    learner_source.load_params(str(tmp_path), {}, step=3)
  code = "import sys, vpt.core.checkpoint, vpt.core.run_dir; sys.exit('vpt.language.interop.hf' in sys.modules)"
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  assert subprocess.run([sys.executable, "-c", code], env=env, check=False).returncode == 0
