"""Ahead-of-time memory check (`python -m vpt.main --config ... --dry_run`).

Builds the mesh, the train state's *shapes* (jax.eval_shape: no weights are allocated, no data is
read), lowers and compiles the real jitted train step (the same function, shardings and donation as
training) and reports per device: parameter, optimizer-state and designer bytes, and the compiled
program's memory analysis (arguments, outputs, aliased by donation, temporaries), with the peak
estimate arguments + outputs − aliased + temporaries against an optional HBM budget.

The target topology is the local devices, or `--dry_run_devices N` simulated host (CPU) devices:
the program is then XLA:CPU's, whose fusion and buffer choices differ from a GPU's or TPU's, so
treat that temporaries figure as an estimate; the parameter and optimizer figures are exact.

A TPU slice (`--dry_run_topology v5e-16`, vpt/core/tpu.py) needs no TPU: libtpu compiles the real TPU
program for compile-only devices of that topology, so the memory figures are the TPU compiler's own
(its fusion, layouts, rematerialisation), checked against the chip's HBM. Then the report also says
what the program does on the pod (`estimate`):

  * collectives: every all-gather / reduce-scatter / all-reduce / all-to-all / collective-permute in
    the optimized HLO, counted per step (a while loop's body × its known trip count), with its
    payload (result bytes per device) and its wire traffic per device, the ring cost
    (n−1)/n · payload (all-reduce twice that, reduce-scatter (n−1) · its shard, permute the payload)
    for a group of n devices; across slices (multi-slice: libtpu compiles one program per slice and
    sends what crosses slices to the DCN runtime as host transfers) over DCN, the rest over ICI;
  * FLOPs and bytes accessed per device from the compiled program's cost_analysis();
  * a roofline step time: max(FLOPs / peak, bytes / HBM bandwidth, ICI traffic / ICI bandwidth of
    one torus dimension, DCN traffic / DCN bandwidth) with the chip's published figures — a MODEL,
    not a measurement: it assumes perfect overlap of the three (the sum is printed as the
    no-overlap bound), peak MXU rate for every FLOP (no pipeline bubbles, no VPU-bound ops), every
    byte-accessed from HBM (none from VMEM reuse), collectives along one torus dimension with
    uncontended links, and ignores host input, launch and step-to-step gaps.
    From it: tokens (images) per second per chip, MFU (the learner's model FLOPs, PaLM accounting,
    vpt/core/metrics.py) and the predicted V-Pretraining ÷ baseline throughput.

The V-Pretraining LM step is ONE program whose meta update sits under `lax.cond` (vpt/language/vpt_step.py):
its memory is the real program's, but cost analysis cannot say which branch runs, so the estimate
compiles the same step twice more with the step counter fixed to a meta step and to a plain step
(XLA folds the constant predicate and inlines one branch). A V-Pretraining step averages over the
meta period: ((r−1)·t_plain + t_meta) / r, r = vpt.meta_every (after the burn-in); the baseline is
the same config in mode "ntp" (vision: "dino"), compiled the same way. Vision already runs two
programs (meta / plain; vpt/vision/train.py): both are compiled, the memory verdict takes the larger.
"""

from __future__ import annotations

import copy
import json
import math
import os
import re
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from vpt.core import lora as lora_lib, meta as meta_lib, sharding, tpu
from vpt.language import config_lib, train, vpt_step
from vpt.language.models.lm import (LMConfig, Transformer, count_nonembedding_params, count_params,
                                   flops_per_token as lm_flops_per_token)
from vpt.language.steps import state_shardings

GB = 1024 ** 3
BATCH_FIELDS = {"inputs": jnp.int32, "targets": jnp.int32, "loss_mask": jnp.float32, "segment_ids": jnp.int32,
                "positions": jnp.int32}
# The LM pipeline's batches also carry each token's stream domain (vpt/language/data/pipeline.py).
LM_BATCH_FIELDS = {**BATCH_FIELDS, "domain_ids": jnp.int32}


def vocab_size_for_dry_run(config: ml_collections.ConfigDict) -> int:
  """config.model.vocab_size, else the `vocab_size` of an HF config.json in config.init_from."""
  if config.model.vocab_size > 0:
    return int(config.model.vocab_size)
  hf_config = os.path.join(config.init_from, "config.json") if config.init_from else ""
  if hf_config and os.path.isfile(hf_config):
    with open(hf_config) as f:
      vocab = int(json.load(f).get("vocab_size", 0))
    if vocab > 0:
      return vocab
  raise ValueError("config.model.vocab_size=0: a dry run reads no tokenizer, so it needs the vocabulary size "
                   "(set --config.model.vocab_size, or config.init_from to an HF directory with config.json)")


