"""The ViT learner and the DINOv2 / DINOv3 import, against Hugging Face transformers (torch, CPU)."""

import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file, save_file

from vpt.vision.interop import dinov2
from vpt.vision.models import vit as vit_lib
from vpt.vision.models.vit import ViT, ViTConfig, vit_config


# name → (model class, config class, config kwargs, a second image size); hidden 32, 2 layers, 4 heads,
# pretrained at 28 px with patch 7 (a 4×4 grid). The second size exercises, in turn, bicubic
# downsampling (2×2), upsampling (6×6), antialiased interpolation to a non-square 3×5 grid, and
# RoPE on a non-square grid.
HF_CASES = {
    "dinov2": (transformers.Dinov2Model, transformers.Dinov2Config, {}, (14, 14)),
    "dinov2_swiglu": (transformers.Dinov2Model, transformers.Dinov2Config, dict(use_swiglu_ffn=True), (42, 42)),
    "dinov2_registers": (transformers.Dinov2WithRegistersModel, transformers.Dinov2WithRegistersConfig,
                         dict(num_register_tokens=2), (21, 35)),
    "dinov3": (transformers.DINOv3ViTModel, transformers.DINOv3ViTConfig,
               dict(intermediate_size=48, num_register_tokens=2), (35, 21)),
    "dinov3_gated": (transformers.DINOv3ViTModel, transformers.DINOv3ViTConfig,
                     dict(intermediate_size=48, use_gated_mlp=True, hidden_act="silu"), (28, 28)),
}


def _hf_model(name, seed=0):
  """A tiny HF model whose every parameter (cls, registers, layer scale too) is perturbed off its init."""
  model_cls, config_cls, kw, _ = HF_CASES[name]
  torch.manual_seed(seed)
  cfg = config_cls(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, image_size=28, patch_size=7, **kw)
  model = model_cls(cfg).eval()
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.2 * torch.randn_like(p))
  return model


def _save(model, path):
  model.save_pretrained(str(path))
  return str(path)


def _forward(cfg, params, x_nchw, return_all=False):
  """Jitted (one compile per image size; faster than op-by-op for a new shape) NHWC forward."""
  fn = jax.jit(lambda p, x: ViT(cfg).apply({"params": p}, x, return_all=return_all))
  return fn(params, jnp.asarray(x_nchw.transpose(0, 2, 3, 1)))


def _images(hw, seed=0, b=2):
  return np.random.default_rng(seed).normal(size=(b, 3) + hw).astype(np.float32)  # NCHW for torch


# ----------------------------------------------------------------------------- HF parity


