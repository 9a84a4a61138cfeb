"""The vision loop end to end: frozen-feature evals, checkpoints, resume == uninterrupted, bad config, main."""

import json
import math
import os
import subprocess
import sys

import jax
import numpy as np
import pytest


from vpt.core import config as core_config, metrics
from vpt.vision import config as vision_config, step as vision_step, train as train_vision

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXPERIMENT = os.path.join(REPO, "experiments", "vision_dino.py")


def nano_config(variant="dino", **overrides):
  config = core_config.load_config_file(EXPERIMENT, f"nano,{variant}")
  return core_config.with_overrides(config, {"progress_bar": False, "mesh.num_devices": 1, "num_steps": 4,
                                            **overrides})


def _checkpoint_steps(workdir):
  return sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit())


def _assert_same_state(a, b):
  for name in ("student", "teacher", "center", "opt_state", "heads", "designer"):
    la, lb = jax.tree.leaves(jax.device_get(getattr(a, name))), jax.tree.leaves(jax.device_get(getattr(b, name)))
    assert len(la) == len(lb), name
    for x, y in zip(la, lb):
      np.testing.assert_array_equal(x, y, err_msg=name)


def test_nano_runs_end_to_end_with_evals_and_checkpoints(tmp_path):
  summary = train_vision.run(nano_config(**{"eval.every_steps": 4, "checkpoint.every_steps": 2}), str(tmp_path))
  assert summary["step"] == 4 and not summary["preempted"]
  ev = summary["eval"]
  assert set(ev) == {"linear_acc", "knn_acc", "miou", "rmse", "abs_rel", "delta1"}
  assert all(math.isfinite(v) for v in ev.values()), ev
  assert 0 <= ev["linear_acc"] <= 1 and 0 <= ev["knn_acc"] <= 1 and 0 <= ev["miou"] <= 1 and 0 <= ev["delta1"] <= 1
  assert ev["rmse"] > 0 and ev["abs_rel"] > 0
  assert _checkpoint_steps(tmp_path) == [2, 4]
  records = metrics.read_jsonl(os.path.join(tmp_path, "metrics.jsonl"))
  assert [r["step"] for r in records if "train/loss" in r] == [2, 4]
  assert all(math.isfinite(r["train/loss"]) for r in records if "train/loss" in r)
  assert [r["eval/miou"] for r in records if "eval/miou" in r] == [ev["miou"]]
  # The standalone evaluator reads the final student back from the checkpoint: same backbone, same probes
  # (given a relative workdir, as from a shell).
  again = train_vision.evaluate_run(os.path.relpath(tmp_path), "val")
  assert again["step"] == 4
  for k, v in ev.items():
    np.testing.assert_allclose(again[k], v, rtol=1e-5, err_msg=k)
  assert os.path.isfile(tmp_path / "eval_val.json")
  # ... and so does the one eval-only command of every task.
  out = subprocess.run([sys.executable, "-m", "vpt.main", "--eval_only", f"--workdir={tmp_path}", "--eval_split=val"],
                       capture_output=True, text=True, cwd=REPO, env={**os.environ, "JAX_PLATFORMS": "cpu"}, timeout=600)
  assert out.returncode == 0, out.stderr[-2000:]
  cli = json.loads(out.stdout[out.stdout.rfind("\n{") + 1:])
  for k, v in again.items():
    np.testing.assert_allclose(cli[k], v, rtol=1e-5, err_msg=k)
  # Throughput as the language loop reports it: images/s, and MFU from the DINO FLOPs model.
  tp, setup = summary["throughput"], vision_step.VisionSetup.from_config(nano_config())
  image_flops = train_vision.flops_per_image(setup, jax.device_get(summary["state"].student))
  assert image_flops > 0 and tp["images_per_sec"] > 0
  np.testing.assert_allclose(tp["mfu"], image_flops * tp["images_per_sec"] / (summary["peak_flops"] *
                                                                            jax.device_count()), rtol=1e-9)


def test_resume_equals_uninterrupted(tmp_path):
  config = nano_config(**{"eval.num_train": 0, "checkpoint.every_steps": 1000})
  straight = train_vision.run(config, str(tmp_path / "straight"))
  half = train_vision.run(config, str(tmp_path / "resumed"), stop_after=2)
  assert half["preempted"] and half["step"] == 2
  assert _checkpoint_steps(tmp_path / "resumed") == [2]
  resumed = train_vision.run(config, str(tmp_path / "resumed"))
  assert resumed["start_step"] == 2 and resumed["step"] == 4
  _assert_same_state(resumed["state"], straight["state"])


@pytest.mark.slow
def test_designer_mode_resume_equals_uninterrupted(tmp_path):
  """U-Net V-Pretraining: heads, designer and all four data iterators; the run stops at step 3 (not a
  meta step, so the resumed run starts on a placeholder meta batch) and resumes through meta step 4."""
  config = nano_config("unet", num_steps=6, **{"eval.num_train": 0, "checkpoint.every_steps": 1000,
                                               "log_every_steps": 1})
  straight = train_vision.run(config, str(tmp_path / "straight"))
  train_vision.run(config, str(tmp_path / "resumed"), stop_after=3)
  resumed = train_vision.run(config, str(tmp_path / "resumed"))
  assert resumed["start_step"] == 3 and resumed["step"] == 6
  _assert_same_state(resumed["state"], straight["state"])
  records = metrics.read_jsonl(os.path.join(tmp_path, "straight", "metrics.jsonl"))
  assert [r["train/meta/is_meta_step"] for r in records] == [1.0, 0.0, 1.0, 0.0, 1.0, 0.0]
  assert all(math.isfinite(r["train/meta/value"]) and r["train/meta/g_down_norm"] > 0 for r in records)


