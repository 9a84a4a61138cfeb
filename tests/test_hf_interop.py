"""Hugging Face interop: tiny transformers models in and out of vpt (logits, greedy tokens, bit-exact
round trips, sharded import, broken checkpoints, the CLI, training from an HF directory, tokenizers)."""

import dataclasses
import json
import os
import pickle
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from jax.sharding import NamedSharding, PartitionSpec as P
from safetensors.numpy import load_file, save_file

from vpt.core import checkpoint as ckpt_lib, config as core_config, lora as lora_lib, sharding
from vpt.language import config_lib, generate as gen, train
from vpt.language.data import tokenizer as tok_lib
from vpt.language.interop import hf
from vpt.language.models.lm import SHARDING_RULES, LMConfig, Transformer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

# name -> (transformers class, config kwargs). All float32, 2 layers.
CASES = {
    "qwen2_untied_gqa42": ("qwen2", dict(hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                                         intermediate_size=64, vocab_size=128, tie_word_embeddings=False)),
    "qwen2_tied_gqa41": ("qwen2", dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=1,
                                       intermediate_size=96, vocab_size=192, tie_word_embeddings=True)),
    # Qwen1.5: Qwen2ForCausalLM with MHA and q/k/v biases; its config.json is rewritten below in the
    # old layout (top-level rope_theta, rope_scaling: null).
    "qwen15_mha_legacy": ("qwen2", dict(hidden_size=32, num_attention_heads=4, num_key_value_heads=4,
                                        intermediate_size=64, vocab_size=160, tie_word_embeddings=False,
                                        rope_parameters={"rope_type": "default", "rope_theta": 1e6})),
    "llama_gqa_nobias": ("llama", dict(hidden_size=48, num_attention_heads=4, num_key_value_heads=2,
                                       intermediate_size=80, vocab_size=256, tie_word_embeddings=False,
                                       head_dim=16)),
}


def _build(family, **kw):
  torch.manual_seed(0)
  # A wide init makes the next-token distribution peaked, so greedy decoding has no near-ties.
  common = dict(num_hidden_layers=2, initializer_range=0.25, rms_norm_eps=1e-6, bos_token_id=None,
                eos_token_id=None, pad_token_id=None)
  if family == "qwen2":
    model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**common, **kw))
  else:
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**common, **kw))
  with torch.no_grad():  # norms away from 1 and non-zero biases, so a mix-up would show.
    for name, p in model.named_parameters():
      if name.endswith("norm.weight") or name.endswith(".bias"):
        p.copy_(torch.randn_like(p) * 0.2 + (1.0 if "norm" in name else 0.0))
  return model.eval()


def _to_legacy_config(path):
  with open(path) as f:
    c = json.load(f)
  c["rope_theta"] = c.pop("rope_parameters")["rope_theta"]
  c["rope_scaling"] = None
  c.pop("layer_types", None)
  c.update(use_sliding_window=False, sliding_window=32768, max_window_layers=21)
  with open(path, "w") as f:
    json.dump(c, f)


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
  """name -> (HF model, directory). qwen2_untied_gqa42 is also saved sharded (with an index)."""
  root = tmp_path_factory.mktemp("hf")
  out = {}
  for name, (family, kw) in CASES.items():
    model = _build(family, **kw)
    path = str(root / name)
    model.save_pretrained(path, max_shard_size="20KB" if name == "qwen2_untied_gqa42" else "50MB")
    if name == "qwen15_mha_legacy":
      _to_legacy_config(os.path.join(path, "config.json"))
    out[name] = (model, path)
  assert os.path.isfile(os.path.join(out["qwen2_untied_gqa42"][1], hf.INDEX_NAME))
  return out


def _tokens(vocab, shape=(2, 12), seed=0):
  return np.random.default_rng(seed).integers(0, vocab, size=shape)


def _hf_logits(model, ids):
  with torch.no_grad():
    return model(torch.tensor(ids)).logits.numpy()


def _vpt_logits(cfg, params, ids):
  return np.asarray(jax.jit(Transformer(cfg).apply)({"params": params}, jnp.asarray(ids)))


