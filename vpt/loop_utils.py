"""Pieces both training loops (vpt.train, vpt.train_vision) share: preemption and step timing."""

from __future__ import annotations

import signal
import time

import jax
import numpy as np


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
