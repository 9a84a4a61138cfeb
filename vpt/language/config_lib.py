"""The full configuration schema, its defaults and its validation.

Every experiment in `experiments/` starts from `base_config()` and overrides fields,
so the set of valid fields (and their types) is defined once, here. The config is
locked before use: a misspelt `--config.x=y` fails at start-up naming the field.
"""

from __future__ import annotations

import copy
import dataclasses
import re

import ml_collections

from vpt.core import ALIGNS, DISPATCHES, FEEDBACK_DIRECTIONS, config as core_config
from vpt.language.data.synthetic_math import StreamStyle

# The projections LoRA can adapt (Hugging Face / PEFT module names); all of them by default, as in the
# paper's reference branch.
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def model_config(size: str = "tiny") -> ml_collections.ConfigDict:
  """Learner LM hyperparameters in the Qwen2/Llama layout. `size` picks a preset."""
  presets = {
      # ~0.1M non-embedding params: unit tests and the CI end-to-end run.
      "nano": dict(d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64),
      # ~1M params: the embedded-default main job.
      "tiny": dict(d_model=128, n_layers=4, n_heads=4, n_kv_heads=2, d_ff=384),
      # ~25M params: the larger benchmark size.
      "small": dict(d_model=512, n_layers=8, n_heads=8, n_kv_heads=4, d_ff=1536),
  }
  if size not in presets:
    raise ValueError(f"model size {size!r} unknown; expected one of {sorted(presets)}")
  c = ml_collections.ConfigDict()
  c.vocab_size = 0  # 0: take it from the tokenizer.
  c.head_dim = 0  # 0: d_model // n_heads.
  c.rope_theta = 10_000.0
  c.rms_norm_eps = 1e-6
  c.qkv_bias = True  # Qwen2 has q/k/v biases; Llama does not.
  c.tie_embeddings = True
  c.dtype = "float32"  # compute dtype; params are always float32.
  c.remat = False
  c.init_std = 0.02
  # LoRA (lora_rank > 0): the base weights are frozen, only the adapters train, and the alignment
  # subset S is the adapters of the last vpt.align_last_n_layers blocks.
  c.lora_rank = 0  # 0: off (full-parameter training)
  c.lora_alpha = 16.0  # the update is scaled by lora_alpha / lora_rank
  c.lora_dropout = 0.05  # on the adapter input, learner step only
  c.lora_targets = ",".join(LORA_TARGETS)
  c.update(presets[size])
  return c


def data_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  # 'synthetic_math' (embedded, no download) | 'jsonl' (also .jsonl.gz / .jsonl.zst) | 'text'
  # | 'tfds' | 'parquet' | 'arrow' (a datasets.save_to_disk directory) | 'array_record'
  # (JSON records) | 'mixture' (data.mixture).
  c.source = "synthetic_math"
  c.train_path = ""  # file, directory ('arrow') or glob, for the file sources.
  c.eval_path = ""
  # Entries {'weight': w, 'source': ..., 'train_path': ..., ...} (any of sources.MIXTURE_KEYS;
  # the others come from data.*), sampled in proportion to w, for data.source='mixture'.
  c.mixture = ()
  # Where compressed jsonl is decompressed once (keyed by path, size, mtime); '' = a
  # .vpt_cache directory next to each file. Set, it also caches plain jsonl (no per-start check).
  c.cache_dir = ""
  c.text_field = "text"  # the field / column holding plain text...
  c.prompt_field = ""  # ...or a prompt / answer pair: the loss is then on the answer only.
  c.answer_field = ""
  c.tfds_name = ""
  c.tfds_data_dir = ""
  c.train_split = "train"
  c.eval_split = "validation"
  c.tokenizer_path = ""  # sentencepiece model; trained on the corpus and cached in workdir if empty.
  c.vocab_size = 1024  # for a trained tokenizer.
  c.tokenizer_train_examples = 20_000
  c.seq_len = 128
  # An example longer than seq_len + 1 tokens is an error unless this truncates it.
  c.truncate_long_examples = False
  c.packing_bins = 0  # first-fit packing bins; 0: max(32, local batch size).
  c.shuffle_seed = 0
  c.worker_count = 0  # grain worker processes (0: in the main process).
  c.read_threads = 0  # grain reader threads per process (0: read when a batch is asked for).
  c.synthetic = ml_collections.ConfigDict()
  c.synthetic.seed = 0
  c.synthetic.num_train = 0  # 0: a virtual 10**9 records (generated on demand).
  c.synthetic.irrelevant_fraction = 0.0  # share of non-math filler text in the stream.
  c.synthetic.num_eval = 512
  # How the stream departs from the downstream format (vpt/language/data/synthetic_math.py, StreamStyle; the
  # defaults depart in nothing). Only the training stream: feedback, eval and test stay clean.
  style = StreamStyle()
  c.synthetic.downstream_format_fraction = style.downstream_format_fraction  # else '$\boxed{N}$'
  c.synthetic.corrupt_fact_rate = style.corrupt_fact_rate  # per written 'a op b = c' result
  c.synthetic.corrupt_ops = style.corrupt_ops  # which ops' results may be corrupted
  c.synthetic.corrupt_mode = style.corrupt_mode  # 'random' | 'systematic' (c + 1)
  c.synthetic.wrong_final_fraction = style.wrong_final_fraction  # final answer ≠ the last step's result
  return c


