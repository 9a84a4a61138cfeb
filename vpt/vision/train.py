"""The vision training loop: DINO continued SSL ± V-Pretraining, with frozen-feature evaluations.

    python -m vpt.main --config experiments/vision_dino.py:tiny,unet --workdir DIR
    python -m vpt.main --eval_only --workdir DIR [--eval_split test]

Mirrors vpt/language/train.py: init or restore (state + every data iterator), one jitted step with explicit
shardings and the state donated, SIGTERM → save and exit, metrics to metrics.jsonl / TensorBoard.
The step itself (DINO learner step, feedback heads, meta step) lives in vpt/vision/step.py.

Data. Four grain iterators, all checkpointed: `data` (the unlabeled stream, images only — its labels,
if the source has any, are dropped before the step), `meta_data` (the separate unlabeled meta-SSL
batch), `labeled_train` (the heads' refresh) and `labeled_meta` (g_down). These three advance only on
meta steps (other steps pass the last batches again; the step reads them only under its meta branch),
so their checkpointed positions are exact and a resumed run equals an uninterrupted one.

Evaluation, on frozen features of the learner's backbone: a linear probe and DINO's kNN on the cls
feature (image labels), linear-BN segmentation and depth heads on the patch features (mIoU, depth
RMSE / AbsRel / δ1) — all fitted on labeled_train and scored on val (periodic) or test
(`evaluate_checkpoint`), written with an `eval/` prefix.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from vpt.core import (checkpoint as ckpt_lib, config as core_config, loop as loop_lib, meta as meta_lib,
                      metrics as metrics_lib, paths, run_dir as run_dir_lib, sharding)
from vpt.vision import config as vision_config, dino, evals as vision_evals, step as vision_step
from vpt.vision.data import images as images_lib
from vpt.vision.models.vit import ViT, ViTConfig, count_params
from vpt.vision.step import VisionSetup


EVAL_SPLITS = ("val", "test")


# ----------------------------------------------------------------------------- data


class _Range:
  """Records [start, start + size) of a source (ADE20K / NYUv2 train → labeled_train, labeled_meta)."""

  def __init__(self, source, start: int, size: int, field: str):
    if start + size > len(source):
      raise ValueError(f"config.{field}: the labeled splits need {start + size} training records, but the source "
                       f"has {len(source)}")
    self.source, self.start, self.size = source, start, size

  def __len__(self) -> int:
    return self.size

  def __getitem__(self, i: int) -> dict:
    return self.source[self.start + int(i)]


def unlabeled_source(data_cfg):
  """The unlabeled SSL stream: the source's training split."""
  return images_lib.make_image_source(data_cfg, "train")


def labeled_source(data_cfg, split: str):
  """labeled_train / labeled_meta / val / test records with 'seg' and/or 'depth' (and 'label' for scenes)."""
  lab = data_cfg.labeled
  name = lab.source or data_cfg.source
  cfg = ml_collections.ConfigDict({"source": name, "root": lab.root or data_cfg.root,
                                   "fashion_dir": data_cfg.fashion_dir,
                                   "image_size": lab.image_size or data_cfg.image_size, "scenes": data_cfg.scenes})
  if name == "scenes":
    return images_lib.make_image_source(cfg, split)
  if name in ("ade20k", "nyuv2"):
    if split in ("labeled_train", "labeled_meta"):
      base = images_lib.make_image_source(cfg, "train")
      if split == "labeled_train":
        return _Range(base, 0, lab.num_train, "data.labeled.num_train")
      return _Range(base, lab.num_train, lab.num_meta, "data.labeled.num_meta")
    return images_lib.make_image_source(cfg, "val" if name == "ade20k" else "test")
  raise ValueError(f"config.data.labeled.source={lab.source!r} (data.source={data_cfg.source!r}): no labeled "
                   "splits; expected 'scenes', 'ade20k' or 'nyuv2'")