@pytest.mark.parametrize("name", list(CASES))
def test_import_matches_transformers_logits_and_greedy_tokens(hf_dirs, name):
  model, path = hf_dirs[name]
  params, cfg = hf.import_params(path)
  expected = dict(CASES[name][1])
  assert (cfg.vocab_size, cfg.d_model, cfg.n_kv_heads) == (expected["vocab_size"], expected["hidden_size"],
                                                           expected["num_key_value_heads"])
  assert cfg.tie_embeddings == expected["tie_word_embeddings"] and cfg.qkv_bias == (CASES[name][0] == "qwen2")
  assert cfg.rope_theta == (1e6 if name == "qwen15_mha_legacy" else 1e4)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))

  prompt = _tokens(cfg.vocab_size, (2, 7), seed=1)
  with torch.no_grad():
    ref = model.generate(torch.tensor(prompt), attention_mask=torch.ones(prompt.shape, dtype=torch.long),
                         do_sample=False, max_new_tokens=32, eos_token_id=None, pad_token_id=0).numpy()
  ours = gen.generate_tokens(cfg, params, prompt.tolist(), max_new_tokens=32, eos_id=-1, pad_id=0)
  np.testing.assert_array_equal(ours, ref[:, prompt.shape[1]:])
  assert len(np.unique(ours)) > 8  # a real continuation, not one token repeated
  ids = np.concatenate([ref[:, :-1], _tokens(cfg.vocab_size, (2, 1))], axis=1)  # a random batch, 39 positions
  np.testing.assert_allclose(_vpt_logits(cfg, params, ids), _hf_logits(model, ids), atol=1e-4, rtol=0)


def _tensors(path):
  files = sorted(set(hf.tensor_files(path).values()))
  return {k: v for f in files for k, v in load_file(f).items()}


@pytest.mark.parametrize("name,shard", [("qwen2_untied_gqa42", "50MB"), ("qwen2_tied_gqa41", "30KB"),
                                        ("llama_gqa_nobias", "50MB")])
def test_export_loads_in_transformers_and_round_trips_bit_exactly(hf_dirs, tmp_path, name, shard):
  model, path = hf_dirs[name]
  params, cfg = hf.import_params(path)
  out = str(tmp_path / "export")
  hf.export_hf(params, cfg, out, template=hf.read_config(path)[0], max_shard_size=shard)
  assert os.path.isfile(os.path.join(out, hf.INDEX_NAME)) == (shard == "30KB")
  loaded, info = transformers.AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
  assert type(loaded) is type(model)
  assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
  ids = _tokens(cfg.vocab_size)
  np.testing.assert_allclose(_hf_logits(loaded.eval(), ids), _hf_logits(model, ids), atol=1e-6, rtol=0)
  # import∘export is the identity on the safetensors tensors, bit for bit.
  original, exported = _tensors(path), _tensors(out)
  assert sorted(original) == sorted(exported)
  for k in original:
    assert original[k].dtype == exported[k].dtype and np.array_equal(original[k], exported[k]), k
  if shard == "30KB":  # a bfloat16 export re-imports as the float32 params rounded to bfloat16.
    hf.export_hf(params, cfg, str(tmp_path / "bf16"), dtype="bfloat16")
    again, _ = hf.import_params(str(tmp_path / "bf16"))
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(again)):
      assert b.dtype == jnp.float32
      np.testing.assert_array_equal(np.asarray(a).astype(jnp.bfloat16).astype(np.float32), np.asarray(b))