def feedback_config() -> ml_collections.ConfigDict:
  """The small labeled feedback set D_fb (GSM8K format) behind g_down."""
  c = ml_collections.ConfigDict()
  c.source = "synthetic"  # 'synthetic' (embedded generator) | 'gsm8k_jsonl'
  c.path = ""  # gsm8k_jsonl: a {"question", "answer"} jsonl file (e.g. GSM8K train.jsonl).
  c.num_examples = 1024  # sampled with `seed` from the file (all if fewer).
  c.seed = 0
  c.strip_calculator = True  # drop GSM8K's <<expr=value>> annotations.
  c.batch_size = 16
  c.eval_path = ""  # held-out GSM8K-format problems for the downstream eval (synthetic: built in).
  c.num_eval = 256
  # bos + prompt + solution + eos; longer solutions are truncated (bos + prompt must fit).
  # Real GSM8K with the tokenizer trained on synthetic math is ~2 characters a token:
  # 256 truncates ~40% of the solutions and some prompts do not fit; 512 fits all prompts.
  c.seq_len = 256
  # Multitask feedback (the paper's v2): g_down = Σ_j ω_j g_j, g_j = sg ∇_S L_down(θ; a batch of set j).
  # This block is the first set; `sets` adds more (see feedback_sets). A lone set of weight 1 is today's g_down.
  c.name = "main"  # how feedback.sets, data.mixture[k].feedback_set and checkpoints name this set
  c.weight = 1.0  # ω of this set
  # Extra sets: a list of {'name': ..., 'weight': ω, <any key of this block>} or a dict name -> {...};
  # keys an entry leaves out come from this block, except `seed` (this block's + the entry's position).
  # None (or empty): this block is the only set.
  c.sets = None
  return c