def abstract_batch(batch_size: int, seq_len: int, mesh, fields=BATCH_FIELDS) -> dict[str, jax.ShapeDtypeStruct]:
  sh = sharding.batch_sharding(mesh)
  return {k: jax.ShapeDtypeStruct((batch_size, seq_len), dt, sharding=sh) for k, dt in fields.items()}


def abstract_feedback(config: ml_collections.ConfigDict, mesh) -> Any:
  """The train step's feedback argument as training builds it (train.feedback_shapes): one batch, or
  {set name: batch} with several feedback sets."""
  sh = sharding.batch_sharding(mesh)
  shapes = train.feedback_shapes(config, vpt_step.feedback_plan(config))
  return jax.tree.map(lambda leaf: jax.ShapeDtypeStruct(leaf[0], leaf[1], sharding=sh), shapes,
                      is_leaf=lambda x: isinstance(x, tuple))


def per_device_bytes(tree: Any, shardings: Any) -> int:
  """Bytes one device holds of `tree` (ShapeDtypeStructs) under `shardings` (the largest shard)."""
  total = 0
  for x, s in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings)):
    total += int(np.prod(s.shard_shape(tuple(x.shape)), dtype=np.int64)) * jnp.dtype(x.dtype).itemsize
  return total


def resolve_target(devices=None, topology: str = "", topology_shape: str = "", num_slices: int = 1,
                   echo: bool = True) -> tuple[Any, tpu.Slice | None]:
  """(devices to compile for, the TPU slice if one was named). `topology`: e.g. 'v5e-16' (vpt/core/tpu.py)."""
  if not topology:
    if topology_shape or num_slices != 1:
      raise ValueError("--dry_run_topology_shape / --dry_run_slices need --dry_run_topology (e.g. v5e-16)")
    return devices, None
  sl = tpu.parse_slice(topology, topology_shape, num_slices)
  return tpu.compile_only_devices(sl, echo=echo), sl


def _check_num_devices(config, devices) -> None:
  if devices is not None and config.mesh.num_devices not in (0, len(devices)):
    raise ValueError(f"config.mesh.num_devices={config.mesh.num_devices}, but the target has {len(devices)} "
                     "devices (set it to 0 for a topology dry run)")


def _compile(jitted, *args) -> tuple[Any, float]:
  t0 = time.perf_counter()
  compiled = jitted.lower(*args).compile()
  return compiled, time.perf_counter() - t0


def program_memory(compiled) -> dict[str, int]:
  """memory_analysis() of a compiled program, with the peak estimate (empty if the backend has none)."""
  mem = compiled.memory_analysis()
  if mem is None:  # some backends do not report it
    return {}
  out = dict(arguments=int(mem.argument_size_in_bytes), outputs=int(mem.output_size_in_bytes),
             aliased=int(mem.alias_size_in_bytes), temporaries=int(mem.temp_size_in_bytes),
             code=int(mem.generated_code_size_in_bytes))
  out["peak"] = out["arguments"] + out["outputs"] - out["aliased"] + out["temporaries"]
  return out


def _with_step(jitted, step_value: int):
  """The same jitted step (shardings, donation) with state.step fixed to `step_value` inside: the meta
  predicate becomes a constant, so XLA keeps one branch of the `lax.cond` (for the cost estimate)."""
  fn = jitted.__wrapped__

  def fixed(state, *args):
    return fn(state.replace(step=jnp.asarray(step_value, state.step.dtype)), *args)

  return fixed


PROGRAM_NAMES = {None: "step", False: "plain", True: "meta"}  # a step program's name in the report, by its `meta`


def _first_step(vpt_cfg, meta: bool) -> int:
  """The first step (≥ burn-in) that is a meta step (meta=True) or a plain one."""
  step = int(vpt_cfg.burn_in_steps)
  while bool(meta_lib.is_meta_step(step, vpt_cfg.burn_in_steps, vpt_cfg.meta_every)) != meta:
    step += 1
  return step


