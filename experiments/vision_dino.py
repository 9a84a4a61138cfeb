"""Vision: DINO continued SSL (the baseline) and V-Pretraining with a learned view designer.

    python -m vpt.main --config experiments/vision_dino.py:tiny,unet --workdir /tmp/vision

The argument is `size[,variant][,dinov2][,chips=N]`. Sizes:

    nano   unit tests and CI: 16 px scenes, patch 4, d 32, 2 layers (seconds)
    tiny   the CPU replication: 32 px scenes, patch 4, d 96, 4 layers (minutes on 2 cores)
    vitb   ViT-B/16 in the DINOv3 layout, the vitl recipe otherwise
    vitl   paper scale: ViT-L/16 in the DINOv3 layout at 224 px, ImageNet-1K unlabeled stream, ADE20K
           feedback, the selected ADE20K ViT-L hyperparameters of PAPER §6b (v2 Table 11). Set
           --config.data.root and --config.data.labeled.root, and --config.init_from to a Hugging Face
           DINOv2 / DINOv3 directory (its config.json then sets the backbone's shape; DINOv2's patch 14 needs
           --config.dino.local_size=98 --config.data.labeled.image_size=518).

Variants (config.vpt.mode):

    dino             baseline: the fixed multi-crop pipeline (μ ≡ 1), no designer, no feedback
    unet             V-Pretraining: a tiny U-Net predicts soft masks μ on the global crops
    candidates       V-Pretraining: M candidate augmentations scored by their value, soft-weighted
    random_feedback  control: the U-Net designer with g_down replaced by a random direction of equal norm
                     (any designer: --config.vpt.feedback_direction=random)

Objective (config.dino). Every size trains the paper's objective by default: DINO's class-token loss
alone, with DINO's centring (dino.ibot_weight = dino.koleo_weight = 0, dino.centering='centering').
`dinov2` switches to the objective DINOv2 / DINOv3 checkpoints were trained with: DINO + the iBOT
masked-patch loss (weight 1, the DINO head shared, half the global crops masked at 10–50 % of their
patches) + KoLeo (weight 0.1) + Sinkhorn-Knopp teacher targets (3 iterations), the V-Pretraining value
then differentiating all of it (vpt.vision.dinov2_terms).

`chips=N` lays the recipe out on N devices (a TPU slice: v5e-8 has 8 chips) without changing any batch:
the data axis is the largest divisor of N that divides every batch (images, meta, feedback), the rest is
tensor parallelism. vitl / vitb train on 50 images, which 8 chips do not divide: chips=8 is data 2 ×
tensor 4 (the heads, MLP and DINO head split 4 ways), chips=4 is data 2 × tensor 2.
"""

from vpt.vision import config as vision_config

VARIANTS = ("dino", "unet", "candidates", "random_feedback")


def _nano(c):
  # Objective: DINO only (the paper's) unless `dinov2`.
  c.model = vision_config.model_config("nano", image_size=16, patch_size=4, d_model=32, n_layers=2, n_heads=2)
  c.data.image_size = 16
  c.dino.update(global_size=16, local_size=8, n_local_crops=2, out_dim=64, head_hidden=64, head_bottleneck=32,
                blur_sigma=(0.1, 1.0))
  c.batch_size = 8
  c.num_steps = 8
  c.optimizer.update(learning_rate=1e-3, warmup_steps=2)
  c.feedback.batch_size = 8
  c.vpt.update(meta_every=2, meta_batch_size=8, align_last_n_layers=1)
  c.vpt.designer.update(base_channels=4, depth=1, learning_rate=1e-3, blur_sigma=1.0)
  c.vpt.candidates.update(kinds=("identity", "blur_all", "center", "blocks"), blur_sigma=1.0)
  c.data.scenes.update(num_labeled_train=64, num_labeled_meta=32, num_val=32, num_test=32)
  c.eval.update(every_steps=4, num_train=32, num_eval=16, batch_size=16, linear_probe_steps=20,
                dense_head_steps=20, dense_head_batch_size=8, knn_k=5)
  c.checkpoint.update(every_steps=4, keep=2)
  c.log_every_steps = 2


def _tiny(c):
  # Objective: DINO only (the paper's) unless `dinov2`.
  c.model = vision_config.model_config("nano", image_size=32, patch_size=4, d_model=96, n_layers=4, n_heads=3)
  c.data.image_size = 32
  c.dino.update(global_size=32, local_size=16, n_local_crops=4, out_dim=1024, head_hidden=256, head_bottleneck=64,
                blur_sigma=(0.1, 1.5))
  c.batch_size = 32
  c.num_steps = 300
  c.optimizer.update(learning_rate=5e-4, warmup_steps=30)
  c.feedback.batch_size = 16
  c.vpt.update(meta_every=4, meta_batch_size=16, align_last_n_layers=2)
  # A designer small beside its learner, as in the paper: its U-Net (base 16, depth 3) costs ~0.6 % of a
  # ViT-L DINO step at 224 px; base 16 at 32 px would cost ~22 % of this ViT's (as many parameters as
  # the learner), base 4 ~1.4 % (BENCHMARKS.md).
  c.vpt.designer.update(base_channels=4, depth=3, learning_rate=5e-4, keep_ratio=0.6, lambda_sparsity=0.131,
                        lambda_tv=0.144, blur_sigma=1.5)
  c.vpt.candidates.blur_sigma = 1.5
  c.data.scenes.update(num_labeled_train=2000, num_labeled_meta=512, num_val=512, num_test=1024)
  c.eval.update(every_steps=100, num_train=1024, num_eval=512, batch_size=128, linear_probe_steps=300,
                dense_head_steps=300, dense_head_batch_size=32)
  c.checkpoint.update(every_steps=100, keep=2)


