"""The device lock: one engine job at a time, granted in arrival order."""

from __future__ import annotations

import collections
import contextlib
import threading


class FairLock:
    """A lock granted in arrival order (threading.Lock is not), with a cancellable wait.

    Two clients propagating at once are served one after the other, and a waiter whose client
    has gone away leaves the queue instead of holding the GPU for nobody.
    """

    def __init__(self):
        self._cond = threading.Condition()
        self._queue = collections.deque()
        self._held = False

    def acquire(self, cancel: threading.Event | None = None, poll: float = 0.1) -> bool:
        me = object()
        with self._cond:
            self._queue.append(me)
            try:
                while self._held or self._queue[0] is not me:
                    if cancel is not None and cancel.is_set():
                        return False
                    self._cond.wait(poll if cancel is not None else None)
                self._held = True
                return True
            finally:
                self._queue.remove(me)
                self._cond.notify_all()

    def release(self) -> None:
        with self._cond:
            self._held = False
            self._cond.notify_all()

    def locked(self) -> bool:
        with self._cond:
            return self._held

    def waiting(self) -> int:
        with self._cond:
            return len(self._queue)

    @contextlib.contextmanager
    def hold(self):
        self.acquire()
        try:
            yield
        finally:
            self.release()
