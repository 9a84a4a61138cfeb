"""The V-Pretraining core: what the method is, whatever the modality.

A designer φ builds the learner's self-supervised task; every `meta_every` steps (after a burn-in)
it takes one step on −Align(g_down, g_pre(φ)) over an alignment subset S of the learner's
parameters, and the learner never sees a feedback label. This package holds the pieces of that
sentence that know nothing about tokens or pixels:

  alignment  — S (the last blocks + the final norm, or their LoRA adapters), tree algebra, the value
               as one JVP, its double-backward reference, the random-feedback direction, Adam geometry.
  meta       — the meta schedule, the designer's state and optimizer, the meta-or-skip dispatch and
               the cos(g_down, g_pre) bookkeeping every step does.
  step       — THE step: meta update on meta steps, then the learner step (a task supplies both).
  loop       — THE loop: steps, logs, evals, checkpoints, preemption, stop_after, the summary.
  tasks      — config.task → the task module (vpt.language.train, vpt.vision.train, or any module path).

and what every task's run shares: config (the optimizer / mesh / checkpoint blocks, ConfigError),
checkpoint (orbax), run_dir (a run directory's files), sharding, optim, metrics (logs, MFU), lora,
paths (local or gs://), tpu (the chip table).

Where the algorithm is: step.py for its order, meta.py for its schedule, alignment.py for its value.
A modality is a package beside this one (vpt/language, vpt/vision) that supplies a StepTask and the
entry points of vpt.core.tasks.

Invariant: nothing under vpt.core imports a modality (vpt.language, vpt.vision).
"""

# How a step takes its meta step (vpt.core.meta); here, so that config schemas validate it without JAX.
DISPATCHES = ("cond", "host")
# Where the designer's alignment direction comes from (config `vpt.feedback_direction`): the labeled
# feedback's g_down, or the random-feedback control (a random direction of g_down's norm, drawn per meta step).
FEEDBACK_DIRECTIONS = ("feedback", "random")
# How the designer's objective aligns g_down with g_pre (config `vpt.align`; vpt.core.alignment.align_from_value).
ALIGNS = ("dot", "cosine", "cosine_cheap")
