"""Metric logging, progress display, throughput and model FLOPs utilisation (MFU).

* `MetricWriter`: scalars to TensorBoard (tensorboardX, no TensorFlow needed) and to an
  append-only `metrics.jsonl`, which is the durable record (flushed on every write).
* `ProgressBar`: a tqdm bar on a terminal, a compact periodic line in CI logs.
* `device_peak_flops` and `throughput_stats`: tokens (or images)/s, TFLOP/s per device and MFU, with a
  peak table for TPUs/GPUs and a measured, cached peak on CPU. A task counts its model's FLOPs
  (vpt.language.models.lm.flops_per_token, vpt.vision.dino.flops_per_image).
"""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import re
import socket
import sys
import time
from typing import Any, Mapping, TextIO

import numpy as np

from vpt.core import paths

# --------------------------------------------------------------------------------------
# Metric writer
# --------------------------------------------------------------------------------------

# JSON has no NaN/Infinity, and Python's json.dumps would emit the non-standard tokens
# that strict readers (jq, JavaScript, pandas with some engines) reject. Non-finite
# values are therefore written as these strings (which `float()` parses back), and
# `read_jsonl` turns them back into floats. Strings keep NaN and +/-inf apart, which
# null would not.
_STR_TO_NONFINITE = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}


def _to_float(value: Any, name: str) -> float:
  arr = np.asarray(value)  # also pulls jax arrays to the host.
  if arr.size != 1:
    raise ValueError(f"scalar {name!r} has shape {arr.shape}; expected a single value")
  return float(arr.reshape(()))


def _json_value(x: float) -> float | str:
  if math.isfinite(x):
    return x
  return "nan" if math.isnan(x) else ("inf" if x > 0 else "-inf")


