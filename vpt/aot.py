"""Ahead-of-time memory check (`python -m vpt.main --config ... --dry_run`).

Builds the mesh, the train state's *shapes* (jax.eval_shape: no weights are allocated, no data is
read), lowers and compiles the real jitted train step (the same function, shardings and donation as
training) and reports per device: parameter, optimizer-state and designer bytes, and the compiled
program's memory analysis (arguments, outputs, aliased by donation, temporaries), with the peak
estimate arguments + outputs − aliased + temporaries against an optional HBM budget.

The target topology is the local devices, or `--dry_run_devices N` simulated host (CPU) devices:
the program is then XLA:CPU's, whose fusion and buffer choices differ from a GPU's or TPU's, so
treat that temporaries figure as an estimate; the parameter and optimizer figures are exact.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from vpt import config_lib, sharding, train, vpt_step
from vpt.models import lora as lora_lib
from vpt.models.lm import LMConfig, Transformer, count_params

GB = 1024 ** 3
BATCH_FIELDS = {"inputs": jnp.int32, "targets": jnp.int32, "loss_mask": jnp.float32, "segment_ids": jnp.int32,
                "positions": jnp.int32}


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


def abstract_batch(batch_size: int, seq_len: int, mesh) -> dict[str, jax.ShapeDtypeStruct]:
  sh = sharding.batch_sharding(mesh)
  return {k: jax.ShapeDtypeStruct((batch_size, seq_len), dt, sharding=sh) for k, dt in BATCH_FIELDS.items()}


def per_device_bytes(tree: Any, shardings: Any) -> int:
  """Bytes one device holds of `tree` (ShapeDtypeStructs) under `shardings` (the largest shard)."""
  total = 0
  for x, s in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings)):
    total += int(np.prod(s.shard_shape(tuple(x.shape)), dtype=np.int64)) * jnp.dtype(x.dtype).itemsize
  return total


def dry_run(config: ml_collections.ConfigDict, *, hbm_gb: float = 0.0, devices=None, label: str = "",
            echo: bool = True) -> dict[str, Any]:
  """Compiles the train step for `config` without allocating it; returns (and prints) the memory report."""
  config_lib.validate(config)
  if config.init_from:  # an HF checkpoint (or a run imported from one) sets the shape, as in training.
    from vpt.interop import hf as hf_interop  # pylint: disable=g-import-not-at-top
    if hf_dir := hf_interop.hf_files_dir(config.init_from):
      config = hf_interop.config_with_hf_model(config, hf_dir)
  model_cfg = LMConfig.from_config(config.model, vocab_size_for_dry_run(config))
  mesh = sharding.make_mesh(config.mesh, devices)
  model = Transformer(model_cfg, batch_sharding=sharding.batch_sharding(mesh))
  dp = mesh.shape["data"] * mesh.shape["fsdp"]
  if config.batch_size % dp:
    raise ValueError(f"config.batch_size={config.batch_size} is not divisible by the data-parallel size {dp} "
                     f"(mesh.data × mesh.fsdp)")
  optimizer, schedule = train.make_learner_optimizer(config, model_cfg)
  abstract_state = jax.eval_shape(train.make_init_fn(config, model, optimizer))
  shardings = sharding.state_shardings(abstract_state, mesh, optimizer)
  step = train.jit_train_step(config, model, optimizer, schedule, shardings, mesh)

  state_in = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract_state, shardings)
  batch = abstract_batch(config.batch_size, config.data.seq_len, mesh)
  fb = None
  if vpt_step.uses_designer(config.vpt):
    fb = abstract_batch(config.feedback.batch_size, config.feedback.seq_len, mesh)
  compiled = step.lower(state_in, batch, fb).compile()
  mem = compiled.memory_analysis()

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
  }
  if mem is not None:  # some backends do not report it
    report.update(arguments=int(mem.argument_size_in_bytes), outputs=int(mem.output_size_in_bytes),
                  aliased=int(mem.alias_size_in_bytes), temporaries=int(mem.temp_size_in_bytes),
                  code=int(mem.generated_code_size_in_bytes))
    report["peak"] = report["arguments"] + report["outputs"] - report["aliased"] + report["temporaries"]
  report = with_budget(report, hbm_gb)
  if echo:
    print(format_report(report), flush=True)
  return report


def with_budget(report: dict[str, Any], hbm_gb: float) -> dict[str, Any]:
  """The report with the verdict against a per-device budget of `hbm_gb` GiB (none for 0)."""
  report = {k: v for k, v in report.items() if k not in ("budget", "fits")}
  if hbm_gb > 0:
    need = report.get("peak", report["params"] + report["opt_state"] + report["designer"])
    report.update(budget=hbm_gb * GB, fits=need <= hbm_gb * GB)
  return report


def format_report(r: dict[str, Any]) -> str:
  gb = lambda b: f"{b / GB:10.3f} GB"
  lora = f"LoRA r={r['lora_rank']}" if r["lora_rank"] else "full-parameter"
  lines = [f"Dry run {r['label']}: mode={r['mode']}, {lora}, mesh {r['mesh']} on {r['devices']} devices",
           f"  learner parameters: {r['num_params']:,} ({r['num_trainable']:,} trained)",
           "  per device:",
           f"    parameters                 {gb(r['params'])}",
           f"    optimizer state            {gb(r['opt_state'])}",
           f"    designer (params + opt)    {gb(r['designer'])}"]
  if "peak" in r:
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
  return "\n".join(lines)
