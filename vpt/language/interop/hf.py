"""Hugging Face checkpoints (Qwen2 / Qwen2.5 / Qwen1.5, Llama) in and out of vpt.

    python -m vpt.language.interop.hf import --hf_dir DIR --out RUN      # HF directory -> vpt run directory
    python -m vpt.language.interop.hf export --checkpoint RUN --out DIR  # vpt run -> HF directory
    --config.init_from=DIR                                      # train straight from an HF directory

The LM's parameter tree already follows HF's module names, so the mapping is a rename plus a
transpose of the linear kernels (HF stores `weight` as [out, in], vpt `kernel` as [in, out]).
Both sides use rotate-half RoPE with the same frequencies, so q/k rows need no permutation.

Memory. Import never materialises the model on one host: tensors are read one at a time with
`safetensors.safe_open` (memory-mapped; only the header is parsed up front), and each becomes a
global array through `jax.make_array_from_callback`, whose callback reads only the slice one
device holds (`get_slice`), transposed and cast to float32 slice by slice. Peak host memory is
about the distinct slices of one tensor that this host's devices hold. A 7B model is 28 GB in
float32; its largest tensor (Qwen2's 152k × 3584 embedding) is 2.2 GB, and sharded over
fsdp × tensor = 8 devices each slice is ~270 MB, so the model loads into the devices' memory
on a host with far less RAM than the model (a bf16 checkpoint is cast per slice, never whole).
Export gathers one shard file's tensors at a time (peak ≈ `max_shard_size`).

A run directory made by `import` holds `config.json` (the vpt config, HF shapes in `model`),
`checkpoints/0/state` (an orbax PyTree with a `params` item: what `config.init_from` reads, through
vpt.language.learner_source and vpt.core.checkpoint.load_learner_params) and `hf/` (the HF directory without its weights:
config, tokenizer and generation files; the tokenizer of runs started from it and the template
of `export`). A run started from an HF directory copies the same files into its own `hf/`.
Such a directory is an init source: train in a new workdir with `init_from=RUN`.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import json
import os
import re
import sys
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import ml_dtypes  # registers bfloat16 with numpy: safetensors then reads bf16 checkpoints.
import numpy as np
from flax import traverse_util
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from vpt.core import checkpoint as ckpt_lib, paths, run_dir as run_dir_lib, sharding as sharding_lib
from vpt.core.lora import LORA_LEAVES
from vpt.language import config_lib
from vpt.language.data.tokenizer import HFTokenizer
from vpt.language.models.lm import SHARDING_RULES, LMConfig, Transformer

ARCHITECTURES = {"Qwen2ForCausalLM": "qwen2", "LlamaForCausalLM": "llama"}
INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
HF_SUBDIR = run_dir_lib.HF_SUBDIR  # WORKDIR/hf: the HF files of a run imported or started from HF
DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16}
# Non-persistent RoPE buffers that old exports wrote into the weights; nothing to import.
_IGNORED = re.compile(r"(^|\.)rotary_emb\.inv_freq$")
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".onnx")
_FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")
# Fields an export keeps from the source checkpoint's config.json (token ids, context length).
_TEMPLATE_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id", "max_position_embeddings",
                  "initializer_range", "attention_dropout", "use_cache")
# The LMConfig fields that are the checkpoint's shape (the rest: dtype, remat, LoRA, ...).
ARCH_FIELDS = ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff", "head_dim",
               "rope_theta", "rms_norm_eps", "qkv_bias", "tie_embeddings")
_PRESETS = ("nano", "tiny", "small")


# ----------------------------------------------------------------------------------------------
# Configs.


def is_hf_dir(path: str) -> bool:
  """A Hugging Face model directory: its config.json names `architectures` or `model_type`."""
  try:
    data = json.loads((paths.path(path) / "config.json").read_text())
  except (OSError, ValueError):
    return False
  return isinstance(data, dict) and ("architectures" in data or "model_type" in data)


def hf_files_dir(init_from: str) -> str | None:
  """The HF config/tokenizer directory behind `init_from`: itself if it is an HF directory, its
  `hf/` if it is a vpt run imported from (or trained from) one, else None."""
  if is_hf_dir(init_from):
    return init_from
  sub = os.path.join(init_from, HF_SUBDIR)
  return sub if is_hf_dir(sub) else None


def read_config(hf_dir: str) -> tuple[dict, str]:
  """(config.json as a dict, its path)."""
  path = os.path.join(hf_dir, "config.json")
  if not paths.path(path).is_file():
    raise FileNotFoundError(f"{path}: no such file (expected a Hugging Face model directory)")
  try:
    data = json.loads(paths.path(path).read_text())
  except ValueError as e:
    raise ValueError(f"{path}: not valid JSON ({e})") from e
  if not isinstance(data, dict):
    raise ValueError(f"{path}: expected a JSON object")
  return data, path


def _family(hf: dict, source: str) -> str:
  archs, model_type = hf.get("architectures"), hf.get("model_type")
  if archs:
    if not isinstance(archs, list) or len(archs) != 1 or archs[0] not in ARCHITECTURES:
      raise ValueError(f"{source}: architectures={archs!r} is not supported; expected one of "
                       f"{sorted(ARCHITECTURES)}")
    family = ARCHITECTURES[archs[0]]
    if model_type is not None and model_type != family:
      raise ValueError(f"{source}: model_type={model_type!r} does not match architectures={archs!r} "
                       f"(expected {family!r})")
    return family
  if model_type not in ARCHITECTURES.values():
    raise ValueError(f"{source}: model_type={model_type!r} is not supported (and no architectures); "
                     f"expected one of {sorted(set(ARCHITECTURES.values()))}")
  return model_type


def _rope_theta(hf: dict, source: str) -> float:
  """θ from the old (`rope_theta`, `rope_scaling`) or new (`rope_parameters`) layout; plain RoPE only."""
  theta = hf.get("rope_theta", 10_000.0)
  for field in ("rope_scaling", "rope_parameters"):
    rp = hf.get(field)
    if rp is None:
      continue
    if not isinstance(rp, dict):
      raise ValueError(f"{source}: {field}={rp!r}: expected an object or null")
    kind = rp.get("rope_type", rp.get("type", "default"))
    if kind != "default":
      raise ValueError(f"{source}: {field}.rope_type={kind!r} is not supported: vpt's LM implements plain "
                       "RoPE (rope_type 'default'); scaled variants (linear, dynamic, yarn, llama3, ...) "
                       "change the logits")
    if float(rp.get("partial_rotary_factor", 1.0)) != 1.0:
      raise ValueError(f"{source}: {field}.partial_rotary_factor={rp['partial_rotary_factor']!r} is not "
                       "supported (vpt rotates the whole head)")
    theta = rp.get("rope_theta", theta)
  return float(theta)


def lm_config_from_hf(hf: dict, source: str = "config.json", **overrides) -> LMConfig:
  """The LMConfig of an HF config.json (dict); `overrides` set non-shape fields (dtype, remat)."""
  family = _family(hf, source)

  def reject(field, why):
    raise ValueError(f"{source}: {field}={hf[field]!r} is not supported: {why}")

  def positive_int(field):
    value = hf.get(field)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
      raise ValueError(f"{source}: {field}={value!r}: expected a positive integer")
    return value

  if hf.get("hidden_act", "silu") != "silu":
    reject("hidden_act", "the LM's MLP is SwiGLU (silu)")
  if hf.get("quantization_config"):
    reject("quantization_config", "quantized weights cannot be read; use an unquantized checkpoint")
  if family == "llama":
    if hf.get("attention_bias"):
      reject("attention_bias", "Llama's attention bias includes o_proj, which vpt's LM does not have")
    if hf.get("mlp_bias"):
      reject("mlp_bias", "vpt's MLP has no biases")
  elif hf.get("use_sliding_window"):
    reject("use_sliding_window", "vpt's LM attends to the whole context in every layer")
  layer_types = hf.get("layer_types")
  if layer_types and any(t != "full_attention" for t in layer_types):
    reject("layer_types", "only full attention layers are supported")
  d_model, n_heads = positive_int("hidden_size"), positive_int("num_attention_heads")
  n_kv = positive_int("num_key_value_heads") if hf.get("num_key_value_heads") is not None else n_heads
  if n_heads % n_kv:
    raise ValueError(f"{source}: num_key_value_heads={n_kv} does not divide num_attention_heads={n_heads}")
  head_dim = positive_int("head_dim") if hf.get("head_dim") is not None else d_model // n_heads
  return LMConfig(
      vocab_size=positive_int("vocab_size"), d_model=d_model, n_layers=positive_int("num_hidden_layers"),
      n_heads=n_heads, n_kv_heads=n_kv, d_ff=positive_int("intermediate_size"), head_dim=head_dim,
      rope_theta=_rope_theta(hf, source), rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
      # Qwen2 always has q/k/v biases (its config's attention_bias is not read by transformers).
      qkv_bias=family == "qwen2", tie_embeddings=bool(hf.get("tie_word_embeddings", False)), **overrides)


def hf_config_from_lm(cfg: LMConfig, *, architecture: str | None = None, template: dict | None = None,
                      dtype: str = "float32") -> dict:
  """The HF config.json for `cfg`. `template` (the source checkpoint's config) supplies token ids
  and the context length; the architecture defaults to the template's, else Qwen2 with q/k/v
  biases and Llama without."""
  template = template or {}
  if architecture is None:
    arch = (template.get("architectures") or [None])[0]
    architecture = arch if arch in ARCHITECTURES else ("Qwen2ForCausalLM" if cfg.qkv_bias else "LlamaForCausalLM")
  if architecture not in ARCHITECTURES:
    raise ValueError(f"architecture={architecture!r}: expected one of {sorted(ARCHITECTURES)}")
  family = ARCHITECTURES[architecture]
  if family == "qwen2" and not cfg.qkv_bias:
    raise ValueError("architecture='Qwen2ForCausalLM' always has q/k/v biases but the model has qkv_bias=False; "
                     "export it as LlamaForCausalLM")
  if family == "llama" and cfg.qkv_bias:
    raise ValueError("architecture='LlamaForCausalLM' with attention_bias would also bias o_proj, but the model "
                     "has q/k/v biases only (qkv_bias=True); export it as Qwen2ForCausalLM")
  out = {k: template[k] for k in _TEMPLATE_KEYS if k in template}
  theta = float(cfg.rope_theta)
  out.update({
      "architectures": [architecture], "model_type": family, "vocab_size": cfg.vocab_size,
      "hidden_size": cfg.d_model, "intermediate_size": cfg.d_ff, "num_hidden_layers": cfg.n_layers,
      "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.n_kv_heads,
      "head_dim": cfg.resolved_head_dim, "hidden_act": "silu", "rms_norm_eps": cfg.rms_norm_eps,
      # Both RoPE layouts and both dtype keys: transformers 5 reads the first, 4.x the second.
      "rope_parameters": {"rope_type": "default", "rope_theta": theta}, "rope_theta": theta,
      "tie_word_embeddings": cfg.tie_embeddings, "dtype": dtype, "torch_dtype": dtype,
  })
  out.setdefault("max_position_embeddings", 32768)
  if family == "llama":
    out.update(attention_bias=False, mlp_bias=False)
  else:
    out.update(use_sliding_window=False)
  return out


def config_with_hf_model(config: ml_collections.ConfigDict, hf_dir: str) -> ml_collections.ConfigDict:
  """A copy of a vpt config whose learner shape (`model.` ARCH_FIELDS) is the HF checkpoint's.

  A field still at a preset's value (config_lib.model_config) is replaced; one the user set to
  something else that disagrees with the checkpoint is an error naming it.
  """
  hf, source = read_config(hf_dir)
  lm = lm_config_from_hf(hf, source)
  presets = []
  for size in _PRESETS:
    with contextlib.suppress(ValueError):
      presets.append(config_lib.model_config(size))
  config = copy.deepcopy(config)
  conflicts = []
  with config.unlocked():
    for field in ARCH_FIELDS:
      value = getattr(lm, field) if field != "head_dim" else lm.resolved_head_dim
      user = config.model[field]
      if field in ("vocab_size", "head_dim"):
        unset = user in (0, value)  # 0 means "derive it"
      else:
        unset = user == value or any(field in p and user == p[field] for p in presets)
      if not unset:
        conflicts.append(f"model.{field}={user!r} (the checkpoint has {value!r})")
      config.model[field] = value
  if conflicts:
    raise ValueError(f"config.init_from={config.init_from!r}: the learner's shape comes from {source}, but "
                     f"the config sets {'; '.join(conflicts)}. Leave these fields at their defaults or match them.")
  config_lib.validate(config)
  return config


def copy_hf_files(src: str, dst: str, *, include_config: bool = True) -> None:
  """Copies an HF directory's files except its weights (config, tokenizer, generation config)."""
  src, dst = paths.path(src), paths.makedirs(dst)
  for path in sorted(src.iterdir()):
    name = path.name
    if (not path.is_file() or name.startswith(".") or name.endswith(_WEIGHT_SUFFIXES)
        or name.endswith(".index.json") or (name == "config.json" and not include_config)):
      continue
    if path != dst / name:
      paths.copy_file(path, dst / name)


# ----------------------------------------------------------------------------------------------
# Tokenizer against model.

# Checkpoints pad the embedding beyond the tokenizer (to a multiple of 64/128 or a round number for
# the sharding: Qwen2.5-0.5B 151,665 tokens in 151,936 rows, Qwen2.5-7B in 152,064, Phi-3 32,011 in
# 32,064), never by more than a few hundred rows. A tokenizer this much smaller is another model's.
VOCAB_SLACK_MIN, VOCAB_SLACK_FRACTION = 1024, 1 / 64
# Plain text whose encoding two copies of one tokenizer agree on (words, digits, spaces, newlines).
ROUND_TRIP_TEXTS = ("Question: Natalia sold 48 clips in April, and half as many clips in May.\nAnswer: 48 / 2 = 24",
                    "The quick brown fox jumps over the lazy dog. #### 72", "  indented\n\nand 1,234.5 $ 100%")


def _ids(value) -> set[int]:
  if isinstance(value, bool):
    return set()
  if isinstance(value, int):
    return {value}
  return {v for v in value if isinstance(v, int) and not isinstance(v, bool)} if isinstance(value, list) else set()


def tokenizer_file(tokenizer) -> str:
  """The file a tokenizer was read from (tokenizer.json or a sentencepiece model), for messages."""
  return str(getattr(tokenizer, "path", None) or getattr(tokenizer, "model_path", None) or type(tokenizer).__name__)


def check_tokenizer(tokenizer, hf_dir: str) -> None:
  """Raises a ValueError naming both files when `tokenizer` is not the tokenizer of the checkpoint in
  `hf_dir`, as far as can be checked:

  - size: its ids must fit the embedding (vocab_size of config.json), and not fall short of it by
    more than max(VOCAB_SLACK_MIN, VOCAB_SLACK_FRACTION × vocab_size) rows (checkpoints pad the
    embedding by at most a few hundred rows; a much smaller tokenizer is another model's);
  - special tokens: its eos must be one of config.json's (or generation_config.json's)
    eos_token_id; its bos (eos when it has none) config.json's bos_token_id or an eos; an explicit pad
    (one that is not eos) config.json's pad_token_id;
  - when `hf_dir` holds a tokenizer.json that is not the tokenizer's own file: both encode
    ROUND_TRIP_TEXTS to the same ids.
  """
  hf, source = read_config(hf_dir)
  name = tokenizer_file(tokenizer)
  vocab = lm_config_from_hf(hf, source).vocab_size
  n = int(tokenizer.vocab_size)
  if n > vocab:
    raise ValueError(f"the tokenizer {name} ({n:,} ids) outgrows the vocabulary of {source} (vocab_size={vocab:,}): "
                     "it is not this model's tokenizer (set data.tokenizer_path to the checkpoint's tokenizer.json)")
  slack = max(VOCAB_SLACK_MIN, int(vocab * VOCAB_SLACK_FRACTION))
  if vocab - n > slack:
    raise ValueError(f"the tokenizer {name} has {n:,} ids but {source} has vocab_size={vocab:,}: checkpoints pad "
                     f"their embedding by at most a few hundred rows (Qwen2.5: 151,665 tokens in 151,936), not by "
                     f"{vocab - n:,} (> {slack:,} allowed), so this is another model's tokenizer (set "
                     "data.tokenizer_path to the checkpoint's tokenizer.json)")
  eos = _ids(hf.get("eos_token_id"))
  generation = os.path.join(hf_dir, "generation_config.json")
  if os.path.isfile(generation):
    with contextlib.suppress(OSError, ValueError, AttributeError):
      with open(generation) as f:
        eos |= _ids(json.load(f).get("eos_token_id"))
  mine = {int(tokenizer.eos_id), *(int(i) for i in getattr(tokenizer, "eos_ids", ()))}
  if eos and not mine & eos:
    raise ValueError(f"the tokenizer {name} ends documents with eos id {tokenizer.eos_id}, but {source} has "
                     f"eos_token_id={hf.get('eos_token_id')!r}: the tokenizer is not this model's")
  bos = _ids(hf.get("bos_token_id"))
  if bos and int(tokenizer.bos_id) not in bos | eos | {int(tokenizer.eos_id)}:
    raise ValueError(f"the tokenizer {name} has bos id {tokenizer.bos_id}, but {source} has "
                     f"bos_token_id={hf.get('bos_token_id')!r}: the tokenizer is not this model's")
  pad = _ids(hf.get("pad_token_id"))  # pad positions are masked: a pad that falls back to eos is fine.
  if pad and int(tokenizer.pad_id) != int(tokenizer.eos_id) and int(tokenizer.pad_id) not in pad:
    raise ValueError(f"the tokenizer {name} has pad id {tokenizer.pad_id}, but {source} has "
                     f"pad_token_id={hf.get('pad_token_id')!r}: the tokenizer is not this model's")
  own = os.path.join(hf_dir, "tokenizer.json")
  if os.path.isfile(own) and not (os.path.isfile(name) and os.path.samefile(own, name)):
    reference = HFTokenizer(hf_dir)
    for text in ROUND_TRIP_TEXTS:
      a, b = list(tokenizer.encode(text)), list(reference.encode(text))
      if a != b:
        raise ValueError(f"the tokenizer {name} and the checkpoint's {own} encode {text!r} differently "
                         f"({a[:12]}{'...' if len(a) > 12 else ''} vs {b[:12]}{'...' if len(b) > 12 else ''}): "
                         "the model was trained with the latter; leave data.tokenizer_path empty to use it")


# ----------------------------------------------------------------------------------------------
# Tensor names.


def tensor_names(cfg: LMConfig) -> dict[str, tuple[tuple[str, ...], bool]]:
  """HF tensor name -> (vpt parameter path, whether the kernel is transposed), in HF's order."""
  names = {"model.embed_tokens.weight": (("embed_tokens", "embedding"), False)}
  for i in range(cfg.n_layers):
    hf, vpt = f"model.layers.{i}.", f"layers_{i}"
    for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
      names[f"{hf}self_attn.{proj}.weight"] = ((vpt, "self_attn", proj, "kernel"), True)
      if cfg.qkv_bias and proj != "o_proj":
        names[f"{hf}self_attn.{proj}.bias"] = ((vpt, "self_attn", proj, "bias"), False)
    for proj in ("gate_proj", "up_proj", "down_proj"):
      names[f"{hf}mlp.{proj}.weight"] = ((vpt, "mlp", proj, "kernel"), True)
    names[f"{hf}input_layernorm.weight"] = ((vpt, "input_layernorm", "scale"), False)
    names[f"{hf}post_attention_layernorm.weight"] = ((vpt, "post_attention_layernorm", "scale"), False)
  names["model.norm.weight"] = (("norm", "scale"), False)
  if not cfg.tie_embeddings:
    names["lm_head.weight"] = (("lm_head", "kernel"), True)
  return names


def abstract_params(cfg: LMConfig) -> Any:
  """ShapeDtypeStructs of the LM's parameters (no sharding)."""
  return jax.eval_shape(lambda: Transformer(cfg).init(jax.random.PRNGKey(0), jnp.zeros((1, 1), jnp.int32)))["params"]


def _flat(tree) -> dict[tuple[str, ...], Any]:
  if isinstance(tree, dict) and set(tree) == {"params"}:
    tree = tree["params"]
  return {tuple(str(k) for k in path): leaf for path, leaf in traverse_util.flatten_dict(dict(tree)).items()}




def _without_lora(cfg: LMConfig) -> LMConfig:
  return dataclasses.replace(cfg, lora_rank=0) if getattr(cfg, "lora_rank", 0) else cfg


def _check_leaves(flat: dict, names: dict, what: str, hint: str = "") -> None:
  expected = {path for path, _ in names.values()}
  extra = sorted(set(flat) - expected)
  if extra:
    raise ValueError(f"{what}: parameter {'/'.join(extra[0])!r} has no tensor in the HF layout "
                     f"({len(extra)} such leaves){hint}")
  missing = sorted(expected - set(flat))
  if missing:
    raise ValueError(f"{what}: parameter {'/'.join(missing[0])!r} is missing ({len(missing)} missing)")


# ----------------------------------------------------------------------------------------------
# Import.


def open_safetensors(path: str):
  """safe_open (memory-mapped, header parsed) with errors that name the file: safetensors' own
  (e.g. 'incomplete metadata' for a truncated download) do not."""
  try:
    return safe_open(path, framework="numpy")
  except (SafetensorError, OSError) as e:
    raise ValueError(f"{path}: not a readable safetensors file ({type(e).__name__}: {e}); a truncated or "
                     "interrupted download looks like this: download or save it again") from e


def tensor_files(hf_dir: str) -> dict[str, str]:
  """HF tensor name -> the safetensors file holding it (from the index, or every *.safetensors)."""
  index = os.path.join(hf_dir, INDEX_NAME)
  if os.path.isfile(index):
    try:
      with open(index) as f:
        weight_map = json.load(f)["weight_map"]
    except (ValueError, KeyError, TypeError) as e:
      raise ValueError(f"{index}: expected a JSON object with a 'weight_map' ({e})") from e
    if not isinstance(weight_map, dict):
      raise ValueError(f"{index}: 'weight_map' must map tensor names to shard file names")
    for name, shard in weight_map.items():
      # A shard is a file beside the index: a path could read anything on the machine.
      if (not isinstance(shard, str) or not shard or shard in (".", "..") or os.path.isabs(shard)
          or "/" in shard or "\\" in shard or os.sep in shard):
        raise ValueError(f"{index}: tensor {name!r} is in shard {shard!r}, which is not a file name in {hf_dir} "
                         "(absolute paths, '..' and directory separators are refused)")
    files = {name: os.path.join(hf_dir, shard) for name, shard in weight_map.items()}
    for path in sorted(set(files.values())):
      if not os.path.isfile(path):
        raise FileNotFoundError(f"{index}: shard {os.path.basename(path)!r} does not exist in {hf_dir}")
    return files
  shards = sorted(n for n in os.listdir(hf_dir) if n.endswith(".safetensors")) if os.path.isdir(hf_dir) else []
  if not shards:
    raise FileNotFoundError(f"{hf_dir}: no *.safetensors weights (PyTorch .bin checkpoints are not read: "
                            "re-save them with save_pretrained(..., safe_serialization=True))")
  files = {}
  for shard in shards:
    path = os.path.join(hf_dir, shard)
    with open_safetensors(path) as f:
      for name in f.keys():
        if name in files:
          raise ValueError(f"{path}: tensor {name!r} is also in {files[name]}")
        files[name] = path
  return files


def _slice_reader(handle, name: str, transpose: bool, dtype) -> Callable:
  """make_array_from_callback's callback: reads one device's slice (once per distinct slice)."""
  source = handle.get_slice(name)
  cache: dict = {}

  def read(index):
    key = tuple((s.start, s.stop, s.step) for s in index)
    if key not in cache:
      x = source[tuple(index[::-1]) if transpose else tuple(index)]
      x = np.asarray(x).astype(dtype, copy=False)
      cache[key] = np.ascontiguousarray(x.T if transpose else x)
    return cache[key]

  return read


def load_params(hf_dir: str, abstract: Any, *, cfg: LMConfig | None = None) -> Any:
  """The HF weights as vpt params with the shapes, dtypes and shardings of `abstract`
  (ShapeDtypeStructs; without a sharding a leaf goes to the first device). LoRA adapter leaves
  in `abstract` are left out of the result (they keep their initialisation)."""
  hf, source = read_config(hf_dir)
  cfg = cfg or lm_config_from_hf(hf, source)
  names = tensor_names(cfg)
  flat = {path: leaf for path, leaf in _flat(abstract).items() if path[-1] not in LORA_LEAVES}  # never in an HF file
  _check_leaves(flat, names, f"loading {hf_dir}")
  files = tensor_files(hf_dir)
  for name, path in files.items():
    if name not in names and not _IGNORED.search(name) and not (cfg.tie_embeddings and name == "lm_head.weight"):
      raise ValueError(f"{path}: unexpected tensor {name!r}: the vpt LM for {source} has no such parameter")
  for name in names:
    if name not in files:
      where = INDEX_NAME if os.path.isfile(os.path.join(hf_dir, INDEX_NAME)) else "the *.safetensors files"
      raise ValueError(f"{hf_dir}: tensor {name!r} is missing (not in {where}; expected for {source})")
  default = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  out = {}
  with contextlib.ExitStack() as stack:
    handles = {path: stack.enter_context(open_safetensors(path)) for path in sorted(set(files.values()))
               if any(files.get(n) == path for n in names)}
    for name, (path, transpose) in names.items():
      leaf, handle = flat[path], handles[files[name]]
      source_slice = handle.get_slice(name)
      shape, kind = tuple(source_slice.get_shape()), source_slice.get_dtype()
      expected = tuple(leaf.shape[::-1]) if transpose else tuple(leaf.shape)
      if shape != expected:
        raise ValueError(f"{files[name]}: tensor {name!r} has shape {list(shape)}, expected {list(expected)} "
                         f"(from {source})")
      if kind not in _FLOAT_DTYPES:
        raise ValueError(f"{files[name]}: tensor {name!r} has dtype {kind}, expected a float ({_FLOAT_DTYPES})")
      sharding = getattr(leaf, "sharding", None) or default
      out[path] = jax.make_array_from_callback(tuple(leaf.shape), sharding,
                                               _slice_reader(handle, name, transpose, leaf.dtype))
  return traverse_util.unflatten_dict(out)


def import_params(hf_dir: str, *, mesh: jax.sharding.Mesh | None = None, dtype: str = "float32") -> tuple[Any, LMConfig]:
  """(params, LMConfig) of an HF directory; with `mesh`, sharded by vpt.core.sharding's rules."""
  hf, source = read_config(hf_dir)
  cfg = lm_config_from_hf(hf, source)
  abstract = abstract_params(cfg)
  if mesh is not None:
    shardings = sharding_lib.param_shardings(abstract, mesh, SHARDING_RULES)
  else:
    shardings = jax.tree.map(lambda _: jax.sharding.SingleDeviceSharding(jax.devices()[0]), abstract)
  abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, jnp.dtype(dtype), sharding=s), abstract, shardings)
  return load_params(hf_dir, abstract, cfg=cfg), cfg


