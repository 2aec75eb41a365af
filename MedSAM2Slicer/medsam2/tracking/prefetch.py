"""Encoding frames ahead of tracking, on a background thread.

The image encoder does not depend on memory, so frame n+1 can be encoded while frame n is being
tracked. On a 2-core CPU this fills the cores that the tracking step's many small operations leave
idle; on a GPU the frames are encoded in batches. Results are unchanged: every frame is encoded by
the same network with the same number of intra-op threads, only earlier (tested bit for bit).
The prefetcher stays at most `lookahead` frames ahead, so it adds a bounded amount of memory.
"""

from __future__ import annotations

import contextlib
import threading

import torch


class FramePrefetcher:
    def __init__(self, predictor, frames, cache, device, order, lookahead=2, batch_size=1, autocast=None):
        self._predictor = predictor
        self._frames = frames
        self._cache = cache
        self._device = device
        self._order = list(order)
        self._lookahead = max(1, int(lookahead))
        self._batch = max(1, int(batch_size))
        self._autocast = autocast or contextlib.nullcontext
        self._position = 0  # index in `order` of the frame the tracker is on
        self._in_progress: set[int] = set()
        self._cond = threading.Condition()
        self._stop = False
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="medsam2-prefetch", daemon=True)
        self._thread.start()

    def advance(self, position: int) -> None:
        """The tracker moved to `order[position]`: the prefetcher may run further ahead."""
        with self._cond:
            self._position = position
            self._cond.notify_all()

    def wait_for(self, frame: int) -> None:
        """Block while `frame` is being encoded here, so the tracker never encodes it twice."""
        with self._cond:
            while frame in self._in_progress:
                self._cond.wait()

    def stop(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        self._thread.join()

    def _run(self) -> None:
        try:
            i = 0
            while i < len(self._order):
                with self._cond:
                    while not self._stop and i > self._position + self._lookahead:
                        self._cond.wait()
                    if self._stop:
                        return
                    # the tracker encodes the frame it is on itself if it got there first:
                    # only frames strictly ahead of it are ours, so none is encoded twice
                    i = max(i, self._position + 1)
                    if i >= len(self._order):
                        return
                    chunk = [f for f in self._order[i:i + self._batch] if f not in self._cache]
                    self._in_progress.update(chunk)
                i += self._batch
                if chunk:
                    try:
                        self._encode(chunk)
                    finally:
                        with self._cond:
                            self._in_progress.difference_update(chunk)
                            self._cond.notify_all()
        except BaseException as exc:  # the tracker encodes the frame itself; keep the cause for tests
            self.error = exc

    @torch.inference_mode()
    def _encode(self, chunk) -> None:
        images = torch.stack([self._frames[f] for f in chunk]).to(self._device).float()
        with self._autocast():
            out = self._predictor.forward_image(images)
        for j, f in enumerate(chunk):
            self._cache.put(f, {"backbone_fpn": [t[j:j + 1] for t in out["backbone_fpn"]],
                                "vision_pos_enc": [p[j:j + 1] for p in out["vision_pos_enc"]]})