def _lm_compile(config, model_cfg, devices, *, variants: bool) -> dict[str, Any]:
  """Mesh, abstract state, shardings and the compiled LM step; with `variants`, also the forced
  meta / plain programs of a designer mode."""
  mesh = sharding.make_mesh(config.mesh, devices)
  model = Transformer(model_cfg, batch_sharding=sharding.batch_sharding(mesh))
  dp = mesh.shape["data"] * mesh.shape["fsdp"]
  if config.batch_size % dp:
    raise ValueError(f"config.batch_size={config.batch_size} is not divisible by the data-parallel size {dp} "
                     f"(mesh.data × mesh.fsdp)")
  optimizer, schedule = train.make_learner_optimizer(config, model_cfg)
  abstract_state = jax.eval_shape(train.make_init_fn(config, model, optimizer))
  shardings = state_shardings(abstract_state, mesh, optimizer)

  state_in = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract_state, shardings)
  batch = abstract_batch(config.batch_size, config.data.seq_len, mesh, LM_BATCH_FIELDS)
  uses_designer = vpt_step.uses_designer(config.vpt)
  fb = abstract_feedback(config, mesh) if uses_designer else None
  args = (state_in, batch, fb)
  out = dict(mesh=mesh, abstract_state=abstract_state, shardings=shardings, args=args, programs={},
             compile_seconds={})
  for meta in meta_lib.programs_for(config.vpt.dispatch, uses_designer):  # what training runs
    step = train.jit_train_step(config, model, optimizer, schedule, shardings, mesh, meta=meta)
    name = PROGRAM_NAMES[meta]
    out["programs"][name], out["compile_seconds"][name] = _compile(step, *args)
  out["runs"] = list(out["programs"])
  if variants and uses_designer and "step" in out["programs"]:  # the cond program's branches, for the estimate
    batch_sh, repl = sharding.batch_sharding(mesh), sharding.replicated(mesh)
    for name, meta in (("meta", True), ("plain", False)):
      forced = jax.jit(_with_step(step, _first_step(config.vpt, meta)), in_shardings=(shardings, batch_sh, batch_sh),
                       out_shardings=(shardings, repl), donate_argnums=(0,))
      out["programs"][name], out["compile_seconds"][name] = _compile(forced, *args)
  return out


def _worst_memory(programs: dict[str, Any], runs) -> dict[str, Any]:
  """The memory rows of the program (of those training runs) with the highest peak, which it names."""
  mems = {name: program_memory(programs[name]) for name in runs}
  worst = max(mems, key=lambda n: mems[n].get("peak", 0))
  return {**mems[worst], "program": worst, "programs_peak": {n: m.get("peak") for n, m in mems.items()}}


def dry_run(config: ml_collections.ConfigDict, *, hbm_gb: float = 0.0, devices=None, label: str = "",
            echo: bool = True, topology: str = "", topology_shape: str = "", num_slices: int = 1,
            estimate: bool = True) -> dict[str, Any]:
  """Compiles the train step for `config` without allocating it; returns (and prints) the report.

  `devices`: the compile target (default: the local devices); `topology` ('v5e-16', …) compiles for
  that TPU slice instead (`topology_shape`, `num_slices`: vpt/core/tpu.py), with the chip's HBM as the
  budget unless `hbm_gb` is given and, with `estimate`, the collectives and roofline estimate."""
  if config.get("task") == "vision":
    return vision_dry_run(config, hbm_gb=hbm_gb, devices=devices, label=label, echo=echo, topology=topology,
                          topology_shape=topology_shape, num_slices=num_slices, estimate=estimate)
  config_lib.validate(config)
  if config.init_from:  # an HF checkpoint (or a run imported from one) sets the shape, as in training.
    from vpt.language.interop import hf as hf_interop  # pylint: disable=g-import-not-at-top
    if hf_dir := hf_interop.hf_files_dir(config.init_from):
      config = hf_interop.config_with_hf_model(config, hf_dir)
  model_cfg = LMConfig.from_config(config.model, vocab_size_for_dry_run(config))
  devices, sl = resolve_target(devices, topology, topology_shape, num_slices, echo)
  _check_num_devices(config, devices)
  built = _lm_compile(config, model_cfg, devices, variants=bool(sl and estimate))
  mesh, abstract_state, shardings = built["mesh"], built["abstract_state"], built["shardings"]

  n_params = count_params(abstract_state.params)
  n_trainable = count_params(lora_lib.split_lora(abstract_state.params)[0]) if model_cfg.lora_rank else n_params
  report = {
      "label": label,
      "mode": config.vpt.mode,
      "lora_rank": model_cfg.lora_rank,
      "mesh": dict(mesh.shape),
      "devices": f"{mesh.size} × {mesh.devices.flat[0].platform}",
      "num_params": n_params,
      "num_trainable": n_trainable,
      "params": per_device_bytes(abstract_state.params, shardings.params),
      "opt_state": per_device_bytes(abstract_state.opt_state, shardings.opt_state),
      "designer": per_device_bytes(abstract_state.designer, shardings.designer),
      "compile_seconds": dict(built["compile_seconds"]),
      "state_shardings": shardings,
  }
  report.update(_worst_memory(built["programs"], built["runs"]))
  report["compiled"] = built["programs"][report["program"]]
  if sl is not None:
    report.update(slice=sl.name, topology=sl.topology_name, chip=sl.chip.name, num_chips=sl.num_chips)
    hbm_gb = hbm_gb or sl.chip.hbm_bytes / GB
    if estimate:
      tokens = config.batch_size * config.data.seq_len
      flops_per_token = lm_flops_per_token(
          n_params_nonembed=count_nonembedding_params(abstract_state.params), n_layers=model_cfg.n_layers,
          d_model=model_cfg.d_model, seq_len=config.data.seq_len, vocab_size=model_cfg.vocab_size,
          n_heads=model_cfg.n_heads, head_dim=model_cfg.resolved_head_dim)
      programs = {k: v for k, v in built["programs"].items() if k != "step"} or {"plain": built["programs"]["step"]}
      baseline = None
      if config.vpt.mode != "ntp":
        ntp = copy.deepcopy(config)
        with ntp.unlocked():
          ntp.vpt.mode = "ntp"
        nb = _lm_compile(ntp, model_cfg, devices, variants=False)
        report["compile_seconds"]["ntp"] = nb["compile_seconds"]["step"]  # NTP: one program, "step"
        baseline = nb["programs"]["step"]
      report["estimate"] = estimate_throughput(
          programs, baseline, sl, mesh, config.vpt, units=tokens, unit_name="tokens",
          model_flops=flops_per_token * tokens, baseline_name="NTP")
  report = with_budget(report, hbm_gb)
  if echo:
    print(format_report(report), flush=True)
  return report


