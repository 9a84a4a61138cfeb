"""The vision schema is the one source of defaults: a field left out of a config (or of an older run's
config.json) reads the schema's value on every path; the run validates once; the optimizer block is
validated (LM and vision, one check); and vpt.vision.data's modules import one way (images → scenes)."""

import ast
import copy
import dataclasses
import json
import os

import jax.numpy as jnp
import numpy as np
import pytest

from vpt.core import config as core_config
from vpt.language import config_lib
from vpt.vision import config as vision_config, step as vs, train as train_vision

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXPERIMENT = os.path.join(REPO, "experiments", "vision_dino.py")
# The blocks VisionSetup and the optimizers read.
STEP_BLOCKS = ("dino", "feedback", "vpt", "optimizer")


def nano_config(variant="unet", **overrides):
  config = core_config.load_config_file(EXPERIMENT, f"nano,{variant}")
  return core_config.with_overrides(config, {"progress_bar": False, "mesh.num_devices": 1, "num_steps": 4,
                                            **overrides})


def _leaves(cfg, prefix):
  for key, value in cfg.items():
    path = f"{prefix}.{key}"
    if hasattr(value, "items"):
      yield from _leaves(value, path)
    else:
      yield path


def _without(config, dotted):
  config = copy.deepcopy(config)
  *parents, leaf = dotted.split(".")
  node = config
  for part in parents:
    node = node[part]
  del node[leaf]
  return config


def _what_the_step_reads(config):
  """The setup, the learner's schedule at its end, and one update of each optimizer on a fixed gradient."""
  _, schedule = vs.make_vision_optimizer(config)
  params, grads = {"w": jnp.ones((2, 2))}, {"w": jnp.full((2, 2), 10.0)}
  updates = []
  for opt in (vs.make_vision_optimizer(config)[0], vs.make_head_optimizer(config), vs.make_designer_optimizer(config)):
    update, _ = opt.update(grads, opt.init(params), params)
    updates.append(np.asarray(update["w"]))
  return vs.VisionSetup.from_config(config), float(schedule(config.num_steps)), updates


@pytest.mark.parametrize("mode", ["unet", "candidates"])
def test_a_field_left_out_reads_the_schema_default(mode):
  """The defect (before: vpt.designer.lambda_sparsity 0.0 vs the schema's 0.1, lambda_tv 0.0 vs 0.05,
  blur_sigma 1.0 vs 2.0, optimizer.end_lr_fraction 0.0 vs 0.1, each read by the step when the config left
  it out): now every field of the step's blocks, left out, reads what the complete schema gives."""
  full = vision_config.vision_base_config()
  full.vpt.mode = mode
  want_setup, want_end_lr, want_updates = _what_the_step_reads(full)
  drift = []
  for path in (p for block in STEP_BLOCKS for p in _leaves(full[block], block)):
    if path == "vpt.mode":
      continue
    setup, end_lr, updates = _what_the_step_reads(vision_config.with_defaults(_without(full, path)))
    fields = [f.name for f in dataclasses.fields(setup) if getattr(setup, f.name) != getattr(want_setup, f.name)]
    fields += ["learning-rate schedule"] if end_lr != want_end_lr else []
    fields += [name for name, a, b in zip(("learner", "heads", "designer"), updates, want_updates)
               if not np.array_equal(a, b)]
    if fields:
      drift.append((path, fields))
  assert not drift, drift


def test_the_run_reads_the_schema_default_of_a_field_the_config_leaves_out(tmp_path):
  """The run's own path (train_vision.prepare_config → VisionSetup) and the schema agree."""
  config = nano_config()
  for path in ("vpt.designer.lambda_sparsity", "vpt.designer.lambda_tv", "vpt.designer.blur_sigma",
               "optimizer.end_lr_fraction"):
    config = _without(config, path)
  setup = vs.VisionSetup.from_config(train_vision.prepare_config(config))
  designer = vision_config.vpt_config().designer
  assert (setup.lambda_sparsity, setup.lambda_tv, setup.blur_sigma) == (
      designer.lambda_sparsity, designer.lambda_tv, designer.blur_sigma) == (0.1, 0.05, 2.0)
  assert train_vision.prepare_config(config).optimizer.end_lr_fraction == config_lib.base_config().optimizer.end_lr_fraction


def test_a_saved_run_config_without_newer_fields_loads_with_the_schema_defaults(tmp_path):
  saved = nano_config().to_dict()
  newer = ["dino.koleo_weight", "dino.centering", "vpt.designer.grad_through_teacher", "vpt.designer.lambda_tv",
           "optimizer.end_lr_fraction", "feedback.head_steps", "checkpoint.on_mismatch", "data.labeled.num_meta"]
  for path in newer:
    *parents, leaf = path.split(".")
    node = saved
    for part in parents:
      node = node[part]
    del node[leaf]
  (tmp_path / "config.json").write_text(json.dumps(saved))
  config = train_vision.load_run_config(str(tmp_path))
  schema = vision_config.vision_base_config()
  for path in newer:
    assert core_config.get_field(config, path) == core_config.get_field(schema, path), path
  assert config.model.to_dict() == nano_config().model.to_dict()  # what the run set is kept
  vision_config.validate_vision(config)
  # Filling is idempotent: a complete config is returned as it is.
  assert vision_config.with_defaults(config).to_dict() == config.to_dict()