def test_sharded_import_on_8_devices_matches_single_device(hf_dirs):
  model, path = hf_dirs["qwen2_untied_gqa42"]  # the sharded (indexed) checkpoint
  mesh = sharding.make_mesh(core_config.with_overrides(config_lib.base_config(), {
      "mesh.data": 1, "mesh.fsdp": 4, "mesh.tensor": 2}).mesh)
  sharded, cfg = hf.import_params(path, mesh=mesh)
  single, _ = hf.import_params(path)
  expected = sharding.param_shardings(sharded, mesh, SHARDING_RULES)
  for x, s in zip(jax.tree.leaves(sharded), jax.tree.leaves(expected)):
    assert x.sharding == s
  q = sharded["layers_0"]["self_attn"]["q_proj"]["kernel"]
  assert q.sharding == NamedSharding(mesh, P("fsdp", "tensor")) and len(q.sharding.device_set) == 8
  assert q.addressable_shards[0].data.shape == (32 // 4, 32 // 2)
  for a, b in zip(jax.tree.leaves(sharded), jax.tree.leaves(single)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  ids = _tokens(cfg.vocab_size)
  np.testing.assert_allclose(_vpt_logits(cfg, sharded, ids), _vpt_logits(cfg, single, ids), atol=1e-5, rtol=0)


def _broken_copy(src, dst, *, edit_tensors=None, edit_config=None):
  os.makedirs(dst)
  shutil.copy(os.path.join(src, "config.json"), dst)
  tensors = _tensors(src)
  if edit_tensors:
    edit_tensors(tensors)
  save_file(tensors, os.path.join(dst, "model.safetensors"), metadata={"format": "pt"})
  if edit_config:
    with open(os.path.join(dst, "config.json")) as f:
      c = json.load(f)
    edit_config(c)
    with open(os.path.join(dst, "config.json"), "w") as f:
      json.dump(c, f)
  return dst


def test_broken_checkpoints_fail_naming_the_tensor_or_field(hf_dirs, tmp_path):
  src = hf_dirs["llama_gqa_nobias"][1]
  cases = [
      (dict(edit_tensors=lambda t: t.pop("model.layers.1.mlp.up_proj.weight")),
       r"model\.layers\.1\.mlp\.up_proj\.weight.* missing"),
      (dict(edit_tensors=lambda t: t.update({"model.layers.0.self_attn.k_proj.weight": np.zeros((16, 48), np.float32)})),
       r"model\.safetensors: tensor 'model\.layers\.0\.self_attn\.k_proj\.weight' has shape \[16, 48\], expected \[32, 48\]"),
      (dict(edit_tensors=lambda t: t.update({"model.layers.0.self_attn.o_proj.bias": np.zeros(48, np.float32)})),
       r"model\.safetensors: unexpected tensor 'model\.layers\.0\.self_attn\.o_proj\.bias'"),
      (dict(edit_config=lambda c: c.update(architectures=["MistralForCausalLM"])),
       r"config\.json: architectures=\['MistralForCausalLM'\] is not supported"),
      (dict(edit_config=lambda c: c.update(architectures=None, model_type="gpt2")),
       r"config\.json: model_type='gpt2' is not supported"),
      (dict(edit_config=lambda c: c.update(rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0})),
       r"config\.json: rope_parameters\.rope_type='yarn' is not supported"),
      (dict(edit_config=lambda c: c.update(rope_scaling={"type": "linear", "factor": 2.0})),
       r"config\.json: rope_scaling\.rope_type='linear' is not supported"),
      (dict(edit_config=lambda c: c.update(attention_bias=True)), r"config\.json: attention_bias=True is not supported"),
      (dict(edit_config=lambda c: c.update(hidden_act="gelu")), r"config\.json: hidden_act='gelu' is not supported"),
  ]
  for i, (edits, pattern) in enumerate(cases):
    path = _broken_copy(src, str(tmp_path / f"b{i}"), **edits)
    with pytest.raises(ValueError, match=pattern):
      hf.import_params(path)
  qwen = _broken_copy(hf_dirs["qwen2_tied_gqa41"][1], str(tmp_path / "sw"),
                      edit_config=lambda c: c.update(use_sliding_window=True))
  with pytest.raises(ValueError, match=r"config\.json: use_sliding_window=True is not supported"):
    hf.import_params(qwen)
  with pytest.raises(FileNotFoundError, match="no \\*.safetensors"):
    os.makedirs(tmp_path / "noweights")
    shutil.copy(os.path.join(src, "config.json"), tmp_path / "noweights")
    hf.import_params(str(tmp_path / "noweights"))


def test_export_folds_lora_adapters_through_merge_fn(tmp_path):
  cfg = LMConfig(vocab_size=96, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, tie_embeddings=False,
                 lora_rank=4, lora_alpha=8.0, lora_dropout=0.0)
  # Random NumPy params of the adapted model's shapes (lora_b too, so folding the adapters in matters).
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda a: rng.normal(0.0, 0.2, a.shape).astype(np.float32), hf.abstract_params(cfg))
  with pytest.raises(ValueError, match="lora_a.*merge_fn"):
    hf.export_hf(params, cfg, str(tmp_path / "nomerge"))
  out = str(tmp_path / "merged")
  hf.export_hf(params, cfg, out, merge_fn=lambda p: lora_lib.merge_lora(p, cfg))
  loaded, info = transformers.AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
  assert not info["missing_keys"] and not info["unexpected_keys"], info
  ids = _tokens(cfg.vocab_size)
  np.testing.assert_allclose(_hf_logits(loaded.eval(), ids), _vpt_logits(cfg, params, ids), atol=1e-4, rtol=0)


