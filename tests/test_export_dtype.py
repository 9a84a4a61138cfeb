"""`hf export` writes the source checkpoint's dtype unless --dtype says otherwise."""

import json
import logging
import os
import sys

import torch
from safetensors import safe_open

from vpt.language.interop import hf

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_hf_interop import _build  # noqa: E402


def _dtypes(out):
  with safe_open(os.path.join(out, hf.SINGLE_NAME), framework="numpy") as f:
    header = {k: f.get_slice(k).get_dtype() for k in f.keys()}
  with open(os.path.join(out, "config.json")) as f:
    config = json.load(f)
  return set(header.values()), config.get("torch_dtype")


def test_export_defaults_to_the_source_dtype(tmp_path, caplog):
  src = str(tmp_path / "bf16")
  _build("qwen2", hidden_size=32, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
         vocab_size=128, tie_word_embeddings=False).to(torch.bfloat16).save_pretrained(src)
  assert hf.source_dtype(hf.read_config(src)[0]) == "bfloat16"
  run = str(tmp_path / "run")
  hf.main(["import", "--hf_dir", src, "--out", run])
  with caplog.at_level(logging.WARNING):
    hf.main(["export", "--checkpoint", run, "--out", str(tmp_path / "default")])
  assert not [r for r in caplog.records if "could not be restored" in r.getMessage()]
  assert _dtypes(str(tmp_path / "default")) == ({"BF16"}, "bfloat16")
  hf.main(["export", "--checkpoint", run, "--out", str(tmp_path / "f32"), "--dtype", "float32"])
  assert _dtypes(str(tmp_path / "f32")) == ({"F32"}, "float32")
  # A run never imported from HF (no hf/config.json), or a dtype export does not write: float32.
  assert hf.source_dtype(None) == "float32" and hf.source_dtype({"torch_dtype": "float16"}) == "float32"
  assert hf.source_dtype({"dtype": "bfloat16"}) == "bfloat16"  # newer transformers' key