# ----------------------------------------------------------------------------- vision


def _labeled_fields(config) -> tuple[str, ...]:
  """The targets of the labeled source (vpt/vision/train.py `labeled_source`): what the heads train on."""
  name = config.data.labeled.source or config.data.source
  return {"scenes": ("seg", "depth"), "ade20k": ("seg",), "nyuv2": ("depth",)}.get(name, ("seg", "depth"))


def vision_dry_run(config: ml_collections.ConfigDict, *, hbm_gb: float = 0.0, devices=None, label: str = "",
                   echo: bool = True, topology: str = "", topology_shape: str = "", num_slices: int = 1,
                   estimate: bool = True) -> dict[str, Any]:
  """The vision loop's programs (vpt/vision/train.py `jit_step_programs`: plain and, with a designer,
  meta), compiled from shapes alone; the report as `dry_run`'s (student, teacher, heads + designer)."""
  from vpt.vision import train as train_vision
  from vpt.vision import config as vision_config
  from vpt.vision import step as vision_step  # noqa: PLC0415  (vision imports stay off the LM path)
  from vpt.vision.models.vit import count_params as vit_count  # noqa: PLC0415

  config = train_vision.prepare_config(config)  # schema defaults, init model, num_classes; validated once
  devices, sl = resolve_target(devices, topology, topology_shape, num_slices, echo)
  _check_num_devices(config, devices)

  def build(cfg):
    mesh = sharding.make_mesh(cfg.mesh, devices)
    dp = mesh.shape["data"] * mesh.shape["fsdp"]
    uses = vision_config.uses_designer(cfg)
    vision_config.check_batches_divide(cfg, dp)
    size, lsize = cfg.data.image_size, cfg.data.labeled.image_size or cfg.data.image_size
    bsh = sharding.batch_sharding(mesh)
    img = lambda n, s: jax.ShapeDtypeStruct((n, s, s, 3), jnp.float32, sharding=bsh)
    sample = jax.ShapeDtypeStruct((1, lsize, lsize, 3), jnp.float32)
    abstract_state = jax.eval_shape(lambda rng, x: vision_step.init_vision_state(cfg, rng, x),
                                    jax.random.PRNGKey(0), sample)
    shardings = vision_step.vision_state_shardings(cfg, abstract_state, mesh)
    state_in = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract_state,
                            shardings)
    args = [state_in, {"image": img(cfg.batch_size, size)}, None, None, None]
    if uses:
      labeled = {"image": img(cfg.feedback.batch_size, lsize)}
      for f in _labeled_fields(cfg):
        labeled[f] = jax.ShapeDtypeStruct((cfg.feedback.batch_size, lsize, lsize),
                                          jnp.int32 if f == "seg" else jnp.float32, sharding=bsh)
      args[2:] = [{"image": img(cfg.vpt.meta_batch_size, size)}, labeled, labeled]
    jitted = train_vision.jit_step_programs(cfg, shardings, mesh)  # what training runs
    names = {**PROGRAM_NAMES, None: "step" if uses else "plain"}
    programs, seconds = {}, {}
    for meta, step in jitted.items():
      programs[names[meta]], seconds[names[meta]] = _compile(step, *args)
    runs = list(programs)
    if estimate and "step" in programs:  # one lax.cond program: its branches as programs, for the estimate
      for meta, step in train_vision.jit_step_programs(cfg, shardings, mesh, dispatch="host").items():
        programs[names[meta]], seconds[names[meta]] = _compile(step, *args)
    return mesh, abstract_state, shardings, programs, seconds, runs

  mesh, abstract_state, shardings, programs, seconds, runs = build(config)
  student, teacher = abstract_state.student, abstract_state.teacher
  report = {
      "label": label, "mode": config.vpt.mode, "lora_rank": 0, "task": "vision",
      "mesh": dict(mesh.shape), "devices": f"{mesh.size} × {mesh.devices.flat[0].platform}",
      "num_params": vit_count(student["backbone"]), "num_trainable": vit_count(student),
      "params": per_device_bytes(student, shardings.student),
      "teacher": per_device_bytes(teacher, shardings.teacher),
      "opt_state": per_device_bytes(abstract_state.opt_state, shardings.opt_state),
      "designer": (per_device_bytes(abstract_state.designer, shardings.designer)
                   + per_device_bytes(abstract_state.heads, shardings.heads)),
      "compile_seconds": dict(seconds), "state_shardings": shardings,
  }
  report.update(_worst_memory(programs, runs))
  report["compiled"] = programs[runs[0]]
  if sl is not None:
    report.update(slice=sl.name, topology=sl.topology_name, chip=sl.chip.name, num_chips=sl.num_chips)
    hbm_gb = hbm_gb or sl.chip.hbm_bytes / GB
    if estimate:
      baseline = None
      if config.vpt.mode != "dino":
        dino_cfg = copy.deepcopy(config)
        with dino_cfg.unlocked():
          dino_cfg.vpt.mode = "dino"
        _, _, _, bprog, bsec, _ = build(dino_cfg)
        report["compile_seconds"]["dino"] = bsec["plain"]
        baseline = bprog["plain"]
      report["estimate"] = estimate_throughput({k: v for k, v in programs.items() if k != "step"}, baseline, sl,
                                               mesh, config.vpt, units=config.batch_size,
                                               unit_name="images", model_flops=None, baseline_name="DINO")
  report = with_budget(report, hbm_gb)
  if echo:
    print(format_report(report), flush=True)
  return report


