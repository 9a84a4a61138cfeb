"""Import Hugging Face DINOv2 / DINOv2-with-registers / DINOv3-ViT checkpoints into `vpt.vision.models.vit`.

A checkpoint directory holds `config.json` and `model.safetensors` (or a sharded
`model.safetensors.index.json`). Both tensor layouts are accepted: the hub layout that
`save_pretrained` still writes (`encoder.layer.{i}.attention.attention.query`, `mlp.weights_in`,
DINOv3's `layer.{i}`) and transformers 5.x's in-memory names (`attention.q_proj`, `mlp.gate_proj`,
`model.layer.{i}`). Every ViT parameter comes from exactly one tensor (SwiGLU's fused `weights_in`
is split into gate and up). The iBOT `mask_token` becomes the ViT's mask token when the ViT has one
(`mask_token=True`: iBOT training; a checkpoint without it leaves the token at its zero init) and is
skipped otherwise, as is a classification head; any other leftover tensor is an error, as is a
missing tensor or a wrong shape — each naming the tensor and the checkpoint directory.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from safetensors import safe_open

from vpt.vision.models.vit import ACTIVATIONS, ViT, ViTConfig

# architecture (config.json "architectures"[0]) → family; model_type is the fallback.
ARCHITECTURES = {
    "Dinov2Model": "dinov2", "Dinov2Backbone": "dinov2", "Dinov2ForImageClassification": "dinov2",
    "Dinov2WithRegistersModel": "dinov2_with_registers", "Dinov2WithRegistersBackbone": "dinov2_with_registers",
    "Dinov2WithRegistersForImageClassification": "dinov2_with_registers",
    "DINOv3ViTModel": "dinov3_vit", "DINOv3ViTBackbone": "dinov3_vit",
}
MODEL_TYPES = ("dinov2", "dinov2_with_registers", "dinov3_vit")
# Prefixes a task model (…ForImageClassification) puts before the backbone's tensors.
_PREFIXES = ("dinov2.", "dinov2_with_registers.")
# Tensors that exist in checkpoints but have no ViT parameter (iBOT masking; task heads).
_SKIPPED = ("embeddings.mask_token", "classifier.")


def load_dinov2(path: str, *, dtype: str = "float32", mask_token: bool = False) -> tuple[ViTConfig, dict]:
  """(ViTConfig, float32 params) from a HF checkpoint directory; `dtype` is the compute dtype;
  `mask_token`: the ViT gets the checkpoint's mask token (iBOT)."""
  hf = read_config(path)
  cfg = dataclasses.replace(config_from_hf(hf, dtype=dtype), mask_token=mask_token)
  return cfg, params_from_state_dict(read_safetensors(path), cfg, hf_family(hf), source=path)


def read_config(path: str) -> dict:
  file = os.path.join(path, "config.json")
  if not os.path.isfile(file):
    raise FileNotFoundError(f"{file} not found: a Hugging Face checkpoint directory needs config.json")
  with open(file) as f:
    return json.load(f)


def hf_family(hf: dict) -> str:
  archs = hf.get("architectures") or []
  if archs:
    if archs[0] not in ARCHITECTURES:
      raise ValueError(f"config.json: unknown architecture {archs[0]!r}; the ViT importer supports "
                       f"{sorted(ARCHITECTURES)}")
    return ARCHITECTURES[archs[0]]
  if hf.get("model_type") not in MODEL_TYPES:
    raise ValueError(f"config.json: no 'architectures' and model_type {hf.get('model_type')!r} is not one of "
                     f"{list(MODEL_TYPES)}")
  return hf["model_type"]


def _square(hf: dict, field: str) -> int:
  v = hf[field]
  if isinstance(v, (list, tuple)):
    if len(v) != 2 or v[0] != v[1]:
      raise ValueError(f"config.json: {field}={v} is not square; the ViT supports square {field} only")
    v = v[0]
  return int(v)