class MetricWriter:
  """Writes scalars to `{workdir}/tb/` (TensorBoard) and `{workdir}/metrics.jsonl`.

  Each `write_scalars` call appends one JSON line `{"step": s, "train/loss": v, ...}`
  and flushes it, so a killed run keeps everything written so far. The TensorBoard
  file is written by tensorboardX's background thread and flushed every
  `tb_flush_secs`: a hard kill may lose that last window there, never in the JSONL.
  Non-finite values are written to the JSONL as the strings "nan", "inf", "-inf"
  (`read_jsonl` converts them back). A resumed run appends to the same files, so a
  step may appear twice; readers should keep the last line per step.
  With `enabled=False` (non-zero JAX processes) every method is a no-op and nothing
  is created on disk.
  """

  def __init__(self, workdir: str, *, enabled: bool = True, tb_flush_secs: float = 5.0):
    self.workdir = workdir
    self.enabled = enabled
    self._tb = None
    self._jsonl: paths.AppendFile | None = None
    self._text: paths.AppendFile | None = None
    if not enabled:
      return
    paths.makedirs(workdir)
    from tensorboardX import SummaryWriter  # imported lazily: only process 0 needs it.

    # tensorboardX writes gs:// and s3:// itself (google-cloud-storage / boto3) when given the URL.
    self._tb = SummaryWriter(logdir=os.fspath(paths.path(workdir) / "tb"), flush_secs=tb_flush_secs)
    self._jsonl = paths.AppendFile(self.jsonl_path)

  @property
  def jsonl_path(self) -> str:
    return os.fspath(paths.path(self.workdir) / "metrics.jsonl")

  def write_scalars(self, step: int, scalars: Mapping[str, Any], prefix: str = "") -> None:
    """Writes `scalars` at `step`; tags are `prefix/name` when a prefix is given."""
    if not self.enabled:
      return
    step = int(step)
    prefix = prefix.rstrip("/")
    values = {}
    for name, value in scalars.items():
      tag = f"{prefix}/{name}" if prefix else str(name)
      if tag == "step":
        raise ValueError("a metric may not be called 'step' without a prefix: it is the step key")
      values[tag] = _to_float(value, tag)
    record = {"step": step, **{k: _json_value(v) for k, v in values.items()}}
    # JSONL first: it is the durable record. allow_nan=False guarantees valid JSON.
    self._jsonl.write(json.dumps(record, allow_nan=False) + "\n")
    self._jsonl.flush()
    for tag, v in values.items():
      self._tb.add_scalar(tag, v, global_step=step)

  def write_text(self, step: int, name: str, text: str) -> None:
    """Writes a note (e.g. the resolved config) to TensorBoard and `{workdir}/text.jsonl`.

    Text goes to its own JSONL so that `metrics.jsonl` stays purely numeric.
    """
    if not self.enabled:
      return
    step = int(step)
    self._tb.add_text(name, text, global_step=step)
    if self._text is None:
      self._text = paths.AppendFile(paths.path(self.workdir) / "text.jsonl")
    self._text.write(json.dumps({"step": step, "name": name, "text": text}) + "\n")
    self._text.flush()

  def flush(self) -> None:
    if not self.enabled:
      return
    self._jsonl.flush()
    self._tb.flush()

  def close(self) -> None:
    """Flushes and closes all files; safe to call twice."""
    if self._tb is not None:
      self._tb.close()  # drains tensorboardX's queue before closing the file.
      self._tb = None
    for f in (self._jsonl, self._text):
      if f is not None:
        f.close()
    self._jsonl = self._text = None
    self.enabled = False

  def __enter__(self) -> MetricWriter:
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def read_jsonl(path: str, *, decode_nonfinite: bool = True) -> list[dict]:
  """Reads a JSONL file into a list of dicts, skipping blank and truncated lines.

  A run killed mid-write can leave a partial last line; it is dropped rather than
  failing the whole read. With `decode_nonfinite`, the strings "nan"/"inf"/"-inf"
  that `MetricWriter` writes for non-finite values become floats again.
  """
  rows = []
  lines = paths.path(path).read_text(encoding="utf-8").split("\n")
  for i, line in enumerate(lines):
    if not line.strip():
      continue
    try:
      row = json.loads(line)
    except json.JSONDecodeError:
      if i == len(lines) - 1:  # the unterminated last line of a killed run.
        continue
      raise
    if decode_nonfinite:
      row = {k: _STR_TO_NONFINITE.get(v, v) if isinstance(v, str) else v for k, v in row.items()}
    rows.append(row)
  return rows


# --------------------------------------------------------------------------------------
# Progress bar
# --------------------------------------------------------------------------------------


def _fmt_num(v: Any) -> str:
  """Short human form: 2.345, 12.3k, 1.25M; ints stay exact below 10k."""
  if isinstance(v, str):
    return v
  try:
    x = float(np.asarray(v))
  except (TypeError, ValueError):
    return str(v)
  if not math.isfinite(x):
    return str(x)
  if x == int(x) and abs(x) < 1e4:
    return str(int(x))
  for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
    if abs(x) >= scale:
      return f"{x / scale:.3g}{unit}"
  return f"{x:.4g}"


def _fmt_secs(s: float) -> str:
  if not math.isfinite(s):
    return "?"
  s = int(round(s))
  return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def _is_sized_terminal(stream: Any) -> bool:
  """A TTY that reports its size; tqdm prints nothing on a 0x0 pty (e.g. `docker -t`)."""
  try:
    if not stream.isatty():
      return False
    size = os.get_terminal_size(stream.fileno())
  except (AttributeError, OSError, ValueError):
    return False
  return size.columns > 0 and size.lines > 0