def vpt_config() -> ml_collections.ConfigDict:
  """V-Pretraining: the task designer, the value and the meta step. mode='ntp' is the baseline."""
  c = ml_collections.ConfigDict()
  # The method: 'ntp' (baseline: one-hot targets, no designer) | 'value' (V-Pretraining: the designer)
  # | the fixed-target controls 'uniform_topk' (r uniform, fixed α) and 'self_distill' (r = the learner's
  # renormalised top-K). 'random_feedback' is the older name of value + feedback_direction='random'.
  c.mode = "ntp"
  # The designer's alignment direction: 'feedback' (g_down of the labeled feedback set) | 'random' (the
  # random-feedback control: a random direction of g_down's norm; vpt.core.config.random_feedback).
  c.feedback_direction = "feedback"
  c.top_k = 64  # candidates per position: the true token ∪ the learner's top-(K−1).
  c.alpha_max = 0.5
  c.fixed_alpha = 0.25  # α for the uniform_topk / self_distill controls (and value with learn_alpha=False).
  c.learn_alpha = True  # value / random_feedback: False holds α at fixed_alpha and the designer learns r only.
  c.align = "dot"  # 'dot' | 'cosine' (exact norm of g_pre) | 'cosine_cheap' (norm held constant)
  # 'pooled': Align(g_down, g_pre) on the whole batch. 'domain_matched': −(1/|D|) Σ_d Align(g_down,d, g_pre,d),
  # each stream domain d against its own feedback set (vpt_step.py; data.mixture[k].feedback_set).
  c.alignment = "pooled"
  c.geometry = "raw"  # 'raw' (paper) | 'adam' (precondition g_down with the learner's Adam v̂)
  c.align_last_n_layers = 2  # S = last n blocks + final norm + head; 0 = all parameters.
  c.meta_every = 8  # r: one designer step every r learner steps...
  # The meta step's share of the unlabeled batch (the paper's meta step sees one micro-batch at
  # meta sequence length 256 while the learner steps on 32 accumulated micro-batches of 1024).
  c.meta_batch_size = 0  # evenly spaced rows of the batch (0: all)
  c.meta_seq_len = 0  # first positions of each row (0: all)
  c.burn_in_steps = 0  # ...after this many learner steps.
  # 'cond': one program, the meta step under lax.cond; 'host': a plain and a meta program, the loop picks
  # (vpt.core.meta: straight-line code, twice the compiles).
  c.dispatch = "cond"
  # β of a running average of g_down over the meta steps (bias-corrected; vpt_step.py): the designer
  # aligns with ≈ the last 1/(1 − β) feedback batches at the cost of one. 0: this step's g_down only.
  c.g_down_average = 0.0
  c.reg_alpha = 0.0  # λ · mean α
  c.reg_entropy = 0.0  # −λ · mean entropy of r (positive λ favours spread-out r)
  c.reg_trust_region = 0.0  # λ · expected increase of the learner's pretraining loss under q
  c.designer = ml_collections.ConfigDict()
  c.designer.d_model = 256
  c.designer.n_layers = 6
  c.designer.n_heads = 4
  c.designer.d_ff = 1024
  c.designer.learning_rate = 1e-4
  c.designer.alpha_init_logit = -2.0  # the gate starts at α_max·sigmoid(this): near one-hot.
  c.designer.gate_features = False  # the gate also reads the learner's log p(y), top other, gap, entropy.
  c.designer.weight_decay = 0.0
  c.designer.grad_clip_norm = 1.0
  return c


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.task = "language"  # the task this schema describes (vpt.core.tasks; vision: vpt/vision/config.py)
  c.seed = 0
  c.model = model_config("tiny")
  c.data = data_config()
  c.feedback = feedback_config()
  c.vpt = vpt_config()

  c.batch_size = 16  # global, in sequences.
  c.num_steps = 1000
  c.grad_accum_steps = 1

  c.optimizer = core_config.optimizer_config()
  c.mesh = core_config.mesh_config()
  c.multihost = False  # call jax.distributed.initialize() (also: env VPT_MULTIHOST=1).
  c.checkpoint = core_config.checkpoint_config()

  c.log_every_steps = 10
  c.eval_every_steps = 200
  c.eval_batches = 8
  c.progress_bar = True
  # Generation-based downstream eval at every held-out eval: greedy Pass@1 on held-out problems
  # (feedback.eval_path, or the synthetic 'eval' partition); 0 items switches it off.
  c.eval_generation = ml_collections.ConfigDict()
  c.eval_generation.num_items = 0
  c.eval_generation.max_new_tokens = 128
  # Which held-out problems (synthetic feedback): 'test' for reported results, 'validation' for the runs
  # that choose settings — the two disjoint halves of the generator's 'eval' partition.
  c.eval_generation.split = "test"
  c.eval_generation.final_only = False  # True: generate at the last step only (it costs more than the loss evals).
  # A base model to continue from, trained once and cached (vpt/language/base_model.py): base.num_steps of NTP on
  # the clean synthetic generator plus base.irrelevant_fraction filler; 0 steps: no base (the default).
  c.base = ml_collections.ConfigDict()
  c.base.num_steps = 0
  c.base.irrelevant_fraction = 0.6
  c.base.data_seed = 101  # the base's stream; the continued run's data.synthetic.seed differs.
  c.base.seed = 0
  c.base.learning_rate = 3e-3
  c.base.cache_dir = ""  # '': $VPT_CACHE_DIR/base or ~/.cache/vpt/base.
  c.init_from = ""  # a vpt run directory: its newest checkpoint's learner params (and tokenizer) start this run.
  c.compare_with_baseline = False  # after a V-Pretraining run, also train the NTP baseline and compare.
  return c


def validate(config: ml_collections.ConfigDict) -> None:
  """Checks values that types alone cannot; raises core_config.ConfigError (a ValueError) naming the field."""
  try:
    _validate(config)
  except core_config.ConfigError:
    raise
  except ValueError as e:  # the data and feedback blocks' own checks (feedback_sets, stream domains, …)
    raise core_config.ConfigError(str(e)) from e