def test_cli_export_of_a_lora_run_needs_merge_lora(monkeypatch):
  import sys
  import vpt.core
  monkeypatch.delattr(vpt.core, "lora")
  monkeypatch.setitem(sys.modules, "vpt.core.lora", None)  # as if the module did not exist
  model_cfg = config_lib.model_config("nano")
  model_cfg.lora_rank = 2
  with pytest.raises(ValueError, match=r"RUN/config\.json: model\.lora_rank=2 .*merge_lora is not available"):
    hf._lora_merge_fn(model_cfg, "RUN")


def test_config_mapping_layouts():
  base = dict(architectures=["Qwen2ForCausalLM"], hidden_size=64, num_hidden_layers=3, num_attention_heads=8,
              num_key_value_heads=2, intermediate_size=128, vocab_size=300)
  cfg = hf.lm_config_from_hf({**base, "rope_theta": 5e5, "rope_scaling": None, "tie_word_embeddings": True})
  assert (cfg.rope_theta, cfg.tie_embeddings, cfg.qkv_bias, cfg.resolved_head_dim) == (5e5, True, True, 8)
  cfg = hf.lm_config_from_hf({**base, "rope_parameters": {"rope_type": "default", "rope_theta": 2e4}, "head_dim": 16,
                              "attention_bias": False})  # Qwen2's q/k/v bias is always on
  assert (cfg.rope_theta, cfg.head_dim, cfg.qkv_bias, cfg.tie_embeddings) == (2e4, 16, True, False)
  llama = {**base, "architectures": ["LlamaForCausalLM"], "model_type": "llama", "num_key_value_heads": None}
  cfg = hf.lm_config_from_hf(llama)
  assert (cfg.qkv_bias, cfg.n_kv_heads, cfg.rope_theta) == (False, 8, 1e4)
  assert hf.lm_config_from_hf(hf.hf_config_from_lm(cfg)) == cfg
  with pytest.raises(ValueError, match="model_type='qwen2' does not match"):
    hf.lm_config_from_hf({**llama, "model_type": "qwen2"})
  with pytest.raises(ValueError, match="vocab_size=None"):
    hf.lm_config_from_hf({k: v for k, v in base.items() if k != "vocab_size"}, "x/config.json")
  assert hf.parse_size("2GiB") == 2 << 30 and hf.parse_size("5GB") == 5 * 10**9 and hf.parse_size(7) == 7


