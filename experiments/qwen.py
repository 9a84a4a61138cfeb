"""The paper's full-scale language runs on Qwen learners: V-Pretraining on a NuminaMath-CoT-style
stream with GSM8K-train feedback, and (with `,ntp`) the matched next-token-prediction baseline.

    python -m vpt.main --config experiments/qwen.py:qwen2.5-0.5b-lora --workdir runs/q25-lora \\
        --config.init_from=/path/to/Qwen2.5-0.5B \\
        --config.data.train_path='/data/numina/*.jsonl' --config.feedback.path=/data/gsm8k/train.jsonl

The argument is `setup[,ntp][,dp=N][,micro=M]`, setup one of

    qwen2.5-0.5b-lora  v2's LoRA reference branch: r=8, α=16, dropout 0.05 on q,k,v,o,gate,up,down;
                       student LR 2e-4, designer LR 1e-4, batch 4 × accum 8, 2,000 steps, seq 1024,
                       downstream seq 512, meta seq 256; S = the LoRA params of the last 2 layers
    qwen2.5-0.5b       v2's full-parameter branch: LR 1.5e-5, batch 4 × accum 32, warmup 3 %, seq 512,
                       weight decay 0, clip 1.0; S = the last 2 layers
    qwen1.5-0.5b, qwen1.5-4b, qwen1.5-7b
                       v1's main runs (full parameter): LR 1e-5 (the top of v1's sweep [5e-6, 1e-5]),
                       seq 1024, packed; S = the last 2 layers

`ntp` gives the baseline (same data, steps, optimizer; no designer). `dp=N` lays the same recipe out
for N data-parallel devices (the mesh's data × fsdp size, default 1 as on the paper's single GPU):
the global batch (micro × accum sequences per optimizer step) stays the paper's, each device gets
the paper's micro-batch of 4 (fewer once N exceeds the accumulation steps), and the feedback batch
and the meta step's slice are one micro-batch of the whole mesh. `micro=M` sets that per-device
micro-batch (default the paper's 4; the global batch stays, accumulation grows). On 16 GiB v5e chips
Qwen1.5-7B at `dp=16` does not fit at micro 4 (the TPU compiler: the NTP step's temporaries are 16.1 GiB;
BENCHMARKS.md); `dp=16,micro=2` halves the activations and logits per chip (its compile was not
finished when this was written: check it with --dry_run first).

Architectures are the released config.json of each model (vocab 151,936; Qwen2 layout with q/k/v
biases). Every setup uses the paper's designer (6 layers × 256, 4 heads, fp32, LR 1e-4), K = 64,
α_max = 0.5, a meta step every r = 8 learner steps, bf16 compute with fp32 master weights, remat.
Values the paper does not give are marked [?] below (see docs/PAPER.md §6a, §10); the README
beside this file has the GPU and TPU commands and the measured dry-run memory.
"""

from vpt.language import config_lib

VOCAB = 151_936

# The released config.json of each learner (hidden, layers, heads, kv heads, intermediate, rope θ, tied).
ARCHITECTURES = {
    "qwen2.5-0.5b": dict(d_model=896, n_layers=24, n_heads=14, n_kv_heads=2, d_ff=4864, rope_theta=1e6,
                         tie_embeddings=True),
    "qwen1.5-0.5b": dict(d_model=1024, n_layers=24, n_heads=16, n_kv_heads=16, d_ff=2816, rope_theta=1e6,
                         tie_embeddings=True),
    "qwen1.5-4b": dict(d_model=2560, n_layers=40, n_heads=20, n_kv_heads=20, d_ff=6912, rope_theta=5e6,
                       tie_embeddings=False),
    "qwen1.5-7b": dict(d_model=4096, n_layers=32, n_heads=32, n_kv_heads=32, d_ff=11008, rope_theta=1e6,
                       tie_embeddings=False),
}

# Per setup: the learner, the learner optimizer and the batch. "micro × accum" is the paper's
# per-device micro-batch and gradient accumulation; batch_size here is global (micro × accum).
SETUPS = {
    "qwen2.5-0.5b-lora": dict(arch="qwen2.5-0.5b", lora=True, lr=2e-4, micro=4, accum=8, steps=2000, seq=1024,
                              warmup=0.03,  # [?] warmup and weight decay of the LoRA branch are not given
                              weight_decay=0.0),
    "qwen2.5-0.5b": dict(arch="qwen2.5-0.5b", lora=False, lr=1.5e-5, micro=4, accum=32, steps=2000, seq=512,
                         warmup=0.03, weight_decay=0.0),  # [?] "2 epochs": set num_steps for your stream
    "qwen1.5-0.5b": dict(arch="qwen1.5-0.5b", lora=False, lr=1e-5, micro=4, accum=32, steps=2000, seq=1024,
                         warmup=0.03, weight_decay=0.0),  # [?] v1 gives neither batch nor warmup
    "qwen1.5-4b": dict(arch="qwen1.5-4b", lora=False, lr=1e-5, micro=4, accum=32, steps=2000, seq=1024,
                       warmup=0.03, weight_decay=0.0),
    "qwen1.5-7b": dict(arch="qwen1.5-7b", lora=False, lr=1e-5, micro=4, accum=32, steps=2000, seq=1024,
                       warmup=0.03, weight_decay=0.0),
}


