"""Ahead-of-time memory check: exact per-device state bytes, donation, the budget verdict, clear
errors, and the 7B dry run end to end (shapes only: the process never holds the weights)."""

import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest

from vpt import aot
from vpt.core import config as core_config, lora as lora_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GB = 1024 ** 3


def _nano(**overrides):
  config = core_config.load_config_file(os.path.join(REPO, "experiments", "lm_vpt.py"), "nano,value")
  base = {"model.vocab_size": 96, "mesh.num_devices": 8, "mesh.data": 2, "mesh.fsdp": 4, "data.seq_len": 32,
          "feedback.seq_len": 32}
  return core_config.with_overrides(config, {**base, **overrides})


def _leaf_bytes(tree):
  return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def test_dry_run_reports_exact_state_bytes_and_the_compiled_program(capsys):
  """NTP with LoRA here; V-Pretraining with full parameters in the 7B test below."""
  mode, lora_rank = "ntp", 4
  config = _nano(**{"vpt.mode": mode, "model.lora_rank": lora_rank, "model.d_model": 64, "model.d_ff": 128})
  report = aot.dry_run(config, hbm_gb=1.0, label="nano")
  out = capsys.readouterr().out
  # The parameters: fsdp=4 shards the MLP kernels' rows, so a device holds less than all of them
  # (and exactly the shard sizes).
  model_cfg = aot.LMConfig.from_config(config.model, 96)
  params = jax.eval_shape(aot.Transformer(model_cfg).init, jax.random.PRNGKey(0), np.zeros((1, 8), np.int32))["params"]
  full = _leaf_bytes(params)
  gate = params["layers_0"]["mlp"]["gate_proj"]["kernel"]
  assert report["params"] < full
  assert full - report["params"] >= 2 * 2 * (3 / 4) * _leaf_bytes(gate)  # gate/up of 2 layers, 3/4 elsewhere
  # The optimizer: two Adam moments laid out like what they train (+ a few scalar counts).
  adapters = _leaf_bytes(lora_lib.split_lora(params)[0])  # replicated
  assert 2 * adapters <= report["opt_state"] <= 2 * adapters + 64
  assert report["designer"] == 0 and report["num_trainable"] * 4 == adapters
  # The compiled program takes the whole state and donates it (output aliased onto input).
  state = report["params"] + report["opt_state"] + report["designer"]
  assert report["arguments"] >= state and report["aliased"] >= state and report["temporaries"] > 0
  assert report["peak"] == report["arguments"] + report["outputs"] - report["aliased"] + report["temporaries"]
  assert report["fits"] and "budget 1 GB per device: fits" in out
  assert re.search(r"temporaries \(activations\)\s+\d+\.\d+ GB", out)
  tight = aot.with_budget(report, report["peak"] / GB * 0.99)
  assert not tight["fits"] and "does not fit" in aot.format_report(tight)
  assert aot.with_budget(report, report["peak"] / GB * 1.01)["fits"]


def test_dry_run_needs_the_vocabulary_size(tmp_path):
  config = _nano(**{"model.vocab_size": 0})
  with pytest.raises(ValueError, match="model.vocab_size"):
    aot.dry_run(config, echo=False)
  (tmp_path / "config.json").write_text('{"vocab_size": 77}')
  config = core_config.with_overrides(config, {"init_from": str(tmp_path)})
  assert aot.vocab_size_for_dry_run(config) == 77  # an HF directory's config.json supplies it


def test_qwen_configs_have_the_released_architectures():
  path = os.path.join(REPO, "experiments", "qwen.py")
  want = {  # hidden, layers, heads, kv heads, intermediate, rope θ, tied (each model's config.json)
      "qwen2.5-0.5b": (896, 24, 14, 2, 4864, 1e6, True), "qwen1.5-0.5b": (1024, 24, 16, 16, 2816, 1e6, True),
      "qwen1.5-4b": (2560, 40, 20, 20, 6912, 5e6, False), "qwen1.5-7b": (4096, 32, 32, 32, 11008, 1e6, False)}
  for name, dims in want.items():
    m = core_config.load_config_file(path, name).model
    assert (m.d_model, m.n_layers, m.n_heads, m.n_kv_heads, m.d_ff, m.rope_theta, m.tie_embeddings) == dims, name
    assert (m.vocab_size, m.qkv_bias, m.dtype, m.remat) == (151936, True, "bfloat16", True)
  lora = core_config.load_config_file(path, "qwen2.5-0.5b-lora")
  assert (lora.model.lora_rank, lora.model.lora_alpha, lora.model.lora_dropout) == (8, 16.0, 0.05)
  assert (lora.batch_size, lora.grad_accum_steps, lora.optimizer.learning_rate) == (32, 8, 2e-4)
  assert (lora.data.seq_len, lora.feedback.seq_len, lora.vpt.meta_seq_len, lora.vpt.meta_batch_size) == (1024, 512, 256, 4)
  assert (lora.vpt.top_k, lora.vpt.alpha_max, lora.vpt.meta_every, lora.vpt.align_last_n_layers) == (64, 0.5, 8, 2)
  assert lora.vpt.designer.learning_rate == 1e-4 and lora.vpt.mode == "value"
  # dp=8 keeps the paper's global batch and gives each device a micro-batch of 4; ntp is the baseline.
  wide = core_config.load_config_file(path, "qwen1.5-7b,ntp,dp=8")
  assert (wide.batch_size, wide.grad_accum_steps, wide.vpt.mode) == (128, 4, "ntp")
  assert wide.batch_size // wide.grad_accum_steps // 8 == 4
  with pytest.raises(ValueError, match="dp=3"):
    core_config.load_config_file(path, "qwen1.5-7b,dp=3")


