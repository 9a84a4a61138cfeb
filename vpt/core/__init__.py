"""The V-Pretraining core: what the method is, whatever the modality.

A designer φ builds the learner's self-supervised task; every `meta_every` steps (after a burn-in)
it takes one step on −Align(g_down, g_pre(φ)) over an alignment subset S of the learner's
parameters, and the learner never sees a feedback label. This package holds the pieces of that
sentence that know nothing about tokens or pixels:

  alignment  — S (the last blocks + the final norm, or their LoRA adapters), tree algebra, the value
               as one JVP, its double-backward reference, the random-feedback direction, Adam geometry.
  meta       — the meta schedule, the designer's state and optimizer, the meta-or-skip dispatch and
               the cos(g_down, g_pre) bookkeeping every step does.

Invariant: nothing under vpt.core imports a modality (vpt.language, vpt.vision).
"""

# How a step takes its meta step (vpt.core.meta); here, so that config schemas validate it without JAX.
DISPATCHES = ("cond", "host")
