"""Language V-Pretraining: a causal LM learner (Qwen2/Llama layout) continued on soft next-token
targets that a small causal-transformer designer builds, with GSM8K-style feedback.

  train       the task's entry points (main_run, run): config, state, feeds, evals, baseline comparison
  vpt_step    the V-Pretraining step (a vpt.core.step.StepTask): designer targets, meta objective
  steps       TrainState, the learner update (gradient accumulation, LoRA), the NTP baseline's step
  value       the value on a token batch: the candidates' log-prob tangents by one JVP, the reference
  soft_targets, losses   top-K candidates and soft targets; the token losses and the downstream loss
  config_lib  the language config schema and its validation
  models/ data/ evals/ interop/   the LM and designer; synthetic math, sources, tokenizer, grain;
              GSM8K Pass@k and skills; Hugging Face import/export
  base_model, generate, learner_source, analysis   the cached base, decoding, "HF dir or vpt run", notebooks
"""