def _parse(arg: str) -> tuple[str, bool, int, int]:
  setup_name, *options = [a.strip() for a in (arg or "qwen2.5-0.5b-lora").split(",")]
  if setup_name not in SETUPS:
    raise ValueError(f"setup {setup_name!r} unknown; expected one of {sorted(SETUPS)}")
  ntp, dp, micro = False, 1, 0
  for option in options:
    if option == "ntp":
      ntp = True
    elif option.startswith("dp=") and option[3:].isdigit() and int(option[3:]) >= 1:
      dp = int(option[3:])
    elif option.startswith("micro=") and option[6:].isdigit() and int(option[6:]) >= 1:
      micro = int(option[6:])
    else:
      raise ValueError(f"option {option!r} unknown; expected 'ntp' (the baseline), 'dp=N' (N >= 1 devices) "
                       "or 'micro=M' (M >= 1 sequences per device and micro-step)")
  return setup_name, ntp, dp, micro


def batch_layout(micro: int, accum: int, dp: int, device_micro: int = 0) -> tuple[int, int, int]:
  """(global batch, accumulation steps, global micro-batch) keeping the paper's global batch; each
  device gets `device_micro` sequences per micro-step (default the paper's `micro`)."""
  total = micro * accum
  if total % dp:
    raise ValueError(f"dp={dp} does not divide the paper's global batch of {total} sequences")
  per_device = total // dp
  micro = device_micro or micro
  steps = max(1, per_device // micro) if per_device % micro == 0 else 1
  return total, steps, total // steps


def get_config(arg: str = "qwen2.5-0.5b-lora"):
  setup_name, ntp, dp, device_micro = _parse(arg)
  setup = SETUPS[setup_name]
  batch, accum, micro = batch_layout(setup["micro"], setup["accum"], dp, device_micro)
  config = config_lib.base_config()

  # Learner: the HF architecture, bf16 compute over fp32 master weights, rematerialised blocks.
  m = config.model
  m.update(ARCHITECTURES[setup["arch"]])
  m.vocab_size = VOCAB
  m.head_dim = 0  # d_model / n_heads (64, 64, 128, 128)
  m.rms_norm_eps = 1e-6
  m.qkv_bias = True
  m.dtype = "bfloat16"
  m.remat = True
  if setup["lora"]:
    m.lora_rank, m.lora_alpha, m.lora_dropout = 8, 16.0, 0.05
  # Fill in the HF checkpoint directory (config.json, *.safetensors, tokenizer.json) to start from.
  config.init_from = ""

  # Unlabeled stream: NuminaMath-CoT-style jsonl, loss on the solution only, packed. A mixture is a
  # comma-separated list of files or globs (records of all files are pooled and shuffled).
  d = config.data
  d.source = "jsonl"
  d.train_path = "data/numina_math_cot/*.jsonl"
  d.prompt_field, d.answer_field = "problem", "solution"
  d.seq_len = setup["seq"]
  d.truncate_long_examples = True  # a long CoT solution is cut at seq_len rather than stopping the run

  # Feedback: 1,024 GSM8K train solutions, downstream sequence length 512.
  f = config.feedback
  f.source = "gsm8k_jsonl"
  f.path = "data/gsm8k/train.jsonl"
  f.num_examples = 1024
  f.seq_len = 512
  f.batch_size = micro  # [?] one micro-batch per meta step

  config.batch_size = batch
  config.grad_accum_steps = accum
  config.num_steps = setup["steps"]
  o = config.optimizer
  o.learning_rate = setup["lr"]
  o.warmup_steps = int(setup["warmup"] * setup["steps"])
  o.end_lr_fraction = 0.0  # cosine to zero, as HF's cosine schedule
  o.b1, o.b2, o.eps = 0.9, 0.999, 1e-8  # AdamW defaults (torch / HF Trainer)
  o.weight_decay = setup["weight_decay"]
  o.grad_clip_norm = 1.0

  # V-Pretraining: the paper's designer, candidates, gate, meta period and alignment subset.
  v = config.vpt
  v.mode = "ntp" if ntp else "value"
  v.align = "dot"
  v.top_k = 64
  v.alpha_max = 0.5
  v.meta_every = 8
  v.align_last_n_layers = 2  # with LoRA: the adapters of the last 2 layers
  v.meta_batch_size = micro  # the meta step sees one micro-batch ...
  v.meta_seq_len = min(256, setup["seq"])  # ... at meta sequence length 256
  v.designer.d_model, v.designer.n_layers, v.designer.n_heads, v.designer.d_ff = 256, 6, 4, 1024
  v.designer.learning_rate = 1e-4
  v.designer.grad_clip_norm = 1.0

  # Large-model housekeeping: FSDP over all devices (override mesh.* for data/tensor parallelism).
  config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 1, -1, 1
  config.checkpoint.every_steps = 200
  config.log_every_steps = 10
  config.eval_every_steps = 200
  config.eval_batches = 8
  return config