# ----------------------------------------------------------------------------- collectives and roofline

COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")
_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4,
                "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16, "s4": 0.5, "u4": 0.5}
_ARRAY = re.compile(r"\b(pred|[su](?:4|8|16|32|64)|bf16|f16|f32|f64|c64|c128|f8\w*?)\[([\d,]*)\]")
_OP = re.compile(r"=\s*(.*?)\s(" + "|".join(COLLECTIVES) + r")(-start)?\(")
_COMP = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
_CALLEE = re.compile(r"\b(?:calls|to_apply|condition|body|branch_computations|true_computation|false_computation)="
                     r"(\{[^}]*\}|%?[\w.\-]+)")


_DCN_SEND = re.compile(r"=\s*\((.*?)\)\s+send\(.*_xla_megascale_transfer_type=\"(\w+)\"")
_DCN_KINDS = {"ALL_REDUCE": "all-reduce", "ALL_GATHER": "all-gather", "REDUCE_SCATTER": "reduce-scatter",
              "ALL_TO_ALL": "all-to-all"}


def _arrays(shape_text: str) -> list[float]:
  out = []
  for dtype, dims in _ARRAY.findall(shape_text):
    n = math.prod(int(d) for d in dims.split(",") if d) if dims else 1
    out.append(n * _DTYPE_BYTES.get(dtype, 1))
  return out


def _iota(dims: list[int], perm: list[int] | None) -> np.ndarray:
  ids = np.arange(math.prod(dims)).reshape(dims)
  return (ids.transpose(perm) if perm else ids).reshape(-1)


def _ints(text: str) -> list[int]:
  return [int(x) for x in re.findall(r"\d+", text)]


