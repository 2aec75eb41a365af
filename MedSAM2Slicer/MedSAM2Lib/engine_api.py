"""What the module logic asks of an engine, and the request objects it gets back.

Two engines fulfil it: `LocalEngine` / `RemoteEngine` (engine_process.py: the engine in a child
process, for an application's main thread) and `InProcessEngine` (engine_inprocess.py: a model
already loaded in this process, for scripts, tests and the Python console). Both have:

    engine.open(frames, memory, window=None, image_set=False) -> session   (returns at once)
    session.add_prompt(frame, obj_id, points=, labels=, box=, mask=) -> Request   (value: bool mask)
    session.set_prompts(frame, obj_id, prompts) -> Request    (replay: exactly these prompts there)
    session.propagate(direction, start=None, stop=None, axes=None) -> Request  (a stream of items)
    session.masks(obj_id=None) -> Request                       (value: the engine's masks volume)
    session.close(); session.alive; session.opened (the open's Request)
    engine.poll(budget_s) -> int      (never blocks: delivers what has arrived)
    engine.wait(request, timeout)     (blocks: scripts and tests only)
    engine.state, engine.generation, engine.close()
"""

from __future__ import annotations

from collections import deque
from typing import Callable


class Request:
    """One request to an engine. `done` turns True when its reply (or error) has arrived; a
    propagation is a stream whose finished frames collect in `items` as (frame, {obj_id: mask})."""

    def __init__(self, op: str, stream: bool = False, on_cancel: Callable[["Request"], None] | None = None):
        self.op, self.stream = op, stream
        self.done = False
        self.error: BaseException | None = None
        self.value = None
        self.items: deque = deque()
        self._on_cancel = on_cancel
        self.cancel_requested = False

    def cancel(self) -> None:
        """Ask the engine to stop this request (a propagation stops within one frame)."""
        if not self.done and not self.cancel_requested:
            self.cancel_requested = True
            if self._on_cancel is not None:
                self._on_cancel(self)

    def finish(self, value=None, error: BaseException | None = None) -> None:
        self.done, self.value, self.error = True, value, error

    def result(self):
        """The value once done; raises the request's error."""
        if self.error is not None:
            raise self.error
        return self.value
