"""One persistent worker thread and the mailbox the main thread empties.

The GUI calls `submit(fn, on_done, on_error)`; fn(emit) runs on the worker, in order, one at a
time, and may call emit(item) any number of times. Nothing comes back by itself: the main thread
calls `drain()` (a short QTimer in the module), which runs on_item(item), on_done(result) and
on_error(exc) there. So the worker never touches a node or a widget, and a single thread keeps
every engine call in order (the engine's per-thread caches stay warm).
"""

import queue
import threading
import traceback


class Task:
    def __init__(self, fn, on_done=None, on_error=None, on_item=None, name=""):
        self.fn, self.on_done, self.on_error, self.on_item, self.name = fn, on_done, on_error, on_item, name
        self.cancel = threading.Event()


class Worker:
    def __init__(self, name="MedSAM2 worker"):
        self._tasks = queue.Queue()
        self._outbox = queue.Queue()
        self._busy = 0  # submitted and not yet reported back (main-thread counter)
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    @property
    def busy(self):
        return self._busy > 0

    @property
    def thread(self):
        return self._thread

    def submit(self, fn, on_done=None, on_error=None, on_item=None, name=""):
        """Queue fn(emit, cancel) for the worker; returns the Task (task.cancel is its Event)."""
        task = Task(fn, on_done, on_error, on_item, name)
        self._busy += 1
        self._tasks.put(task)
        return task

    def _loop(self):
        while True:
            task = self._tasks.get()
            if task is None:
                return
            try:
                result = task.fn(lambda item, _t=task: self._outbox.put(("item", _t, item)), task.cancel)
            except BaseException as exc:  # report everything; the thread must survive
                exc.medsam2_traceback = traceback.format_exc()
                self._outbox.put(("error", task, exc))
            else:
                self._outbox.put(("done", task, result))

    def drain(self, max_items=None):
        """Main thread: deliver what the worker produced since the last call. Returns the count."""
        n = 0
        while max_items is None or n < max_items:
            try:
                kind, task, payload = self._outbox.get_nowait()
            except queue.Empty:
                break
            n += 1
            if kind == "item":
                if task.on_item is not None:
                    task.on_item(payload)
                continue
            self._busy -= 1
            callback = task.on_done if kind == "done" else task.on_error
            if callback is not None:
                callback(payload)
        return n

    def pending_items(self):
        """Items waiting for drain (to batch frame writes)."""
        return self._outbox.qsize()

    def stop(self, timeout=5.0):
        """Ask the thread to finish after its current task (tasks already queued still run)."""
        self._tasks.put(None)
        self._thread.join(timeout)