def _validate(config: ml_collections.ConfigDict) -> None:
  need = core_config.requirement(config)
  need(config.get("task", "language") == "language", "task", "'language' (this is the language schema)")

  m = config.model
  need(m.d_model > 0, "model.d_model", "> 0")
  need(m.n_layers > 0, "model.n_layers", "> 0")
  need(m.n_heads > 0 and (m.head_dim or m.d_model % m.n_heads == 0), "model.n_heads",
       "a positive divisor of model.d_model (or set model.head_dim)")
  need(m.n_kv_heads > 0 and m.n_heads % m.n_kv_heads == 0, "model.n_kv_heads",
       "a positive divisor of model.n_heads")
  need(m.dtype in ("float32", "bfloat16", "float64"), "model.dtype",
       "'float32', 'bfloat16' (or 'float64' for numerics checks)")
  need(m.lora_rank >= 0, "model.lora_rank", ">= 0 (0 = no LoRA)")
  if m.lora_rank > 0:
    need(m.lora_alpha > 0, "model.lora_alpha", "> 0")
    need(0.0 <= m.lora_dropout < 1.0, "model.lora_dropout", "in [0, 1)")
    targets = [t.strip() for t in m.lora_targets.split(",") if t.strip()]
    need(targets and set(targets) <= set(LORA_TARGETS), "model.lora_targets",
         f"a comma-separated non-empty subset of {','.join(LORA_TARGETS)}")
  d = config.data
  from vpt.language.data import sources  # Here, not at the top: config_lib stays import-light.
  need(d.source in sources.SOURCES, "data.source", "one of " + ", ".join(map(repr, sources.SOURCES)))
  need(d.source not in sources.PATH_SOURCES or d.train_path, "data.train_path",
       f"a file or glob for data.source={d.source!r}")
  need(d.source != "mixture" or d.mixture, "data.mixture",
       "a non-empty list of {'weight': w, 'source': ..., ...} for data.source='mixture'")
  need(d.source == "mixture" or not d.mixture, "data.mixture", "empty unless data.source='mixture'")
  if d.source == "mixture":
    for comp, _, prefix in sources.mixture_components(d):  # Raises naming data.mixture[k].key.
      if comp.source in sources.PATH_SOURCES and not comp.train_path:
        raise ValueError(f"config.{prefix}.train_path is empty: expected a file or glob for "
                         f"source={comp.source!r}")
      if comp.source == "tfds" and not comp.tfds_name:
        raise ValueError(f"config.{prefix}.tfds_name is empty: expected a TFDS dataset name")
      if bool(comp.prompt_field) != bool(comp.answer_field):
        raise ValueError(f"config.{prefix}.answer_field: set together with prompt_field "
                         "(both or neither)")
  need(d.source != "tfds" or d.tfds_name, "data.tfds_name", "a TFDS dataset name for data.source='tfds'")
  need(bool(d.prompt_field) == bool(d.answer_field), "data.answer_field",
       "set together with data.prompt_field (both or neither)")
  need(d.seq_len >= 8, "data.seq_len", ">= 8")
  need(d.packing_bins >= 0, "data.packing_bins", ">= 0")
  need(d.read_threads >= 0, "data.read_threads", ">= 0")
  need(d.worker_count >= 0, "data.worker_count", ">= 0")
  need(0.0 <= d.synthetic.irrelevant_fraction <= 1.0, "data.synthetic.irrelevant_fraction",
       "in [0, 1]")
  need(d.synthetic.num_eval > 0, "data.synthetic.num_eval", "> 0")
  need(d.synthetic.num_train >= 0, "data.synthetic.num_train", ">= 0")
  try:
    StreamStyle.from_config(d.synthetic)
  except ValueError as e:
    raise ValueError(f"config.data.synthetic.{e}") from None
  fb_sets = feedback_sets(config.feedback)  # Raises naming feedback.sets[k].key.
  for fb_set in fb_sets:
    _validate_feedback_block(fb_set.config, fb_set.field)
  set_names = [fb_set.name for fb_set in fb_sets]
  domains = sources.stream_domains(d, set_names[0])  # Raises naming data.mixture[k].feedback_set.
  for domain in domains:
    if domain.feedback_set is not None and domain.feedback_set not in set_names:
      raise ValueError(f"config.{domain.field}={domain.feedback_set!r}: expected the name of a feedback set, "
                       f"one of {set_names} (feedback.name and the names in feedback.sets)")
  need(config.eval_generation.split in ("test", "validation"), "eval_generation.split", "'test' or 'validation'")
  b = config.base
  need(b.num_steps >= 0, "base.num_steps", ">= 0 (0 = no base model)")
  need(0.0 <= b.irrelevant_fraction <= 1.0, "base.irrelevant_fraction", "in [0, 1]")
  need(b.learning_rate > 0, "base.learning_rate", "> 0")
  need(b.num_steps == 0 or d.source == "synthetic_math", "base.num_steps",
       "0 unless data.source='synthetic_math' (the base is trained on the embedded generator; "
       "continue a real checkpoint with config.init_from)")
  need(config.batch_size > 0, "batch_size", "> 0")
  need(config.num_steps > 0, "num_steps", "> 0")
  need(config.grad_accum_steps >= 1, "grad_accum_steps", ">= 1")
  need(config.batch_size % config.grad_accum_steps == 0, "grad_accum_steps",
       f"a divisor of batch_size={config.batch_size}")
  core_config.validate_optimizer(config)
  core_config.validate_mesh_and_checkpoint(config)
  v = config.vpt
  need(v.mode in ("ntp", "value", "random_feedback", "uniform_topk", "self_distill"), "vpt.mode",
       "one of 'ntp', 'value', 'random_feedback', 'uniform_topk', 'self_distill'")
  direction = v.get("feedback_direction", "feedback")  # (get: a config.json written before the field)
  need(direction in FEEDBACK_DIRECTIONS, "vpt.feedback_direction", " or ".join(map(repr, FEEDBACK_DIRECTIONS)))
  need(direction == "feedback" or v.mode in ("value", "random_feedback"), "vpt.feedback_direction",
       f"'feedback' with vpt.mode={v.mode!r} (the random-feedback control replaces a designer's g_down)")
  need(v.align in ALIGNS, "vpt.align", "one of " + ", ".join(map(repr, ALIGNS)))
  need(v.geometry in ("raw", "adam"), "vpt.geometry", "'raw' or 'adam'")
  need(v.alignment in ALIGNMENTS, "vpt.alignment", " or ".join(map(repr, ALIGNMENTS)))
  if v.alignment == "domain_matched":
    need(any(domain.feedback_set is not None for domain in domains), "vpt.alignment",
         f"a stream domain paired with a feedback set for 'domain_matched' (the domains of data.source="
         f"{d.source!r}: {[domain.name for domain in domains]}; pair a mixture component with "
         "data.mixture[k].feedback_set)")
  need(v.top_k >= 2, "vpt.top_k", ">= 2")
  need(0.0 <= v.alpha_max <= 1.0, "vpt.alpha_max", "in [0, 1]")
  need(0.0 <= v.fixed_alpha <= 1.0, "vpt.fixed_alpha", "in [0, 1]")
  need(0 <= v.align_last_n_layers <= m.n_layers, "vpt.align_last_n_layers", f"in [0, model.n_layers={m.n_layers}]")
  need(v.meta_every >= 1, "vpt.meta_every", ">= 1")
  need(v.burn_in_steps >= 0, "vpt.burn_in_steps", ">= 0")
  need(v.dispatch in DISPATCHES, "vpt.dispatch", f"one of {DISPATCHES}")
  need(0.0 <= v.g_down_average < 1.0, "vpt.g_down_average", "in [0, 1) (0: off)")
  need(v.g_down_average == 0.0 or v.alignment == "pooled", "vpt.g_down_average",
       "0 with vpt.alignment='domain_matched' (the running average is of the pooled g_down)")
  need(0 <= v.meta_batch_size <= config.batch_size, "vpt.meta_batch_size", f"in [0, batch_size={config.batch_size}]")
  need(0 <= v.meta_seq_len <= d.seq_len, "vpt.meta_seq_len", f"in [0, data.seq_len={d.seq_len}]")
  need(v.designer.d_model % v.designer.n_heads == 0, "vpt.designer.n_heads", "a divisor of vpt.designer.d_model")