def _write_tokenizer(path, vocab_size):
  """A byte-level BPE tokenizer.json trained with `tokenizers` (no download), Qwen-style files beside it."""
  import tokenizers
  from tokenizers import decoders, models, pre_tokenizers, trainers
  tok = tokenizers.Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  texts = ["Question: what is 12 + 30?\nAnswer: 12 + 30 = 42. #### 42", "The quick brown fox jumps.",
           "Natalia sold 48 clips in April, and half as many in May."] * 20
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS, show_progress=False,
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(texts, trainer)
  os.makedirs(path, exist_ok=True)
  tok.save(os.path.join(path, "tokenizer.json"))
  with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
    json.dump({"bos_token": None, "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}, f)
  with open(os.path.join(path, "generation_config.json"), "w") as f:
    json.dump({"eos_token_id": [2, 0]}, f)


def test_hf_tokenizer_round_trip_and_special_tokens(tmp_path):
  _write_tokenizer(str(tmp_path), 300)
  tok = tok_lib.HFTokenizer(str(tmp_path))
  assert isinstance(tok, tok_lib.Tokenizer)
  endoftext, im_start, im_end = (tok.tok.token_to_id(s) for s in SPECIALS)
  assert (tok.eos_id, tok.bos_id, tok.pad_id) == (endoftext, endoftext, endoftext)  # no bos: eos separates docs
  assert tok.eos_ids == (endoftext, im_end)  # + generation_config's other stop id
  assert tok.vocab_size == 300
  for text in ["Question: what is 12 + 30?\nAnswer:  42", "ünïcode ✓ and  spaces\n\n", "Zebra 9876"]:
    ids = tok.encode(text)
    assert ids and max(ids) < tok.vocab_size and tok.decode(ids) == text
  chat = tok.encode("<|im_start|>user\nhi<|im_end|>")
  assert chat[0] == im_start and chat[-1] == im_end and tok.decode(chat) == "<|im_start|>user\nhi<|im_end|>"
  assert tok.decode([tok.bos_id, *tok.encode("a b"), tok.eos_id, tok.pad_id]) == "a b"
  clone = pickle.loads(pickle.dumps(tok))  # grain worker processes get copies
  assert clone.encode("fox 42") == tok.encode("fox 42") and clone.eos_id == tok.eos_id
  # The instruct layout: tokenizer_config's eos (the chat end) wins over generation_config.
  with open(tmp_path / "tokenizer_config.json", "w") as f:
    json.dump({"eos_token": {"content": "<|im_end|>"}}, f)
  assert tok_lib.HFTokenizer(str(tmp_path / "tokenizer.json")).eos_id == im_end
  data_cfg = config_lib.data_config()
  data_cfg.tokenizer_path = str(tmp_path)
  assert isinstance(tok_lib.load_or_train_tokenizer(data_cfg, "/unused"), tok_lib.HFTokenizer)
  with open(tmp_path / "tokenizer_config.json", "w") as f:
    json.dump({"eos_token": "<|nope|>"}, f)
  with pytest.raises(ValueError, match=r"tokenizer_config\.json: eos_token='<\|nope\|>' is not a token"):
    tok_lib.HFTokenizer(str(tmp_path))


def _nano(**overrides):
  config = core_config.load_config_file(os.path.join(REPO, "experiments", "lm_ntp.py"), "nano")
  return core_config.with_overrides(config, {"progress_bar": False, "mesh.num_devices": 1, **overrides})


@pytest.mark.slow
def test_cli_round_trip_and_training_from_an_hf_directory(tmp_path):
  # A tiny Qwen2 with a real tokenizer.json, shaped unlike the nano preset (which the HF config overrides).
  hf_dir = str(tmp_path / "qwen")
  model = _build("qwen2", hidden_size=48, num_attention_heads=4, num_key_value_heads=2, intermediate_size=96,
                 vocab_size=320, tie_word_embeddings=True)
  model.save_pretrained(hf_dir)
  _write_tokenizer(hf_dir, 300)

  run_dir = str(tmp_path / "imported")
  hf.main(["import", "--hf_dir", hf_dir, "--out", run_dir])
  saved = json.load(open(os.path.join(run_dir, "config.json")))["model"]
  assert (saved["d_model"], saved["vocab_size"], saved["tie_embeddings"]) == (48, 320, True)
  assert os.path.isfile(os.path.join(run_dir, "hf", "tokenizer.json"))
  assert hf.hf_files_dir(run_dir) == os.path.join(run_dir, "hf")
  direct, cfg = hf.import_params(hf_dir)
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device), hf.abstract_params(cfg))
  from_run, step = ckpt_lib.load_learner_params(run_dir, abstract)
  assert step == 0
  for a, b in zip(jax.tree.leaves(direct), jax.tree.leaves(from_run)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

  # Train LoRA adapters straight from the HF directory: shape and tokenizer from it, the base weights
  # imported, the adapters initialised; lr 0 keeps them all.
  workdir = str(tmp_path / "train")
  summary = train.run(_nano(num_steps=2, init_from=hf_dir, **{"optimizer.learning_rate": 0.0, "model.lora_rank": 2}),
                      workdir)
  trained = jax.device_get(summary["state"].params)
  adapters, base = lora_lib.split_lora(trained)
  assert adapters and all(not np.any(v) for k, v in adapters.items() if k.endswith("lora_b"))
  for path, x in hf._flat(direct).items():
    np.testing.assert_array_equal(np.asarray(x), base["/".join(path)])
  assert np.isfinite(summary["train"]["loss"])
  assert json.load(open(os.path.join(workdir, "config.json")))["model"]["d_model"] == 48
  assert os.path.isfile(os.path.join(workdir, "hf", "tokenizer.json"))
  with pytest.raises(ValueError, match=r"model\.d_model=40 \(the checkpoint has 48\)"):
    train.run(_nano(num_steps=2, init_from=hf_dir, **{"model.d_model": 40}), str(tmp_path / "bad"))

  # Export the trained run (the CLI folds the adapters in): transformers loads it, with the tokenizer
  # files, and agrees with the source.
  out = str(tmp_path / "export")
  hf.main(["export", "--checkpoint", workdir, "--out", out])
  loaded, info = transformers.AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
  assert not info["missing_keys"] and not info["unexpected_keys"], info
  assert os.path.isfile(os.path.join(out, "tokenizer.json")) and os.path.isfile(os.path.join(out, "generation_config.json"))
  ids = _tokens(300)
  np.testing.assert_allclose(_hf_logits(loaded.eval(), ids), _hf_logits(model, ids), atol=1e-5, rtol=0)


@pytest.fixture(scope="module")
def imported_run(tmp_path_factory):
  """(HF directory with a tokenizer.json, the vpt run `hf import` made of it, the HF model)."""
  root = tmp_path_factory.mktemp("imported")
  hf_dir = str(root / "qwen")
  model = _build("qwen2", hidden_size=48, num_attention_heads=4, num_key_value_heads=2, intermediate_size=96,
                 vocab_size=320, tie_word_embeddings=True)
  model.save_pretrained(hf_dir)
  _write_tokenizer(hf_dir, 300)
  run_dir = str(root / "run")
  hf.import_to_run(hf_dir, run_dir)
  return hf_dir, run_dir, model


@pytest.mark.slow
def test_lora_run_initialised_from_an_imported_run(imported_run, tmp_path):
  """The path `hf import` recommends, with LoRA: the base weights are the imported ones, the adapters
  (absent from the imported checkpoint) keep their LoRA initialisation (lr 0 keeps everything)."""
  hf_dir, run_dir, _ = imported_run
  config = _nano(num_steps=2, init_from=run_dir, eval_every_steps=1000,
                 **{"optimizer.learning_rate": 0.0, "model.lora_rank": 2})
  summary = train.run(config, str(tmp_path / "lora"))
  assert np.isfinite(summary["train"]["loss"])
  trained = jax.device_get(summary["state"].params)
  adapters, base = lora_lib.split_lora(trained)
  direct, _ = hf.import_params(hf_dir)
  assert set(base) == {"/".join(p) for p in hf._flat(direct)}
  for path, x in hf._flat(direct).items():
    np.testing.assert_array_equal(np.asarray(x), base["/".join(path)])
  # The adapters are those of the run's own initialisation: A random, B zero.
  run_config = hf.config_with_hf_model(config, hf_dir)
  model_cfg = LMConfig.from_config(run_config.model, 320)
  init = jax.jit(train.make_init_fn(run_config, Transformer(model_cfg), train.make_learner_optimizer(
      run_config, model_cfg)[0]))()
  init_adapters = lora_lib.split_lora(jax.device_get(init.params))[0]
  assert adapters.keys() == init_adapters.keys() and adapters
  for k, v in adapters.items():
    np.testing.assert_array_equal(v, init_adapters[k], err_msg=k)
    assert np.any(v) == k.endswith("lora_a"), k


def test_init_from_a_run_that_does_not_match_names_the_parameter(imported_run):
  _, run_dir, _ = imported_run
  cfg = hf.lm_config_from_hf(hf.read_config(os.path.join(run_dir, "hf"))[0])
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  place = lambda tree: jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device), tree)
  wider = place(hf.abstract_params(dataclasses.replace(cfg, d_ff=128)))
  with pytest.raises(ValueError, match=r"layers_0/mlp/down_proj/kernel' has shape \[96, 48\] .* this model's is \[128, 48\]"):
    ckpt_lib.load_learner_params(run_dir, wider)
  untied = place(hf.abstract_params(dataclasses.replace(cfg, tie_embeddings=False)))
  with pytest.raises(ValueError, match=r"'lm_head/kernel' is one of 1 leaves this model has but the checkpoint lacks"):
    ckpt_lib.load_learner_params(run_dir, untied)