@pytest.mark.parametrize("field, value", [
    ("vpt.mode", "bogus"),
    ("dino.global_size", 18),  # not a multiple of the patch size 4
    ("data.image_size", 8),  # smaller than the global crop
    ("vpt.align_last_n_layers", 3),  # the nano ViT has 2 blocks
    ("vpt.candidates.kinds", ("identity", "rotate")),
    ("dino.global_scale", (0.5, 0.2)),
    ("feedback.batch_size", 0),
    ("eval.knn_k", 0),
    ("dino.centering", "mean"),
    ("dino.ibot_weight", -1.0),
    ("dino.koleo_weight", -0.1),
    ("vpt.dispatch", "sometimes"),
])
def test_bad_config_field_is_named(field, value):
  config = nano_config(**{field: value})
  with pytest.raises(ValueError, match=f"config.{field}="):
    vision_config.validate_vision(config)


def test_bad_ibot_fields_are_named():
  on = {"dino.ibot_weight": 1.0}
  for field, value in [("dino.ibot_mask_ratio", (0.5, 0.1)), ("dino.ibot_mask_prob", 0.0), ("dino.ibot_out_dim", 48),
                       ("dino.ibot_center_momentum", 1.0)]:
    with pytest.raises(ValueError, match=f"config.{field}="):
      vision_config.validate_vision(nano_config(**on, **{field: value}))
  vision_config.validate_vision(nano_config(**on, **{"dino.ibot_out_dim": 48, "dino.ibot_separate_head": True}))


def test_run_config_written_before_the_heads_moved_into_the_meta_step_still_loads(tmp_path):
  old = nano_config("unet").to_dict()
  del old["feedback"]["head_steps"]
  old["feedback"]["head_steps_per_learner_step"] = 1
  with open(tmp_path / "config.json", "w") as f:
    json.dump(old, f)
  config = train_vision.load_run_config(str(tmp_path))
  assert "head_steps_per_learner_step" not in config.feedback
  assert config.feedback.head_steps == vision_config.feedback_config().head_steps
  vision_config.validate_vision(config)


def test_bad_setups_fail_before_any_checkpoint(tmp_path):
  cases = [
      (nano_config("unet", **{"data.source": "fashion_mnist"}), "data.labeled.source"),  # no dense labels
      (nano_config(**{"data.labeled.source": "ade20k"}), "data.labeled.root"),
      (nano_config(**{"mesh.num_devices": 8, "batch_size": 12}), "batch_size=12"),
      (nano_config(init_from=str(tmp_path / "nowhere")), "init_from"),
  ]
  for i, (config, needle) in enumerate(cases):
    workdir = tmp_path / f"run{i}"
    with pytest.raises((ValueError, FileNotFoundError), match=needle):
      train_vision.run(config, str(workdir))
    assert not (workdir / "checkpoints").exists()


def test_main_dispatches_vision_configs(tmp_path):
  env = dict(os.environ)  # conftest's XLA cache: the subprocesses share this worker's compiled programs
  base = [sys.executable, "-m", "vpt.main", f"--config={EXPERIMENT}:nano,dino", "--config.num_steps=4",
          "--config.eval.num_train=0", "--config.mesh.num_devices=1", "--config.progress_bar=False",
          "--config.checkpoint.every_steps=2"]
  out = subprocess.run(base + [f"--workdir={tmp_path / 'ok'}"], cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=300)
  assert out.returncode == 0, out.stdout + out.stderr
  assert _checkpoint_steps(tmp_path / "ok") == [2, 4]
  assert metrics.read_jsonl(str(tmp_path / "ok" / "metrics.jsonl"))[-1]["step"] == 4
  bad = subprocess.run(base + [f"--workdir={tmp_path / 'bad'}", "--config.vpt.align_last_n_layers=5"], cwd=REPO,
                       env=env, capture_output=True, text=True, timeout=300)
  assert bad.returncode != 0 and "vpt.align_last_n_layers" in bad.stdout + bad.stderr
  assert not (tmp_path / "bad" / "checkpoints").exists()


@pytest.mark.parametrize("size", ["nano", "tiny", "vitl"])
def test_experiment_configs_validate(size):
  for variant in ("dino", "unet", "candidates", "random_feedback"):
    config = core_config.load_config_file(EXPERIMENT, f"{size},{variant}")
    if size == "vitl":  # paper scale reads ImageNet + ADE20K: their roots are the user's to give.
      with pytest.raises(ValueError, match="config.data.root="):
        vision_config.validate_vision(config)
      config = core_config.with_overrides(config, {"data.root": "/data/imagenet", "data.labeled.root": "/data/ade"})
    vision_config.validate_vision(config)
    assert config.vpt.mode == variant
    # Every size trains the paper's objective (DINO only) unless `dinov2` asks for DINOv2's.
    assert config.dino.ibot_weight == config.dino.koleo_weight == 0 and config.dino.centering == "centering"
    objective = core_config.load_config_file(EXPERIMENT, f"{size},{variant},dinov2")
    objective = core_config.with_overrides(objective, {"data.root": config.data.root,
                                                      "data.labeled.root": config.data.labeled.root})
    vision_config.validate_vision(objective)
    assert objective.dino.ibot_weight == 1.0 and objective.dino.koleo_weight == 0.1
    assert objective.dino.centering == "sinkhorn_knopp" and objective.vpt.mode == variant
  with pytest.raises(ValueError, match="variant 'bogus'"):
    core_config.load_config_file(EXPERIMENT, f"{size},bogus")
