"""Device mesh, parameter sharding rules and multi-host helpers.

The mesh has three axes: `data` (pure data parallel), `fsdp` (data parallel with parameters
and optimizer state sharded, gathered per layer by XLA) and `tensor` (Megatron-style tensor
parallelism). The batch is split over `data` and `fsdp`.

Parameter shardings come from a task's rules on parameter paths (which dimension of which parameter
goes over which axis: vpt.language.models.lm.SHARDING_RULES, vpt.vision.step.VIT_RULES), so parameters
stay plain pytrees (no boxed metadata) — which keeps JVPs over parameter subsets (V-Pretraining) simple.
"""

from __future__ import annotations

import os
import re
from typing import Any

import jax
import numpy as np
from absl import logging
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# A task's sharding rules: ((regex on the '/'-joined parameter path, mesh axis per dimension), ...); the first
# match wins (vpt.language.models.lm.SHARDING_RULES, vpt.vision.step.VIT_RULES).
Rules = tuple[tuple[str, tuple], ...]


def maybe_initialize_distributed(enabled: bool) -> None:
  """Multi-host init, gated by `config.multihost` or env VPT_MULTIHOST=1 (TPU pods, multi-node GPU)."""
  if enabled or os.environ.get("VPT_MULTIHOST", "") in ("1", "true", "True"):
    if not jax.distributed.is_initialized():
      # jax reads JAX_COORDINATOR_ADDRESS itself (and auto-detects TPU pods, SLURM, Open MPI);
      # the process count and id it does not read, so hand-launched multi-node GPU runs pass them.
      kwargs = {}
      if os.environ.get("JAX_NUM_PROCESSES"):
        kwargs["num_processes"] = int(os.environ["JAX_NUM_PROCESSES"])
      if os.environ.get("JAX_PROCESS_ID"):
        kwargs["process_id"] = int(os.environ["JAX_PROCESS_ID"])
      jax.distributed.initialize(**kwargs)
    logging.info("jax.distributed: process %d of %d", jax.process_index(), jax.process_count())


def mesh_shape(mesh_cfg, num_devices: int) -> tuple[int, int, int]:
  sizes = [int(mesh_cfg.data), int(mesh_cfg.fsdp), int(mesh_cfg.tensor)]
  known = int(np.prod([s for s in sizes if s != -1]))
  if -1 in sizes:
    if num_devices % known:
      raise ValueError(f"config.mesh={dict(zip(AXES, sizes))}: {num_devices} devices are not divisible by {known}")
    sizes[sizes.index(-1)] = num_devices // known
  if int(np.prod(sizes)) != num_devices:
    raise ValueError(f"config.mesh={dict(zip(AXES, sizes))} needs {int(np.prod(sizes))} devices, "
                     f"but {num_devices} are available")
  return tuple(sizes)


def make_mesh(mesh_cfg, devices=None) -> Mesh:
  devices = list(devices if devices is not None else jax.devices())
  if getattr(mesh_cfg, "num_devices", 0):
    if mesh_cfg.num_devices > len(devices):
      raise ValueError(f"config.mesh.num_devices={mesh_cfg.num_devices}, but only {len(devices)} devices exist")
    devices = devices[:mesh_cfg.num_devices]
  shape = mesh_shape(mesh_cfg, len(devices))
  num_slices = len({getattr(d, "slice_index", 0) for d in devices})
  if num_slices > 1:
    # Multi-slice (TPU slices joined by the data-center network): the `data` axis spans the slices
    # (its data-parallel gradient reduction is the only traffic that crosses DCN), fsdp and tensor
    # stay inside a slice, on ICI.
    if shape[0] % num_slices:
      raise ValueError(f"config.mesh.data={shape[0]}: the devices form {num_slices} slices and the data axis "
                       f"spans them, so it must be a multiple of {num_slices}")
    ici = (shape[0] // num_slices, shape[1], shape[2])
    return Mesh(mesh_utils.create_hybrid_device_mesh(ici, (num_slices, 1, 1), devices=devices), AXES)
  try:
    grid = mesh_utils.create_device_mesh(shape, devices=devices)
  except (ValueError, NotImplementedError, AssertionError):
    # Devices without a physical topology (CPU, simulated host devices) have no ICI layout to
    # optimise: a plain reshape is the mesh.
    grid = np.asarray(devices).reshape(shape)
  return Mesh(grid, AXES)


def _path_str(path) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def spec_for(path: str, shape: tuple[int, ...], mesh: Mesh, rules: Rules) -> P:
  """PartitionSpec for one parameter; a dimension that the axis size does not divide is replicated."""
  for pattern, axes in rules:
    if re.search(pattern, path):
      axes = tuple(axes)[:len(shape)] + (None,) * (len(shape) - len(axes))
      return P(*[ax if ax and shape[i] % mesh.shape[ax] == 0 else None for i, ax in enumerate(axes)])
  return P()


def param_shardings(params: Any, mesh: Mesh, rules: Rules) -> Any:
  """A pytree of NamedShardings matching `params` (arrays or ShapeDtypeStructs)."""
  return jax.tree_util.tree_map_with_path(
      lambda path, x: NamedSharding(mesh, spec_for(_path_str(path), tuple(x.shape), mesh, rules)), params)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def global_batch(local_batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Assembles per-host batches (each host holds its own rows) into global, sharded arrays."""
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in local_batch.items()}