def num_seg_classes(data_cfg) -> int | None:
  return vision_config.labeled_seg_classes(data_cfg)


def _images_only(batch: dict) -> dict:
  """The learner's unlabeled batch: whatever labels the source has never reach the SSL step."""
  return {"image": batch["image"]}


def _labeled(batch: dict) -> dict:
  """{image, seg and/or depth}: the targets the labeled source has (the step trains a head per target)."""
  out = {"image": batch["image"]}
  if "seg" in batch:
    out["seg"] = np.asarray(batch["seg"], np.int32)
  if "depth" in batch:
    out["depth"] = np.asarray(batch["depth"], np.float32)
  return out


def _make_iterators(config, with_feedback: bool) -> dict:
  pi, pc = jax.process_index(), jax.process_count()
  common = dict(process_index=pi, process_count=pc, read_threads=config.data.read_threads)
  train_src = unlabeled_source(config.data)
  its = {"data": images_lib.make_image_iterator(train_src, batch_size=config.batch_size // pc,
                                                seed=config.seed, **common)}
  if with_feedback:
    fb = config.feedback.batch_size // pc
    its["meta_data"] = images_lib.make_image_iterator(train_src, batch_size=config.vpt.meta_batch_size // pc,
                                                      seed=config.seed + 1, **common)
    its["labeled_train"] = images_lib.make_image_iterator(labeled_source(config.data, "labeled_train"),
                                                          batch_size=fb, seed=config.seed + 2, **common)
    its["labeled_meta"] = images_lib.make_image_iterator(labeled_source(config.data, "labeled_meta"),
                                                         batch_size=fb, seed=config.seed + 3, **common)
  return its


