"""What every replication driver shares (experiments/toy_math, experiments/vision_scenes).

A sweep trains (arm, seed[, protocol]) runs and keeps one record per run in OUT/results.json, rewritten
after every run, so a sweep cut short keeps what it measured. `--resume` keeps the saved runs and trains
only the missing ones, but only under the settings they were measured with (`resume_from`). Tables report
mean ± std over seeds per arm and, against the baseline arm, paired differences (same seed: same data
order, initialisation and views), mean ± s.e. over seeds and how many seeds favour the arm.
"""

from __future__ import annotations

import json
import os

import numpy as np


def save_results(out: str, **fields) -> None:
  """OUT/results.json ← fields (written whole, then renamed: a crash mid-write keeps the previous file)."""
  path = os.path.join(out, "results.json")
  with open(path + ".tmp", "w") as f:
    json.dump(fields, f, indent=1, default=float)
  os.replace(path + ".tmp", path)


def resume_from(out: str, args, must_match) -> dict | None:
  """The saved results.json of a sweep to continue, or None if there is none. SystemExit naming every
  setting of `must_match` that differs from the saved run's (its runs would not be comparable)."""
  path = os.path.join(out, "results.json")
  if not os.path.exists(path):
    return None
  with open(path) as f:
    saved = json.load(f)
  differ = [k for k in must_match if saved["args"].get(k) != getattr(args, k)]
  if differ:
    raise SystemExit(f"--resume: {path} was measured with other settings: "
                     + ", ".join(f"--{k} {saved['args'].get(k)} (now {getattr(args, k)})" for k in differ))
  return saved


def mean_std(values, fmt: str = "{:.3f}") -> str:
  """'mean ± std' (sample std over seeds; 0 for one seed) of the finite values, '—' if there are none."""
  values = [v for v in values if v is not None and np.isfinite(v)]
  if not values:
    return "—"
  std = np.std(values, ddof=1) if len(values) > 1 else 0.0
  return f"{fmt.format(np.mean(values))} ± {fmt.replace('+', '').format(std)}"


def paired_difference(results, arm: str, key: str, baseline: str, *, protocol: str | None = None,
                      higher_is_better: bool = True):
  """(mean, s.e., seeds where the arm is better, seeds) of arm − baseline in final[key], paired by seed;
  None without a common seed. With higher_is_better=False the sign is flipped (positive = better)."""
  def by_seed(a):
    return {r["seed"]: r["final"].get(key) for r in results
            if r["arm"] == a and (protocol is None or r.get("protocol") == protocol)}
  base, other = by_seed(baseline), by_seed(arm)
  sign = 1.0 if higher_is_better else -1.0
  diffs = [sign * (other[s] - base[s]) for s in sorted(set(base) & set(other))
           if other[s] is not None and base[s] is not None]
  if not diffs:
    return None
  se = float(np.std(diffs, ddof=1) / np.sqrt(len(diffs))) if len(diffs) > 1 else float("nan")
  return float(np.mean(diffs)), se, sum(d > 0 for d in diffs), len(diffs)


def difference_cell(d, fmt: str = "{:+.3f}") -> str:
  """A paired_difference as a table cell: 'mean ± s.e. (better/seeds)'."""
  if d is None:
    return "—"
  return f"{fmt.format(d[0])} ± {fmt.replace('+', '').format(d[1])} ({d[2]}/{d[3]})"


def markdown_table(header, rows) -> list[str]:
  return ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"] + ["| " + " | ".join(r) + " |" for r in rows]
