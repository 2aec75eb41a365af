"""A session's jobs: one prompt, or one propagation, from submission to its undo step.

A job is submitted (geometry checked on the main thread, returns at once), waits in its
session's queue, is started (its requests sent to the engine), then stepped by `poll()` on the
main thread: each step applies what the engine has sent so far, within a time budget, and never
waits. Nothing here runs on another thread.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import numpy as np

from medsam2.prompt import Prompt
from medsam2.tracking.refine import PropagationReport

from .actions import OBJ_ID, Action, AxisState
from .engine_api import CANCELLED, EngineSession, Request
from .segment_io import SegmentFrames

QUEUED, RUNNING, FINISHED = "queued", "running", "finished"


@dataclass(frozen=True)
class JobContext:
    """All a job may touch of its session: the axis's engine session, the segment, the undo stack."""

    engine_session: Callable[[AxisState], EngineSession]  # opened (prompts replayed) when needed
    segment: SegmentFrames
    record: Callable[[Action], None]  # the job's undo step


class Job:
    """Common lifecycle. `done`, `error`, `cancel()`, `progress` are what a shell reads."""

    kind = "job"
    written: list = []  # frames written by the last step (a propagation's; for progress callbacks)

    def __init__(self, context: JobContext, state: AxisState):
        self.context, self.state = context, state
        self.status = QUEUED
        self.error: BaseException | None = None
        self.action: Action | None = None
        self.cancelled = False
        self.discard = False   # the session is closing: apply nothing more
        self.requests: list[Request] = []
        self._handle: EngineSession | None = None

    @property
    def done(self) -> bool:
        return self.status == FINISHED

    @property
    def progress(self) -> tuple:
        """(done, total) in the job's own units (frames for a propagation)."""
        return (1, 1) if self.done else (0, 1)

    def cancel(self) -> None:
        """Stop the job: a queued one never starts; a running propagation stops within one frame
        and keeps the slices already finished (one undo step)."""
        self.cancelled = True
        if self.status == QUEUED:
            self.status = FINISHED  # its session drops it from the queue
        else:
            for request in self.requests:
                request.cancel()

    @property
    def settled(self) -> bool:
        """Every request sent has its reply (nothing more will arrive for this job)."""
        return all(r.done for r in self.requests)

    def start(self) -> None:
        """Send this job's requests (the engine session is opened and brought up to date first)."""
        self.status = RUNNING
        handle = self._handle = self.context.engine_session(self.state)
        for frame, prompts in self.state.replay():
            self.requests.append(handle.set_prompts(frame, OBJ_ID, prompts))
        self._send(handle)

    def _send(self, handle) -> None:
        raise NotImplementedError

    def _first_error(self):
        opened = self._handle.opened if self._handle is not None else None
        if opened is not None and opened.error is not None:
            return opened.error  # the root cause: every later request on it fails too
        return next((r.error for r in self.requests if r.error is not None), None)

    def step(self, deadline: float) -> bool:
        """Apply what has arrived; True once the job is finished (its undo step recorded)."""
        raise NotImplementedError

    def abandon(self, error: BaseException) -> bool:
        """Its results cannot be written (the segment was deleted, converted or regridded): the
        engine stops working for it, and the job ends with that error."""
        for request in self.requests:
            request.cancel()
        return self.finish(error)

    def finish(self, error: BaseException | None = None) -> bool:
        """The job is over (with `error` if it failed; a cancel the engine obeyed is no error)."""
        self.status = FINISHED
        if error is not None and not (self.cancelled and any(r.outcome == CANCELLED for r in self.requests)):
            self.error = error
        if self._handle is not None and self._handle.opened is not None and self._handle.opened.error is not None \
                and self.state.engine is self._handle:
            self.state.engine = None  # it never opened: the next job tries again
        return True


