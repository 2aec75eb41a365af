"""The review strip: one cell per slice under the propagation controls, coloured by the model's
confidence, flagged slices marked; a click shows that slice. The cells come from
ModuleController.review_cells(); the strip is redrawn only when they change (the controller's
on_changed comes every tick while a propagation runs)."""

import qt


class ReviewStrip:
    def __init__(self, layout):
        self.layout = layout
        self._cells = []     # the cell buttons
        self._shown = None   # what they show: (colour, flagged, title) per cell

    def show(self, cells: list, on_click) -> None:
        """Draw `cells` (dicts of frame, color, flagged, title); on_click(frame) for a clicked cell."""
        shown = [(cell["color"], cell["flagged"], cell["title"]) for cell in cells]
        if shown == self._shown:
            return
        self._shown = shown
        for button in self._cells:
            button.setParent(None)
        self._cells = []
        for cell in cells:
            button = qt.QToolButton()
            cap = "5px solid white" if cell["flagged"] else "none"
            button.setStyleSheet(f"background: {cell['color']}; border: none; border-top: {cap};")
            button.setFixedHeight(22 if cell["flagged"] else 12)
            button.toolTip = cell["title"]
            button.connect("clicked()", lambda frame=cell["frame"]: on_click(frame))
            self.layout.addWidget(button, 0, qt.Qt.AlignBottom)
            self._cells.append(button)