@pytest.mark.parametrize("name", sorted(HF_CASES))
def test_import_matches_hf_features_float32(tmp_path, name):
  model = _hf_model(name)
  cfg, params = dinov2.load_dinov2(_save(model, tmp_path))
  assert cfg.n_registers == (2 if "registers" in name or name == "dinov3" else 0)
  for hw in sorted({(28, 28), HF_CASES[name][3]}):
    x = _images(hw)
    with torch.no_grad():
      ref = model(torch.tensor(x), output_hidden_states=True)
    out = _forward(cfg, params, x, return_all=True)
    seq = ref.last_hidden_state.numpy()
    np.testing.assert_allclose(out["cls"], seq[:, 0], atol=1e-4, rtol=0)
    np.testing.assert_allclose(out["registers"], seq[:, 1:cfg.n_prefix], atol=1e-4, rtol=0)
    np.testing.assert_allclose(out["patches"], seq[:, cfg.n_prefix:], atol=1e-4, rtol=0)
    assert out["patches"].shape == (2, (hw[0] // 7) * (hw[1] // 7), 32)
    assert len(out["hidden_states"]) == len(ref.hidden_states) == 3
    for ours, theirs in zip(out["hidden_states"], ref.hidden_states):
      np.testing.assert_allclose(ours, theirs.numpy(), atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", ["dinov2_registers", "dinov3"])
def test_forward_matches_hf_in_float64(x64, name):
  """The same forward in float64 (torch .double(), our float64 compute) agrees to 1e-10, so every
  operation matches, not just to float32 noise. At the pretrained size: HF interpolates position
  tables and builds RoPE tables in float32. Uses transformers' in-memory (5.x) tensor names."""
  model = _hf_model(name).double()
  state = {k: v.numpy() for k, v in model.state_dict().items()}
  cfg = dinov2.config_from_hf(model.config.to_dict(), dtype="float64")
  params = dinov2.params_from_state_dict(state, cfg, dinov2.hf_family(model.config.to_dict()),
                                         param_dtype=jnp.float64)
  x = _images((28, 28)).astype(np.float64)
  with torch.no_grad():
    ref = model(torch.tensor(x)).last_hidden_state.numpy()
  out = _forward(cfg, params, x)
  assert out["cls"].dtype == jnp.float64
  np.testing.assert_allclose(out["cls"], ref[:, 0], atol=1e-10, rtol=0)
  np.testing.assert_allclose(out["patches"], ref[:, cfg.n_prefix:], atol=1e-10, rtol=0)


@pytest.mark.parametrize("antialias", [False, True])
def test_position_interpolation_is_torch_bicubic(x64, antialias):
  grid = np.random.default_rng(1).normal(size=(5, 5, 3))
  for out_hw in [(5, 5), (8, 8), (3, 2), (9, 4)]:
    ref = torch.nn.functional.interpolate(torch.tensor(grid.transpose(2, 0, 1)[None]), size=out_hw, mode="bicubic",
                                          align_corners=False, antialias=antialias)[0].numpy().transpose(1, 2, 0)
    out = vit_lib.interpolate_grid(jnp.asarray(grid), out_hw, antialias)
    np.testing.assert_allclose(out, ref, atol=1e-12, rtol=0)


def test_interpolation_at_the_pretrained_size_is_the_identity(x64):
  """At the pretrained grid the interpolation operator is exactly the identity (both kernels), so
  the pretrained-size output does not depend on whether the table goes through it."""
  grid = jnp.asarray(np.random.default_rng(2).normal(size=(4, 6, 5)))
  for antialias in (False, True):
    for n in (1, 4, 37):
      np.testing.assert_array_equal(vit_lib._bicubic_matrix(n, n, antialias), np.eye(n))
    np.testing.assert_array_equal(vit_lib.interpolate_grid(grid, (4, 6), antialias), grid)


# ----------------------------------------------------------------------------- the split at a block


def _noisy(shapes, seed=0):
  """float64 parameters of the given shapes, all N(0, 0.3²): no parameter at a trivial init value."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: jnp.asarray(0.3 * rng.normal(size=s.shape)), shapes)


@pytest.mark.parametrize("pos_embed, layers", [("learned", (0, 1, 2)), ("rope", (1,))])
def test_hidden_before_then_from_hidden_equals_the_full_forward(x64, pos_embed, layers):
  cfg = vit_config("nano", n_registers=2, pos_embed=pos_embed, dtype="float64")
  net = ViT(cfg)
  x = jnp.asarray(np.random.default_rng(3).uniform(size=(2, 24, 40, 3)))  # non-square 3×5 grid
  params = _noisy(jax.eval_shape(net.init, jax.random.PRNGKey(0), x)["params"])
  full = jax.jit(lambda p: net.apply({"params": p}, x, return_all=True))(params)

  @functools.partial(jax.jit, static_argnums=1)
  def split(p, layer):
    h = net.apply({"params": p}, x, layer, method=ViT.hidden_before)
    return h, net.apply({"params": p}, h, layer, grid=(3, 5), return_all=True, method=ViT.from_hidden)

  for layer in layers:
    h, out = split(params, layer)
    np.testing.assert_allclose(h, full["hidden_states"][layer], atol=1e-12, rtol=0)
    for key in ("cls", "patches", "registers"):
      np.testing.assert_allclose(out[key], full[key], atol=1e-12, rtol=0)
    assert len(out["hidden_states"]) == cfg.n_layers - layer + 1
  if pos_embed == "rope":  # RoPE needs the grid shape, which 15 patch tokens do not determine.
    with pytest.raises(ValueError, match="not a square grid"):
      net.apply({"params": params}, h, 1, method=ViT.from_hidden)


def test_block_names_make_value_split_pick_the_last_blocks_and_final_norm():
  from vpt.core.alignment import split_params
  cfg = vit_config("nano", n_layers=4)
  params = jax.eval_shape(ViT(cfg).init, jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)))["params"]
  subset, rest = split_params(params, cfg.n_layers, 2)
  assert {k.split("/")[0] for k in subset} == {"layers_2", "layers_3", "norm"}
  assert {"cls_token", "position_embeddings", "layers_0", "layers_1"} <= {k.split("/")[0] for k in rest}


def test_config_validation_names_the_field():
  with pytest.raises(ValueError, match="n_heads"):
    ViTConfig(d_model=30, n_heads=4)
  with pytest.raises(ValueError, match="mlp"):
    ViTConfig(mlp="moe")
  with pytest.raises(ValueError, match="unknown"):
    vit_config("huge")
  with pytest.raises(ValueError, match="unknown ViT config fields"):
    ViTConfig.from_config({"d_model": 64, "n_head": 2})
  net = ViT(vit_config("nano"))
  with pytest.raises(ValueError, match="patch size"):
    jax.eval_shape(net.init, jax.random.PRNGKey(0), jnp.zeros((1, 30, 32, 3)))
  with pytest.raises(ValueError, match=r"images \[B, H, W, 3\]"):
    jax.eval_shape(net.init, jax.random.PRNGKey(0), jnp.zeros((1, 3, 32, 32)))


# ----------------------------------------------------------------------------- broken checkpoints


def _rewrite(path, edit):
  file = os.path.join(path, "model.safetensors")
  state = load_file(file)
  edit(state)
  save_file(state, file)


def test_broken_checkpoints_name_the_tensor(tmp_path):
  model = _hf_model("dinov2_registers")
  good = _save(model, tmp_path / "good")

  missing = _save(model, tmp_path / "missing")
  _rewrite(missing, lambda s: s.pop("encoder.layer.1.attention.attention.value.weight"))
  with pytest.raises(KeyError, match=r"'encoder\.layer\.1\.attention\.attention\.value\.weight'.*"
                                    r"'layers_1/attention/v_proj/kernel'"):
    dinov2.load_dinov2(missing)

  bad_shape = _save(model, tmp_path / "shape")
  _rewrite(bad_shape, lambda s: s.update({"embeddings.register_tokens": np.zeros((1, 3, 32), np.float32)}))
  with pytest.raises(ValueError, match=r"embeddings\.register_tokens.*\(1, 3, 32\).*\(1, 2, 32\)"):
    dinov2.load_dinov2(bad_shape)

  extra = _save(model, tmp_path / "extra")
  _rewrite(extra, lambda s: s.update({"encoder.layer.2.norm1.weight": np.ones(32, np.float32)}))
  with pytest.raises(ValueError, match=r"unexpected tensors.*encoder\.layer\.2\.norm1\.weight"):
    dinov2.load_dinov2(extra)

  cfg_file = os.path.join(good, "config.json")
  with open(cfg_file) as f:
    hf = json.load(f)
  with open(cfg_file, "w") as f:
    json.dump({**hf, "architectures": ["SwinModel"]}, f)
  with pytest.raises(ValueError, match="unknown architecture 'SwinModel'"):
    dinov2.load_dinov2(good)

  with pytest.raises(FileNotFoundError, match="config.json"):
    dinov2.load_dinov2(str(tmp_path / "nowhere"))
  os.remove(os.path.join(missing, "model.safetensors"))
  with pytest.raises(FileNotFoundError, match="model.safetensors"):
    dinov2.load_dinov2(missing)


def test_classification_checkpoint_loads_its_backbone(tmp_path):
  """A …ForImageClassification checkpoint (prefixed tensors + a classifier) yields the same backbone."""
  base = _hf_model("dinov2")
  clf = transformers.Dinov2ForImageClassification(base.config)
  clf.dinov2.load_state_dict(base.state_dict())
  _, from_base = dinov2.load_dinov2(_save(base, tmp_path / "base"))
  _, from_clf = dinov2.load_dinov2(_save(clf, tmp_path / "clf"))
  jax.tree.map(np.testing.assert_array_equal, from_base, from_clf)