def replica_groups(line: str, num_partitions: int) -> np.ndarray | None:
  """The device groups of one collective (rows = groups of partition ids), or None if not parsed.
  Forms: {{0,1},{2,3}}; [G,S]<=[dims]T(perm); mesh['axis_0'=2,...], device_ids=([dims]T(perm)) {'axis_0'}."""
  m = re.search(r"replica_groups=\{(\{[\d,]*\}(?:,\{[\d,]*\})*)\}", line)
  if m:
    groups = [_ints(g) for g in re.findall(r"\{([\d,]*)\}", m.group(1))]
    return np.array(groups) if groups and len({len(g) for g in groups}) == 1 else None
  m = re.search(r"replica_groups=\[([\d,]+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?", line)
  if m:
    shape = _ints(m.group(1))
    ids = _iota(_ints(m.group(2)), _ints(m.group(3)) if m.group(3) else None)
    return ids.reshape(shape) if len(shape) == 2 else ids.reshape(1, -1)
  m = re.search(r"replica_groups=mesh\[([^\]]*)\](?:,\s*device_ids=\(\[([\d,]+)\](?:T\(([\d,]+)\))?\))?\s*\{([^}]*)\}",
                line)
  if m:
    axes = re.findall(r"'(\w+)'=(\d+)", m.group(1))
    names, sizes = [a for a, _ in axes], [int(n) for _, n in axes]
    ids = _iota(_ints(m.group(2)), _ints(m.group(3)) if m.group(3) else None) if m.group(2) \
        else np.arange(math.prod(sizes))
    group_axes = [names.index(a) for a in re.findall(r"'(\w+)'", m.group(4))]
    rest = [i for i in range(len(names)) if i not in group_axes]
    grid = ids.reshape(sizes).transpose(rest + group_axes)
    return grid.reshape(-1, math.prod(sizes[i] for i in group_axes) if group_axes else 1)
  if "replica_groups={}" in line or "replica_groups" not in line:
    return np.arange(num_partitions).reshape(1, -1)  # all devices
  return None