def test_truncated_weights_and_unsafe_shard_names_fail_naming_the_file(hf_dirs, tmp_path):
  src = hf_dirs["llama_gqa_nobias"][1]
  for i, keep in enumerate([0.5, 8 / 1000]):  # into the data, into the header
    bad = _broken_copy(src, str(tmp_path / f"t{i}"))
    weights = os.path.join(bad, "model.safetensors")
    with open(weights, "r+b") as f:
      f.truncate(max(int(os.path.getsize(weights) * keep), 8))
    with pytest.raises(ValueError, match=rf"{weights}: not a readable safetensors file"):
      hf.import_params(bad)
  sharded = hf_dirs["qwen2_untied_gqa42"][1]
  for shard in ("../x.safetensors", "/abs/x.safetensors", "sub/x.safetensors", "sub\\x.safetensors", "..", ""):
    bad = str(tmp_path / f"idx{abs(hash(shard))}")
    shutil.copytree(sharded, bad)
    index = os.path.join(bad, hf.INDEX_NAME)
    with open(index) as f:
      data = json.load(f)
    data["weight_map"]["lm_head.weight"] = shard
    with open(index, "w") as f:
      json.dump(data, f)
    with pytest.raises(ValueError, match=rf"{index}: tensor 'lm_head\.weight' is in shard {re.escape(repr(shard))}"):
      hf.import_params(bad)


