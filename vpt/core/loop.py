"""The training loop every task runs: its steps, periodic logs and evaluations, checkpoints, and
preemption. A task (vpt.language.train for language, vpt.vision.train for vision) builds the state, the
feeds and the step programs, restores with `restore_run`, hands them to `run_loop`, and prints its
`summary_table` with `print_summary`.

Invariants:
- At most one save per step: a periodic one (every `checkpoint_every` steps), the last step's, or a
  stop's — a preemption notice seen by any host, or `stop_after` (a time-sliced schedule or a test).
  A stopped run's checkpoint is at the step it stopped after; the next run resumes there.
- Every host asks `Preemption.should_stop` at every step (a collective), so all hosts stop at the same
  step.
- Timing (`StepTimer`) excludes the first call of each step program (its compile), logging, evals and
  saves; meta steps are also timed alone for `meta_time_fraction`.
- The loop itself adds nothing to the state: the state after step s is a function of the checkpoint
  at s and the feeds' checkpointed positions, so a resumed run equals an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import signal
import time
from typing import Any, Callable, Hashable

import jax
import numpy as np

from vpt.core import metrics as metrics_lib, paths, run_dir


class Preemption:
  """Turns SIGTERM (TPU/GCE preemption notice, `kill`) into a flag the loop polls between steps.

  Multi-host: every host must stop (and save, a collective) at the same step, or one host enters
  the save while another enters the next train step and both wait forever. A signal reaches the
  hosts at different times, so `should_stop` all-gathers the local flags (a one-int collective,
  called by every host at every step) and all hosts stop at the first step where any host has
  seen the signal.

  The first SIGTERM restores the default action: a second one ends the process at once, even
  while it is blocked in a collective or a save (checkpoints are written atomically, so nothing
  half-written is ever restored).
  """

  def __init__(self):
    self.requested = False
    self._previous = None

  def __enter__(self):
    try:
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # not in the main thread (e.g. a notebook worker): no handler.
      self._previous = None
    return self

  def _handle(self, signum, frame):
    del signum, frame
    self.requested = True
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM terminates.

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)

  def should_stop(self, step: int) -> bool:
    """Whether to save and stop after `step`; the same answer on every host (call it on all hosts)."""
    del step  # every host calls this once per step, so the collectives pair up by call order.
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      flags = multihost_utils.process_allgather(np.asarray(self.requested, np.int32))
      return bool(np.any(flags))
    return self.requested


class StepTimer:
  """Wall time spent in training steps only: evals and checkpoint saves are paused out.

  JAX dispatches asynchronously, so pausing blocks on a result of the steps timed so far.
  """

  def __init__(self):
    self.steps, self.seconds, self._since = 0, 0.0, None
    self.meta_steps, self.meta_seconds = 0, 0.0

  def meta_fraction(self) -> float:
    """Share of training time spent on meta work: meta steps' time beyond a regular step's."""
    regular = (self.seconds - self.meta_seconds) / (self.steps - self.meta_steps)
    return max(0.0, self.meta_seconds - self.meta_steps * regular) / self.seconds

  def resume(self):
    self._since = time.perf_counter()

  def step(self, train_step, state, *args, meta: bool, first: bool):
    """`train_step(state, *args)`, timed: meta steps also alone (two syncs per meta period, for
    meta_fraction). A `first` call includes compilation: the clock stops around it and it is not
    counted."""
    if first:
      self.pause(block_on=state.step)
    elif meta:
      jax.block_until_ready(state.step)
      meta_start = time.perf_counter()
    state, metrics = train_step(state, *args)
    if meta:
      jax.block_until_ready(metrics)
      self.meta_steps += 1
      self.meta_seconds += time.perf_counter() - meta_start
    if first:
      jax.block_until_ready(metrics)
      self.resume()
    else:
      self.steps += 1
    return state, metrics

  def pause(self, block_on=None):
    if self._since is not None:
      if block_on is not None:
        jax.block_until_ready(block_on)
      self.seconds += time.perf_counter() - self._since
      self._since = None


@dataclasses.dataclass(frozen=True)
class Schedule:
  num_steps: int
  log_every: int
  eval_every: int
  checkpoint_every: int
  stop_after: int | None = None  # stop (and save) after this step, as a preemption would


@dataclasses.dataclass
class StepCall:
  """One step as the task wants it run: `program(state, *args)`. `key` names the program (its first
  call compiles it, and is not timed); `meta`: whether it takes a meta step (timed alone)."""
  key: Hashable
  program: Callable
  args: tuple
  meta: bool


@dataclasses.dataclass
class LoopResult:
  state: Any
  step: int
  preempted: bool  # stopped before num_steps (a preemption notice or stop_after)
  last_train: dict[str, float]
  last_eval: dict[str, float] | None
  timer: StepTimer


def run_loop(state, start_step: int, schedule: Schedule, *, next_step: Callable[[int], StepCall],
             evaluate: Callable[[Any, int], dict[str, float] | None], rates: Callable[[int, float], dict],
             progress_fields: Callable[[dict], dict], checkpointer, iterators: dict, writer,
             show_progress: bool) -> LoopResult:
  """Runs steps start_step … num_steps − 1 (or to stop_after) and returns where it ended.

  next_step(step) -> StepCall: the program and arguments of `step` (the task's feeds advance here).
  evaluate(state, step) -> metrics or None: called every `eval_every` steps and at the last step.
  rates(steps, seconds) -> throughput metrics; progress_fields(train metrics) -> what the bar shows.
  """
  progress = metrics_lib.ProgressBar(schedule.num_steps, start_step, enabled=show_progress,
                                     print_every=schedule.log_every)  # logs: a line per logged step
  end = schedule.num_steps if schedule.stop_after is None else min(schedule.num_steps, schedule.stop_after)
  timer, compiled = StepTimer(), set()
  logged_steps, logged_seconds = 0, 0.0
  last_train, last_eval = {}, None
  step = start_step
  with Preemption() as preemption:
    while step < end:
      call = next_step(step)
      first = call.key not in compiled  # this call compiles its program: not timed
      compiled.add(call.key)
      state, metrics = timer.step(call.program, state, *call.args, meta=call.meta and not first, first=first)
      step += 1
      last = step == schedule.num_steps

      if step % schedule.log_every == 0 or last:
        host = {k: float(v) for k, v in jax.device_get(metrics).items()}
        timer.pause()
        if timer.steps > logged_steps:
          host.update(rates(timer.steps - logged_steps, timer.seconds - logged_seconds))
          logged_steps, logged_seconds = timer.steps, timer.seconds
          if timer.meta_steps and timer.steps > timer.meta_steps:
            host["meta_time_fraction"] = timer.meta_fraction()
        writer.write_scalars(step, host, prefix="train")
        last_train = host
        progress.update(step, progress_fields(host))
        timer.resume()

      if step % schedule.eval_every == 0 or last:
        timer.pause(state)
        result = evaluate(state, step)
        if result is not None:
          last_eval = result
          writer.write_scalars(step, result, prefix="eval")
        timer.resume()

      # Every host asks every step (a collective); one save per step, preempted, stopped or periodic.
      preempted = preemption.should_stop(step) and not last
      if preempted:
        print(f"Preemption notice (on this or another host): saving at step {step} and exiting.", flush=True)
      stop = preempted or step == end < schedule.num_steps
      if stop or step % schedule.checkpoint_every == 0 or last:
        timer.pause(state)
        checkpointer.save(step, state, iterators, force=True)
        timer.resume()
      if stop:
        break
  timer.pause(state)
  progress.close()
  return LoopResult(state=state, step=step, preempted=step < schedule.num_steps, last_train=last_train,
                    last_eval=last_eval, timer=timer)


def print_summary(summary: dict, table: str) -> None:
  """The end of a run on the screen: the task's table, the MFU and, if it stopped early, how to go on."""
  print(table, flush=True)
  if summary.get("throughput"):
    print(f"  MFU {100 * summary['throughput']['mfu']:.1f}% of {summary['peak_source']}", flush=True)
  if summary["preempted"]:
    print("  stopped early: resume by re-running the same command", flush=True)


def restore_run(checkpointer, abstract_state: Any, iterators: dict[str, Any], config,
                workdir: str) -> tuple[Any, int] | tuple[None, None]:
  """checkpointer.restore_latest under config.checkpoint.on_mismatch; a mismatch error names the config
  keys changed since the run's newest config file."""
  source, changes = run_dir.config_changes(config, workdir)
  note = ""
  if changes:
    shown = "\n  ".join(changes[:20]) + (f"\n  … and {len(changes) - 20} more" if len(changes) > 20 else "")
    note = f"Config keys changed since {paths.path(workdir) / source}:\n  {shown}"
  return checkpointer.restore_latest(abstract_state, iterators, config_note=note,
                                     on_mismatch=config.checkpoint.get("on_mismatch", "error"))


def _cell(section: dict | None, key: str, fmt: str) -> str:
  section = section or {}
  if key not in section:
    return "—"
  se = section.get(f"{key}_se")
  return fmt.format(section[key]) + (f" ± {se:.3f}" if se is not None else "")


def summary_table(summaries: dict[str, dict], summary_rows) -> str:
  """A text table with one column per run (e.g. V-Pretraining beside the NTP baseline); one row per
  (label, section, key, format) of `summary_rows` that some run has."""
  names = list(summaries)
  rows = [("steps", *[str(s["step"]) for s in summaries.values()])]
  for label, section, key, fmt in summary_rows:
    cells = [_cell(s.get(section), key, fmt) for s in summaries.values()]
    if any(c != "—" for c in cells):
      rows.append((label, *cells))
  widths = [max(len(r[i]) for r in rows + [("", *names)]) for i in range(len(names) + 1)]
  lines = ["  ".join(c.ljust(w) for c, w in zip(("", *names), widths))]
  lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
  return "\n".join("  " + line.rstrip() for line in lines)