class PromptJob(Job):
    """One prompt on one frame: the engine returns that frame's mask, written into the segment."""

    def __init__(self, context: JobContext, state: AxisState, kind: str, prompt: Prompt, write_result: bool = True):
        super().__init__(context, state)
        self.kind, self.prompt, self.write_result = kind, prompt, write_result
        self.mask = None

    @property
    def frame(self) -> int:
        return self.prompt.frame

    def abandon(self, error: BaseException) -> bool:
        self.state.remove(self.prompt)  # never applied: the engine must forget it too
        return super().abandon(error)

    def _send(self, handle) -> None:
        self.state.add(self.prompt)
        self._request = handle.add_prompt(self.prompt)
        self.requests.append(self._request)

    def step(self, deadline: float) -> bool:
        if not self.settled:
            return False
        error = self._first_error()
        if error is not None or self.cancelled or self.discard:
            # refused, cancelled or abandoned: forget the prompt, and make the engine forget it too
            self.state.remove(self.prompt)
            return self.finish(error)
        self.mask = np.asarray(self._request.value, dtype=bool)  # unpacked here, where it is used
        self.action = Action(self.kind, self.state.layout.axis, prompt=self.prompt)
        if self.write_result:
            self.action.changes = self.context.segment.write(self.state.layout, {self.frame: self.mask})
        self.context.record(self.action)
        return self.finish()


class PropagationJob(Job):
    """Propagation along one axis: finished frames are written as they arrive, a batch per step."""

    kind = "propagation"

    def __init__(self, context: JobContext, state: AxisState, direction: str, start, stop, total: int,
                 steps_total: int | None = None, axes: str = "one"):
        super().__init__(context, state)
        self.axes = axes
        self.direction, self.start_frame, self.stop, self.total = direction, start, stop, total
        self.action = Action("propagation", state.layout.axis)
        self.done_frames = 0   # frames received (written or not)
        # progress in engine items: a fused run first reports its three single-axis runs
        self.steps = 0
        self.steps_total = steps_total or total
        self.written: list = []  # frames written by the last step (for progress callbacks)
        self.report = None       # the engine's PropagationReport: where and why each direction stopped
        self._cost = 0.002       # seconds to write one frame, learnt as frames are written

    @property
    def progress(self) -> tuple:
        return (min(self.steps, self.steps_total), self.steps_total)

    def _send(self, handle) -> None:
        axes = "all" if self.axes == "all" else None
        self._request = handle.propagate(self.direction, start=self.start_frame, stop=self.stop, axes=axes)
        self.requests.append(self._request)

    def step(self, deadline: float) -> bool:
        self.written = []
        items = self._request.items
        batch = {}
        # take as many finished frames as can be written before the deadline (at least one)
        while items and (not batch or time.monotonic() + self._cost * (len(batch) + 1) < deadline):
            frame, masks = items.popleft()
            self.steps += 1
            mask = masks.get(OBJ_ID)
            if mask is not None:
                batch[frame] = np.asarray(mask, dtype=bool)  # unpacked here, where it is written
                self.done_frames += 1
        if batch and not self.discard:
            began = time.monotonic()
            self.apply(batch)
            self._cost = 0.7 * self._cost + 0.3 * (time.monotonic() - began) / len(batch)
            self.written = sorted(batch)
        if items or not self.settled:
            return False
        value = self._request.value
        if isinstance(value, dict) and value.get("report"):
            self.report = PropagationReport.from_dict(value["report"])
        if not self.discard and self.action.changes:
            self.context.record(self.action)  # one undo step, even after a cancel
        return self.finish(self._first_error())

    def apply(self, masks: dict) -> list:
        """Write {frame: mask}. Prompted slices keep what their prompt gave (the engine re-yields
        them unchanged, and a hand-edited slice would come back at the model's coarser resolution)."""
        prompted = set(self.state.prompted_frames())
        writable = {f: m for f, m in masks.items() if f not in prompted}
        changed = self.context.segment.write(self.state.layout, writable) if writable else {}
        for frame, (old, new) in changed.items():
            previous = self.action.changes.get(frame)  # keep the oldest 'old' if written twice
            self.action.changes[frame] = (previous[0] if previous else old, new)
        return sorted(changed)