def _vitl(c):
  # Objective: DINO only, as the paper trains it (PAPER §4: "a DINO-style student-teacher loss"), unless
  # `dinov2` (the objective the DINOv3 checkpoint itself was trained with).
  # DINOv3 ViT-L/16 (facebook/dinov3-vitl16-pretrain-lvd1689m): 4 registers, 2-D RoPE, layer scale 1e-5.
  c.model = vision_config.model_config(
      "large", image_size=224, patch_size=16, d_ff=4096, n_registers=4, pos_embed="rope", rope_theta=100.0,
      layer_scale_init=1e-5, ln_eps=1e-5, k_bias=False, dtype="bfloat16")
  c.data.update(source="imagenet", root="", image_size=256)
  c.data.labeled.update(source="ade20k", root="", image_size=512, num_train=2000, num_meta=512)
  # PAPER §4 / §6b: out dim 8192, T_s 0.1, T_t 0.04, momentum 0.996, centre 0.9, 2×224 global + 6×96 local.
  c.dino.update(global_size=224, local_size=96, n_local_crops=6, out_dim=8192, head_hidden=2048, head_bottleneck=256)
  # v2 G.4 and Table 11 (ADE20K, ViT-L): 20k steps, AdamW wd 0.04, clip 1.0, 1k warmup, LR 4.5e-5, batch 50.
  c.num_steps = 20_000
  c.batch_size = 50
  c.optimizer.update(learning_rate=4.5e-5, warmup_steps=1000, weight_decay=0.04, grad_clip_norm=1.0)
  c.vpt.update(meta_every=4, meta_batch_size=16, align_last_n_layers=4)
  c.vpt.designer.update(base_channels=16, depth=3, learning_rate=2.17e-4, keep_ratio=0.5, lambda_sparsity=0.196,
                        lambda_tv=0.0399)
  c.feedback.update(alpha_seg=4.0, alpha_dep=1.0, batch_size=16, head_learning_rate=5e-4)
  # v2 G.3 probes: 20k steps, batch 8, seg LR 5e-4, depth LR 1e-3 (here on the labeled_train pool).
  # Probe features are held on the host: 512 + 500 images of 32×32 patches × 1024 dims ≈ 4 GB.
  c.eval.update(every_steps=5000, num_train=512, num_eval=500, batch_size=64, linear_probe_steps=1000,
                dense_head_steps=20_000, dense_head_batch_size=8, seg_learning_rate=5e-4, depth_learning_rate=1e-3)
  c.checkpoint.update(every_steps=1000, keep=3)
  c.log_every_steps = 50


def _vitb(c):
  # Objective: as vitl (DINO only unless `dinov2`).
  # DINOv3 ViT-B/16 (facebook/dinov3-vitb16-pretrain-lvd1689m): the ViT-L recipe on the base backbone
  # (4 registers, 2-D RoPE, layer scale 1e-5); PAPER §6b selects hyperparameters on ViT-L, reused here.
  _vitl(c)
  c.model = vision_config.model_config(
      "base", image_size=224, patch_size=16, d_ff=3072, n_registers=4, pos_embed="rope", rope_theta=100.0,
      layer_scale_init=1e-5, ln_eps=1e-5, k_bias=False, dtype="bfloat16")
  c.eval.update(num_train=512, num_eval=500)


SIZES = {"nano": _nano, "tiny": _tiny, "vitb": _vitb, "vitl": _vitl}


def _dinov2_objective(c):
  """DINO + iBOT + KoLeo + Sinkhorn-Knopp, DINOv2's weights (its ssl_default_config)."""
  c.dino.update(ibot_weight=1.0, ibot_mask_ratio=(0.1, 0.5), ibot_mask_prob=0.5, ibot_separate_head=False,
                ibot_out_dim=0, ibot_center_momentum=0.9, koleo_weight=0.1, centering="sinkhorn_knopp")


def mesh_for_chips(config, chips: int) -> tuple[int, int, int]:
  """(data, fsdp, tensor) for `chips` devices: data divides every batch, tensor takes the rest."""
  batches = [config.batch_size]
  if config.vpt.mode != "dino":
    batches += [config.vpt.meta_batch_size, config.feedback.batch_size]
  data = max(d for d in range(1, chips + 1) if chips % d == 0 and all(b % d == 0 for b in batches))
  return data, 1, chips // data


def get_config(arg: str = "tiny,dino"):
  size, *options = (arg or "tiny,dino").split(",")
  size, chips, variant, objective = size or "tiny", 0, "dino", "dino"
  for option in options:
    if option.startswith("chips="):
      if not (option[6:].isdigit() and int(option[6:]) >= 1):
        raise ValueError(f"option {option!r}: expected chips=N with N >= 1 devices")
      chips = int(option[6:])
    elif option == "dinov2":
      objective = option
    elif option:
      variant = option
  if size not in SIZES:
    raise ValueError(f"size {size!r} unknown; expected one of {sorted(SIZES)}")
  if variant not in VARIANTS:
    raise ValueError(f"variant {variant!r} unknown; expected one of {list(VARIANTS)}")
  config = vision_config.vision_base_config()
  SIZES[size](config)
  if objective == "dinov2":
    _dinov2_objective(config)
  config.vpt.mode = variant
  if chips:
    config.mesh.data, config.mesh.fsdp, config.mesh.tensor = mesh_for_chips(config, chips)
  return config