class ProgressBar:
  """Training progress: a tqdm bar on a terminal, periodic plain lines otherwise.

  `update(step, postfix)` takes the absolute step. On a terminal it drives a tqdm bar
  (tqdm's own ETA, smoothed, so the slow compile step washes out). When the output
  stream (stderr by default, like tqdm) is not a sized TTY (CI, `nohup`, redirected
  logs), carriage-return redraws would be one giant line, so instead a compact line is
  printed on the first update, then whenever `print_every` steps have passed since the
  last line (default: ~5% of the run, i.e. about 20 lines), and at the last step. Its
  ETA uses the rate since the first update, which excludes the compile step. `mode`
  forces "bar" or "lines".
  """

  def __init__(self, total_steps: int, initial_step: int = 0, enabled: bool = True, *,
               desc: str = "train", print_every: int | None = None,
               file: TextIO | None = None, mode: str | None = None):
    self.total_steps = int(total_steps)
    self.enabled = enabled
    self.desc = desc
    self._file = file if file is not None else sys.stderr  # tqdm's default stream.
    self._bar = None
    if mode is None:
      mode = "bar" if _is_sized_terminal(self._file) else "lines"
    if mode not in ("bar", "lines"):
      raise ValueError(f"mode={mode!r}: expected 'bar', 'lines' or None")
    self.mode = mode
    remaining = max(1, self.total_steps - int(initial_step))
    self.print_every = print_every or max(1, remaining // 20)
    self._last_printed: int | None = None
    self._t0: float | None = None
    self._step0 = int(initial_step)
    if enabled and mode == "bar":
      from tqdm import tqdm

      self._bar = tqdm(total=self.total_steps, initial=int(initial_step), desc=desc,
                       unit="step", file=self._file, dynamic_ncols=True)

  def update(self, step: int, postfix: Mapping[str, Any] | None = None) -> None:
    if not self.enabled:
      return
    step = int(step)
    post = {k: _fmt_num(v) for k, v in (postfix or {}).items()}
    if self._bar is not None:
      self._bar.set_postfix(post, refresh=False)
      if step >= self._bar.n:
        self._bar.update(step - self._bar.n)
      else:  # restarted from an earlier step; tqdm only counts forward.
        self._bar.n = step
        self._bar.refresh()
      return
    now = time.monotonic()
    if self._t0 is None:
      self._t0, self._step0 = now, step
    due = (self._last_printed is None or step - self._last_printed >= self.print_every
           or step >= self.total_steps)
    if not due:
      return
    self._last_printed = step
    elapsed = now - self._t0
    rate = (step - self._step0) / elapsed if elapsed > 0 else 0.0
    eta = (self.total_steps - step) / rate if rate > 0 else math.nan
    pct = 100.0 * step / self.total_steps if self.total_steps else 100.0
    parts = [f"{self.desc} step {step}/{self.total_steps} ({pct:.1f}%)"]
    parts += [f"{k}={v}" for k, v in post.items()]
    parts.append(f"| elapsed {_fmt_secs(elapsed)}, eta {_fmt_secs(eta)}")
    print(" ".join(parts), file=self._file, flush=True)

  def close(self) -> None:
    if self._bar is not None:
      self._bar.close()
      self._bar = None
    self.enabled = False


# --------------------------------------------------------------------------------------
# Peak FLOP/s per device
# --------------------------------------------------------------------------------------

# Dense (no 2:4 sparsity) peak FLOP/s per JAX device. On TPU v4 and later a JAX device
# is a chip (megacore); on v2/v3 it is one of the chip's two TensorCores.
# "float32" is what an f32 matmul runs at under JAX's default matmul precision:
#  * TPU: single-pass bf16, so the bf16 peak (precision=HIGHEST is several times slower).
#  * NVIDIA Ampere and later: TF32 tensor cores, about half the bf16 peak
#    (precision=HIGHEST uses the far lower non-tensor-core FP32 peak, e.g. A100 19.5T,
#    H100 SXM 67T).
# Sources: cloud.google.com/tpu/docs/{v2,v3,v4,v5e,v5p,v6e}; NVIDIA A100/H100/H200/L4
# datasheets (sparsity figures halved).
from vpt.core import tpu as _tpu  # noqa: E402  (no JAX at import)

PEAK_FLOPS_PER_DEVICE: dict[str, dict[str, float]] = {
    "TPU v2": {"bfloat16": 22.5e12, "float32": 22.5e12},  # per core (45T per chip).
    "TPU v3": {"bfloat16": 61.5e12, "float32": 61.5e12},  # per core (123T per chip).
    # TPU v4 and later: the chip table of vpt/core/tpu.py (peak bf16, HBM, ICI; one table, with sources).
    **{f"TPU {c.name}": {"bfloat16": c.peak_bf16_flops, "float32": c.peak_bf16_flops} for c in _tpu.CHIPS.values()},
    "A100": {"bfloat16": 312e12, "float16": 312e12, "float32": 156e12},
    "H100 SXM": {"bfloat16": 989.4e12, "float16": 989.4e12, "float32": 494.7e12},
    "H100 PCIe": {"bfloat16": 756e12, "float16": 756e12, "float32": 378e12},
    "H100 NVL": {"bfloat16": 835.5e12, "float16": 835.5e12, "float32": 417.5e12},
    "H200": {"bfloat16": 989.4e12, "float16": 989.4e12, "float32": 494.7e12},
    "H200 NVL": {"bfloat16": 835.5e12, "float16": 835.5e12, "float32": 417.5e12},
    "GH200": {"bfloat16": 989.4e12, "float16": 989.4e12, "float32": 494.7e12},
    "L4": {"bfloat16": 121e12, "float16": 121e12, "float32": 60e12},
}

# `device_kind` (lower-cased) -> table key; first match wins, so specific patterns
# come first. Real strings: "TPU v4", "TPU v5 lite" (v5e), "TPU v5" (v5p),
# "TPU v6 lite" (v6e), "NVIDIA H100 80GB HBM3" (SXM), "NVIDIA H100 PCIe",
# "NVIDIA A100-SXM4-40GB", "NVIDIA A100 80GB PCIe", "NVIDIA L4".
_DEVICE_KIND_PATTERNS: list[tuple[str, str]] = [
    (r"^tpu v2\b", "TPU v2"),
    (r"^tpu v3\b", "TPU v3"),
    (r"^tpu v4$", "TPU v4"),
    (r"^tpu v5 ?(lite|e)$", "TPU v5e"),
    (r"^tpu v5p?$", "TPU v5p"),
    (r"^tpu v6 ?(lite|e)$", "TPU v6e"),
    (r"\bgh200\b", "GH200"),
    (r"\bh200\b.*\bnvl\b", "H200 NVL"),
    (r"\bh200\b", "H200"),
    (r"\bh100\b.*\bpcie\b", "H100 PCIe"),
    (r"\bh100\b.*\bnvl\b", "H100 NVL"),
    (r"\bh100\b", "H100 SXM"),
    (r"\ba100\b", "A100"),
    (r"\bl4\b", "L4"),  # \b keeps "L40S" out.
]


def _dtype_name(dtype: Any) -> str:
  name = np.dtype(dtype).name if not isinstance(dtype, str) else dtype
  name = {"bf16": "bfloat16", "f32": "float32", "fp32": "float32", "f16": "float16",
          "fp16": "float16", "half": "float16", "float": "float32"}.get(name, name)
  if name not in ("bfloat16", "float16", "float32"):
    raise ValueError(f"dtype {dtype!r}: expected bfloat16, float16 or float32")
  return name


def peak_flops_for_device_kind(device_kind: str,
                               dtype: Any = "bfloat16") -> tuple[float, str] | None:
  """Table lookup by `jax.Device.device_kind`; None if the kind is not known."""
  kind = device_kind.strip().lower()
  dtype = _dtype_name(dtype)
  for pattern, key in _DEVICE_KIND_PATTERNS:
    if re.search(pattern, kind):
      entry = PEAK_FLOPS_PER_DEVICE[key]
      # float16 on TPU has no native path; it runs at the bf16 rate at best.
      peak = entry.get(dtype, entry["bfloat16"])
      return peak, f"table: {key} dense {dtype} peak {peak / 1e12:g} TFLOP/s ({device_kind!r})"
  return None


def device_peak_flops(device: Any = None, dtype: Any = "bfloat16") -> tuple[float, str]:
  """(peak FLOP/s per device, description of where it came from).

  `device` is a `jax.Device`, a `device_kind` string, or None for `jax.devices()[0]`.
  Accelerators come from `PEAK_FLOPS_PER_DEVICE`. CPU devices get the host's measured
  f32 matmul peak (`cpu_peak_flops`, whatever `dtype`) divided by the number of local
  CPU devices: with `--xla_force_host_platform_device_count=8` the simulated devices
  share the same cores, so MFU on CPU is relative to the whole host's peak, and
  `peak_per_device * num_devices` is that host peak. Unknown accelerators give NaN
  (MFU then logs as NaN instead of crashing the run).
  """
  import jax

  if device is None:
    device = jax.devices()[0]
  if isinstance(device, str):
    kind, platform_name = device, ("cpu" if device.lower() == "cpu" else "")
  else:
    kind, platform_name = device.device_kind, device.platform
  if platform_name == "cpu":
    host_peak, source = cpu_peak_flops()
    n_local = max(1, len(jax.local_devices(backend="cpu")))
    return host_peak / n_local, f"{source}, split over {n_local} local CPU device(s)"
  found = peak_flops_for_device_kind(kind, dtype)
  if found is not None:
    return found
  logging.warning("No peak FLOP/s known for device kind %r; MFU will be NaN.", kind)
  return math.nan, f"unknown device kind {kind!r}"


# --------------------------------------------------------------------------------------
# Measured CPU peak
# --------------------------------------------------------------------------------------

CPU_PEAK_ENV = "VPT_CPU_PEAK_FLOPS"
_cpu_peak_memo: dict[str, tuple[float, str]] = {}


def measure_cpu_matmul_peak(n: int = 2048, repeats: int = 5, dtype: Any = "float32") -> float:
  """FLOP/s of a jitted n x n @ n x n matmul on the first CPU device (fastest of `repeats`).

  One device only: simulated host devices share the same cores and XLA:CPU already
  spreads one large matmul over the host's thread pool, so this is the whole host's
  matmul peak. Two warm-up calls (compile, then caches/thread pool) are not timed.
  A peak is the best the host achieves, so the fastest run is taken: load from other
  processes only ever slows runs down. Sustained load can still lower it; measure on an
  idle host or set `VPT_CPU_PEAK_FLOPS`.
  """
  import jax
  import jax.numpy as jnp

  dev = jax.devices("cpu")[0]
  key_a, key_b = jax.random.split(jax.random.key(0))
  a = jax.device_put(jax.random.normal(key_a, (n, n), dtype=jnp.dtype(dtype)), dev)
  b = jax.device_put(jax.random.normal(key_b, (n, n), dtype=jnp.dtype(dtype)), dev)
  matmul = jax.jit(jnp.matmul)
  for _ in range(2):
    matmul(a, b).block_until_ready()
  times = []
  for _ in range(max(1, repeats)):
    t = time.perf_counter()
    matmul(a, b).block_until_ready()
    times.append(time.perf_counter() - t)
  return 2.0 * n**3 / min(times)


def _cpu_model() -> str:
  try:
    with open("/proc/cpuinfo", encoding="utf-8") as f:
      for line in f:
        if line.lower().startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def _usable_cpus() -> int:
  try:
    return len(os.sched_getaffinity(0))  # respects taskset / container CPU sets.
  except AttributeError:
    return os.cpu_count() or 1


def default_cache_dir() -> str:
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.environ.get("VPT_CACHE_DIR") or os.path.join(base, "vpt")


def cpu_peak_flops(*, cache_path: str | None = None, n: int = 2048,
                   repeats: int = 5) -> tuple[float, str]:
  """The host's f32 matmul peak FLOP/s, measured once and cached.

  Order: env `VPT_CPU_PEAK_FLOPS` (FLOP/s for the whole host) > this process's memo >
  the JSON cache (`cache_path`, default `$VPT_CACHE_DIR` or `$XDG_CACHE_HOME/vpt` or
  `~/.cache/vpt`, file `cpu_peak.json`; keyed by hostname, CPU model, usable
  CPU count and jax version, since each changes the answer) > a fresh measurement,
  which is then stored. The cache is replaced atomically, so concurrent processes can
  at worst both measure.
  """
  override = os.environ.get(CPU_PEAK_ENV)
  if override:
    try:
      peak = float(override)
    except ValueError:
      raise ValueError(f"{CPU_PEAK_ENV}={override!r}: expected FLOP/s, e.g. 1.5e11") from None
    if not (peak > 0 and math.isfinite(peak)):
      raise ValueError(f"{CPU_PEAK_ENV}={override!r}: expected a positive finite FLOP/s")
    return peak, f"{CPU_PEAK_ENV}={peak / 1e9:g} GFLOP/s"
  import jax

  path = cache_path or os.path.join(default_cache_dir(), "cpu_peak.json")
  key = f"{socket.gethostname()}|{_cpu_model()}|cpus={_usable_cpus()}|jax={jax.__version__}|float32"
  memo_key = f"{path}|{key}"
  if memo_key in _cpu_peak_memo:
    return _cpu_peak_memo[memo_key]
  cache: dict = {}
  try:
    with open(path, encoding="utf-8") as f:
      cache = json.load(f)
  except (OSError, ValueError):
    cache = {}
  entry = cache.get(key) if isinstance(cache, dict) else None
  if isinstance(entry, dict) and entry.get("flops", 0) > 0:
    result = (float(entry["flops"]),
              f"measured CPU f32 matmul peak {entry['flops'] / 1e9:.1f} GFLOP/s "
              f"(n={entry.get('n')}, cached in {path})")
  else:
    flops = measure_cpu_matmul_peak(n=n, repeats=repeats)
    cache = cache if isinstance(cache, dict) else {}
    cache[key] = {"flops": flops, "n": n, "repeats": repeats, "measured_at": time.time()}
    try:
      os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
      tmp = f"{path}.{os.getpid()}.tmp"
      with open(tmp, "w", encoding="utf-8") as f:
        json.dump(cache, f, indent=1)
      os.replace(tmp, path)
    except OSError as e:  # a read-only home must not stop training.
      logging.warning("Could not cache the CPU peak in %s: %s", path, e)
    result = (flops, f"measured CPU f32 matmul peak {flops / 1e9:.1f} GFLOP/s (n={n})")
  _cpu_peak_memo[memo_key] = result
  return result


# --------------------------------------------------------------------------------------
# Throughput and MFU
# --------------------------------------------------------------------------------------


def throughput_stats(*, steps: float, seconds: float, tokens: float, flops_per_token: float,
                     num_devices: int, peak_flops_per_device: float) -> dict[str, float]:
  """Rates over a window of `steps` steps that processed `tokens` tokens in `seconds`.

  MFU = (flops_per_token * tokens / seconds) / (peak_flops_per_device * num_devices).
  """
  nan = math.nan
  tokens_per_sec = tokens / seconds if seconds > 0 else nan
  model_flops_per_sec = flops_per_token * tokens_per_sec
  peak_total = peak_flops_per_device * num_devices
  return {
      "steps_per_sec": steps / seconds if seconds > 0 else nan,
      "step_time_s": seconds / steps if steps > 0 else nan,
      "tokens_per_sec": tokens_per_sec,
      "tflops_per_device": model_flops_per_sec / num_devices / 1e12,
      "mfu": model_flops_per_sec / peak_total if peak_total > 0 else nan,
  }