def hlo_collectives(hlo_text: str, partition_slices: list[int] | None = None) -> dict[str, dict[str, float]]:
  """Per kind: count per step, payload bytes and wire traffic per device (ICI and DCN) of the
  collectives in an optimized (SPMD-partitioned) HLO module; `partition_slices[i]`: the slice of
  partition i (None: one slice)."""
  comps: dict[str, list[str]] = {}
  entry, current = None, None
  for line in hlo_text.splitlines():
    if current is None:
      m = _COMP.match(line)
      if m and not line.startswith(" "):
        current = m.group(1)
        comps[current] = []
        if line.startswith("ENTRY"):
          entry = current
    elif line.strip() == "}":
      current = None
    else:
      comps[current].append(line)
  n_parts = len(partition_slices) if partition_slices else 1
  m = re.search(r"num_partitions=(\d+)", hlo_text)
  if m:
    n_parts = int(m.group(1))
  slices = np.asarray(partition_slices if partition_slices else [0] * n_parts)

  # How often each computation runs per step: while bodies × known trip counts, every other call once.
  runs: dict[str, float] = {}

  def visit(name: str, times: float, depth: int = 0) -> None:
    if name not in comps or depth > 64:
      return
    runs[name] = runs.get(name, 0.0) + times
    for line in comps[name]:
      trip = re.search(r"\"known_trip_count\":\{\"n\":\"(\d+)\"", line)
      for callee in _CALLEE.findall(line):
        is_body = re.search(r"\bbody=" + re.escape(callee), line) is not None
        for c in re.findall(r"%?([\w.\-]+)", callee):
          visit(c, times * (int(trip.group(1)) if (is_body and trip) else 1), depth + 1)

  visit(entry or next(iter(comps), ""), 1.0)
  out = {k: {"count": 0.0, "bytes": 0.0, "ici_traffic": 0.0, "dcn_traffic": 0.0, "dcn_count": 0.0}
         for k in COLLECTIVES}
  num_slices = len(set(slices.tolist()))
  for name, times in runs.items():
    for line in comps[name]:
      ms = _DCN_SEND.search(line)
      if ms:
        # Multi-slice: libtpu compiles one program per slice (num_partitions = its chips) and lowers the
        # collectives across slices to host-transfer sends to the DCN runtime ("megascale"), one per chip.
        kind = _DCN_KINDS.get(ms.group(2), "collective-permute")
        payload = float(_arrays(ms.group(1))[0]) if _arrays(ms.group(1)) else 0.0
        n = max(num_slices, 2)
        traffic = {"all-reduce": 2 * payload * (n - 1) / n, "reduce-scatter": payload * (n - 1)}.get(
            kind, payload * (n - 1) / n if kind != "collective-permute" else payload)
        rec = out[kind]
        rec["count"] += times
        rec["dcn_count"] += times
        rec["bytes"] += times * payload
        rec["dcn_traffic"] += times * traffic
        continue
      m = _OP.search(line)
      if not m:
        continue
      shape, kind, start = m.group(1), m.group(2), m.group(3)
      arrays = _arrays(shape)
      if start and kind in ("all-gather", "collective-permute"):  # (operands, results[, contexts])
        arrays = [a for a in arrays if a > 4] or arrays
        arrays = arrays[len(arrays) // 2:]
      payload = float(sum(arrays))
      groups = replica_groups(line, n_parts)
      if kind == "collective-permute":
        pairs = [tuple(_ints(p)) for p in re.findall(r"\{(\d+,\d+)\}", line.split("source_target_pairs=")[-1])]
        n = 2
        dcn = any(slices[a % len(slices)] != slices[b % len(slices)] for a, b in pairs) if pairs else False
        traffic = payload
      else:
        n = groups.shape[1] if groups is not None else n_parts
        dcn = bool(groups is not None and any(len(set(slices[g % len(slices)])) > 1 for g in groups))
        traffic = {"all-gather": payload * (n - 1) / n, "all-to-all": payload * (n - 1) / n,
                   "all-reduce": 2 * payload * (n - 1) / n, "reduce-scatter": payload * (n - 1)}[kind]
      if n <= 1:
        traffic = 0.0
      rec = out[kind]
      rec["count"] += times
      rec["bytes"] += times * payload
      rec["dcn_traffic" if dcn else "ici_traffic"] += times * traffic
      rec["dcn_count"] += times if dcn else 0
  return out


def program_costs(compiled, mesh, chip: tpu.Chip) -> dict[str, Any]:
  """FLOPs / bytes (cost_analysis, per device), collectives (optimized HLO) and the roofline terms."""
  cost = compiled.cost_analysis() or {}
  if isinstance(cost, (list, tuple)):  # older jax: one dict per program
    cost = cost[0] if cost else {}
  flops, hbm = float(cost.get("flops", 0.0)), float(cost.get("bytes accessed", 0.0))
  slices = [getattr(d, "slice_index", 0) or 0 for d in mesh.devices.flat]
  colls = hlo_collectives(compiled.as_text(), slices)
  ici = sum(c["ici_traffic"] for c in colls.values())
  dcn = sum(c["dcn_traffic"] for c in colls.values())
  terms = {"compute": flops / chip.peak_bf16_flops, "hbm": hbm / chip.hbm_bytes_per_s,
           "ici": ici / chip.ici_axis_bytes_per_s, "dcn": dcn / chip.dcn_bytes_per_s}
  bound = max(terms, key=terms.get)
  return {"flops": flops, "bytes_accessed": hbm, "collectives": colls, "ici_traffic": ici, "dcn_traffic": dcn,
          "terms": terms, "bound": bound, "step_seconds": terms[bound], "no_overlap_seconds": sum(terms.values())}


def estimate_throughput(programs: dict[str, Any], baseline, sl: tpu.Slice, mesh, vpt_cfg, *, units: float,
                        unit_name: str, model_flops: float | None, baseline_name: str) -> dict[str, Any]:
  """Roofline per program ('plain' and, with a designer, 'meta'; 'baseline'), the meta-period average,
  throughput per chip, MFU and the predicted V ÷ baseline throughput."""
  chip = sl.chip
  costs = {name: program_costs(c, mesh, chip) for name, c in programs.items()}
  r = int(getattr(vpt_cfg, "meta_every", 1) or 1)
  t_plain = costs["plain"]["step_seconds"]
  t_avg = ((r - 1) * t_plain + costs["meta"]["step_seconds"]) / r if "meta" in costs else t_plain
  est = {"programs": costs, "meta_every": r if "meta" in costs else 0, "step_seconds": t_avg, "unit": unit_name,
         "per_chip_per_s": units / t_avg / sl.num_chips if t_avg else float("nan"), "baseline_name": baseline_name}
  if model_flops:
    est["mfu"] = model_flops / (t_avg * sl.num_chips * chip.peak_bf16_flops) if t_avg else float("nan")
  if baseline is not None:
    costs["baseline"] = program_costs(baseline, mesh, chip)
    t_base = costs["baseline"]["step_seconds"]
    est["baseline_step_seconds"] = t_base
    est["v_over_baseline"] = t_base / t_avg if t_avg else float("nan")
  return est


# ----------------------------------------------------------------------------- report


def with_budget(report: dict[str, Any], hbm_gb: float) -> dict[str, Any]:
  """The report with the verdict against a per-device budget of `hbm_gb` GiB (none for 0)."""
  report = {k: v for k, v in report.items() if k not in ("budget", "fits")}
  if hbm_gb > 0:
    need = report.get("peak", report["params"] + report["opt_state"] + report["designer"])
    report.update(budget=hbm_gb * GB, fits=need <= hbm_gb * GB)
  return report


def _si(x: float, unit: str) -> str:
  for scale, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
    if abs(x) >= scale:
      return f"{x / scale:.3g} {prefix}{unit}"
  return f"{x:.3g} {unit}"


def format_estimate(est: dict[str, Any]) -> list[str]:
  lines = ["  on the pod, per device per step (compiled program; roofline = a model, not a measurement):"]
  for name, c in est["programs"].items():
    label = {"plain": "plain step", "meta": "meta step", "baseline": f"{est['baseline_name']} baseline"}[name]
    t = c["terms"]
    lines.append(f"    {label:<16} {_si(c['flops'], 'FLOP')}, {_si(c['bytes_accessed'], 'B')} accessed, "
                 f"ICI {_si(c['ici_traffic'], 'B')}, DCN {_si(c['dcn_traffic'], 'B')} -> compute "
                 f"{t['compute'] * 1e3:.3g} ms, HBM {t['hbm'] * 1e3:.3g} ms, ICI {t['ici'] * 1e3:.3g} ms, "
                 f"DCN {t['dcn'] * 1e3:.3g} ms: {c['step_seconds'] * 1e3:.3g} ms ({c['bound']}-bound; "
                 f"{c['no_overlap_seconds'] * 1e3:.3g} ms without overlap)")
    kinds = [f"{k} {v['count']:g}× {_si(v['bytes'], 'B')}" + (f" ({v['dcn_count']:g} over DCN)" if v["dcn_count"] else "")
             for k, v in c["collectives"].items() if v["count"]]
    lines.append(f"    {'':<16} collectives: {', '.join(kinds) or 'none'}")
  tail = f"  predicted: {est['per_chip_per_s']:,.0f} {est['unit']}/s per chip"
  if est["meta_every"]:
    tail += f" (meta step every {est['meta_every']}: {est['step_seconds'] * 1e3:.3g} ms per step on average)"
  if "mfu" in est:
    tail += f", MFU {est['mfu']:.1%}"
  lines.append(tail)
  if "v_over_baseline" in est:
    lines.append(f"  predicted throughput ÷ {est['baseline_name']}: {est['v_over_baseline']:.3f}")
  lines.append("  (roofline: max of compute at peak bf16, HBM bytes, ICI/DCN traffic at the published bandwidths; "
               "ignores overlap limits, non-MXU ops, VMEM reuse, link contention and host gaps)")
  return lines


def format_report(r: dict[str, Any]) -> str:
  gb = lambda b: f"{b / GB:10.3f} GB"
  lora = f"LoRA r={r['lora_rank']}" if r["lora_rank"] else "full-parameter"
  target = f"{r['devices']} devices"
  if "slice" in r:
    target = f"TPU {r['slice']} ({r['topology']}, {r['num_chips']} chips)"
  what = "ViT" if r.get("task") == "vision" else "learner"
  lines = [f"Dry run {r['label']}: mode={r['mode']}, {lora}, mesh {r['mesh']} on {target}",
           f"  {what} parameters: {r['num_params']:,} ({r['num_trainable']:,} trained)",
           "  per device:",
           f"    parameters                 {gb(r['params'])}"]
  if "teacher" in r:
    lines.append(f"    teacher (EMA)              {gb(r['teacher'])}")
  lines += [f"    optimizer state            {gb(r['opt_state'])}",
            f"    designer (params + opt)    {gb(r['designer'])}"]
  if "peak" in r:
    if len(r.get("programs_peak", {})) > 1:
      lines.append(f"    (the {r['program']} program, the larger of "
                   + ", ".join(f"{n} {gb(p).strip()}" for n, p in r["programs_peak"].items()) + ")")
    lines += [f"    program arguments          {gb(r['arguments'])}",
              f"    program outputs            {gb(r['outputs'])}",
              f"    aliased (donated state)    {gb(r['aliased'])}",
              f"    temporaries (activations)  {gb(r['temporaries'])}",
              f"    peak estimate              {gb(r['peak'])}   (arguments + outputs − aliased + temporaries)"]
  else:
    lines.append("    (this backend reports no memory analysis of the compiled program)")
  if "budget" in r:
    verdict = "fits" if r["fits"] else "does not fit"
    lines.append(f"  budget {r['budget'] / GB:g} GB per device: {verdict}")
  if "compile_seconds" in r:
    lines.append("  compile time: " + ", ".join(f"{k} {v:.1f} s" for k, v in r["compile_seconds"].items()))
  if "estimate" in r:
    lines += format_estimate(r["estimate"])
  return "\n".join(lines)