@pytest.mark.slow
def test_7b_dry_run_on_8_simulated_devices_never_holds_the_weights():
  """`python -m vpt.main --dry_run` on the Qwen1.5-7B V-Pretraining config, fsdp over 8 simulated
  devices. The real widths and vocabulary, but 2 of the 32 blocks (compiling all 32 on 2 CPU cores
  takes minutes; the 32-block figures are in experiments/README_qwen.md). The weights alone would be
  2.1B × 4 bytes = 8.5 GB at 2 blocks; the process must stay far below that."""
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
  cmd = [sys.executable, "-m", "vpt.main", "--config", "experiments/qwen.py:qwen1.5-7b,dp=8", "--dry_run",
         "--dry_run_devices=8", "--dry_run_hbm_gb=80", "--config.model.n_layers=2"]
  # A wrapper process so that ru_maxrss is this child's alone (not pytest's other children's).
  wrapper = ("import resource, subprocess, sys; r = subprocess.run(sys.argv[1:]); "
             "print('MAXRSS_KB', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(r.returncode)")
  proc = subprocess.run([sys.executable, "-c", wrapper, *cmd], cwd=REPO, env=env, capture_output=True, text=True,
                        timeout=300)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  out = proc.stdout
  n_params = int(re.search(r"learner parameters: ([\d,]+)", out).group(1).replace(",", ""))
  d, v, f = 4096, 151936, 11008
  assert n_params == 2 * v * d + 2 * (4 * d * d + 3 * d + 3 * d * f + 2 * d) + d  # untied head, 2 blocks
  for row in ("parameters", "optimizer state", "designer", "temporaries (activations)", "peak estimate"):
    assert row in out, out
  gb = lambda row: float(re.search(row + r"\s+([\d.]+) GB", out).group(1))
  assert abs(gb("parameters") - n_params * 4 / 8 / GB) < 0.01  # fp32, fully sharded over fsdp=8
  assert abs(gb("optimizer state") - 2 * gb("parameters")) < 0.01  # Adam's two moments, sharded alike
  # ≈ 40 GB of temporaries measured (XLA 0.10, CPU): vocabulary-sized logits for 4 rows × 1024 tokens,
  # the meta step's, all-gathered weights. A replicated batch (8× the activations) would be far above.
  assert gb(r"temporaries \(activations\)") < 60, out
  assert re.search(r"budget 80 GB per device: (fits|does not fit)", out)
  maxrss_gb = int(re.search(r"MAXRSS_KB (\d+)", out).group(1)) / 1024 ** 2
  assert maxrss_gb < 4.0, maxrss_gb


@pytest.mark.slow
def test_vision_dry_run_on_simulated_devices():
  """`--dry_run --dry_run_devices 2` on a vision config. Its config file imports jax (the ViT's schema),
  which once made every such dry run stop with "must be set before JAX is imported": the device flag
  only has to precede the backends' start, not the import."""
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
  proc = subprocess.run([sys.executable, "-m", "vpt.main", "--config", "experiments/vision_dino.py:nano,dino",
                         "--dry_run", "--dry_run_devices=2"], cwd=REPO, env=env, capture_output=True, text=True,
                        timeout=600)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  assert "on 2 × cpu devices" in proc.stdout and "peak estimate" in proc.stdout, proc.stdout


def test_dry_run_from_an_hf_directory_compiles_the_checkpoints_shape(tmp_path):
  """The learner's shape comes from the HF config.json (as training takes it), not from the preset."""
  import torch
  import transformers
  torch.manual_seed(0)
  hf_cfg = transformers.Qwen2Config(hidden_size=48, num_attention_heads=4, num_key_value_heads=2, intermediate_size=96,
                                    num_hidden_layers=3, vocab_size=320, tie_word_embeddings=False)
  model = transformers.Qwen2ForCausalLM(hf_cfg)
  model.save_pretrained(str(tmp_path / "qwen"))
  n_hf = sum(p.numel() for p in model.parameters())
  config = _nano(**{"model.vocab_size": 0, "vpt.mode": "ntp", "init_from": str(tmp_path / "qwen")})
  report = aot.dry_run(config, echo=False)
  assert report["num_params"] == n_hf
  assert report["num_params"] != aot.dry_run(_nano(**{"vpt.mode": "ntp"}), echo=False)["num_params"]
