"""The web shell: one trame server, one Slicer scene, the page and its handlers.

Wiring only. The scene work is in scene.py, the views and prompt tools in views.py, the page in
page.py, everything MedSAM2 does in segmenter.py (the one module that talks to MedSAM2Lib). A
periodic task on the server's event loop calls `Segmenter.poll()` every 40 ms, as the Slicer
module's timer does, and copies progress and undo state to the page.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import os

from medsam2.errors import MedSAM2Error
from medsam2.masks import pack_mask

from MedSAM2Lib.shortcuts import SHORTCUTS, browser_key
from medsam2.options import MIN_CONFIDENCE
from MedSAM2Lib.view_watch import SliceViewWatch

from . import page, scene, views
from .segmenter import ModelSettings, Segmenter

log = logging.getLogger(__name__)
POLL_INTERVAL_S = 0.04
BUSY_INTERVAL_S = 0.005
DEFAULT_LAYOUT = "Red slice only"
RANGE_FROM_VIEW = 10  # "From view": this many slices either side of the Red view's slice
# the page's keys: the module's one shortcut table (as the browser names keys), and slice movement
KEYS = {browser_key(key): (action, arg) for key, action, arg, _ in SHORTCUTS}
FIRST_TOOL = "include"  # active when a volume opens: the first click in a view is a prompt
NO_TOOL_TEXT = ("No prompt tool is active: choose Include point (I), Exclude point (X) or Box (O), then click "
                "or drag in the slice view.")
NO_UNCERTAIN = "No uncertain slices"


class WebApp:
    def __init__(self, server, settings: ModelSettings, output_path: str, memory: str = "self-sorting"):
        from trame_slicer import module as trame_slicer_module
        from trame_slicer.core import LayoutManager, SlicerApp

        self.server, self.state = server, server.state
        server.enable_module(trame_slicer_module)
        self.segmenter = Segmenter(settings, memory, on_error=self.show_error, on_message=self.show_message)
        self.segmenter.start()
        self.tools = views.PromptTools(self.place_point, self.place_box,
                                       on_idle_click=lambda: self.show_message(NO_TOOL_TEXT))
        self.slicer = SlicerApp()  # sets VTK's output window: the views' messages are held after it
        with views.quiet_resize_event_deprecation():
            views.register_views(self.slicer.view_manager, server)
            self.layouts = LayoutManager(self.slicer.scene, self.slicer.view_manager, server)
            self.layouts.register_layout_dict(views.layouts())
            for view in self.slicer.view_manager.get_slice_views():
                view.modified.connect(self._show_slice_number)
                # a slice view draws images: trame-slicer's 8x multisampling changes nothing visible but
                # multiplies the cost of each redraw in Mesa's software renderer (every propagated slice)
                view.render_window().SetMultiSamples(0)
                self.tools.attach(view)
                # after trame-slicer's own observer of the same event has given the view its new size
                view.interactor().AddObserver("WindowResizeEvent", lambda *_, v=view: v.fit_view_to_content(), -1.0)
        red = self.slicer.view_manager.get_view("Red")
        self.segmenter.review_view = red.get_view_node() if red is not None else None
        # the slice each view shows: the engine prepares a click there in its idle time
        self.view_watch = SliceViewWatch(self.segmenter.viewing)
        self.view_watch.watch([view.get_view_node() for view in self.slicer.view_manager.get_slice_views()])
        self.loaded: scene.LoadedVolume | None = None
        self.segmentation = None
        self.output_path = os.path.abspath(output_path)
        self._prompt_view = "Red"
        self._poll_task = None
        self._init_state()
        self.layouts.set_layout(DEFAULT_LAYOUT)
        self.ui = page.build(self)
        server.controller.on_server_ready.add(self._on_ready)
        server.trigger("medsam2_key")(self.on_key)
        server.trigger("medsam2_error")(self.show_error)

    # --- state -------------------------------------------------------------------------------
    def _init_state(self):
        s = self.state
        s.update({
            "trame__title": "MedSAM2", "volume_name": "no volume", "random_weights": self.segmenter.weights_are_random,
            "layout_names": list(self.layouts.get_layout_ids()), "layout_name": DEFAULT_LAYOUT, "tool": None,
            "segments": [], "segment_id": None, "direction": "both", "limit_range": False, "range_first": 0,
            "range_last": 0, "slice_count": 0, "busy": False, "progress_text": "", "progress_percent": 0,
            "can_undo": False, "can_redo": False, "error": "", "message": "",
            "window_presets": ["Auto", *(p for p, _, _ in scene.WINDOW_PRESETS)], "window_width": 0, "window_level": 0,
            "saved": False, "output_path": self.output_path, "output_name": os.path.basename(self.output_path),
            "output_shown": shown_path(self.output_path),
            **{views.slice_label_key(name): "" for name in views.VIEW_NAMES},
            "review_cells": [], "review_flagged": 0, "review_min_confidence": MIN_CONFIDENCE,
        })
        s.change("review_min_confidence")(lambda review_min_confidence, **_: self._set_review_rule(review_min_confidence))
        s.change("layout_name")(lambda layout_name, **_: self._set_layout(layout_name))

    def _refresh(self):
        s, seg = self.state, self.segmenter
        progress = seg.progress
        s.busy = seg.busy
        s.progress_text = progress.text if progress else ""
        s.progress_percent = round(100 * progress.value / progress.maximum) if progress and progress.maximum else 0
        s.can_undo, s.can_redo = seg.can_undo, seg.can_redo
        s.review_cells = seg.review_strip()
        s.review_flagged = sum(cell["flagged"] for cell in s.review_cells)

    def _refresh_segments(self):
        node = self.segmentation
        rows = []
        if node is not None:
            for segment_id in scene.segment_ids(node):
                seg = node.GetSegmentation().GetSegment(segment_id)
                rows.append({"id": segment_id, "name": seg.GetName(), "color": scene.hex_color(seg.GetColor())})
        self.state.segments = rows
        if self.state.segment_id not in {r["id"] for r in rows}:
            self.state.segment_id = rows[-1]["id"] if rows else None
        self.segmenter.select(self.loaded.node if self.loaded else None, node, self.state.segment_id)
        self._refresh()

    def show_error(self, text: str) -> None:
        self.state.error = str(text)

    def show_message(self, text: str) -> None:
        self.state.message = str(text)

    # --- volume ------------------------------------------------------------------------------
    def open_volume(self, path, series=None) -> None:
        """Show a volume (file or DICOM folder) with one empty segment; replaces the current one."""
        from medsam2.io.volume_io import read_volume

        self.show_volume(read_volume(path, series), scene.volume_name(path))  # raises before anything changes

    def show_volume(self, volume, name: str) -> None:
        """Show a read volume (medsam2.io.volume_io.Volume) with one empty segment, replacing the current one."""
        loaded = scene.add_volume(self.slicer.scene, volume, name)
        self.segmenter.close_sessions()
        for node in (self.segmentation, self.loaded.node if self.loaded else None):
            if node is not None:
                self.slicer.scene.RemoveNode(node)
        self.loaded = loaded
        self.segmentation = scene.new_segmentation(self.slicer.scene, loaded.node)
        scene.add_segment(self.segmentation)
        self.slicer.display_manager.show_volume_in_slice_background(loaded.node)
        for view in self.slicer.view_manager.get_slice_views():
            view.fit_view_to_content()
        s = self.state
        s.volume_name = loaded.name
        s.slice_count = int(loaded.volume.array.shape[0])
        s.range_first, s.range_last = 0, s.slice_count - 1
        s.window_width, s.window_level = (round(v, 1) for v in scene.window_level(loaded.node))
        s.saved, s.error = False, ""
        s.segment_id = None
        self.choose_tool(FIRST_TOOL)
        self._refresh_segments()
        for view in self.slicer.view_manager.get_slice_views():
            self._show_slice_number(view)

    def _show_slice_number(self, view) -> None:
        """"Slice k / N" beside the view's slider (k counts from 0, as the slice range does)."""
        loaded = getattr(self, "loaded", None)  # views report changes from the first render on
        shown = views.slice_number(view, loaded.node) if loaded is not None else None
        self.state[views.slice_label_key(view.get_singleton_tag())] = (f"Slice {shown[0]} / {shown[1]}"
                                                                      if shown else "")

    def set_window_preset(self, name: str) -> None:
        if self.loaded is None:
            return
        try:
            width, level = scene.window_preset(name, self.loaded)
        except MedSAM2Error as exc:
            return self.show_error(exc)
        scene.set_window_level(self.loaded.node, width, level)
        self.state.window_width, self.state.window_level = round(width, 1), round(level, 1)

    def _set_layout(self, name: str) -> None:
        if name in self.layouts.get_layout_ids():
            self.layouts.set_layout(name)

    # --- segments ----------------------------------------------------------------------------
    def _guard(fn):  # noqa: N805 - a decorator for the handlers below: errors go to the page
        def wrapped(self, *args):
            try:
                return fn(self, *args)
            except MedSAM2Error as exc:
                self.show_error(str(exc))
        wrapped.__name__ = fn.__name__
        return wrapped

    @_guard
    def add_segment(self) -> None:
        if self.segmentation is None:
            return self.show_error("Open a volume first.")
        self.state.segment_id = scene.add_segment(self.segmentation)
        self._refresh_segments()

    @_guard
    def select_segment(self, segment_id: str) -> None:
        self.state.segment_id = segment_id
        self._refresh_segments()

    @_guard
    def rename_segment(self, segment_id: str, name: str) -> None:
        try:
            scene.rename_segment(self.segmentation, segment_id, name)
        finally:
            self._refresh_segments()  # an empty name shows the old one again

    @_guard
    def recolor_segment(self, segment_id: str, color: str) -> None:
        scene.recolor_segment(self.segmentation, segment_id, scene.parse_hex_color(color))
        self._refresh_segments()

    @_guard
    def delete_segment(self, segment_id: str) -> None:
        if self.segmenter.busy:
            return self.show_message("Wait for the running action (or cancel it) before deleting a segment.")
        scene.remove_segment(self.segmentation, segment_id)
        self.segmenter.forget_segment(segment_id)
        self._refresh_segments()

    # --- prompts and propagation -------------------------------------------------------------
    def _ready(self) -> bool:
        if self.loaded is None:
            self.show_error("Open a volume first.")
            return False
        if not self.state.segment_id:
            self.add_segment()
        self.state.error = self.state.message = ""  # a new action: the last one's news is old
        return True

    def place_point(self, ras, normal, view_name: str, include: bool) -> None:
        if self._ready():
            self._prompt_view = view_name
            self.segmenter.place_point(ras, normal, include)
            self._refresh()

    def place_box(self, ras_a, ras_b, normal, view_name: str) -> None:
        if self._ready():
            self._prompt_view = view_name
            self.segmenter.place_box(ras_a, ras_b, normal)
            self._refresh()

    def _slice_range(self):
        s = self.state
        return (int(s.range_first), int(s.range_last)) if s.limit_range else None

    def propagate(self, direction: str | None = None) -> None:
        if self._ready():
            self.segmenter.propagate(direction or self.state.direction, self._slice_range())
            self._refresh()

    def _prompt_slice_node(self):
        view = self.slicer.view_manager.get_view(self._prompt_view) or self.slicer.view_manager.get_view("Red")
        return view.get_view_node()

    def refine(self) -> None:
        if self._ready():
            node = self._prompt_slice_node()
            self.segmenter.refine(views.slice_center(node), views.slice_normal(node), self._slice_range())
            self._refresh()

    def use_edited_slice(self) -> None:
        if self._ready():
            node = self._prompt_slice_node()
            self.segmenter.use_edited_slice(views.slice_center(node), views.slice_normal(node))
            self._refresh()

    def range_from_view(self) -> None:
        node = self._prompt_slice_node()
        frame = self.segmenter.frame_index(views.slice_center(node), views.slice_normal(node))
        if frame is None:
            return self.show_message("Place a prompt first: the range counts slices along its view.")
        s = self.state
        s.limit_range = True
        s.range_first, s.range_last = max(0, frame - RANGE_FROM_VIEW), min(s.slice_count - 1, frame + RANGE_FROM_VIEW)

    def undo(self) -> None:
        self.segmenter.undo()
        self._refresh()

    def redo(self) -> None:
        self.segmenter.redo()
        self._refresh()

    def cancel(self) -> None:
        self.segmenter.cancel()
        self._refresh()

    # --- review: the slices worth a look -------------------------------------------------------
    def next_uncertain_slice(self, backwards: bool = False) -> None:
        """Move the Red view to the next (previous) flagged slice, cycling; the status says when none is."""
        frame = self.segmenter.next_uncertain_slice(bool(backwards))
        self.show_message(NO_UNCERTAIN if frame is None else "")

    def show_review_slice(self, frame: int) -> None:
        self.segmenter.show_frame(int(frame))

    def _set_review_rule(self, min_confidence) -> None:
        try:
            value = float(min_confidence)
        except (TypeError, ValueError):
            return self.show_error(f"Flag below confidence: give a number from 0 to 1; got {min_confidence!r}.")
        self.segmenter.set_review_rule(value)
        self._refresh()

    def choose_tool(self, tool: str | None) -> None:
        """The prompt tool for the next press in a view, taken now. The page's buttons and keys call
        this as a trigger: the browser holds back a state change while the view has requests in
        flight (trame flushes state only when idle), so a press right after choosing Box would still
        reach the views with the old tool and place a point."""
        self.tools.set_tool(tool or None)
        self.state.tool = tool or None

    def on_key(self, combo: str, view_name: str | None = None) -> None:
        """A key pressed on the page; view_name: the slice view under the mouse, if any."""
        if combo in page.SLICE_KEYS:
            view = self.slicer.view_manager.get_view(view_name or self._prompt_view)
            return views.step_slice(view or self.slicer.view_manager.get_view("Red"), page.SLICE_KEYS[combo])
        action, arg = KEYS.get(combo, (None, None))
        if action == "tool":
            self.choose_tool(arg)
        elif action == "next_uncertain_slice":
            self.next_uncertain_slice(arg == "backward")
        elif action == "propagate":
            self.propagate(arg)
        elif action in ("refine", "use_edited_slice", "undo", "redo"):
            getattr(self, action)()

    # --- result ------------------------------------------------------------------------------
    @_guard
    def save(self) -> None:
        if self.loaded is None:
            return self.show_error("Open a volume first.")
        scene.save_segmentation(self.segmentation, self.loaded, self.output_path)
        self.state.saved = True
        self.show_message(f"Saved {self.output_path}")

    # --- the timer ---------------------------------------------------------------------------
    def _on_ready(self, **_):
        self._poll_task = asyncio.get_event_loop().create_task(self._poll_forever())

    async def _poll_forever(self):
        while True:
            # while an action runs, only yield to the loop (renders, clicks) between engine steps
            await asyncio.sleep(BUSY_INTERVAL_S if self.segmenter.busy else POLL_INTERVAL_S)
            try:
                with self.state:
                    was_busy = self.state.busy
                    if self.segmenter.poll() or was_busy != self.segmenter.busy:
                        self._refresh()
            except Exception:  # the timer must survive anything: the page would freeze
                log.exception("MedSAM2 web: poll failed")

    def shutdown(self) -> None:
        if self._poll_task is not None:
            self._poll_task.cancel()
        self.segmenter.shutdown()

    # --- for the status endpoint -------------------------------------------------------------
    def status(self, masks: bool = False) -> dict:
        """What the page shows, as data: volume geometry, segments (voxel counts per slice, and with
        masks=True the voxels), the slice views' geometry, the last prompt the engine received."""
        from .views import matrix_list

        s, out = self.state, {}
        out["volume"] = None
        if self.loaded is not None:
            import vtk

            m = vtk.vtkMatrix4x4()
            self.loaded.node.GetIJKToRASMatrix(m)
            out["volume"] = {"name": self.loaded.name, "dims": list(self.loaded.node.GetImageData().GetDimensions()),
                             "ijk_to_ras": matrix_list(m)}
        segments = []
        if self.segmentation is not None:
            for row in s.segments:
                mask = scene.segment_mask(self.segmentation, row["id"], self.loaded.node)
                counts = mask.reshape(mask.shape[0], -1).sum(axis=1)
                entry = {**row, "voxels_per_slice": {str(k): int(n) for k, n in enumerate(counts) if n}}
                if masks:
                    entry["mask"] = {"shape_kji": list(mask.shape),
                                     "packed": base64.b64encode(pack_mask(mask).tobytes()).decode()}
                segments.append(entry)
        out["segments"] = segments
        out["views"] = {v.get_singleton_tag(): views.view_state(v) for v in self.slicer.view_manager.get_slice_views()
                        if v.get_singleton_tag() in self.slicer.view_manager.get_current_view_ids()}
        out.update({"segment_id": s.segment_id, "tool": s.tool, "busy": self.segmenter.busy,
                    "can_undo": self.segmenter.can_undo, "can_redo": self.segmenter.can_redo,
                    "last_prompt": self.segmenter.last_prompt, "error": s.error, "message": s.message,
                    "review": self.segmenter.review(),
                    "output": self.output_path, "saved": bool(s.saved), "layout": s.layout_name})
        return out


def shown_path(path: str) -> str:
    """A file's path as the page shows it: relative to the folder the command ran in when inside it."""
    relative = os.path.relpath(path)
    return path if relative.startswith("..") else relative
