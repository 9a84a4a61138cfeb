"""The configuration schema of the vision path (DINO continued SSL ± V-Pretraining), its defaults and validation.

Experiments (experiments/vision_dino.py) start from `vision_base_config()` and override fields, so the
valid fields are defined once, here; `task="vision"` is what routes `vpt.main` to `vpt.vision.train`.
The shared sub-configs (optimizer, mesh, checkpoint) and their checks are vpt.core.config's.

Invariants:
- This schema is the one source of the vision defaults. A config that leaves a field out (an older
  saved run's config.json, a hand-built test config) gets the schema's value through `with_defaults`,
  applied once where a run starts (vpt.vision.train.prepare_config); nothing downstream keeps a
  fallback of its own (VisionSetup.from_config and the optimizers read the complete config as is).
- `validate_vision` runs once per run, on the complete config (prepare_config); the step trusts it.
"""

from __future__ import annotations

import dataclasses
import math

import ml_collections

from vpt.core import ALIGNS, DISPATCHES, FEEDBACK_DIRECTIONS, config as core_config
from vpt.vision.candidates import CandidateConfig, KINDS, LEARNER_MODES
from vpt.vision.data import scenes
from vpt.vision.data.images import ADE20K_NUM_CLASSES, image_data_config
from vpt.vision.dinov2_terms import CENTERINGS
from vpt.vision.models.vit import ACTIVATIONS, ViTConfig, vit_config
from vpt.vision.views import MultiCropConfig

VPT_MODES = ("dino", "unet", "candidates", "random_feedback")
DESIGNER_MODES = ("unet", "candidates", "random_feedback")  # modes with a designer and a meta step
IMAGE_SOURCES = ("scenes", "fashion_mnist", "imagenet", "ade20k", "nyuv2")
LABELED_SOURCES = ("", "scenes", "ade20k", "nyuv2")
# MultiCropConfig fields kept under config.dino with the same names (n_local is `n_local_crops`).
_MULTICROP_RENAMES = {"n_local": "n_local_crops"}


def model_config(size: str = "nano", **overrides) -> ml_collections.ConfigDict:
  """Every ViTConfig field (so ViTConfig.from_config takes the dict whole), from a vit_config preset."""
  cfg = vit_config(size, **overrides)
  return ml_collections.ConfigDict(dataclasses.asdict(cfg))


def dino_config() -> ml_collections.ConfigDict:
  """DINO head, loss temperatures, EMA/centering, the multi-crop recipe (PAPER §4, §6b) and the objective:
  DINO only (the paper's, the default) or with DINOv2's iBOT / KoLeo / Sinkhorn-Knopp terms."""
  c = ml_collections.ConfigDict()
  c.out_dim = 8192
  c.head_hidden = 2048
  c.head_bottleneck = 256
  c.head_layers = 3
  c.norm_last_layer = True
  c.t_s = 0.1
  c.t_t = 0.04
  c.t_t_warmup = 0.04  # teacher temperature at step 0, linearly to t_t over t_t_warmup_steps
  c.t_t_warmup_steps = 0
  c.center_momentum = 0.9
  c.momentum_base = 0.996  # cosine teacher momentum schedule: base at step 0 …
  c.momentum_final = 1.0  # … final at num_steps
  # The objective: DINO's class-token loss (the paper's, the default), plus DINOv2's terms as switches
  # (vpt.vision.dinov2_terms). iBOT: masked patch tokens of the student's global crops predict the
  # teacher's patch targets through the DINO head (or a separate one).
  c.ibot_weight = 0.0  # 0: off; DINOv2 1.0
  c.ibot_mask_ratio = (0.1, 0.5)  # (min, max) share of a masked crop's patches (DINOv2)
  c.ibot_mask_prob = 0.5  # share of the global crops that are masked (DINOv2)
  c.ibot_separate_head = False  # DINOv2 default: the DINO head scores the patches too
  c.ibot_out_dim = 0  # the separate head's prototypes; 0: dino.out_dim
  c.ibot_center_momentum = 0.9
  c.koleo_weight = 0.0  # KoLeo on the student's global cls features; 0: off; DINOv2 0.1
  c.centering = "centering"  # teacher targets: 'centering' (DINO's centre) | 'sinkhorn_knopp' (3 iterations)
  mc = MultiCropConfig()
  for f in dataclasses.fields(MultiCropConfig):
    c[_MULTICROP_RENAMES.get(f.name, f.name)] = getattr(mc, f.name)
  return c


