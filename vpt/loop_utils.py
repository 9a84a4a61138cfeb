"""Pieces both training loops (vpt.train, vpt.train_vision) share: preemption and step timing."""

from __future__ import annotations

import signal
import time

import jax


class Preemption:
  """Turns SIGTERM (TPU/GCE preemption notice, `kill`) into a flag the loop polls between steps."""

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

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)

  def should_stop(self, step: int) -> bool:
    if jax.process_count() > 1:
      # All hosts must agree on the step at which they stop and save.
      from jax.experimental import multihost_utils
      return bool(multihost_utils.reached_preemption_sync_point(step)) or self.requested
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