class _MetaFeed:
  """The meta step's batches (unlabeled meta-SSL, labeled-train for the heads, labeled-meta for g_down):
  fresh on meta steps, the resident previous batches otherwise — the jitted step reads them only under
  its meta branch, so plain steps neither render nor transfer feedback data."""

  def __init__(self, iterators, config, mesh, labeled_like: dict):
    self.its, self.config, self.mesh = iterators, config, mesh
    self.setup = VisionSetup.from_config(config)
    self.labeled_like = labeled_like
    self.current = None

  def batches_for(self, step: int):
    if self.setup.is_meta_step(step):
      batches = (_images_only(next(self.its["meta_data"])), _labeled(next(self.its["labeled_train"])),
                 _labeled(next(self.its["labeled_meta"])))
    elif self.current is None:  # placeholders of the right shapes (never read: not a meta step).
      c, pc = self.config, jax.process_count()
      size = c.data.image_size
      labeled = jax.tree.map(np.zeros_like, self.labeled_like)
      batches = ({"image": np.zeros((c.vpt.meta_batch_size // pc, size, size, 3), np.float32)}, labeled, labeled)
    else:
      return self.current
    self.current = tuple(sharding.global_batch(b, self.mesh) for b in batches)
    return self.current


def _peek(iterator) -> dict:
  """The iterator's next batch, leaving its position where it was (the checkpointed state stays exact)."""
  position = iterator.get_state()
  batch = next(iterator)
  iterator.set_state(position)
  return batch


# ----------------------------------------------------------------------------- state, shardings, init


def _is_vpt_run(path: str) -> bool:
  return paths.path(run_dir_lib.checkpoint_dir(path)).is_dir()


def config_with_init_model(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """With init_from a Hugging Face DINOv2/DINOv3 directory, config.model becomes its architecture
  (the compute dtype and remat stay the config's)."""
  if not config.init_from:
    return config
  if not paths.path(config.init_from).is_dir():
    raise FileNotFoundError(f"config.init_from={config.init_from!r}: no such directory")
  if _is_vpt_run(config.init_from):
    return config
  from vpt.vision.interop import dinov2  # noqa: PLC0415
  hf_cfg = dinov2.config_from_hf(dinov2.read_config(config.init_from), dtype=config.model.dtype)
  config = copy.deepcopy(config)
  with config.unlocked():
    config.model = ml_collections.ConfigDict({**dataclasses.asdict(hf_cfg), "remat": config.model.remat})
  return config


def prepare_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The config a run reads, built once where the run (or its dry run) starts: every schema field
  (vision_config.with_defaults: the schema is the one source of defaults), config.model from a Hugging
  Face init_from, feedback.num_classes from the labeled source — then validated, once. The step and its
  setup (VisionSetup.from_config) trust the result and re-check nothing."""
  config = resolve_config(config_with_init_model(vision_config.with_defaults(config)))
  vision_config.validate_vision(config)
  return config


def resolve_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Fills the fields whose default depends on the data: feedback.num_classes from the labeled source."""
  if config.feedback.num_classes:
    return config
  config = copy.deepcopy(config)
  with config.unlocked():
    config.feedback.num_classes = num_seg_classes(config.data) or 1  # depth-only feedback: unused.
  return config


def _restore_subtree(run_dir: str, abstract: dict, step: int | None = None) -> tuple[dict, int]:
  """The named top-level fields of another vision run's checkpointed state, in `abstract`'s shardings."""
  try:
    return ckpt_lib.restore_state_fields(run_dir, abstract, step)
  except run_dir_lib.NoCheckpointError:
    raise  # no such checkpoint (its message names the steps there are): not a model mismatch
  except (ValueError, KeyError) as e:
    raise ValueError(f"{run_dir!r} (step {step if step is not None else 'latest'}) does not match this run's "
                     f"model (config.model / config.dino): {type(e).__name__}: {str(e)[:300]}") from e


def _initialise_from(config, state, shardings):
  """The state with the student/teacher (and, from a vpt run, the centre) of config.init_from."""
  path = config.init_from
  if _is_vpt_run(path):
    abstract = {k: ckpt_lib.abstract_like(getattr(state, k), getattr(shardings, k))
                for k in ("student", "teacher", "center")}
    loaded, step = _restore_subtree(path, abstract)
    print(f"Initialised the student, teacher and centre from {path} (step {step})", flush=True)
    return state.replace(**loaded)
  from vpt.vision.interop import dinov2  # noqa: PLC0415
  # With iBOT on, the student's mask token is the checkpoint's (DINOv2/DINOv3 trained it with iBOT).
  mask_token = VisionSetup.from_config(config).vit_cfg.mask_token
  _, backbone = dinov2.load_dinov2(path, dtype=config.model.dtype, mask_token=mask_token)
  backbone = jax.device_put(backbone, shardings.student["backbone"])
  print(f"Initialised the student and teacher backbones from {path} (Hugging Face)", flush=True)
  return state.replace(student={**state.student, "backbone": backbone},
                       teacher={**state.teacher, "backbone": jax.tree.map(jnp.copy, backbone)})


# ----------------------------------------------------------------------------- evaluation


def _read_records(source, n: int, what: str) -> dict:
  """The first n records of `source` as stacked arrays (images float32 in [0, 1])."""
  n = min(n, len(source))
  if n <= 0:
    raise ValueError(f"{what}: the source has no records")
  records = [source[i] for i in range(n)]
  out = {k: np.stack([r[k] for r in records]) for k in records[0]}
  out["image"] = out["image"].astype(np.float32) / np.float32(255.0)
  return out


class Evaluator:
  """Frozen-feature evals of a backbone: the probe sets are read once, features recomputed per call."""

  def __init__(self, config, mesh, split: str = "val"):
    if split not in EVAL_SPLITS:
      raise ValueError(f"eval split={split!r}: expected one of {EVAL_SPLITS}")
    self.config, self.mesh, self.split = config, mesh, split
    e = config.eval
    self.train = _read_records(labeled_source(config.data, "labeled_train"), e.num_train, "labeled_train")
    self.eval = _read_records(labeled_source(config.data, split), e.num_eval, split)
    self.cls_train = self.cls_eval = None
    if "label" not in self.train:  # image labels from the unlabeled source, if it has them (ImageNet).
      src = config.data.source
      if src in ("imagenet", "fashion_mnist"):
        self.cls_train = _read_records(images_lib.make_image_source(config.data, "train"), e.num_train, src)
        self.cls_eval = _read_records(images_lib.make_image_source(
            config.data, "val" if src == "imagenet" else "test"), e.num_eval, src)
    else:
      self.cls_train, self.cls_eval = self.train, self.eval
    self.num_classes = num_seg_classes(config.data)
    self.patch_size = config.model.patch_size

  def features(self, backbone, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(cls [N, D], patches [N, n, D]) in eval batches; the last batch is padded then trimmed."""
    bs = min(self.config.eval.batch_size, len(images))
    repl = sharding.replicated(self.mesh)
    cls, patches = [], []
    for s in range(0, len(images), bs):
      x = images[s:s + bs]
      n = len(x)
      if n < bs:
        x = np.concatenate([x, np.zeros((bs - n,) + x.shape[1:], x.dtype)])
      c, p, _ = vision_step.features(self.config, backbone, jax.make_array_from_process_local_data(repl, x))
      c, p = jax.device_get((c, p))
      cls.append(np.asarray(c[:n], np.float32))
      patches.append(np.asarray(p[:n], np.float32))
    return np.concatenate(cls), np.concatenate(patches)

  def __call__(self, backbone) -> dict[str, float]:
    e, out = self.config.eval, {}
    feats = {}  # one forward pass per probe set, shared by the image-level and the dense probes
    get = lambda d: feats[id(d)] if id(d) in feats else feats.setdefault(id(d), self.features(backbone, d["image"]))
    if self.cls_train is not None:
      xs = [get(d)[0] for d in (self.cls_train, self.cls_eval)]
      ys = [np.asarray(d["label"], np.int64) for d in (self.cls_train, self.cls_eval)]
      out["linear_acc"] = vision_evals.linear_probe_accuracy(xs[0], ys[0], xs[1], ys[1],
                                                             steps=e.linear_probe_steps)
      out["knn_acc"] = vision_evals.knn_accuracy(xs[0], ys[0], xs[1], ys[1], k=e.knn_k)
    targets = {}
    if "seg" in self.train:
      targets.update(train_seg=self.train["seg"], eval_seg=self.eval["seg"])
    if "depth" in self.train:
      targets.update(train_depth=self.train["depth"], eval_depth=self.eval["depth"])
    if targets:
      h, w = self.train["image"].shape[1:3]
      grid = (h // self.patch_size, w // self.patch_size)
      dense, _ = vision_evals.train_dense_heads(
          get(self.train)[1], get(self.eval)[1], grid, num_classes=self.num_classes, steps=e.dense_head_steps,
          batch_size=e.dense_head_batch_size, seg_lr=e.seg_learning_rate, depth_lr=e.depth_learning_rate,
          seed=self.config.seed, **targets)
      out.update(dense)
    return out


def eval_backbone(state):
  """The backbone the evals probe: the learner θ (the student), the network V-Pretraining steers;
  the EMA teacher lags it by ~1/(1 − momentum) steps, longer than a CPU-scale run."""
  return state.student["backbone"]


# ----------------------------------------------------------------------------- the loop


def flops_per_image(setup: VisionSetup, student) -> float:
  """The learner's model FLOPs per training image (vpt.vision.dino.flops_per_image) from the student's
  parameter tree (abstract or concrete) and the multi-crop sizes."""
  backbone, cfg, crops = student["backbone"], setup.vit_cfg, setup.crops
  blocks = count_params({k: v for k, v in backbone.items() if k.startswith("layers_")})
  crop = lambda side: (1 + cfg.n_registers + (side // cfg.patch_size) ** 2, (side // cfg.patch_size) ** 2)
  sides = [crops.global_size] * crops.n_global + [crops.local_size] * crops.n_local
  return dino.flops_per_image(
      crops=[crop(s) for s in sides], n_teacher_crops=crops.n_global, n_params_blocks=blocks,
      n_layers=cfg.n_layers, d_model=cfg.d_model, patch_params=count_params(backbone["patch_embeddings"]),
      head_params=count_params(student["head"]))


def _rates(steps: int, seconds: float, images_per_step: int, flops_per_image: float, peak_flops: float) -> dict:
  """Steps/s, images/s, and the learner's TFLOP/s per device and MFU (as the language loop logs them)."""
  out = metrics_lib.throughput_stats(steps=steps, seconds=seconds, tokens=steps * images_per_step,
                                     flops_per_token=flops_per_image, num_devices=jax.device_count(),
                                     peak_flops_per_device=peak_flops)
  out["images_per_sec"] = out.pop("tokens_per_sec")
  return out


def jit_step_programs(config: ml_collections.ConfigDict, shardings, mesh,
                      dispatch: str | None = None) -> dict[bool | None, Any]:
  """{meta: the jitted step} for the keys of vpt.core.meta.programs_for(vpt.dispatch): {False: plain,
  True: meta} dispatched by the host (the default: XLA:CPU ran the meta step up to 2.6× slower under
  lax.cond; BENCHMARKS.md), or {None: one program}. Also what `--dry_run` compiles; `dispatch`
  overrides the config's. Each compiles on first use."""
  uses_designer = vision_config.uses_designer(config)
  batch_sh = sharding.batch_sharding(mesh)
  fb_sh = batch_sh if uses_designer else None
  jit_step = lambda meta: jax.jit(vision_step.make_vision_train_step(config, meta=meta),
                                  in_shardings=(shardings, batch_sh, fb_sh, fb_sh, fb_sh),
                                  out_shardings=(shardings, sharding.replicated(mesh)), donate_argnums=(0,))
  return {m: jit_step(m) for m in meta_lib.programs_for(dispatch or config.vpt.dispatch, uses_designer)}


def main_run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """What `python -m vpt.main` runs for a vision config (vpt.core.tasks): the run, which validates once."""
  return run(config, workdir)


def run(config: ml_collections.ConfigDict, workdir: str, *, stop_after: int | None = None) -> dict[str, Any]:
  """Trains to `config.num_steps` (resuming from `workdir` if it holds checkpoints).

  `stop_after`: stop (and checkpoint) after this step as a preemption would — for tests and
  time-sliced schedules; a later `run` resumes there. Returns a summary dict (final train/eval
  metrics, throughput, whether the run stopped early) with the final state under "state".
  """
  # Everything that can fail on bad input (config, data, init_from, mesh) runs before a checkpoint
  # directory is created, so a bad start leaves no partial checkpoint; the config is recorded after the restore.
  config = prepare_config(config)  # the one validation of the run
  sharding.maybe_initialize_distributed(config.multihost)
  workdir = paths.norm(workdir)  # local paths absolute; gs:// and other URLs through etils.epath
  paths.makedirs(workdir)
  is_main = jax.process_index() == 0
  setup = VisionSetup.from_config(config)
  mesh = sharding.make_mesh(config.mesh)
  dp = mesh.shape["data"] * mesh.shape["fsdp"]
  uses_designer = vision_config.uses_designer(config)
  vision_config.check_batches_divide(config, dp, jax.process_count())
  iterators = _make_iterators(config, uses_designer)
  train_iter = iterators["data"]
  first_batch = _images_only(next(train_iter))  # surfaces data errors now.
  first_labeled = _labeled(_peek(iterators["labeled_train"])) if uses_designer else None
  evaluator = Evaluator(config, mesh, "val") if config.eval.num_train > 0 else None

  # The seed and the sample (the heads are shaped by the labeled images) are arguments, not constants:
  # one compiled init serves every seed.
  repl = sharding.replicated(mesh)
  init_args = tuple(jax.make_array_from_process_local_data(repl, np.asarray(a)) for a in (
      jax.random.PRNGKey(config.seed), (first_labeled or first_batch)["image"][:1]))
  init_fn = lambda rng, sample: vision_step.init_vision_state(config, rng, sample)
  abstract_state = jax.eval_shape(init_fn, *init_args)
  shardings = vision_step.vision_state_shardings(config, abstract_state, mesh)

  checkpointer = ckpt_lib.Checkpointer(run_dir_lib.checkpoint_dir(workdir), keep=config.checkpoint.keep,
                                       async_save=config.checkpoint.async_save, iterator_names=tuple(iterators))
  state, restored_step = loop_lib.restore_run(checkpointer, ckpt_lib.abstract_like(abstract_state, shardings),
                                              iterators, config, workdir)
  if state is None:
    state = jax.jit(init_fn, out_shardings=shardings)(*init_args)
    if config.init_from:
      state = _initialise_from(config, state, shardings)
    pending = first_batch
  else:
    logging.info("Resumed from step %d", restored_step)
    print(f"Resuming from checkpoint at step {restored_step}", flush=True)
    pending = None  # the restored iterators continue where the checkpoint left them.

  programs = jit_step_programs(config, shardings, mesh)
  meta_feed = _MetaFeed(iterators, config, mesh, first_labeled) if uses_designer else None

  if is_main:  # nothing more fails on bad input: the run starts. config.json, or config.<n>.json if changed.
    run_dir_lib.write_config(config, workdir)
  writer = metrics_lib.MetricWriter(workdir, enabled=is_main)
  start_step = int(jax.device_get(state.step))
  n_params = count_params(abstract_state.student["backbone"])
  if is_main and start_step == 0:
    m = config.model
    print(f"Learner: ViT {n_params:,} params (d {m.d_model}, {m.n_layers} layers, patch {m.patch_size}); "
          f"mode {config.vpt.mode}; mesh {dict(mesh.shape)}; {config.num_steps} steps of {config.batch_size} "
          f"images", flush=True)

  def next_step(step: int) -> loop_lib.StepCall:
    nonlocal pending
    batch_u, pending = (pending if pending is not None else _images_only(next(train_iter))), None
    meta = uses_designer and bool(setup.is_meta_step(step))
    feeds = meta_feed.batches_for(step) if uses_designer else (None, None, None)
    key = meta_lib.program_key(programs, meta)
    return loop_lib.StepCall(key, programs[key], (sharding.global_batch(batch_u, mesh), *feeds), meta)

  evaluate = lambda state, step: None if evaluator is None else evaluator(eval_backbone(state))
  peak_flops, peak_source = metrics_lib.device_peak_flops(dtype=config.model.dtype)
  image_flops = flops_per_image(setup, abstract_state.student)
  rates = lambda steps, seconds: _rates(steps, seconds, config.batch_size, image_flops, peak_flops)
  loop_schedule = loop_lib.Schedule(config.num_steps, config.log_every_steps, config.eval.every_steps,
                                    config.checkpoint.every_steps, stop_after)
  result = loop_lib.run_loop(
      state, start_step, loop_schedule, next_step=next_step, evaluate=evaluate,
      rates=rates,
      progress_fields=lambda host: {"loss": host.get("loss", float("nan")), "img/s": host.get("images_per_sec", 0.0)},
      checkpointer=checkpointer, iterators=iterators, writer=writer, show_progress=is_main and config.progress_bar)
  state, step, timer, last_train = result.state, result.step, result.timer, result.last_train
  checkpointer.close()
  writer.close()
  summary: dict[str, Any] = {"preempted": result.preempted, "start_step": start_step, "mode": config.vpt.mode}
  if result.last_eval is not None:
    summary["eval"] = result.last_eval
  summary.update(step=step, train=last_train, num_params=n_params, peak_flops=peak_flops, peak_source=peak_source)
  if timer.steps:
    summary["throughput"] = rates(timer.steps, timer.seconds)
  if is_main:
    loop_lib.print_summary(summary, summary_table({summary.get("mode", "run"): summary}))
    paths.write_atomic(paths.path(workdir) / "summary.json", json.dumps(summary, indent=2, default=float))
  summary["state"] = state
  return summary


SUMMARY_ROWS = (  # (label, section, key, format)
    ("train DINO loss", "train", "loss", "{:.4f}"),
    ("linear-probe accuracy", "eval", "linear_acc", "{:.4f}"),
    ("kNN accuracy", "eval", "knn_acc", "{:.4f}"),
    ("segmentation mIoU", "eval", "miou", "{:.4f}"),
    ("depth RMSE", "eval", "rmse", "{:.4f}"),
    ("depth AbsRel", "eval", "abs_rel", "{:.4f}"),
    ("depth δ1", "eval", "delta1", "{:.4f}"),
    ("share of time in meta steps", "train", "meta_time_fraction", "{:.3f}"),
    ("images/s", "throughput", "images_per_sec", "{:,.1f}"),
)


def summary_table(summaries: dict[str, dict[str, Any]]) -> str:
  """A text table with one column per run."""
  return loop_lib.summary_table(summaries, SUMMARY_ROWS)


# ----------------------------------------------------------------------------- standalone evaluation


def load_run_config(workdir: str) -> ml_collections.ConfigDict:
  """The resolved config a vision run wrote to workdir/config.json, completed from the schema (fields added
  since the run started read their defaults, vision_config.with_defaults)."""
  config = run_dir_lib.read_config(workdir)
  if config.get("task") != "vision":  # checked before the defaults fill in task='vision'
    raise ValueError(f"{run_dir_lib.config_path(workdir)}: task={config.get('task')!r}, not a vision run "
                     "(--workdir must be a vision run directory)")
  fb = config.get("feedback")
  if fb is not None and "head_steps_per_learner_step" in fb:
    # Written before the heads moved into the meta step: the field is gone (evaluation never reads it).
    del fb["head_steps_per_learner_step"]
  return vision_config.with_defaults(config)  # head_steps (and any newer field): the schema's default


def evaluate_run(workdir: str, split: str = "test", step: int | None = None,
                 overrides: dict | None = None) -> dict[str, float]:
  """Frozen-feature evals of a finished (or running) vision run's newest checkpoint (or `step`) on
  `split`; written to workdir/eval_<split>.json and metrics.jsonl (prefix eval_<split>/).

  `overrides`: dotted config fields for the evaluation, e.g. {"eval.num_train": 1024} for a run
  trained without in-loop evals (eval.num_train = 0)."""
  config = core_config.with_overrides(load_run_config(workdir), {**(overrides or {}), "init_from": ""})
  # (init_from: the run's own checkpoint holds the weights; config.model is already resolved.)
  vision_config.validate_vision(config)
  mesh = sharding.make_mesh(config.mesh)
  evaluator = Evaluator(config, mesh, split)
  cfg = ViTConfig.from_config(config.model)
  size = config.data.image_size
  abstract = jax.eval_shape(lambda: ViT(cfg).init(jax.random.PRNGKey(0), jnp.zeros((1, size, size, 3))))["params"]
  shard = sharding.param_shardings(abstract, mesh, vision_step.VIT_RULES)
  loaded, step = _restore_subtree(workdir, {"student": {"backbone": ckpt_lib.abstract_like(abstract, shard)}}, step)
  results = evaluator(loaded["student"]["backbone"])
  if jax.process_index() == 0:
    paths.write_atomic(paths.path(workdir) / f"eval_{split}.json", json.dumps({"step": step, **results}, indent=2))
    with metrics_lib.MetricWriter(workdir) as writer:
      writer.write_scalars(step, results, prefix=f"eval_{split}")
  return {"step": step, **results}