def feedback_config() -> ml_collections.ConfigDict:
  """The labeled feedback heads behind g_down (segmentation CE + depth L1 on frozen features)."""
  c = ml_collections.ConfigDict()
  c.alpha_seg = 1.0
  c.alpha_dep = 1.0
  c.batch_size = 16  # labeled batch (labeled_train for the heads, labeled_meta for g_down)
  c.num_classes = 0  # segmentation classes; 0: from the labeled source (scenes 14, ADE20K 150)
  c.init_depth = 1.0  # the depth head's first prediction (metres)
  c.head_learning_rate = 1e-3
  c.head_weight_decay = 0.0
  c.head_grad_clip_norm = 1.0
  c.head_steps = 4  # AdamW steps of the heads on one labeled_train batch, at each meta step (PAPER §5)
  return c


def vpt_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  # The method: 'dino' (baseline: fixed views, μ ≡ 1, no meta step) | the designer: 'unet' (learned soft
  # masks) or 'candidates' (discrete candidate augmentations weighted by their value). 'random_feedback' is
  # the older name of unet + feedback_direction='random'.
  c.mode = "dino"
  # The designer's alignment direction: 'feedback' (g_down of the labeled feedback) | 'random' (the
  # random-feedback control, with either designer: a random direction of g_down's norm).
  c.feedback_direction = "feedback"
  c.align = "dot"  # 'dot' | 'cosine' (exact, double backward) | 'cosine_cheap' (‖g_pre‖ held constant)
  c.meta_every = 4  # r
  c.burn_in_steps = 0
  c.dispatch = "host"  # 'host': a plain and a meta program, the loop picks; 'cond': one program (vpt.core.meta)
  c.align_last_n_layers = 2  # S = last K blocks + final norm
  c.meta_batch_size = 32  # the separate unlabeled meta-SSL batch
  c.designer = ml_collections.ConfigDict()  # the U-Net (vpt.vision.models.unet) and its optimizer
  c.designer.base_channels = 16
  c.designer.depth = 3  # stride-2 downsamplings
  c.designer.groups = 8  # GroupNorm groups
  c.designer.act = "silu"
  c.designer.init_keep = 0.95  # μ at initialisation: views start ≈ the fixed pipeline's
  c.designer.learning_rate = 2e-4
  c.designer.weight_decay = 0.0
  c.designer.grad_clip_norm = 1.0
  c.designer.keep_ratio = 0.5  # κ: the mean mask is pulled towards it
  c.designer.lambda_sparsity = 0.1
  c.designer.lambda_tv = 0.05
  c.designer.blur_sigma = 2.0  # of Blur(v) in ṽ = μ⊙v + (1−μ)⊙Blur(v), in pixels of the global crop
  # ∇φV differentiates the teacher's targets on the designer's views too (exact); False detaches them,
  # as PyTorch's DINOLoss does (likely the paper's code; cheaper meta step, BENCHMARKS.md).
  c.designer.grad_through_teacher = True
  # Candidate tasks (vpt.vision.candidates): every CandidateConfig field, plus num (0 = len(kinds)).
  c.candidates = ml_collections.ConfigDict(dataclasses.asdict(CandidateConfig()))
  c.candidates.num = 0
  return c


def data_config() -> ml_collections.ConfigDict:
  """The unlabeled stream (image_data_config fields) and where the labeled feedback/eval splits come from."""
  c = image_data_config()
  c.read_threads = 0
  # Labeled splits (labeled_train → heads, labeled_meta → g_down, val/test → evals). '' takes them from the
  # unlabeled source, which needs source='scenes' (its splits are disjoint index ranges of one generator).
  # 'ade20k' / 'nyuv2': labeled_train = the first labeled.num_train training records, labeled_meta the next
  # labeled.num_meta, val/test = the source's validation / test split.
  c.labeled = ml_collections.ConfigDict()
  c.labeled.source = ""
  c.labeled.root = ""
  c.labeled.image_size = 0  # 0: data.image_size
  c.labeled.num_train = 2000  # paper: ADE20K 2,000 train + 512 meta; NYUv2 512 + 128
  c.labeled.num_meta = 512
  return c