# ----------------------------------------------------------------------------------------------
# Export.


def parse_size(size: int | str) -> int:
  """Bytes from an int or '5GB' / '500MB' / '2GiB' (HF's convention: GB = 10**9, GiB = 2**30)."""
  if isinstance(size, int):
    return size
  m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", str(size), re.IGNORECASE)
  if not m:
    raise ValueError(f"max_shard_size={size!r}: expected bytes or a size like '5GB', '500MB', '2GiB'")
  unit = (m.group(2) or "B").upper()
  scale = 1 if unit == "B" else (1024 if "I" in unit else 1000) ** ("KMGT".index(unit[0]) + 1)
  return int(float(m.group(1)) * scale)


def _to_host(x) -> np.ndarray:
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(jax.device_get(x))


def export_hf(params: Any, lm_config: LMConfig, out_dir: str, *, merge_fn: Callable[[Any], Any] | None = None,
              architecture: str | None = None, template: dict | None = None, max_shard_size: int | str = "5GB",
              dtype: str = "float32") -> list[str]:
  """Writes `config.json` and `model.safetensors` (or `model-0000i-of-0000n.safetensors` and
  `model.safetensors.index.json` when larger than `max_shard_size`) for
  `transformers.AutoModelForCausalLM`. `merge_fn` folds extra leaves (LoRA adapters) into the base
  weights first. Returns the written paths (written by process 0; all processes must call it)."""
  if dtype not in DTYPES:
    raise ValueError(f"dtype={dtype!r}: expected one of {sorted(DTYPES)}")
  if merge_fn is not None:
    params = merge_fn(params)
  lm_config = _without_lora(lm_config)
  hf_config = hf_config_from_lm(lm_config, architecture=architecture, template=template, dtype=dtype)
  names = tensor_names(lm_config)
  flat = _flat(params)
  _check_leaves(flat, names, "export_hf", " (LoRA adapters? pass merge_fn to fold them into the base weights)")
  for path, leaf in _flat(abstract_params(lm_config)).items():
    if tuple(flat[path].shape) != tuple(leaf.shape):
      raise ValueError(f"export_hf: parameter {'/'.join(path)!r} has shape {list(flat[path].shape)}, expected "
                       f"{list(leaf.shape)} for {lm_config}")
  itemsize = np.dtype(DTYPES[dtype]).itemsize
  limit = parse_size(max_shard_size)
  shards: list[list[str]] = [[]]
  size = 0
  for name, (path, _) in names.items():
    n = int(np.prod(flat[path].shape)) * itemsize
    if shards[-1] and size + n > limit:
      shards.append([])
      size = 0
    shards[-1].append(name)
    size += n
  main = jax.process_index() == 0
  if main:
    os.makedirs(out_dir, exist_ok=True)
    stale = [n for n in sorted(os.listdir(out_dir)) if n.endswith(".safetensors") or n == INDEX_NAME]
    if stale:
      raise FileExistsError(f"{out_dir} already holds weights ({stale[0]}): remove them or choose another directory")
  files = [SINGLE_NAME] if len(shards) == 1 else [
      f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
  written, weight_map, total = [], {}, 0
  for shard_names, file in zip(shards, files):
    tensors = {}
    for name in shard_names:
      path, transpose = names[name]
      x = _to_host(flat[path])
      tensors[name] = np.ascontiguousarray(x.T if transpose else x).astype(DTYPES[dtype], copy=False)
      weight_map[name] = file
      total += tensors[name].nbytes
    if main:
      save_file(tensors, os.path.join(out_dir, file), metadata={"format": "pt"})
      written.append(os.path.join(out_dir, file))
    del tensors
  if main:
    if len(files) > 1:
      with open(os.path.join(out_dir, INDEX_NAME), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
      written.append(os.path.join(out_dir, INDEX_NAME))
    with open(os.path.join(out_dir, "config.json"), "w") as f:  # last: the directory is complete.
      json.dump(hf_config, f, indent=2, sort_keys=True)
    written.append(os.path.join(out_dir, "config.json"))
  return written


# ----------------------------------------------------------------------------------------------
# vpt run directories and the CLI.


def import_to_run(hf_dir: str, out: str, *, mesh: jax.sharding.Mesh | None = None) -> str:
  """HF directory -> a vpt run directory (config.json, checkpoints/0/state, hf/) that
  `config.init_from` accepts. Parameters are sharded fsdp over all devices unless `mesh` is given."""
  checkpoints = run_dir_lib.checkpoint_dir(out)
  if paths.path(checkpoints).exists():
    raise FileExistsError(f"{checkpoints} already exists: choose a new --out directory")
  if mesh is None:
    mesh = sharding_lib.make_mesh(ml_collections.ConfigDict({"data": 1, "fsdp": -1, "tensor": 1, "num_devices": 0}))
  params, _ = import_params(hf_dir, mesh=mesh)
  config = config_lib.base_config()
  config.init_from = os.path.abspath(hf_dir)  # provenance; `hf/` below makes the run self-contained.
  config = config_with_hf_model(config, hf_dir)
  if jax.process_index() == 0:
    os.makedirs(out, exist_ok=True)
    copy_hf_files(hf_dir, os.path.join(out, HF_SUBDIR))
    run_dir_lib.write_config(config, out)
  checkpointer = ckpt_lib.Checkpointer(checkpoints, keep=1, async_save=False, iterator_names=())
  checkpointer.save(0, {"params": params}, {}, force=True)
  checkpointer.close()
  return out


def _lora_merge_fn(model_cfg, run_dir: str) -> Callable[[Any], Any]:
  try:
    from vpt.core import lora  # pylint: disable=g-import-not-at-top
    merge = lora.merge_lora
  except (ImportError, AttributeError) as e:
    raise ValueError(f"{run_dir}/config.json: model.lora_rank={model_cfg.lora_rank} (the params hold LoRA "
                     f"adapters), but vpt.core.lora.merge_lora is not available ({e}); it folds the adapters "
                     "into the base weights before export") from e
  return lambda params: merge(params, model_cfg)


def source_dtype(template: dict | None) -> str:
  """The export dtype matching a source checkpoint's config.json (`torch_dtype`, or `dtype` in newer
  transformers): bfloat16 for a bf16 release, float32 for float32, for a dtype this export does not
  write (float16: float32 holds it exactly) and for a run never imported from HF."""
  value = (template or {}).get("torch_dtype") or (template or {}).get("dtype")
  return value if value in DTYPES else "float32"


def export_run(run_dir: str, out_dir: str, *, step: int | None = None, max_shard_size: int | str = "5GB",
               dtype: str | None = None, architecture: str | None = None) -> list[str]:
  """A vpt run directory's learner (newest checkpoint, or `step`) -> an HF directory, with the
  tokenizer and generation files of its `hf/` (if it was started from an HF checkpoint).
  `dtype` defaults to the source checkpoint's (`source_dtype` of `hf/config.json`)."""
  # Fields added to the schema since the run keep their defaults (LoRA off for a run from before LoRA).
  model_cfg = run_dir_lib.read_config(run_dir, config_lib.base_config()).model
  # The params item, whatever its tree (LoRA leaves included), on one device.
  params, _ = ckpt_lib.restore_learner_params(run_dir, step, what="--checkpoint=")
  merge_fn = _lora_merge_fn(model_cfg, run_dir) if model_cfg.lora_rank > 0 else None
  vocab = model_cfg.vocab_size or int(params["embed_tokens"]["embedding"].shape[0])
  lm_cfg = LMConfig.from_config(model_cfg, vocab)
  hf_dir = os.path.join(run_dir, HF_SUBDIR)
  template = read_config(hf_dir)[0] if is_hf_dir(hf_dir) else None
  dtype = dtype or source_dtype(template)
  written = export_hf(params, lm_cfg, out_dir, merge_fn=merge_fn, architecture=architecture, template=template,
                      max_shard_size=max_shard_size, dtype=dtype)
  if template is not None and jax.process_index() == 0:
    copy_hf_files(hf_dir, out_dir, include_config=False)
  return written


def main(argv: list[str] | None = None) -> str:
  ap = argparse.ArgumentParser(prog="python -m vpt.language.interop.hf",
                               description="Hugging Face checkpoints in and out of vpt.")
  sub = ap.add_subparsers(dest="command", required=True)
  imp = sub.add_parser("import", help="HF directory (config.json + safetensors) -> vpt run directory")
  imp.add_argument("--hf_dir", required=True, help="Qwen2/Qwen2.5/Qwen1.5 or Llama directory")
  imp.add_argument("--out", required=True, help="new vpt run directory (use it as config.init_from)")
  exp = sub.add_parser("export", help="vpt run directory -> HF directory")
  exp.add_argument("--checkpoint", required=True, help="vpt run directory (config.json, checkpoints/)")
  exp.add_argument("--out", required=True, help="output HF directory")
  exp.add_argument("--step", type=int, default=None, help="checkpoint step (default: newest)")
  exp.add_argument("--max_shard_size", default="5GB", help="shard the weights above this size (e.g. 5GB)")
  exp.add_argument("--dtype", default=None, choices=sorted(DTYPES),
                   help="default: the source checkpoint's (its hf/config.json), else float32")
  exp.add_argument("--architecture", default=None, choices=sorted(ARCHITECTURES),
                   help="default: the source checkpoint's, else Qwen2 with q/k/v biases and Llama without")
  args = ap.parse_args(argv)
  if args.command == "import":
    out = import_to_run(args.hf_dir, args.out)
    print(f"Imported {args.hf_dir} into {out} (use --config.init_from={out})", flush=True)
    return out
  export_run(args.checkpoint, args.out, step=args.step, max_shard_size=args.max_shard_size, dtype=args.dtype,
             architecture=args.architecture)
  print(f"Exported {args.checkpoint} to {args.out}", flush=True)
  return args.out


if __name__ == "__main__":
  try:
    main()
  except (ValueError, FileNotFoundError, FileExistsError) as e:
    sys.exit(f"error: {e}")