def _hf_copy(src, dst, **config_updates):
  """A copy of an HF directory's config and tokenizer files (no weights), config.json edited."""
  hf.copy_hf_files(src, dst)
  path = os.path.join(dst, "config.json")
  with open(path) as f:
    c = json.load(f)
  c.update(config_updates)
  with open(path, "w") as f:
    json.dump(c, f)
  return dst


def test_training_with_another_models_smaller_tokenizer_fails_naming_both_files(imported_run, tmp_path):
  hf_dir, _, _ = imported_run
  other = str(tmp_path / "other_tok")
  _write_tokenizer(other, 280)  # smaller than the model's 320 rows, merges of its own
  with pytest.raises(ValueError, match=rf"tokenizer {other}/tokenizer\.json and the checkpoint's {hf_dir}/tokenizer\.json "
                                       r"encode 'Question: .* differently"):
    train.run(_nano(num_steps=1, init_from=hf_dir, **{"data.tokenizer_path": other}), str(tmp_path / "run"))
  assert not os.path.exists(tmp_path / "run" / "checkpoints")


def test_check_tokenizer_size_and_special_tokens(imported_run, tmp_path):
  hf_dir, _, _ = imported_run
  tok = tok_lib.HFTokenizer(hf_dir)
  hf.check_tokenizer(tok, hf_dir)  # its own tokenizer: fine (300 ids in 320 rows)
  copy = str(tmp_path / "copy")
  shutil.copytree(hf_dir, copy)
  hf.check_tokenizer(tok_lib.HFTokenizer(copy), hf_dir)  # an identical copy elsewhere encodes alike
  endoftext = tok.eos_id
  hf.check_tokenizer(tok, _hf_copy(hf_dir, str(tmp_path / "ok"), eos_token_id=endoftext, bos_token_id=endoftext))
  cases = [
      (dict(vocab_size=4096), r"has 300 ids but .*/big/config\.json has vocab_size=4,096: .* not by 3,796 \(> 1,024"),
      (dict(vocab_size=290), r"\(300 ids\) outgrows the vocabulary of .*/small/config\.json \(vocab_size=290\)"),
      (dict(eos_token_id=7), r"ends documents with eos id \d+, but .*/eos/config\.json has eos_token_id=7"),
  ]
  for (edits, pattern), name in zip(cases, ("big", "small", "eos")):
    target = _hf_copy(hf_dir, str(tmp_path / name), **edits)
    if name == "eos":
      os.remove(os.path.join(target, "generation_config.json"))  # else its stop ids are accepted too
    with pytest.raises(ValueError, match=pattern):
      hf.check_tokenizer(tok, target)
  # Without a bos of its own the tokenizer starts documents with eos, which any bos_token_id accepts;
  # an explicit bos (or pad, when it is not eos) must be the config's.
  hf.check_tokenizer(tok, _hf_copy(hf_dir, str(tmp_path / "bos0"), bos_token_id=9, pad_token_id=5))
  with open(os.path.join(copy, "tokenizer_config.json"), "w") as f:
    json.dump({"bos_token": "<|im_start|>", "eos_token": "<|endoftext|>", "pad_token": "<|im_end|>"}, f)
  explicit = tok_lib.HFTokenizer(copy)
  assert len({explicit.bos_id, explicit.eos_id, explicit.pad_id}) == 3
  with pytest.raises(ValueError, match=r"has bos id \d+, but .*/bos/config\.json has bos_token_id=9"):
    hf.check_tokenizer(explicit, _hf_copy(hf_dir, str(tmp_path / "bos"), bos_token_id=9))
  with pytest.raises(ValueError, match=r"has pad id \d+, but .*/pad/config\.json has pad_token_id=5"):
    hf.check_tokenizer(explicit, _hf_copy(hf_dir, str(tmp_path / "pad"), pad_token_id=5))
  hf.check_tokenizer(explicit, _hf_copy(hf_dir, str(tmp_path / "both"), bos_token_id=explicit.bos_id,
                                        pad_token_id=explicit.pad_id, eos_token_id=[explicit.eos_id, 2]))