def eval_config() -> ml_collections.ConfigDict:
  """Frozen-feature evals: probes train on labeled_train, are scored on val (periodic) or test."""
  c = ml_collections.ConfigDict()
  c.every_steps = 500
  c.num_train = 512  # labeled_train records the probes fit on
  c.num_eval = 256  # val / test records they are scored on
  c.batch_size = 64  # feature extraction
  c.linear_probe_steps = 300
  c.knn_k = 20
  c.dense_head_steps = 300
  c.dense_head_batch_size = 16
  c.seg_learning_rate = 1e-2
  c.depth_learning_rate = 1e-2
  return c


def vision_base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.task = "vision"
  c.seed = 0
  c.num_steps = 1000
  c.batch_size = 32  # unlabeled images per learner step (global)
  c.model = model_config("nano")
  c.dino = dino_config()
  c.data = data_config()
  c.feedback = feedback_config()
  c.vpt = vpt_config()
  c.eval = eval_config()

  c.optimizer = core_config.optimizer_config()  # DINO's defaults (DINOv2: β2 0.999, weight decay 0.04)
  c.optimizer.update(learning_rate=5e-4, b2=0.999, weight_decay=0.04)
  c.mesh = core_config.mesh_config()
  c.multihost = False
  c.checkpoint = core_config.checkpoint_config()
  c.log_every_steps = 10
  c.progress_bar = True
  # A Hugging Face DINOv2 / DINOv3 directory (config.json + safetensors: its config sets config.model, its
  # weights the student and teacher backbones; the DINO head starts fresh), or a vpt vision run directory
  # (its newest checkpoint's student, teacher and center).
  c.init_from = ""
  return c


def check_batches_divide(config: ml_collections.ConfigDict, dp: int, process_count: int | None = None) -> None:
  """The batches a run splits (the stream's; with a designer the feedback's and the meta-SSL batch) divide
  evenly over the `dp` data-parallel devices (and the hosts, when `process_count` is given)."""
  sizes = {"batch_size": config.batch_size}
  if uses_designer(config):
    sizes.update({"feedback.batch_size": config.feedback.batch_size, "vpt.meta_batch_size": config.vpt.meta_batch_size})
  hosts = f" and the process count {process_count}" if process_count is not None else ""
  for field, size in sizes.items():
    if size % dp or (process_count is not None and size % process_count):
      raise ValueError(f"config.{field}={size} is not divisible by the data-parallel size {dp} (mesh.data × "
                       f"mesh.fsdp){hosts}")


def uses_designer(config) -> bool:
  return config.vpt.mode in DESIGNER_MODES


# Segmentation classes of the labeled sources that have them (nyuv2 is depth only).
SEG_CLASSES = {"scenes": scenes.NUM_CLASSES, "ade20k": ADE20K_NUM_CLASSES}


def labeled_seg_classes(data) -> int | None:
  """The segmentation classes of config.data's labeled source (data.labeled.source, '' = data.source);
  None when it has no segmentation labels."""
  return SEG_CLASSES.get(data.labeled.source or data.source)


def _merged(defaults: dict, given: dict) -> dict:
  out = dict(defaults)
  for key, value in given.items():
    both_blocks = isinstance(value, dict) and isinstance(out.get(key), dict)
    out[key] = _merged(out[key], value) if both_blocks else value
  return out