def config_from_hf(hf: dict, *, dtype: str = "float32") -> ViTConfig:
  family = hf_family(hf)
  act = hf.get("hidden_act", "gelu")
  if act not in ACTIVATIONS:
    raise ValueError(f"config.json: hidden_act={act!r} is not supported; expected one of {sorted(ACTIVATIONS)}")
  d, heads = hf["hidden_size"], hf["num_attention_heads"]
  if hf.get("head_dim") not in (None, d // heads):
    raise ValueError(f"config.json: head_dim={hf['head_dim']} != hidden_size / num_attention_heads = {d // heads}")
  common = dict(image_size=_square(hf, "image_size"), patch_size=_square(hf, "patch_size"), d_model=d,
                n_layers=hf["num_hidden_layers"], n_heads=heads, act=act,
                layer_scale_init=hf.get("layerscale_value", 1.0), num_channels=hf.get("num_channels", 3), dtype=dtype)
  if family == "dinov3_vit":
    return ViTConfig(**common, d_ff=hf["intermediate_size"], mlp="gated" if hf.get("use_gated_mlp") else "mlp",
                     n_registers=hf.get("num_register_tokens", 0), ln_eps=hf.get("layer_norm_eps", 1e-5),
                     pos_embed="rope", rope_theta=hf.get("rope_theta", 100.0), rope_shift=hf.get("pos_embed_shift"),
                     rope_jitter=hf.get("pos_embed_jitter"), rope_rescale=hf.get("pos_embed_rescale"),
                     q_bias=hf.get("query_bias", True), k_bias=hf.get("key_bias", False),
                     v_bias=hf.get("value_bias", True), o_bias=hf.get("proj_bias", True),
                     mlp_bias=hf.get("mlp_bias", True))
  qkv_bias = hf.get("qkv_bias", True)
  return ViTConfig(**common, mlp_ratio=hf.get("mlp_ratio", 4), mlp="swiglu" if hf.get("use_swiglu_ffn") else "mlp",
                   n_registers=hf.get("num_register_tokens", 4) if family == "dinov2_with_registers" else 0,
                   ln_eps=hf.get("layer_norm_eps", 1e-6), pos_embed="learned",
                   pos_interp_antialias=family == "dinov2_with_registers",
                   q_bias=qkv_bias, k_bias=qkv_bias, v_bias=qkv_bias)


def read_safetensors(path: str) -> dict[str, np.ndarray]:
  """All tensors of a (possibly sharded) safetensors checkpoint as float32 NumPy arrays."""
  single = os.path.join(path, "model.safetensors")
  index = os.path.join(path, "model.safetensors.index.json")
  if os.path.isfile(single):
    files = [single]
  elif os.path.isfile(index):
    with open(index) as f:
      files = [os.path.join(path, name) for name in sorted(set(json.load(f)["weight_map"].values()))]
  else:
    raise FileNotFoundError(f"{path}: neither model.safetensors nor model.safetensors.index.json")
  out = {}
  for file in files:
    # The flax reader handles bfloat16 (NumPy's does not).
    with safe_open(file, framework="flax") as f:
      for key in f.keys():
        out[key] = np.asarray(f.get_tensor(key), np.float32)
  return out


# ----------------------------------------------------------------------------- the name map


@dataclasses.dataclass(frozen=True)
class _Source:
  key: str
  to_param: Callable[[np.ndarray], np.ndarray]  # HF tensor → ViT parameter
  hf_shape: Callable[[tuple], tuple]  # ViT parameter shape → the HF tensor shape it needs


def _identity(key):
  return _Source(key, lambda w: w, lambda s: s)


def _linear(key):
  return _Source(key, lambda w: w.T, lambda s: s[::-1])


def _conv(key):
  return _Source(key, lambda w: w.transpose(2, 3, 1, 0), lambda s: (s[3], s[2], s[0], s[1]))


def _fused_half(key, half):
  """One half of SwiGLU's fused `weights_in` = [gate; up] (stacked along the output axis)."""
  def take(w):
    n = w.shape[0] // 2
    part = w[:n] if half == 0 else w[n:]
    return part.T if part.ndim == 2 else part
  return _Source(key, take, lambda s: (2 * s[1], s[0]) if len(s) == 2 else (2 * s[0],))


def _norm(keys):
  return {"scale": [_identity(k + ".weight") for k in keys], "bias": [_identity(k + ".bias") for k in keys]}


def _dense(keys, bias=True):
  out = {"kernel": [_linear(k + ".weight") for k in keys]}
  if bias:
    out["bias"] = [_identity(k + ".bias") for k in keys]
  return out


def _spec(cfg: ViTConfig, family: str) -> dict[str, list[_Source]]:
  """ViT parameter path → the HF tensors that can provide it, in order of preference."""
  v3 = family == "dinov3_vit"
  tree = {"cls_token": [_identity("embeddings.cls_token")]}
  patch = "embeddings.patch_embeddings" if v3 else "embeddings.patch_embeddings.projection"
  tree["patch_embeddings"] = {"kernel": [_conv(patch + ".weight")], "bias": [_identity(patch + ".bias")]}
  if cfg.n_registers:
    tree["register_tokens"] = [_identity("embeddings.register_tokens")]
  if cfg.mask_token:  # DINOv2 [1, D]; DINOv3 [1, 1, D]
    tree["mask_token"] = [_Source("embeddings.mask_token", lambda w: w.reshape(1, -1),
                                  (lambda s: (1,) + s) if v3 else (lambda s: s))]
  if cfg.pos_embed == "learned":
    tree["position_embeddings"] = [_identity("embeddings.position_embeddings")]
  # Hub names first, then transformers 5.x in-memory names.
  attn = ({n: (f"attention.{n}",) for n in ("q_proj", "k_proj", "v_proj", "o_proj")} if v3 else
          {"q_proj": ("attention.attention.query", "attention.q_proj"),
           "k_proj": ("attention.attention.key", "attention.k_proj"),
           "v_proj": ("attention.attention.value", "attention.v_proj"),
           "o_proj": ("attention.output.dense", "attention.o_proj")})
  bias = {"q_proj": cfg.q_bias, "k_proj": cfg.k_bias, "v_proj": cfg.v_bias, "o_proj": cfg.o_bias}
  for i in range(cfg.n_layers):
    prefixes = (f"layer.{i}.", f"model.layer.{i}.") if v3 else (f"encoder.layer.{i}.",)
    keys = lambda *suffixes: [p + s for s in suffixes for p in prefixes]
    block = {
        "norm1": _norm(keys("norm1")), "norm2": _norm(keys("norm2")),
        "layer_scale1": {"lambda1": [_identity(k) for k in keys("layer_scale1.lambda1")]},
        "layer_scale2": {"lambda1": [_identity(k) for k in keys("layer_scale2.lambda1")]},
        "attention": {n: _dense(keys(*names), bias[n]) for n, names in attn.items()},
    }
    b = cfg.mlp_bias
    if cfg.mlp == "mlp":
      fc1, fc2 = ("mlp.up_proj", "mlp.down_proj") if v3 else ("mlp.fc1", "mlp.fc2")
      block["mlp"] = {"fc1": _dense(keys(fc1), b), "fc2": _dense(keys(fc2), b)}
    elif cfg.mlp == "gated":
      block["mlp"] = {n: _dense(keys(f"mlp.{n}"), b) for n in ("gate_proj", "up_proj", "down_proj")}
    else:  # DINOv2 SwiGLU: the hub's fused `weights_in` / `weights_out`, or the split 5.x names.
      fused = keys("mlp.weights_in")[0]
      block["mlp"] = {
          n: {"kernel": [_fused_half(fused + ".weight", half)] + [_linear(k + ".weight") for k in keys(f"mlp.{n}")],
              "bias": [_fused_half(fused + ".bias", half)] + [_identity(k + ".bias") for k in keys(f"mlp.{n}")]}
          for half, n in enumerate(("gate_proj", "up_proj"))}
      block["mlp"]["down_proj"] = _dense(keys("mlp.weights_out", "mlp.down_proj"), b)
    tree[f"layers_{i}"] = block
  tree["norm"] = _norm(["norm" if v3 else "layernorm"])
  return traverse_util.flatten_dict(tree, sep="/", is_leaf=lambda _, x: isinstance(x, list))


def _strip_prefix(state: dict) -> dict:
  for prefix in _PREFIXES:
    if any(k.startswith(prefix) for k in state):
      return {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in state.items()}
  return state


def params_from_state_dict(state: dict[str, np.ndarray], cfg: ViTConfig, family: str, *, source: str = "",
                          param_dtype=jnp.float32) -> dict:
  """ViT params from a HF state dict (NumPy arrays); errors name the tensor, the file and the shapes.

  `param_dtype` float64 serves the float64 numerics tests; training keeps float32 master weights.
  """
  where = f"{source}: " if source else ""
  state = _strip_prefix(state)
  shapes = jax.eval_shape(
      lambda: ViT(cfg).init(jax.random.PRNGKey(0),
                            jnp.zeros((1, cfg.image_size, cfg.image_size, cfg.num_channels))))["params"]
  shapes = traverse_util.flatten_dict(shapes, sep="/")
  spec = _spec(cfg, family)
  if set(spec) != set(shapes):
    raise AssertionError(f"ViT parameter tree and the HF name map differ: {sorted(set(spec) ^ set(shapes))}")
  used, flat = set(), {}
  for path, sources in spec.items():
    src = next((s for s in sources if s.key in state), None)
    if src is None and path == "mask_token":  # an inference-only export without it: DINOv2's zero init
      flat[path] = jnp.zeros(shapes[path].shape, param_dtype)
      continue
    if src is None:
      alternatives = f" (or {[s.key for s in sources[1:]]})" if len(sources) > 1 else ""
      raise KeyError(f"{where}checkpoint is missing tensor {sources[0].key!r}{alternatives} for ViT parameter "
                     f"{path!r}")
    want = tuple(shapes[path].shape)
    tensor = state[src.key]
    if tuple(tensor.shape) != tuple(src.hf_shape(want)):
      raise ValueError(f"{where}tensor {src.key!r} has shape {tuple(tensor.shape)}, expected "
                       f"{tuple(src.hf_shape(want))} (ViT parameter {path!r} of shape {want}; does config.json "
                       f"match the weights?)")
    flat[path] = jnp.asarray(src.to_param(tensor), param_dtype)
    used.add(src.key)
  # Empty tensors (DINOv3 stores register_tokens [1, 0, D] when it has none) carry nothing.
  leftover = sorted(k for k in state if k not in used and not k.startswith(_SKIPPED) and state[k].size)
  if leftover:
    raise ValueError(f"{where}unexpected tensors {leftover[:8]}{' …' if len(leftover) > 8 else ''} "
                     f"({len(leftover)} in all); does config.json (num_hidden_layers, use_swiglu_ffn, "
                     f"num_register_tokens, biases) match the weights?")
  return traverse_util.unflatten_dict(flat, sep="/")
