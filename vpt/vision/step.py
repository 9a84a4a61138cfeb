"""The V-Pretraining step for vision: DINO continued SSL on designer-built views, and every
`meta_every` steps (after a burn-in) a meta step that refreshes the feedback heads and takes one
designer step that maximises the value (PAPER §5, Algorithm 1).

One jitted program per step, in this order:
  1. on meta steps (step ≥ burn-in and step % meta_every == 0; under `lax.cond`, or a separate
     program the loop dispatches to, `make_vision_train_step(meta=…)`):
     a. the feedback heads (seg + depth linear-BN on the student's frozen patch features) take
        `feedback.head_steps` AdamW steps on `batch_labeled_train`;
     b. g_down = sg ∇_S [α_seg·CE + α_dep·L1] on `batch_labeled_meta` through the refreshed heads in
        eval mode (fixed affine maps), S = the last K ViT blocks + final norm;
     c. one designer step maximising
            V(φ) = ⟨g_down, ∇_S L_DINO(θ; views_φ(batch_meta_u))⟩   (or its cosine)
        on the separate unlabeled meta batch, minus the mask regularisers;
  2. the learner takes an ordinary DINO step (AdamW, warmup-cosine) on `batch_u` with the views of
     the UPDATED designer, detached (stop_gradient); EMA teacher (cosine momentum), centering.
Plain steps read none of the labeled or meta batches: their cost over DINO is the designer's views.

Views (PAPER §4). `multi_crop` (keyed by the state's rng) gives 2 global + n local crops; the
designer replaces each global crop v by ṽ = μ⊙v + (1−μ)⊙Blur(v), which both the student and the
teacher see (the teacher sees the global crops); local crops come from the fixed pipeline. The
teacher never gets a θ-gradient (separate parameters, EMA only). In the meta step the teacher's
targets on the designer's views are part of the task c_φ, so the exact ∇_φ V flows through the
student's views AND the teacher's targets (`vpt.designer.grad_through_teacher`, default True; False
detaches the targets as PyTorch's DINOLoss does, likely the paper's code).

Value without double backward. L_DINO is not linear in the view, but V(φ) is the directional
derivative d/dε L(θ_S + ε·g_down; views_φ) at ε = 0: ONE `jax.jvp` along g_down, forward through
the last K blocks only (the prefix of the network carries no tangent). `jax.grad` of that function
with respect to φ (reverse-over-forward) is exactly ∇_φ ⟨g_down, ∇_S L⟩ (vpt.core.alignment: `value_jvp`,
and `reference_value`, the nested-grad double-backward form the tests hold it against). The exact cosine needs
∇_φ ‖∇_S L(φ)‖, so `align="cosine"` pays the double backward; "cosine_cheap" holds ‖g_pre‖ at its
value for the current φ.

Isolation: labels enter only g_down, which enters only the designer's objective; heads are trained
on stop-gradient features and never touch θ; the learner reads the designer's views through
stop_gradient. With φ fixed the learner update is a function of batch_u alone.

Modes (config.vpt.mode): "dino" (baseline: μ ≡ 1, no designer, no heads, no meta step; the labeled
and meta batches are ignored and may be None), "unet", "candidates" (vision_candidates), and
"random_feedback" (U-Net designer, g_down replaced by a random direction of the same norm; the same
control for either designer is vpt.feedback_direction='random').

Objective (config.dino). By default DINO's class-token loss alone (the paper's), on the original
code path. DINOv2's terms are switches (vpt.vision.dinov2_terms): L = L_DINO + w_iBOT·L_iBOT +
w_KoLeo·Σ_g L_KoLeo, teacher targets by centring or Sinkhorn-Knopp (`objective_terms`). With iBOT
the student's global crops get block-wise masks (their patches become the ViT's learned mask
token; the teacher sees them unmasked) and the masked patch tokens go through the DINO head (or a
separate iBOT head) against the teacher's; the iBOT centre is `VisionState.ibot_center`. The meta
step differentiates the same full objective: the designer's views move every term, and V stays the
one directional derivative along g_down.

Step randomness: base = fold_in(state.rng, state.step); learner crops use fold_in(base, 0),
the learner's candidate draws fold_in(base, 1), the meta step fold_in(base, 2), the learner's iBOT
masks fold_in(base, 3) (`step_keys`); the meta problem's masks fold_in of its crop key. Masks are a
function of the checkpointed (rng, step) alone, so a resumed run draws the same ones.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import optax

from vpt.core import alignment, config as core_config, meta as meta_lib, optim, sharding, step as core_step
from vpt.core.meta import DesignerState
from vpt.vision import candidates as cand_lib, config as vision_config, dino, dinov2_terms as terms
from vpt.vision.models import dense_heads
from vpt.vision.models.unet import MaskUNet, UNetConfig, init_unet, keep_ratio_penalty, predict_mask, total_variation
from vpt.vision.models.vit import ViT, ViTConfig
from vpt.vision.views import MultiCropConfig, as_float, blend_views, gaussian_blur, multi_crop, normalize

Params = Any
MODES = vision_config.VPT_MODES
UNET_MODES = ("unet", "random_feedback")
HEAD_METRICS = ("head_seg_loss", "head_depth_l1")  # the heads' training losses at their last refresh
UNET_META_METRICS = ("value", "align", "ssl_loss", "down_loss", "g_down_norm", "g_pre_norm", "cosine",
                     "designer_loss", "designer_grad_norm", "keep_ratio", "sparsity", "tv") + HEAD_METRICS
CAND_META_METRICS = ("value", "ssl_loss", "down_loss", "g_down_norm", "g_pre_norm", "cosine", "designer_loss",
                     "designer_grad_norm", "entropy") + HEAD_METRICS

# ViT / DINO-head parameter sharding (regex on the '/'-joined path; see vpt.core.sharding.spec_for).
VIT_RULES: tuple[tuple[str, tuple], ...] = (
    (r"attention/(q_proj|k_proj|v_proj)/kernel$", ("fsdp", "tensor")),
    (r"attention/(q_proj|k_proj|v_proj)/bias$", ("tensor",)),
    (r"attention/o_proj/kernel$", ("tensor", "fsdp")),
    (r"mlp/(fc1|gate_proj|up_proj)/kernel$", ("fsdp", "tensor")),
    (r"mlp/(fc1|gate_proj|up_proj)/bias$", ("tensor",)),
    (r"mlp/(fc2|down_proj)/kernel$", ("tensor", "fsdp")),
    (r"head/mlp_\d+/kernel$", ("fsdp", None)),
    (r"head/last_layer_v$", ("fsdp", "tensor")),
    (r".*", ()),
)


@flax.struct.dataclass
class VisionState:
  step: jax.Array
  student: Params  # DINOModel params: {"backbone": ViT params, "head": DINOHead params}
  teacher: Params  # same tree; EMA of the student; never differentiated
  center: jax.Array  # [out_dim]
  opt_state: Any  # learner AdamW
  heads: Any  # {"seg": variables, "depth": variables, "opt_state": …}; None in mode "dino"
  designer: Any  # DesignerState(params, opt_state, last_meta); None in mode "dino"
  rng: jax.Array
  ibot_center: Any = None  # [iBOT out_dim] beside the DINO centre; None without iBOT (dino.ibot_weight = 0)


# ----------------------------------------------------------------------------- configuration


def multicrop_config(dino_cfg) -> MultiCropConfig:
  """MultiCropConfig from config.dino: its field names, plus n_local_crops / n_global_crops aliases."""
  fields = {f.name for f in dataclasses.fields(MultiCropConfig)}
  aliases = {"n_local_crops": "n_local", "n_global_crops": "n_global"}
  kw = {}
  for k, v in dino_cfg.items():
    k = aliases.get(k, k)
    if k in fields:
      kw[k] = tuple(v) if isinstance(v, (list, tuple)) else v
  return MultiCropConfig(**kw)


def _default_num_classes(config) -> int:
  """feedback.num_classes, or when 0 (the schema's "from the labeled source") the labeled source's
  classes; 1 for a source without segmentation labels (depth-only feedback: the seg head is unused)."""
  return int(config.feedback.num_classes) or vision_config.labeled_seg_classes(config.data) or 1


@dataclasses.dataclass(frozen=True)
class VisionSetup:
  """Everything static the step needs, read once from the config (hashable).

  No field has a default of its own: `from_config` reads every one from a complete config, whose
  defaults are the schema's (vision_config.with_defaults), so no value here can drift from it."""

  mode: str
  random_feedback: bool  # the control: g_down replaced by a random direction of its norm (either designer)
  vit_cfg: ViTConfig
  head_cfg: dino.DINOHeadConfig
  crops: MultiCropConfig
  unet_cfg: UNetConfig | None
  cand_cfg: cand_lib.CandidateConfig | None
  num_steps: int
  n_last: int  # K: S = the last K blocks + final norm (0: every backbone parameter)
  align: str
  meta_every: int
  burn_in_steps: int
  t_s: float
  t_t: float
  t_t_warmup: float
  t_t_warmup_steps: int
  center_momentum: float
  momentum_base: float
  momentum_final: float
  alpha_seg: float
  alpha_dep: float
  num_classes: int
  init_depth: float
  head_steps: int
  keep_ratio: float
  lambda_sparsity: float
  lambda_tv: float
  blur_sigma: float
  grad_through_teacher: bool  # ∇_φ V includes the teacher's targets on the designer's views
  # The DINOv2 terms (vpt.vision.dinov2_terms); all off is the paper's DINO objective.
  ibot_weight: float
  ibot_mask_ratio: tuple[float, float]
  ibot_mask_prob: float
  ibot_head_cfg: dino.DINOHeadConfig | None  # a separate iBOT head; None: the DINO head is shared
  ibot_center_momentum: float
  koleo_weight: float
  centering: str

  @classmethod
  def from_config(cls, config) -> "VisionSetup":
    """The setup of a complete, validated config (train_vision.prepare_config: the schema's defaults
    filled in, validate_vision run once). Plain field access: a missing field is an error here, never
    a second default."""
    try:
      return cls._read(config)
    except AttributeError as e:
      if not (e.args and isinstance(e.args[0], KeyError)):  # not a missing config field (ConfigDict's form)
        raise
      name = str(e.args[0].args[0]).splitlines()[0]
      raise ValueError(f"the vision config has no field {name}: VisionSetup reads a complete config; fill the "
                       "fields it leaves out with the schema's defaults first (vision_config.with_defaults(config), "
                       "as train_vision.prepare_config does)") from None

  @classmethod
  def _read(cls, config) -> "VisionSetup":
    v, d, fb, des = config.vpt, config.dino, config.feedback, config.vpt.designer
    mode = v.mode
    vit_cfg = ViTConfig.from_config(config.model)
    head_cfg = dino.DINOHeadConfig(out_dim=int(d.out_dim), hidden_dim=int(d.head_hidden),
                                   bottleneck_dim=int(d.head_bottleneck), n_layers=int(d.head_layers),
                                   norm_last_layer=bool(d.norm_last_layer))
    unet_cfg = UNetConfig.from_config(des) if mode in UNET_MODES else None
    cand_cfg = cand_lib.CandidateConfig.from_config(v.candidates) if mode == "candidates" else None
    ibot_weight = float(d.ibot_weight)
    ibot_head_cfg = None
    if ibot_weight > 0 and d.ibot_separate_head:  # validate_vision: a shared head keeps dino.out_dim
      ibot_head_cfg = dataclasses.replace(head_cfg, out_dim=int(d.ibot_out_dim or head_cfg.out_dim))
    if ibot_weight > 0:  # the student's masked patches need a mask token
      vit_cfg = dataclasses.replace(vit_cfg, mask_token=True)
    return cls(
        mode=mode, random_feedback=core_config.random_feedback(v), vit_cfg=vit_cfg, head_cfg=head_cfg, crops=multicrop_config(d), unet_cfg=unet_cfg,
        cand_cfg=cand_cfg, num_steps=int(config.num_steps), n_last=int(v.align_last_n_layers), align=v.align,
        meta_every=int(v.meta_every), burn_in_steps=int(v.burn_in_steps), t_s=float(d.t_s), t_t=float(d.t_t),
        t_t_warmup=float(d.t_t_warmup), t_t_warmup_steps=int(d.t_t_warmup_steps),
        center_momentum=float(d.center_momentum), momentum_base=float(d.momentum_base),
        momentum_final=float(d.momentum_final), alpha_seg=float(fb.alpha_seg), alpha_dep=float(fb.alpha_dep),
        num_classes=_default_num_classes(config) if mode != "dino" else 1,
        init_depth=float(fb.init_depth), head_steps=int(fb.head_steps),
        keep_ratio=float(des.keep_ratio), lambda_sparsity=float(des.lambda_sparsity),
        lambda_tv=float(des.lambda_tv), blur_sigma=float(des.blur_sigma),
        grad_through_teacher=bool(des.grad_through_teacher),
        ibot_weight=ibot_weight, ibot_mask_ratio=tuple(float(r) for r in d.ibot_mask_ratio),
        ibot_mask_prob=float(d.ibot_mask_prob), ibot_head_cfg=ibot_head_cfg,
        ibot_center_momentum=float(d.ibot_center_momentum), koleo_weight=float(d.koleo_weight),
        centering=d.centering)

  # Modules are cheap descriptions; build them on demand.
  @property
  def model(self) -> dino.DINOModel:
    return dino.DINOModel(self.vit_cfg, self.head_cfg, self.ibot_head_cfg)

  @property
  def ibot(self) -> bool:
    return self.ibot_weight > 0

  @property
  def koleo(self) -> bool:
    return self.koleo_weight > 0

  @property
  def plain_dino(self) -> bool:
    """DINO's class-token loss alone (the paper's objective): the original code path, bit for bit."""
    return not self.ibot and not self.koleo and self.centering == "centering"

  @property
  def ibot_out_dim(self) -> int:
    return (self.ibot_head_cfg or self.head_cfg).out_dim

  @property
  def ibot_head_name(self) -> str:
    """The params entry that scores the masked patches: "ibot_head" (separate) or the DINO "head"."""
    return "ibot_head" if self.ibot_head_cfg is not None else "head"

  @property
  def ibot_head(self) -> dino.DINOHead:
    return dino.DINOHead(self.ibot_head_cfg or self.head_cfg, self.vit_cfg.dtype)

  @property
  def vit(self) -> ViT:
    return ViT(self.vit_cfg)

  @property
  def dino_head(self) -> dino.DINOHead:
    return dino.DINOHead(self.head_cfg, self.vit_cfg.dtype)

  @property
  def unet(self) -> MaskUNet | None:
    if not self.unet_cfg:
      return None
    # fp32 like the paper's designer, whatever the learner's compute dtype (float64 in the numerics tests).
    return MaskUNet(dataclasses.replace(self.unet_cfg, dtype="float64" if self.vit_cfg.dtype == "float64"
                                        else "float32"))

  @property
  def seg_head(self) -> dense_heads.LinearBNHead:
    return dense_heads.seg_head(self.num_classes)

  @property
  def depth_head(self) -> dense_heads.LinearBNHead:
    return dense_heads.depth_head(self.init_depth)

  @property
  def uses_designer(self) -> bool:
    return self.mode != "dino"

  def is_meta_step(self, step):
    return meta_lib.is_meta_step(step, self.burn_in_steps, self.meta_every)

  def teacher_temperature(self, step):
    return dino.teacher_temperature(step, self.t_t_warmup_steps, self.t_t_warmup, self.t_t)

  def meta_metric_names(self) -> tuple[str, ...]:
    if self.mode == "candidates":
      kinds = self.cand_cfg.kinds
      return CAND_META_METRICS + tuple(f"cand_{i}_{k}/{what}" for i, k in enumerate(kinds)
                                       for what in ("value", "weight"))
    return UNET_META_METRICS


def make_vision_optimizer(config) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """The learner's AdamW with linear warmup + cosine decay (vpt.core.optim, as the LM's), from config.optimizer
  as the schema completes it (its end_lr_fraction, eps: no defaults of its own here)."""
  return optim.make_optimizer(config.optimizer, int(config.num_steps))


def make_head_optimizer(config) -> optax.GradientTransformation:
  fb = config.feedback
  return optax.chain(optax.clip_by_global_norm(float(fb.head_grad_clip_norm)),
                     optax.adamw(float(fb.head_learning_rate), weight_decay=float(fb.head_weight_decay)))


def make_designer_optimizer(config) -> optax.GradientTransformation:
  """AdamW for φ: the U-Net (vpt.designer.learning_rate) or the logit table (vpt.candidates.learning_rate)."""
  d = config.vpt.designer
  lr = float(config.vpt.candidates.learning_rate if config.vpt.mode == "candidates" else d.learning_rate)
  return meta_lib.designer_optimizer(lr, float(d.grad_clip_norm), float(d.weight_decay))


# ----------------------------------------------------------------------------- helpers




def _grid(setup: VisionSetup, images) -> tuple[int, int]:
  p = setup.vit_cfg.patch_size
  return images.shape[1] // p, images.shape[2] // p


def _flat(views: jax.Array) -> jax.Array:
  return views.reshape((-1,) + views.shape[2:])


def step_keys(state: VisionState) -> dict[str, jax.Array]:
  base = jax.random.fold_in(state.rng, state.step)
  return {"crops": jax.random.fold_in(base, 0), "candidates": jax.random.fold_in(base, 1),
          "meta": jax.random.fold_in(base, 2), "masks": jax.random.fold_in(base, 3)}


def _apply_fn(setup: VisionSetup) -> Callable:
  """DINO outputs of [N, H, W, C] views in [0, 1] (normalised to the ViT's statistics here)."""
  model = setup.model
  return lambda params, views: model.apply({"params": params}, normalize(views))


@dataclasses.dataclass(frozen=True, eq=False)
class StudentSplit:
  """The student restricted to S: the prefix (everything before block `layer`) runs once as a
  constant, and `features` / `dino_out` run the last K blocks, the final norm (and the head) on it."""

  setup: VisionSetup
  full: Params  # backbone params, stop-gradient (for the prefix)
  rest: dict  # backbone params outside S (flat)
  head_params: Params
  layer: int
  ibot_head_params: Params = None  # the params that score masked patches (the DINO head's if shared)

  @classmethod
  def build(cls, setup: VisionSetup, student: Params) -> tuple["StudentSplit", dict]:
    n = setup.vit_cfg.n_layers
    subset, rest = alignment.split_params(student["backbone"], n, setup.n_last)
    split = cls(setup, jax.lax.stop_gradient(student["backbone"]), rest, student["head"],
                alignment.first_aligned_layer(n, setup.n_last), student.get(setup.ibot_head_name))
    return split, subset

  def prefix(self, images: jax.Array, masks: jax.Array | None = None) -> jax.Array:
    """The residual stream entering block `layer` of normalised images (the images if S is everything);
    `masks` [N, patches]: those patches become the mask token (iBOT)."""
    if not self.rest:
      return images
    return self.setup.vit.apply({"params": self.full}, images, self.layer, masks=masks, method=ViT.hidden_before)

  def features(self, subset: dict, h: jax.Array, grid, masks: jax.Array | None = None) -> dict:
    """`masks` only matter when S is the whole backbone (the prefix is then the images themselves)."""
    params = {"params": alignment.merge_params(subset, self.rest)}
    if not self.rest:
      return self.setup.vit.apply(params, h, masks=masks)
    return self.setup.vit.apply(params, h, self.layer, grid=grid, method=ViT.from_hidden)

  def dino_out(self, subset: dict, h: jax.Array, grid) -> jax.Array:
    return self.setup.dino_head.apply({"params": self.head_params}, self.features(subset, h, grid)["cls"])


# ----------------------------------------------------------------------------- designer views


def blur_for_designer(setup: VisionSetup, flat_views: jax.Array) -> jax.Array:
  """Blur(v) of [N, H, W, C] crops with σ = vpt.designer.blur_sigma (static radius ⌈3σ⌉ < side)."""
  radius = max(1, min(math.ceil(3 * setup.blur_sigma), min(flat_views.shape[1:3]) - 1))
  return gaussian_blur(flat_views, setup.blur_sigma, radius)


def unet_views(setup: VisionSetup, designer_params, global_views: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(ṽ [G, B, H, W, C], μ [G·B, H, W]): ṽ = μ_φ(v)⊙v + (1−μ_φ(v))⊙Blur(v) on every global crop."""
  flat = _flat(global_views)
  mu = predict_mask(setup.unet, designer_params, flat)
  return blend_views(flat, mu, blur_for_designer(setup, flat)).reshape(global_views.shape), mu


# ----------------------------------------------------------------------------- the learner step


def learner_loss(setup: VisionSetup, student, teacher, center, global_views, local_views, step):
  """(DINO loss, teacher outputs [G, B, K]) with the teacher stop-gradient (dino.dino_objective)."""
  return dino.dino_objective(_apply_fn(setup), student, teacher, center, global_views, local_views,
                             t_s=setup.t_s, t_t=setup.teacher_temperature(step))


# ----------------------------------------------------------------------------- the DINOv2 objective


def draw_masks(setup: VisionSetup, key: jax.Array, n_images: int, grid: tuple[int, int]) -> dict | None:
  """iBOT masks of n_images global crops (view-major) from `key` alone, and their gathered positions:
  {"masks" [M, N], "idx" [U], "valid" [U], "weights" [U]}; None without iBOT."""
  if not setup.ibot:
    return None
  masks = terms.ibot_masks(key, n_images, grid, setup.ibot_mask_ratio, setup.ibot_mask_prob)
  bound = terms.mask_upperbound(n_images, grid[0] * grid[1], setup.ibot_mask_ratio, setup.ibot_mask_prob)
  idx, valid, weights = terms.masked_positions(masks, bound, jnp.promote_types(setup.vit_cfg.compute_dtype,
                                                                               jnp.float32))
  return {"masks": masks, "idx": idx, "valid": valid, "weights": weights}


def _masked_tokens(patches: jax.Array, masks: dict) -> jax.Array:
  """[U, D]: the patch tokens [M, N, D] at the masked positions (padding rows: token 0, weight 0)."""
  return patches.reshape(-1, patches.shape[-1])[masks["idx"]]


def objective_terms(setup: VisionSetup, student_out, student_cls, student_patch_out, teacher_out,
                    teacher_patch_out, center, ibot_center, t_t, masks) -> tuple[jax.Array, dict]:
  """(L, parts): L = L_DINO + w_iBOT·L_iBOT + w_KoLeo·Σ_g L_KoLeo(global crop g), DINOv2's sum.

  student_out [V, B, K] (global views first), student_cls [G, B, D] (the global crops' cls features
  after the final norm, before the head), student_patch_out / teacher_patch_out [U, K'] (masked
  tokens), teacher_out [G, B, K]. The teacher's outputs are used as given: the caller decides
  whether they are stop-gradient (the learner) or part of the task c_φ (the meta objective).
  """
  g = teacher_out.shape[0]
  q = terms.teacher_probs(teacher_out, center, t_t, setup.centering)
  dino_loss = terms.dino_pairs_loss(q, student_out, setup.t_s, g)
  loss, parts = dino_loss, {"dino_loss": dino_loss}
  if setup.ibot:
    q_patch = terms.teacher_probs(teacher_patch_out, ibot_center, t_t, setup.centering, valid=masks["valid"])
    parts["ibot_loss"] = terms.ibot_loss(student_patch_out, q_patch, masks["weights"], masks["masks"].shape[0],
                                         setup.t_s)
    loss = loss + setup.ibot_weight * parts["ibot_loss"]
  if setup.koleo:
    parts["koleo_loss"] = sum(terms.koleo_loss(student_cls[i]) for i in range(g))
    loss = loss + setup.koleo_weight * parts["koleo_loss"]
  return loss, parts


def _teacher_outputs(setup: VisionSetup, teacher, flat_views, g: int, masks) -> tuple[jax.Array, jax.Array | None]:
  """(cls head outputs [G, B, K], masked-patch head outputs [U, K'] or None) of normalised global views."""
  features = setup.vit.apply({"params": teacher["backbone"]}, flat_views)
  out = setup.dino_head.apply({"params": teacher["head"]}, features["cls"]).reshape(g, flat_views.shape[0] // g, -1)
  patch_out = None
  if masks is not None:
    patch_out = setup.ibot_head.apply({"params": teacher[setup.ibot_head_name]},
                                      _masked_tokens(features["patches"], masks))
  return out, patch_out


def full_learner_loss(setup: VisionSetup, student, teacher, center, ibot_center, global_views, local_views, step,
                      masks) -> tuple[jax.Array, dict]:
  """(L, aux) of the DINOv2 objective (`objective_terms`) with the teacher stop-gradient; the student's
  global crops carry the iBOT masks, the teacher's do not. aux: teacher outputs (for the centres), parts."""
  t_t = setup.teacher_temperature(step)
  g, b = global_views.shape[:2]
  flat = normalize(_flat(global_views))
  teacher_out, teacher_patch = jax.lax.stop_gradient(_teacher_outputs(setup, teacher, flat, g, masks))
  features = setup.vit.apply({"params": student["backbone"]}, flat,
                             masks=None if masks is None else masks["masks"])
  out = setup.dino_head.apply({"params": student["head"]}, features["cls"]).reshape(g, b, -1)
  if local_views.shape[0]:
    out = jnp.concatenate([out, dino.multicrop_apply(_apply_fn(setup), student, local_views)], axis=0)
  patch_out = None
  if masks is not None:
    patch_out = setup.ibot_head.apply({"params": student[setup.ibot_head_name]},
                                      _masked_tokens(features["patches"], masks))
  loss, parts = objective_terms(setup, out, features["cls"].reshape(g, b, -1), patch_out, teacher_out, teacher_patch,
                                center, ibot_center, t_t, masks)
  return loss, {"teacher_out": teacher_out, "teacher_patch": teacher_patch, "parts": parts}


def learner_update(setup: VisionSetup, optimizer, schedule, state: VisionState, batch_u: dict, designer_params,
                   keys: dict) -> tuple[VisionState, dict, Params]:
  """One DINO step of θ on the detached designer views of batch_u; returns (state, metrics, grads)."""
  images = as_float(batch_u["image"])
  global_views, local_views = multi_crop(keys["crops"], images, setup.crops)
  metrics = {}
  weights = None
  if setup.mode in UNET_MODES:
    global_views, mu = unet_views(setup, designer_params, global_views)
    metrics["mask_mean"] = jnp.mean(mu)
  elif setup.mode == "candidates":
    cand = cand_lib.candidate_views(jax.random.fold_in(keys["candidates"], 0), global_views, setup.cand_cfg)
    weights = cand_lib.candidate_weights(designer_params["logits"], setup.cand_cfg.temperature)
    if setup.cand_cfg.learner == "sample":
      global_views, _ = cand_lib.sample_candidates(jax.random.fold_in(keys["candidates"], 1), cand, weights)
    else:
      global_views = cand
  global_views = jax.lax.stop_gradient(global_views)  # the designer's views are data for θ
  masks = None
  if setup.ibot:
    gs = global_views.shape[-3:-1]
    masks = draw_masks(setup, keys["masks"], global_views.shape[-5] * global_views.shape[-4],
                       (gs[0] // setup.vit_cfg.patch_size, gs[1] // setup.vit_cfg.patch_size))

  if not setup.plain_dino:
    full = lambda student, views: full_learner_loss(setup, student, state.teacher, state.center, state.ibot_center,
                                                    views, local_views, state.step, masks)
    if weights is not None and setup.cand_cfg.learner == "weighted":
      weights = jax.lax.stop_gradient(weights)

      def loss_fn(student):  # Σ_c w_c L(θ; c), the teacher's outputs weighted alike (for the centres)
        losses, aux = jax.vmap(lambda views: full(student, views))(global_views)
        mix = lambda x: None if x is None else jnp.tensordot(weights.astype(x.dtype), x, axes=1)
        return jnp.sum(weights * losses), jax.tree.map(mix, aux, is_leaf=lambda x: x is None)
    else:
      loss_fn = lambda student: full(student, global_views)
  elif weights is not None and setup.cand_cfg.learner == "weighted":
    weights = jax.lax.stop_gradient(weights)

    def loss_fn(student):  # Σ_c w_c L_DINO(θ; c): the local crops' student outputs are shared.
      apply = _apply_fn(setup)
      t_t = setup.teacher_temperature(state.step)
      local = dino.multicrop_apply(apply, student, local_views) if local_views.shape[0] else None

      def one(views):
        s = dino.multicrop_apply(apply, student, views)
        if local is not None:
          s = jnp.concatenate([s, local], axis=0)
        t = jax.lax.stop_gradient(dino.multicrop_apply(apply, state.teacher, views))
        return dino.dino_loss(s, t, state.center, setup.t_s, t_t, views.shape[0]), t

      losses, touts = jax.vmap(one)(global_views)
      return jnp.sum(weights * losses), jnp.einsum("m,mgbk->gbk", weights.astype(touts.dtype), touts)
  else:
    loss_fn = lambda student: learner_loss(setup, student, state.teacher, state.center, global_views, local_views,
                                           state.step)

  (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.student)
  updates, opt_state = optimizer.update(grads, state.opt_state, state.student)
  student = optax.apply_updates(state.student, updates)
  momentum = dino.momentum_schedule(state.step, setup.num_steps, setup.momentum_base, setup.momentum_final)
  teacher = dino.ema_update(state.teacher, student, momentum)
  ibot_center = state.ibot_center
  if setup.plain_dino:
    center = dino.update_center(state.center, aux, setup.center_momentum)
  else:
    metrics.update(aux["parts"])
    center = state.center  # Sinkhorn-Knopp needs no centre (DINOv2 leaves it alone)
    if setup.centering == "centering":
      center = dino.update_center(state.center, aux["teacher_out"], setup.center_momentum)
      if setup.ibot:
        ibot_center = terms.update_ibot_center(state.ibot_center, aux["teacher_patch"], masks["valid"],
                                               setup.ibot_center_momentum)
    if setup.ibot:
      metrics.update(ibot_center_norm=jnp.linalg.norm(ibot_center), masked_patches=jnp.sum(masks["valid"]))
  metrics.update(loss=loss, learning_rate=schedule(state.step), teacher_momentum=momentum,
                 teacher_temperature=setup.teacher_temperature(state.step), grad_norm=optax.tree.norm(grads),
                 center_norm=jnp.linalg.norm(center))
  new = state.replace(step=state.step + 1, student=student, teacher=teacher, center=center, opt_state=opt_state,
                      ibot_center=ibot_center)
  return new, {k: jnp.asarray(v, jnp.float32) for k, v in metrics.items()}, grads


# ----------------------------------------------------------------------------- feedback heads


def _backbone_patches(setup: VisionSetup, backbone, images) -> tuple[jax.Array, tuple[int, int]]:
  images = normalize(as_float(images))
  return setup.vit.apply({"params": backbone}, images)["patches"], _grid(setup, images)


def downstream_loss(setup: VisionSetup, heads: dict, patches: jax.Array, grid, batch: dict):
  """(α_seg·CE + α_dep·L1, parts) through the heads in eval mode (running BN statistics)."""
  if "seg" not in batch and "depth" not in batch:
    raise ValueError(f"labeled batch has neither 'seg' nor 'depth' (keys {sorted(batch)})")
  total, parts = 0.0, {}
  if "seg" in batch:
    logits, _ = dense_heads.apply_head(setup.seg_head, heads["seg"], patches, grid, batch["seg"].shape[1:3])
    parts["seg_loss"] = dense_heads.seg_loss(logits, batch["seg"])
    total = total + setup.alpha_seg * parts["seg_loss"]
  if "depth" in batch:
    pred, _ = dense_heads.apply_head(setup.depth_head, heads["depth"], patches, grid, batch["depth"].shape[1:3])
    parts["depth_l1"] = dense_heads.depth_l1(pred, batch["depth"])
    total = total + setup.alpha_dep * parts["depth_l1"]
  return total, parts


def head_update(setup: VisionSetup, head_opt, backbone, heads: dict, batch: dict) -> tuple[dict, dict]:
  """`head_steps` AdamW steps of the seg / depth heads on frozen (stop-gradient) student features of
  one labeled-train batch (the backbone runs once)."""
  patches, grid = _backbone_patches(setup, jax.lax.stop_gradient(backbone), batch["image"])
  patches = jax.lax.stop_gradient(patches)
  names = [n for n, key in (("seg", "seg"), ("depth", "depth")) if key in batch]
  mods = {"seg": setup.seg_head, "depth": setup.depth_head}
  params = {n: heads[n]["params"] for n in ("seg", "depth")}
  opt_state, variables = heads["opt_state"], {n: heads[n] for n in ("seg", "depth")}
  metrics = {}
  for _ in range(setup.head_steps):
    def loss(p):
      total, new, parts = 0.0, {}, {}
      for n in names:
        out, new[n] = dense_heads.apply_head(mods[n], {**variables[n], "params": p[n]}, patches, grid,
                                             batch[n].shape[1:3], train=True)
        parts[n] = dense_heads.seg_loss(out, batch[n]) if n == "seg" else dense_heads.depth_l1(out, batch[n])
        total = total + parts[n]
      return total, (new, parts)

    (_, (new, parts)), grads = jax.value_and_grad(loss, has_aux=True)(params)
    updates, opt_state = head_opt.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    variables = {n: {**variables[n], **new.get(n, {}), "params": params[n]} for n in ("seg", "depth")}
    metrics = {f"head_{'seg_loss' if n == 'seg' else 'depth_l1'}": v for n, v in parts.items()}
  return {**variables, "opt_state": opt_state}, {k: jnp.asarray(v, jnp.float32) for k, v in metrics.items()}


def downstream_grad(setup: VisionSetup, student, heads: dict, batch: dict) -> tuple[dict, jax.Array]:
  """(g_down = ∇_S L_down on the labeled meta batch, L_down): a backward through the last K blocks only."""
  split, subset = StudentSplit.build(setup, student)
  images = normalize(as_float(batch["image"]))
  grid = _grid(setup, images)
  h = jax.lax.stop_gradient(split.prefix(images))
  loss = lambda s: downstream_loss(setup, heads, split.features(s, h, grid)["patches"], grid, batch)[0]
  value, grad = jax.value_and_grad(loss)(subset)
  return grad, value


# ----------------------------------------------------------------------------- the value


def dino_cross_entropy(student_out, teacher_out, center, t_s, t_t, n_global: int) -> jax.Array:
  """`dino.dino_loss` (same formula, same pairs) WITHOUT its stop-gradient on the teacher's targets.

  In the meta objective the targets are part of the task c_φ: the teacher's outputs on the
  designer's views depend on φ, and the exact ∇_φ V differentiates them too. θ_S never reaches
  them (the teacher's parameters are separate), so ∇_S L and the learner step are unchanged.
  """
  acc = jnp.promote_types(student_out.dtype, jnp.float32)
  q = jax.nn.softmax((teacher_out.astype(acc) - center.astype(acc)) / t_t, axis=-1)  # [G, B, K]
  log_p = jax.nn.log_softmax(student_out.astype(acc) / t_s, axis=-1)  # [V, B, K]
  n_views, batch = student_out.shape[:2]
  cross = -jnp.einsum("gbk,vbk->gv", q, log_p) / batch
  pair = jnp.arange(n_global)[:, None] != jnp.arange(n_views)[None, :]
  return jnp.sum(jnp.where(pair, cross, 0.0)) / (n_global * n_views - min(n_global, n_views))


@dataclasses.dataclass(frozen=True, eq=False)
class SSLProblem:
  """L_DINO(θ_S; global views) on the meta batch, with the local crops' prefix computed once."""

  setup: VisionSetup
  split: StudentSplit
  teacher: Params
  center: jax.Array
  t_t: jax.Array
  local_prefix: jax.Array | None  # [L·B, T, D] (stop-gradient) or None without local crops
  local_grid: tuple[int, int]
  n_local: int
  ibot_center: jax.Array | None = None
  mask_key: jax.Array | None = None  # the iBOT masks of the global views are drawn from it (the same at every call)

  @classmethod
  def build(cls, setup: VisionSetup, student, teacher, center, step, local_views: jax.Array, ibot_center=None,
            mask_key=None):
    if setup.ibot and (mask_key is None or ibot_center is None):
      raise ValueError("SSLProblem with iBOT (config.dino.ibot_weight > 0) needs ibot_center and mask_key")
    split, subset = StudentSplit.build(setup, student)
    local_prefix, grid = None, (0, 0)
    if local_views.shape[0]:
      flat = normalize(_flat(local_views))
      local_prefix, grid = jax.lax.stop_gradient(split.prefix(flat)), _grid(setup, flat)
    return cls(setup, split, teacher, center, setup.teacher_temperature(step), local_prefix, grid,
               local_views.shape[0], ibot_center, mask_key), subset

  def loss_fn(self, views: jax.Array) -> Callable[[dict], jax.Array]:
    """S ↦ L_DINO for global views [G, B, H, W, C] in [0, 1]: their prefix and the teacher run here,
    once; the returned function runs only the last K blocks (+ norm, head). With the DINOv2 terms on,
    S ↦ the full objective (`objective_terms`) on the same split."""
    if not self.setup.plain_dino:
      return self._full_loss_fn(views)
    g, b = views.shape[:2]
    flat = normalize(_flat(views))
    grid = _grid(self.setup, flat)
    h = self.split.prefix(flat)  # depends on φ through the views, not on S
    teacher_out = self.setup.model.apply({"params": jax.lax.stop_gradient(self.teacher)}, flat).reshape(g, b, -1)
    if not self.setup.grad_through_teacher:
      teacher_out = jax.lax.stop_gradient(teacher_out)

    def loss(subset):
      out = self.split.dino_out(subset, h, grid).reshape(g, b, -1)
      if self.local_prefix is not None:
        local = self.split.dino_out(subset, self.local_prefix, self.local_grid).reshape(self.n_local, b, -1)
        out = jnp.concatenate([out, local], axis=0)
      return dino_cross_entropy(out, teacher_out, self.center, self.setup.t_s, self.t_t, g)

    return loss

  def _full_loss_fn(self, views: jax.Array) -> Callable[[dict], jax.Array]:
    setup, split = self.setup, self.split
    g, b = views.shape[:2]
    flat = normalize(_flat(views))
    grid = _grid(setup, flat)
    masks = draw_masks(setup, self.mask_key, g * b, grid)
    mask_array = None if masks is None else masks["masks"]
    h = split.prefix(flat, mask_array)  # the student's masked views; depends on φ, not on S
    teacher_out, teacher_patch = _teacher_outputs(setup, jax.lax.stop_gradient(self.teacher), flat, g, masks)
    if not setup.grad_through_teacher:
      teacher_out, teacher_patch = jax.lax.stop_gradient((teacher_out, teacher_patch))

    def loss(subset):
      features = split.features(subset, h, grid, mask_array)
      out = setup.dino_head.apply({"params": split.head_params}, features["cls"]).reshape(g, b, -1)
      if self.local_prefix is not None:
        local = split.dino_out(subset, self.local_prefix, self.local_grid).reshape(self.n_local, b, -1)
        out = jnp.concatenate([out, local], axis=0)
      patch_out = None
      if masks is not None:
        patch_out = setup.ibot_head.apply({"params": split.ibot_head_params},
                                          _masked_tokens(features["patches"], masks))
      return objective_terms(setup, out, features["cls"].reshape(g, b, -1), patch_out, teacher_out, teacher_patch,
                             self.center, self.ibot_center, self.t_t, masks)[0]

    return loss


def meta_problem(setup: VisionSetup, state: VisionState, batch_meta_u: dict, key: jax.Array):
  """(SSLProblem, global crops [G, B, H, W, C], S) for the unlabeled meta batch (crops from `key`)."""
  global_views, local_views = multi_crop(key, as_float(batch_meta_u["image"]), setup.crops)
  problem, subset = SSLProblem.build(setup, state.student, state.teacher, state.center, state.step, local_views,
                                     state.ibot_center, jax.random.fold_in(key, 3) if setup.ibot else None)
  return problem, global_views, subset


def unet_meta_objective(setup: VisionSetup, problem: SSLProblem, global_views: jax.Array, subset: dict,
                        g_down: dict, designer_params) -> Callable:
  """φ ↦ (−Align(g_down, g_pre(φ)) + λ_spars·R_spars(μ_φ) + λ_tv·R_tv(μ_φ), aux)."""
  g_down_norm = alignment.tree_norm(g_down)
  g_pre_norm_now = None
  if setup.align == "cosine_cheap":
    views_now = jax.lax.stop_gradient(unet_views(setup, designer_params, global_views)[0])
    g_pre_norm_now = jax.lax.stop_gradient(alignment.tree_norm(jax.grad(problem.loss_fn(views_now))(subset)))

  def objective(phi):
    views, mu = unet_views(setup, phi, global_views)
    if setup.align == "cosine":  # exact: ‖g_pre(φ)‖ is differentiated too (double backward).
      loss_fn = problem.loss_fn(views)
      ssl_loss, g_pre = jax.value_and_grad(loss_fn)(subset)
      v = alignment.tree_vdot(g_down, g_pre)
      align = alignment.align_from_value(v, "cosine", g_down_norm, alignment.tree_norm(g_pre))
    else:
      ssl_loss, v = alignment.value_jvp(problem.loss_fn(views), subset, g_down)
      align = alignment.align_from_value(v, setup.align, g_down_norm, g_pre_norm_now)
    sparsity, tv = keep_ratio_penalty(mu, setup.keep_ratio), total_variation(mu)
    loss = -align + setup.lambda_sparsity * sparsity + setup.lambda_tv * tv
    return loss, {"value": v, "align": align, "ssl_loss": ssl_loss, "keep_ratio": jnp.mean(mu), "sparsity": sparsity, "tv": tv}

  return objective


def candidate_meta_values(setup: VisionSetup, problem: SSLProblem, global_views: jax.Array, subset: dict,
                          g_down: dict, key: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(candidate views [M, G, B, H, W, C], L_c [M], V_c [M]): one vmapped JVP over the candidates."""
  cand = cand_lib.candidate_views(key, global_views, setup.cand_cfg)
  losses, values = cand_lib.candidate_values(lambda s, v: problem.loss_fn(v)(s), subset, g_down, cand)
  return cand, losses, values


def meta_update(setup: VisionSetup, head_opt, designer_opt, state: VisionState, batch_meta_u: dict,
                batch_labeled_train: dict, batch_labeled_meta: dict,
                key: jax.Array) -> tuple[dict, DesignerState, dict]:
  """Refreshes the heads, then one designer step; returns (new heads, new DesignerState, g_down on S)."""
  heads, head_metrics = head_update(setup, head_opt, state.student["backbone"], state.heads, batch_labeled_train)
  g_down, down_loss = downstream_grad(setup, state.student, heads, batch_labeled_meta)
  g_down = jax.lax.stop_gradient(g_down)  # the only place the labels are read
  if setup.random_feedback:
    g_down = alignment.random_like(jax.random.fold_in(key, 1), g_down, alignment.tree_norm(g_down))
  problem, global_views, subset = meta_problem(setup, state, batch_meta_u, jax.random.fold_in(key, 0))
  dstate = state.designer
  extra = {}
  if setup.mode == "candidates":
    _, losses, values = candidate_meta_values(setup, problem, global_views, subset, g_down, jax.random.fold_in(key, 2))
    objective = lambda p: cand_lib.candidate_objective(p["logits"], values, setup.cand_cfg)
    for i, kind in enumerate(setup.cand_cfg.kinds):
      extra[f"cand_{i}_{kind}/value"] = values[i]
    extra["ssl_loss"] = jnp.mean(losses)
  else:
    objective = unet_meta_objective(setup, problem, global_views, subset, g_down, dstate.params)
  (loss, aux), grads = jax.value_and_grad(objective, has_aux=True)(dstate.params)
  updates, opt_state = designer_opt.update(grads, dstate.opt_state, dstate.params)
  params = optax.apply_updates(dstate.params, updates)
  metrics = dict(dstate.last_meta)
  metrics.update({k: v for k, v in aux.items() if k in metrics})
  metrics.update(extra)
  metrics.update(head_metrics)
  if setup.mode == "candidates":
    w = cand_lib.candidate_weights(params["logits"], setup.cand_cfg.temperature)
    for i, kind in enumerate(setup.cand_cfg.kinds):
      metrics[f"cand_{i}_{kind}/weight"] = w[i]
  metrics.update(down_loss=down_loss, g_down_norm=alignment.tree_norm(g_down), designer_loss=loss,
                 designer_grad_norm=optax.tree.norm(grads))
  last = {k: jnp.asarray(metrics[k], jnp.float32) for k in dstate.last_meta}
  return heads, DesignerState(params=params, opt_state=opt_state, last_meta=last), g_down


# ----------------------------------------------------------------------------- state and step


def init_vision_state(config, rng: jax.Array, sample_images: jax.Array) -> VisionState:
  """The initial state; `sample_images` [B, H, W, C] shape the feedback heads (labeled image size).

  Teacher = student at init; heads, designer: None in mode "dino". Traceable (jax.eval_shape).
  """
  setup = VisionSetup.from_config(config)
  optimizer, _ = make_vision_optimizer(config)
  k_model, k_seg, k_depth, k_designer, k_state = jax.random.split(rng, 5)
  sample_images = as_float(jnp.asarray(sample_images))
  c, gs = sample_images.shape[-1], setup.crops.global_size
  crop = jnp.zeros((1, gs, gs, c), jnp.float32)
  if setup.ibot_head_cfg is None:
    student = setup.model.init(k_model, crop)["params"]
  else:
    student = setup.model.init(k_model, crop, method=dino.DINOModel.init_all)["params"]
  teacher = jax.tree.map(lambda x: jnp.array(x, copy=True), student)
  heads = designer = None
  if setup.uses_designer:
    patches, grid = _backbone_patches(setup, student["backbone"], sample_images)
    size = sample_images.shape[1:3]
    heads = {"seg": dense_heads.init_head(setup.seg_head, k_seg, patches, grid, size),
             "depth": dense_heads.init_head(setup.depth_head, k_depth, patches, grid, size)}
    heads["opt_state"] = make_head_optimizer(config).init({n: heads[n]["params"] for n in ("seg", "depth")})
    if setup.mode == "candidates":
      dparams = {"logits": jnp.zeros((setup.cand_cfg.num,), jnp.float32)}
    else:
      dparams = init_unet(setup.unet, k_designer, crop)
    designer = DesignerState(params=dparams, opt_state=make_designer_optimizer(config).init(dparams),
                             last_meta={k: jnp.zeros((), jnp.float32) for k in setup.meta_metric_names()})
  ibot_center = jnp.zeros((setup.ibot_out_dim,), jnp.float32) if setup.ibot else None
  return VisionState(step=jnp.zeros((), jnp.int32), student=student, teacher=teacher,
                     center=jnp.zeros((setup.head_cfg.out_dim,), jnp.float32), opt_state=optimizer.init(student),
                     heads=heads, designer=designer, rng=k_state, ibot_center=ibot_center)


def make_vision_train_step(config, meta: bool | None = None) -> Callable:
  """(state, batch_u, batch_meta_u, batch_labeled_train, batch_labeled_meta) -> (state, metrics).

  `meta=None`: one program that takes the meta step under `lax.cond` on `is_meta_step(state.step)`.
  `meta=True` / `False`: the meta step always / never (the caller dispatches on the host's step
  count, as the training loop does). Same results; XLA:CPU ran the meta step up to 2.6× slower inside
  a conditional than as straight-line code (BENCHMARKS.md), so the loop compiles the two programs.
  """
  setup = VisionSetup.from_config(config)
  optimizer, schedule = make_vision_optimizer(config)
  head_opt = make_head_optimizer(config) if setup.uses_designer else None
  designer_opt = make_designer_optimizer(config) if setup.uses_designer else None
  n_layers = setup.vit_cfg.n_layers

  def learner(state: VisionState, batch_u: dict, *feedback):
    del feedback  # the learner never reads the labeled batches
    designer_params = state.designer.params if setup.uses_designer else None
    return learner_update(setup, optimizer, schedule, state, batch_u, designer_params, step_keys(state))

  def heads_and_designer(state: VisionState, batch_u: dict, batch_meta_u: dict, batch_labeled_train: dict,
                         batch_labeled_meta: dict):
    del batch_u
    heads, designer, g_down = meta_update(setup, head_opt, designer_opt, state, batch_meta_u, batch_labeled_train,
                                          batch_labeled_meta, step_keys(state)["meta"])
    return {"heads": heads, "designer": designer}, g_down

  step = core_step.make_train_step(core_step.StepTask(
      learner_update=learner, uses_designer=setup.uses_designer, is_meta_step=setup.is_meta_step,
      meta_update=heads_and_designer, meta_fields=("heads", "designer"),
      on_subset=lambda grads: alignment.split_params(grads["backbone"], n_layers, setup.n_last)[0],
      subset_zeros=lambda state: alignment.subset_zeros(state.student["backbone"], n_layers, setup.n_last)), meta)

  def train_step(state: VisionState, batch_u: dict, batch_meta_u: dict | None = None,
                 batch_labeled_train: dict | None = None, batch_labeled_meta: dict | None = None):
    if not setup.uses_designer:  # the fixed-view baseline: no heads, no designer, no feedback.
      return step(state, batch_u)
    for name, b in (("batch_meta_u", batch_meta_u), ("batch_labeled_train", batch_labeled_train),
                    ("batch_labeled_meta", batch_labeled_meta)):
      if b is None:
        raise ValueError(f"vision step (mode {setup.mode!r}): {name} is required")
    return step(state, batch_u, batch_meta_u, batch_labeled_train, batch_labeled_meta)

  return train_step


@functools.lru_cache(maxsize=8)
def _features_fn(vit_cfg: ViTConfig) -> Callable:
  vit = ViT(vit_cfg)

  def fn(params, images):
    out = vit.apply({"params": params}, normalize(as_float(images)))
    return out["cls"], out["patches"]

  return jax.jit(fn)


def features(config, params_backbone, images) -> tuple[jax.Array, jax.Array, tuple[int, int]]:
  """(cls [B, D], patches [B, N, D], grid (gh, gw)) of images [B, H, W, C] in [0, 1] (or uint8), after
  the final norm; the images are normalised to the ViT's statistics as in training."""
  vit_cfg = ViTConfig.from_config(config.model)
  cls, patches = _features_fn(vit_cfg)(params_backbone, images)
  p = vit_cfg.patch_size
  return cls, patches, (images.shape[1] // p, images.shape[2] // p)


# ----------------------------------------------------------------------------- sharding


def vision_state_shardings(config, abstract_state: VisionState, mesh) -> VisionState:
  """Student / teacher / learner moments by VIT_RULES (fsdp, tensor); the rest replicated."""
  optimizer, _ = make_vision_optimizer(config)
  repl = sharding.replicated(mesh)
  params = sharding.param_shardings(abstract_state.student, mesh, VIT_RULES)
  opt_state = optax.tree_map_params(optimizer, lambda _, s: s, abstract_state.opt_state, params,
                                    transform_non_params=lambda _: repl)
  everything = lambda tree: jax.tree.map(lambda _: repl, tree)
  return abstract_state.replace(step=repl, student=params, teacher=params, center=repl, opt_state=opt_state,
                                heads=everything(abstract_state.heads), designer=everything(abstract_state.designer),
                                rng=repl, ibot_center=everything(abstract_state.ibot_center))


def jit_vision_train_step(config, mesh, state_shardings: VisionState, donate: bool = True,
                          compiler_options: dict | None = None, train_step: Callable | None = None) -> Callable:
  """The step jitted with explicit shardings: batches split over (data, fsdp), metrics replicated,
  the state donated. `train_step`: an already built `make_vision_train_step(config)` (its trace is reused)."""
  bsh = sharding.batch_sharding(mesh)
  train_step = train_step or make_vision_train_step(config)
  return jax.jit(train_step, in_shardings=(state_shardings, bsh, bsh, bsh, bsh),
                 out_shardings=(state_shardings, sharding.replicated(mesh)), donate_argnums=(0,) if donate else (),
                 compiler_options=compiler_options)