def with_defaults(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A complete copy of `config`: every field it sets, and the schema's default (vision_base_config) for
  every field it leaves out, at any depth. Fields the schema does not know are kept as given
  (validate_vision judges them). Idempotent; applied once per run (train_vision.prepare_config) so a
  config.json written before a field existed reads that field's default, the same on every path."""
  out = ml_collections.ConfigDict(_merged(vision_base_config().to_dict(), config.to_dict()))
  if config.is_locked:
    out.lock()
  return out


def validate_vision(config: ml_collections.ConfigDict) -> None:
  """Checks values that types alone cannot, on a complete config (`with_defaults`); raises
  core_config.ConfigError (a ValueError) naming the field."""

  need = core_config.requirement(config)

  need(config.task == "vision", "task", "'vision'")
  m = config.model
  need(m.d_model > 0, "model.d_model", "> 0")
  need(m.n_layers > 0, "model.n_layers", "> 0")
  need(m.n_heads > 0 and m.d_model % m.n_heads == 0, "model.n_heads", "a positive divisor of model.d_model")
  need(m.patch_size > 0, "model.patch_size", "> 0")
  need(m.image_size % m.patch_size == 0, "model.image_size", f"a multiple of model.patch_size={m.patch_size}")
  need(m.mlp in ("mlp", "swiglu", "gated"), "model.mlp", "'mlp', 'swiglu' or 'gated'")
  need(m.act in ACTIVATIONS, "model.act", f"one of {sorted(ACTIVATIONS)}")
  need(m.pos_embed in ("learned", "rope"), "model.pos_embed", "'learned' or 'rope'")
  need(m.dtype in ("float32", "bfloat16", "float64"), "model.dtype", "'float32', 'bfloat16' (or 'float64')")
  need(m.num_channels == 3, "model.num_channels", "3 (the views and the designer work on RGB)")
  unknown = sorted(set(m.keys()) - {f.name for f in dataclasses.fields(ViTConfig)})
  need(not unknown, "model", f"ViTConfig fields only (unknown: {unknown})")

  d = config.dino
  need(d.out_dim > 0, "dino.out_dim", "> 0")
  need(d.head_hidden > 0, "dino.head_hidden", "> 0")
  need(d.head_bottleneck > 0, "dino.head_bottleneck", "> 0")
  need(d.head_layers >= 1, "dino.head_layers", ">= 1")
  need(d.t_s > 0, "dino.t_s", "> 0")
  need(d.t_t > 0, "dino.t_t", "> 0")
  need(d.t_t_warmup > 0, "dino.t_t_warmup", "> 0")
  need(d.t_t_warmup_steps >= 0, "dino.t_t_warmup_steps", ">= 0")
  need(0.0 <= d.center_momentum < 1.0, "dino.center_momentum", "in [0, 1)")
  need(0.0 <= d.momentum_base <= 1.0, "dino.momentum_base", "in [0, 1]")
  need(d.momentum_base <= d.momentum_final <= 1.0, "dino.momentum_final", "in [dino.momentum_base, 1]")
  need(d.n_global >= 1, "dino.n_global", ">= 1")
  need(d.n_global + d.n_local_crops >= 2, "dino.n_local_crops", "with dino.n_global at least 2 views in all")
  need(d.n_local_crops >= 0, "dino.n_local_crops", ">= 0")
  need(d.global_size > 0 and d.global_size % m.patch_size == 0, "dino.global_size",
       f"a positive multiple of model.patch_size={m.patch_size}")
  need(d.n_local_crops == 0 or (d.local_size > 0 and d.local_size % m.patch_size == 0), "dino.local_size",
       f"a positive multiple of model.patch_size={m.patch_size}")
  for f in ("global_scale", "local_scale", "ratio", "blur_sigma"):
    lo_hi = tuple(d[f])
    need(len(lo_hi) == 2 and 0 < lo_hi[0] <= lo_hi[1], f"dino.{f}", "a pair (lo, hi) with 0 < lo <= hi")
  need(d.global_scale[1] <= 1.0, "dino.global_scale", "at most 1 (a share of the image area)")
  need(d.local_scale[1] <= 1.0, "dino.local_scale", "at most 1 (a share of the image area)")
  need(d.blur_radius >= 0, "dino.blur_radius", ">= 0 (0: ceil(3·σ_max))")
  need(d.ibot_weight >= 0, "dino.ibot_weight", ">= 0 (0: off)")
  if d.ibot_weight > 0:
    ratio = tuple(d.ibot_mask_ratio)
    need(len(ratio) == 2 and 0 <= ratio[0] <= ratio[1] < 1 and ratio[1] > 0, "dino.ibot_mask_ratio",
         "a pair (min, max) with 0 <= min <= max < 1 and max > 0")
    need(0 < d.ibot_mask_prob <= 1, "dino.ibot_mask_prob", "in (0, 1]")
    need(d.ibot_out_dim >= 0, "dino.ibot_out_dim", ">= 0 (0: dino.out_dim)")
    need(d.ibot_separate_head or d.ibot_out_dim in (0, d.out_dim), "dino.ibot_out_dim",
         f"0 or dino.out_dim={d.out_dim} with the shared head (dino.ibot_separate_head=False)")
    need(0.0 <= d.ibot_center_momentum < 1.0, "dino.ibot_center_momentum", "in [0, 1)")
  need(d.koleo_weight >= 0, "dino.koleo_weight", ">= 0 (0: off)")
  need(d.koleo_weight == 0 or config.batch_size >= 2, "dino.koleo_weight",
       "0 with batch_size < 2 (KoLeo needs a nearest neighbour in the batch)")
  need(d.centering in CENTERINGS, "dino.centering", f"one of {CENTERINGS}")

  core_config.validate_optimizer(config)

  data = config.data
  need(data.source in IMAGE_SOURCES, "data.source", f"one of {IMAGE_SOURCES}")
  need(data.source not in ("imagenet", "ade20k", "nyuv2") or data.root, "data.root",
       f"the dataset root for data.source={data.source!r}")
  need(data.image_size >= d.global_size, "data.image_size", f">= dino.global_size={d.global_size}")
  need(data.read_threads >= 0, "data.read_threads", ">= 0")
  lab = data.labeled
  need(lab.source in LABELED_SOURCES, "data.labeled.source", f"one of {LABELED_SOURCES} ('' = data.source)")
  labeled_source = lab.source or data.source
  if lab.source in ("ade20k", "nyuv2"):
    need(lab.root, "data.labeled.root", f"the dataset root for data.labeled.source={lab.source!r}")
    need(lab.num_train > 0, "data.labeled.num_train", "> 0")
    need(lab.num_meta > 0, "data.labeled.num_meta", "> 0")
  need(lab.image_size >= 0, "data.labeled.image_size", ">= 0 (0 = data.image_size)")
  labeled_size = lab.image_size or data.image_size
  need(labeled_size % m.patch_size == 0, "data.labeled.image_size",
       f"labeled images ({labeled_size} px) a multiple of model.patch_size={m.patch_size}")

  fb = config.feedback
  need(fb.batch_size > 0, "feedback.batch_size", "> 0")
  need(fb.alpha_seg >= 0, "feedback.alpha_seg", ">= 0")
  need(fb.alpha_dep >= 0, "feedback.alpha_dep", ">= 0")
  need(fb.head_learning_rate > 0, "feedback.head_learning_rate", "> 0")
  need(fb.head_steps >= 0, "feedback.head_steps", ">= 0")
  need(fb.num_classes >= 0, "feedback.num_classes", ">= 0 (0 = from the labeled source)")
  need(fb.init_depth > 0, "feedback.init_depth", "> 0")

  v = config.vpt
  need(v.mode in VPT_MODES, "vpt.mode", f"one of {VPT_MODES}")
  need(v.feedback_direction in FEEDBACK_DIRECTIONS, "vpt.feedback_direction",
       " or ".join(map(repr, FEEDBACK_DIRECTIONS)))
  need(v.feedback_direction == "feedback" or v.mode in DESIGNER_MODES, "vpt.feedback_direction",
       f"'feedback' with vpt.mode={v.mode!r} (the random-feedback control replaces a designer's g_down)")
  need(v.align in ALIGNS, "vpt.align", f"one of {ALIGNS}")
  need(v.meta_every >= 1, "vpt.meta_every", ">= 1")
  need(v.burn_in_steps >= 0, "vpt.burn_in_steps", ">= 0")
  need(v.dispatch in DISPATCHES, "vpt.dispatch", f"one of {DISPATCHES}")
  need(1 <= v.align_last_n_layers <= m.n_layers, "vpt.align_last_n_layers", f"in [1, model.n_layers={m.n_layers}]")
  need(v.meta_batch_size > 0, "vpt.meta_batch_size", "> 0")
  des = v.designer
  need(des.base_channels > 0, "vpt.designer.base_channels", "> 0")
  need(des.depth >= 0 and 2 ** des.depth <= d.global_size, "vpt.designer.depth",
       f">= 0 with 2^depth <= dino.global_size={d.global_size}")
  need(des.groups >= 1, "vpt.designer.groups", ">= 1")
  need(des.act in ("silu", "relu", "gelu"), "vpt.designer.act", "'silu', 'relu' or 'gelu'")
  need(0.0 < des.init_keep < 1.0, "vpt.designer.init_keep", "in (0, 1)")
  need(des.learning_rate > 0, "vpt.designer.learning_rate", "> 0")
  need(0.0 < des.keep_ratio <= 1.0, "vpt.designer.keep_ratio", "in (0, 1]")
  need(des.lambda_sparsity >= 0, "vpt.designer.lambda_sparsity", ">= 0")
  need(des.lambda_tv >= 0, "vpt.designer.lambda_tv", ">= 0")
  need(0 < des.blur_sigma and math.ceil(3 * des.blur_sigma) < d.global_size, "vpt.designer.blur_sigma",
       f"> 0 with a blur radius ceil(3σ) below dino.global_size={d.global_size}")
  cand = v.candidates
  kinds = tuple(cand.kinds) if isinstance(cand.kinds, (list, tuple)) else ()
  need(kinds and set(kinds) <= set(KINDS), "vpt.candidates.kinds", f"a non-empty tuple of {KINDS}")
  need(cand.num in (0, len(kinds)), "vpt.candidates.num", f"0 or len(vpt.candidates.kinds)={len(kinds)}")
  need(cand.temperature > 0, "vpt.candidates.temperature", "> 0")
  need(cand.learner in LEARNER_MODES, "vpt.candidates.learner", f"one of {LEARNER_MODES}")
  need(cand.learning_rate > 0, "vpt.candidates.learning_rate", "> 0")
  need(0 < cand.zoom_scale <= 1, "vpt.candidates.zoom_scale", "in (0, 1]")
  need(0 < cand.center_frac < 1, "vpt.candidates.center_frac", "in (0, 1)")
  need(0 <= cand.block_keep <= 1, "vpt.candidates.block_keep", "in [0, 1]")
  need(cand.block_grid >= 1, "vpt.candidates.block_grid", ">= 1")
  if v.mode in DESIGNER_MODES:
    need(d.koleo_weight == 0 or v.meta_batch_size >= 2, "vpt.meta_batch_size",
         ">= 2 with dino.koleo_weight > 0 (KoLeo needs a nearest neighbour in the meta batch)")
    need(labeled_source in ("scenes", "ade20k", "nyuv2"), "data.labeled.source",
         f"a source with seg/depth labels for vpt.mode={v.mode!r} (data.source={data.source!r} has none)")
    need(fb.alpha_seg > 0 or fb.alpha_dep > 0, "feedback.alpha_seg", "> 0 (or feedback.alpha_dep > 0)")

  e = config.eval
  need(e.every_steps > 0, "eval.every_steps", "> 0")
  need(e.num_train >= 0, "eval.num_train", ">= 0 (0 = no evals)")
  need(e.num_train == 0 or e.num_eval > 0, "eval.num_eval", "> 0")
  need(e.batch_size > 0, "eval.batch_size", "> 0")
  need(e.linear_probe_steps > 0, "eval.linear_probe_steps", "> 0")
  need(e.knn_k >= 1, "eval.knn_k", ">= 1")
  need(e.dense_head_steps > 0, "eval.dense_head_steps", "> 0")
  need(e.dense_head_batch_size > 0, "eval.dense_head_batch_size", "> 0")

  need(config.batch_size > 0, "batch_size", "> 0")
  need(config.num_steps > 0, "num_steps", "> 0")
  need(config.log_every_steps > 0, "log_every_steps", "> 0")
  core_config.validate_mesh_and_checkpoint(config)