@pytest.mark.slow
def test_gsm8k_eval_of_an_hf_directory_equals_its_imported_run_and_sharded_eval(imported_run, tmp_path):
  """`--workdir` an HF directory scores the base model: the same predictions as its imported run, and
  the same again with the params and the batch sharded over 8 devices (data 2 × fsdp 2 × tensor 2)."""
  from conftest import GSM8K_DIR
  from vpt.language.evals import gsm8k
  hf_dir, run_dir, _ = imported_run
  common = ["--data", os.path.join(GSM8K_DIR, "test.jsonl"), "--limit", "5", "--max-new-tokens", "12",
            "--batch-size", "4"]
  runs = {"hf": (hf_dir, "num_devices=1"), "run": (run_dir, "num_devices=1"),
          "run_8": (run_dir, "data=2,fsdp=2,tensor=2,num_devices=0")}
  predictions = {}
  for name, (workdir, mesh) in runs.items():
    out = str(tmp_path / f"{name}.json")
    scores = gsm8k.main(["--workdir", workdir, "--mesh", mesh, "--out", out] + common)
    assert scores["step"] == 0 and scores["n_items"] == 5
    predictions[name] = [p["generated"] for p in json.load(open(out))["predictions"]]
  assert sum(len(p) for p in predictions["hf"]) > 20  # real continuations, not empty strings
  for name in runs:
    assert predictions[name] == predictions["hf"], name
  assert dict(gsm8k.eval_mesh(hf_dir).shape) == {"data": 1, "fsdp": 8, "tensor": 1}  # HF default: fsdp over all