def test_a_run_validates_its_config_once(tmp_path, monkeypatch):
  calls = []
  real = vision_config.validate_vision
  monkeypatch.setattr(vision_config, "validate_vision", lambda c: calls.append(1) or real(c))
  # A start that fails just after the config is read (12 images on 8 devices), before any state is built.
  config = nano_config(**{"mesh.num_devices": 8, "batch_size": 12})
  with pytest.raises(ValueError, match="batch_size=12"):
    train_vision.run(config, str(tmp_path / "run"))
  assert len(calls) == 1
  with pytest.raises(core_config.ConfigError, match="config.vpt.mode='soft'"):
    train_vision.run(nano_config(**{"vpt.mode": "soft"}), str(tmp_path / "bad"))
  assert not (tmp_path / "bad" / "checkpoints").exists()


@pytest.mark.parametrize("field, value, message", [
    ("optimizer.b2", 1.0, "config.optimizer.b2=1.0: expected in [0, 1)"),
    ("optimizer.b1", -0.1, "config.optimizer.b1=-0.1"),
    ("optimizer.eps", 0.0, "config.optimizer.eps=0.0: expected > 0"),
    ("optimizer.end_lr_fraction", 1.5, "config.optimizer.end_lr_fraction=1.5"),
    ("optimizer.learning_rate", -1e-3, "config.optimizer.learning_rate=-0.001"),
    ("optimizer.warmup_steps", -1, "config.optimizer.warmup_steps=-1"),
    ("optimizer.weight_decay", -0.1, "config.optimizer.weight_decay=-0.1"),
])
def test_the_language_optimizer_block_is_validated(field, value, message):
  config = core_config.with_overrides(config_lib.base_config(), {field: value})
  with pytest.raises(core_config.ConfigError, match=message.replace("[", r"\[").replace(")", r"\)")):
    config_lib.validate(config)
  with pytest.raises(core_config.ConfigError, match=message.replace("[", r"\[").replace(")", r"\)")):
    vision_config.validate_vision(core_config.with_overrides(nano_config(), {field: value}))  # the same check


def test_an_unknown_or_missing_optimizer_field_is_named():
  config = config_lib.base_config()
  config.optimizer.lr = 1e-3  # a misspelt learning_rate
  with pytest.raises(core_config.ConfigError, match=r"config.optimizer has unknown fields \['lr'\]"):
    config_lib.validate(config)
  with pytest.raises(core_config.ConfigError, match=r"config.optimizer has unknown fields \['beta2'\]"):
    vision_config.validate_vision(_with_field(nano_config(), "optimizer.beta2", 0.99))  # the same check
  config = config_lib.base_config()
  del config.optimizer["eps"]
  with pytest.raises(core_config.ConfigError, match=r"config.optimizer lacks \['eps'\]"):
    config_lib.validate(config)
  config_lib.validate(config_lib.base_config())  # the schema's own block passes


def _with_field(config, dotted, value):
  config = copy.deepcopy(config)
  *parents, leaf = dotted.split(".")
  node = config
  for part in parents:
    node = node[part]
  with node.unlocked():
    node[leaf] = value
  return config


def _imports(module_path):
  """(module-level, function-level) vpt imports of a source file."""
  tree = ast.parse(open(os.path.join(REPO, module_path)).read())
  top, nested = set(), set()
  for node in ast.walk(tree):
    if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("vpt"):
      names = {f"{node.module}.{a.name}" for a in node.names} | {node.module}
      (top if node in tree.body else nested).update(names)
    elif isinstance(node, ast.Import):
      names = {a.name for a in node.names if a.name.startswith("vpt")}
      (top if node in tree.body else nested).update(names)
  return top, nested


def test_images_and_scenes_import_one_way():
  """images → scenes → fashion_mnist, all at module level: no circle, no import hidden in a function."""
  images_top, images_nested = _imports("vpt/vision/data/images.py")
  scenes_top, scenes_nested = _imports("vpt/vision/data/scenes.py")
  fashion_top, fashion_nested = _imports("vpt/vision/data/fashion_mnist.py")
  assert "vpt.vision.data.scenes" in images_top and not images_nested
  assert not any("images" in name for name in scenes_top | scenes_nested), scenes_top | scenes_nested
  assert not scenes_nested and not fashion_top and not fashion_nested


def test_the_meta_step_dispatch_is_validated_in_both_schemas():
  message = r"config.vpt.dispatch='sometimes': expected one of \('cond', 'host'\)"
  with pytest.raises(core_config.ConfigError, match=message):
    config_lib.validate(core_config.with_overrides(config_lib.base_config(), {"vpt.dispatch": "sometimes"}))
  with pytest.raises(core_config.ConfigError, match=message):
    vision_config.validate_vision(core_config.with_overrides(nano_config(), {"vpt.dispatch": "sometimes"}))
