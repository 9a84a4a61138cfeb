"""TPU chips and slice topologies for compile-only runs (`--dry_run --dry_run_topology v5e-16`).

One table of the chips' published figures (`CHIPS`: peak bf16 FLOP/s, HBM capacity and bandwidth, ICI
bandwidth; vpt/core/metrics.py's MFU peak table reads its TPU rows from here), the parsing of slice names
as users write them, and the compile-only TPU devices of a named topology (libtpu's topology API:
no TPU needed).

Slice names. Cloud TPU's accelerator types count TensorCores for the megacore generations and
chips for the single-core ones: `v4-32` and `v5p-32` are 16 chips (2 TensorCores per chip, fused
into one JAX device: "megacore"), while `v5e-16` and `v6e-8` are 16 and 8 chips (one TensorCore per
chip). (cloud.google.com/tpu/docs/v4, /v5p: "Topology | Cores | Chips" tables, e.g. v5p 2x2x1 = 8
cores = 4 chips; /v5e, /v6e: "v5litepod-16" / "v6e-8" name chips.) A JAX device is a chip on all four.

Shapes. v5e / v6e slices are 2-D (AxB chips), v4 / v5p 3-D (AxBxC). For a power-of-two chip count
the shape is derived as Cloud TPU's standard slices are (1x1, 2x2, 2x4, 4x4, 4x8, … for 2-D; 2x2x1,
2x2x2, 2x2x4, 2x4x4, 4x4x4, 4x4x8, … for 3-D); other shapes (v5p-384 = 4x4x12, twisted or custom
slices) via `topology_shape`.

This module imports no JAX at import time (vpt/core/metrics.py reads `CHIPS`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import re
import sys
import tempfile

GIB = 1024 ** 3


@dataclasses.dataclass(frozen=True)
class Chip:
  name: str  # the generation as users write it in slice names ("v5e")
  device_kind: str  # jax.Device.device_kind of its devices
  topology_prefix: str  # libtpu's topology name prefix ("v5e" -> "v5e:4x4")
  dims: int  # 2-D or 3-D torus
  cores_per_chip: int  # what a slice name counts: TensorCores (2) or chips (1)
  peak_bf16_flops: float  # dense, per chip
  hbm_bytes: float  # per chip
  hbm_bytes_per_s: float  # per chip
  ici_bytes_per_s: float  # bidirectional, per chip, all ports together
  ici_ports: int
  dcn_bytes_per_s: float  # per chip (multi-slice traffic)
  source: str

  @property
  def ici_axis_bytes_per_s(self) -> float:
    """What one collective along one torus dimension can send per chip: both neighbours' links,
    one direction each = (bidirectional per-chip bandwidth) / (ports)."""
    return self.ici_bytes_per_s / self.ici_ports


# Published per-chip figures; bandwidths in bytes/s (GB = 1e9). HBM: the v5e and v6e pages say "16 GB" /
# "32 GB"; the chips hold 16 and 32 GiB (a v5e device's memory_stats bytes_limit is 2^34), the runtime
# keeps a little of it for itself, so treat a peak within a few % of the capacity as not fitting.
CHIPS: dict[str, Chip] = {c.name: c for c in (
    # v4: 275 TFLOP/s bf16, 32 GiB HBM2 at 1200 GB/s (cloud.google.com/tpu/docs/v4). ICI: 6 ports per chip
    # (3-D torus); the page gives no per-chip figure: 45 GB/s one-way per link ("How to Scale Your
    # Model", jax-ml.github.io/scaling-book, TPU chapter) -> 6 x 2 x 45 = 540 GB/s. DCN: as v5p.
    Chip("v4", "TPU v4", "v4", 3, 2, 275e12, 32 * GIB, 1200e9, 540e9, 6, 50e9 / 8,
         "cloud.google.com/tpu/docs/v4; ICI from the JAX scaling book"),
    # v5e: 197 TFLOP/s, 16 GB HBM2 at 819 GB/s, ICI 400 GB/s bidirectional per chip, 4 ports (2-D torus);
    # DCN 2 x 100 Gbps NICs per 8-chip host = 25 Gbps per chip (cloud.google.com/tpu/docs/v5e).
    Chip("v5e", "TPU v5 lite", "v5e", 2, 1, 197e12, 16 * GIB, 819e9, 400e9, 4, 25e9 / 8,
         "cloud.google.com/tpu/docs/v5e"),
    # v5p: 459 TFLOP/s, 95 GiB HBM2e at 2765 GB/s, ICI 1200 GB/s bidirectional per chip (3-D torus,
    # 6 ports), DCN 50 Gbps per chip (cloud.google.com/tpu/docs/v5p).
    Chip("v5p", "TPU v5", "v5", 3, 2, 459e12, 95 * GIB, 2765e9, 1200e9, 6, 50e9 / 8,
         "cloud.google.com/tpu/docs/v5p"),
    # v6e (Trillium): 918 TFLOP/s, 32 GB HBM at 1638 GB/s, ICI 800 GB/s bidirectional per chip, 4 ports
    # (2-D torus); DCN: the v5e host figure (cloud.google.com/tpu/docs/v6e).
    Chip("v6e", "TPU v6 lite", "v6e", 2, 1, 918e12, 32 * GIB, 1638e9, 800e9, 4, 25e9 / 8,
         "cloud.google.com/tpu/docs/v6e"),
)}

INSTALL_HINT = 'pip install -e ".[tpu]"   (or: pip install "jax[tpu]" matching your jax version)'


@dataclasses.dataclass(frozen=True)
class Slice:
  chip: Chip
  shape: tuple[int, ...]  # chips per torus dimension
  num_slices: int = 1

  @property
  def chips_per_slice(self) -> int:
    return math.prod(self.shape)

  @property
  def num_chips(self) -> int:
    return self.chips_per_slice * self.num_slices

  @property
  def topology_name(self) -> str:  # libtpu's name, e.g. "v5e:4x4"
    return f"{self.chip.topology_prefix}:{'x'.join(map(str, self.shape))}"

  @property
  def name(self) -> str:  # the accelerator type as users write it, e.g. "v5e-16", "v5p-32"
    base = f"{self.chip.name}-{self.chips_per_slice * self.chip.cores_per_chip}"
    return base if self.num_slices == 1 else f"{self.num_slices} x {base}"


def _pow2_shape(chips: int, dims: int) -> tuple[int, ...]:
  """Cloud TPU's standard shape for a power-of-two chip count: as even as possible, ascending; the
  3-D single host is 2x2x1."""
  if dims == 3 and chips == 4:
    return (2, 2, 1)
  shape = [1] * dims
  for i in range(int(math.log2(chips))):
    shape[i % dims] *= 2  # grow the dimensions in turn
  return tuple(sorted(shape))


def parse_slice(topology: str, topology_shape: str = "", num_slices: int = 1) -> Slice:
  """`v5e-16` (+ optional `4x4`, number of slices) -> Slice; clear errors for anything else."""
  m = re.fullmatch(r"\s*(v4|v5e|v5litepod|v5p|v6e)-(\d+)\s*", topology.lower())
  if not m:
    raise ValueError(f"--dry_run_topology={topology!r}: expected <generation>-<size> with generation one of "
                     f"{sorted(CHIPS)}, e.g. v5e-16, v4-32, v5p-64, v6e-8")
  chip = CHIPS["v5e" if m.group(1) == "v5litepod" else m.group(1)]
  size = int(m.group(2))
  if size % chip.cores_per_chip:
    raise ValueError(f"--dry_run_topology={topology!r}: {chip.name} sizes count TensorCores, 2 per chip, so "
                     f"the size must be even")
  chips = size // chip.cores_per_chip
  if num_slices < 1:
    raise ValueError(f"--dry_run_slices={num_slices}: expected >= 1")
  if topology_shape:
    try:
      shape = tuple(int(s) for s in topology_shape.lower().split("x"))
    except ValueError:
      shape = ()
    if len(shape) != chip.dims or min(shape) < 1:
      raise ValueError(f"--dry_run_topology_shape={topology_shape!r}: {chip.name} slices are {chip.dims}-D, "
                       f"expected {'AxB' if chip.dims == 2 else 'AxBxC'} chips")
    if math.prod(shape) != chips:
      raise ValueError(f"--dry_run_topology_shape={topology_shape!r} has {math.prod(shape)} chips, but "
                       f"{topology} has {chips}")
  else:
    if chips & (chips - 1):
      raise ValueError(f"--dry_run_topology={topology!r}: {chips} chips is not a power of two, so its shape "
                       f"is not standard; pass it with --dry_run_topology_shape "
                       f"({'AxB' if chip.dims == 2 else 'AxBxC'})")
    shape = _pow2_shape(chips, chip.dims)
  return Slice(chip, shape, num_slices)


def chip_for_device_kind(device_kind: str) -> Chip | None:
  for chip in CHIPS.values():
    if chip.device_kind.lower() == device_kind.strip().lower():
      return chip
  return None


@contextlib.contextmanager
def _captured_stderr():
  """Captures what C++ code writes to fd 2 (libtpu's start-up warnings) into a string list."""
  sys.stderr.flush()
  saved = os.dup(2)
  out: list[str] = []
  with tempfile.TemporaryFile(mode="w+b") as tmp:
    os.dup2(tmp.fileno(), 2)
    try:
      yield out
    finally:
      sys.stderr.flush()
      os.dup2(saved, 2)
      os.close(saved)
      tmp.seek(0)
      out.append(tmp.read().decode(errors="replace"))


# libtpu, when it starts outside a TPU VM, looks for the VM's metadata and warns that it cannot find
# TPU_ACCELERATOR_TYPE / TPU_WORKER_HOSTNAMES. Compile-only devices need neither: those lines are
# swallowed (and explained once), anything else libtpu prints is passed on.
_HARMLESS = re.compile(r"TPU_ACCELERATOR_TYPE|TPU_WORKER_HOSTNAMES|Logging before InitGoogle|host bounds|"
                       r"Source Location Trace|libtpu_init_utils|^\s*$|^===")


def compile_only_devices(sl: Slice, *, echo: bool = True) -> list:
  """The TPU devices of `sl` for ahead-of-time compilation (no TPU needed; libtpu must be installed).

  Multi-slice: `num_slices` copies of the slice, each device carrying its `slice_index` (the mesh puts
  the DCN axis over slices, vpt/core/sharding.py)."""
  import jax  # noqa: PLC0415
  from jax.experimental import topologies  # noqa: PLC0415
  from jax._src import xla_bridge  # noqa: PLC0415

  if xla_bridge.get_tpu_library_path() is None:
    raise RuntimeError(f"--dry_run_topology needs libtpu (the TPU compiler) installed: {INSTALL_HINT}")
  # libtpu takes /tmp/libtpu_lockfile so that one process owns the local chips; compile-only devices own
  # none, and without this a second dry run (or a test worker) fails while another process holds it.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  kwargs = dict(chip_config_name="megacore" if sl.chip.cores_per_chip == 2 else "default")
  if sl.num_slices > 1:
    kwargs["num_slices"] = sl.num_slices
  with _captured_stderr() as captured:
    try:
      devices = topologies.get_topology_desc(topology_name=sl.topology_name, platform="tpu", **kwargs).devices
    except Exception as e:  # noqa: BLE001  (libtpu raises its runtime errors)
      raise ValueError(f"libtpu rejected topology {sl.topology_name!r} ({sl.name}): {e}") from e
  text = captured[0] if captured else ""
  kept = [line for line in text.splitlines() if not _HARMLESS.search(line)]
  if kept:
    print("\n".join(kept), file=sys.stderr)
  if echo and text.strip() != "\n".join(kept).strip():
    print("(libtpu's warnings about TPU_ACCELERATOR_TYPE / TPU_WORKER_HOSTNAMES are hidden: they concern "
          "running on a TPU VM, not compiling for one)", file=sys.stderr)
  del jax
  if len(devices) != sl.num_chips:
    raise ValueError(f"libtpu gave {len(devices)} devices for {sl.name} ({sl.topology_name}), expected "
                     f"{sl.num_chips} chips")
  return list(devices)
