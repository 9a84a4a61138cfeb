"""Vision V-Pretraining: a ViT learner continued with DINO (± iBOT, KoLeo, Sinkhorn-Knopp) on views a
designer shapes (a U-Net's soft blur masks, or weights over candidate augmentations), with labeled
segmentation / depth / classification feedback read by small heads.

  train       the task's entry points (main_run, run): config, state, feeds, probes, summary
  step        the V-Pretraining step (a vpt.core.step.StepTask): learner update, heads, meta objectives
  config      the vision config schema and its validation
  dino, dinov2_terms, views, candidates   the SSL objective, multi-crop views, candidate augmentations
  models/ data/ evals/ interop/   ViT, U-Net, dense heads; Fashion-MNIST and procedural scenes;
              linear probes and dense metrics; DINOv2/DINOv3 import
"""