ALIGNMENTS = ("pooled", "domain_matched")
# A set's name is part of a checkpoint item's name (feedback_<name>): a file-name-safe word.
_SET_NAME_RE = re.compile(r"[A-Za-z0-9_-]+")


@dataclasses.dataclass(frozen=True)
class FeedbackSet:
  """One feedback set: its name, ω, its full feedback block and the config field it comes from."""
  name: str
  weight: float
  config: ml_collections.ConfigDict  # a feedback_config() without `sets`
  field: str  # 'feedback', 'feedback.sets[k]' or 'feedback.sets.<name>' (for error messages)


def feedback_sets(fb_cfg: ml_collections.ConfigDict) -> list[FeedbackSet]:
  """The feedback sets of a feedback block: the block itself first, then feedback.sets in order.

  An entry of feedback.sets is a feedback block of its own: keys it leaves out come from the main
  block, except `seed`, which defaults to the main block's seed + the entry's position (1, 2, …), so
  synthetic sets draw other problems. Raises ValueError naming the field on an unknown key, a
  missing, repeated or malformed name, or a weight that is not a number > 0.
  """
  main = copy.deepcopy(fb_cfg)
  with main.unlocked():
    main.sets = None
  main_weight = fb_cfg.get("weight", 1.0)
  out = [FeedbackSet(str(fb_cfg.get("name", "main")), main_weight, main, "feedback")]
  entries = fb_cfg.get("sets") or ()
  if hasattr(entries, "items"):  # dict form: name -> entry
    items = [(f"feedback.sets.{name}", name, entry) for name, entry in entries.items()]
  elif isinstance(entries, (list, tuple)):
    items = [(f"feedback.sets[{k}]", None, entry) for k, entry in enumerate(entries)]
  else:
    raise ValueError(f"config.feedback.sets={entries!r}: expected a list of feedback blocks "
                     "({'name': ..., 'weight': ω, ...}) or a dict name -> block")
  allowed = sorted(set(main) - {"sets"})
  for position, (field, key_name, entry) in enumerate(items, 1):
    if not hasattr(entry, "items"):
      raise ValueError(f"config.{field}={entry!r}: expected a dict of feedback keys ({', '.join(allowed)})")
    entry = dict(entry.items())
    unknown = sorted(set(entry) - set(allowed))
    if unknown:
      raise ValueError(f"config.{field} has unknown keys {unknown}; expected some of {allowed}")
    if key_name is not None:
      if entry.setdefault("name", key_name) != key_name:
        raise ValueError(f"config.{field}.name={entry['name']!r}: differs from its key {key_name!r}")
    elif "name" not in entry:
      raise ValueError(f"config.{field} has no 'name': every extra feedback set needs one")
    cfg = copy.deepcopy(main)
    with cfg.unlocked():
      cfg.seed = main.seed + position
      cfg.weight = 1.0
      for key, value in entry.items():
        try:
          cfg[key] = value
        except TypeError:
          raise ValueError(f"config.{field}.{key}={value!r}: expected a {type(main[key]).__name__} like "
                           f"config.feedback.{key}") from None
    out.append(FeedbackSet(str(cfg.name), cfg.weight, cfg, field))
  seen = {}
  for s in out:
    if not isinstance(s.config.name, str) or not _SET_NAME_RE.fullmatch(s.config.name):
      raise ValueError(f"config.{s.field}.name={s.config.name!r}: expected a non-empty word of letters, "
                       "digits, '_' and '-'")
    if s.name in seen:
      raise ValueError(f"config.{s.field}.name={s.name!r}: the name of config.{seen[s.name]} already; "
                       "feedback set names must be unique")
    seen[s.name] = s.field
    w = s.weight
    if not isinstance(w, (int, float)) or isinstance(w, bool) or not w > 0:
      raise ValueError(f"config.{s.field}.weight={w!r}: expected a number > 0")
  return out


def _validate_feedback_block(f, field: str) -> None:
  """The checks of one feedback block (config.feedback or an entry of feedback.sets)."""

  def need(cond, key, expected):
    if not cond:
      raise ValueError(f"config.{field}.{key}={f[key]!r}: expected {expected}")

  need(f.source in ("synthetic", "gsm8k_jsonl"), "source", "one of 'synthetic', 'gsm8k_jsonl'")
  need(f.source != "gsm8k_jsonl" or f.path, "path", f"a GSM8K-format jsonl file for {field}.source='gsm8k_jsonl'")
  need(f.num_examples > 0, "num_examples", "> 0")
  need(f.seed >= 0, "seed", ">= 0")
  need(f.batch_size > 0, "batch_size", "> 0")
  need(f.seq_len >= 8, "seq_len", ">= 8")
