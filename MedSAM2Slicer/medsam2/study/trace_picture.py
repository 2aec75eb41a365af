"""The memory trace as a picture: tracked slice (rows, in tracking order) x slice (columns).

One panel per object. In row r (the r-th frame tracked for that object, its slice and pass
written on the left: "12 F" forward, "12 B" backward), column c is coloured by what slice c was
for that frame:

  dark grey   the tracked slice itself
  red         a prompted (conditioning) slice it attended
  blue        a memory it attended (self-sorting: a bank entry; sam2: a recent frame)
  light blue  in memory after the frame but not attended (self-sorting: the bank; sam2: the
              recent frames the next one reads)
  orange tab  left of the row: nothing but prompted slices was attended (empty bank)

Pillow only (a dependency already); no plotting library needed.
"""

from __future__ import annotations

from PIL import Image, ImageDraw, ImageFont

WHITE, TEXT, GRID = (255, 255, 255), (30, 30, 30), (225, 225, 225)
OWN = (80, 80, 80)
PROMPTED = (214, 39, 40)
ATTENDED = (31, 100, 180)
BANKED = (170, 200, 235)
EMPTY_BANK = (255, 140, 0)
LEGEND = [(OWN, "tracked slice"), (PROMPTED, "prompted slice attended"), (ATTENDED, "memory attended"),
          (BANKED, "in memory, not attended"), (EMPTY_BANK, "only prompted slices attended")]

ROW_KEY = "row labels: the slice tracked and its pass, F forward (rising slice numbers) or B backward (falling)"

LEFT, TOP, BOTTOM, GAP, TAB = 64, 44, 58, 24, 6
MAX_SIDE = 900  # a panel's larger side, in pixels, before cells shrink below their largest size


def _font(size):
    try:
        return ImageFont.load_default(size=size)  # Pillow >= 10.1: a scalable font
    except TypeError:
        return ImageFont.load_default()


class TracePicture:
    """Layout and drawing of a trace; `size` and `cell_box` say where everything is."""

    def __init__(self, records: list[dict], num_frames: int):
        self.num_frames = int(num_frames)
        self.objects = sorted({r["obj_id"] for r in records})
        self.rows = {o: [r for r in records if r["obj_id"] == o] for o in self.objects}
        most_rows = max((len(v) for v in self.rows.values()), default=1)
        self.cell = max(2, min(14, MAX_SIDE // max(self.num_frames, most_rows)))
        self.panel = (self.num_frames * self.cell, most_rows * self.cell)
        panels = max(1, len(self.objects))
        small = _font(10)
        legend = max(8 + sum(22 + int(small.getlength(text)) for _, text in LEGEND), 16 + int(small.getlength(ROW_KEY)))
        self.size = (max(panels * (LEFT + self.panel[0]) + (panels - 1) * GAP + GAP // 2, legend),
                     max(TOP + self.panel[1] + BOTTOM, 140))

    def panel_origin(self, obj_id) -> tuple[int, int]:
        i = self.objects.index(obj_id)
        return i * (LEFT + self.panel[0] + GAP) + LEFT, TOP

    def cell_box(self, obj_id, row, frame) -> tuple[int, int, int, int]:
        """(x0, y0, x1, y1), inclusive, of the cell of a slice in the object's row-th record."""
        x, y = self.panel_origin(obj_id)
        x0, y0 = x + frame * self.cell, y + row * self.cell
        return x0, y0, x0 + self.cell - 1, y0 + self.cell - 1

    def render(self) -> Image.Image:
        """The picture; `texts` then lists every label drawn on it."""
        self.texts: list[str] = []
        image = Image.new("RGB", self.size, WHITE)
        draw = ImageDraw.Draw(image)
        font, small = _font(12), _font(10)
        if not self.objects:
            draw.text((10, 10), "no tracked frames: nothing was propagated", fill=TEXT, font=font)
            return image
        for obj_id in self.objects:
            self._panel(draw, obj_id, font, small)
        self._legend(draw, small)
        return image

    def save(self, path) -> None:
        self.render().save(path, format="PNG")

    def _panel(self, draw, obj_id, font, small):
        x, y = self.panel_origin(obj_id)
        rows = self.rows[obj_id]
        memory = rows[0]["memory"] if rows else ""
        draw.text((x - LEFT + 4, 4), f"object {obj_id} ({memory} memory)", fill=TEXT, font=font)
        width, height = self.cell * self.num_frames, self.cell * len(rows)
        draw.rectangle((x - 1, y - 1, x + width, y + height), outline=GRID)
        for r, record in enumerate(rows):
            prompted = set(record["prompted"])
            for frame in record["bank"]:
                self._fill(draw, obj_id, r, frame, BANKED)
            for frame in record["attended"]:
                self._fill(draw, obj_id, r, frame, PROMPTED if frame in prompted else ATTENDED)
            self._fill(draw, obj_id, r, record["frame"], OWN)
            if record["bank_empty"]:
                x0, y0, _, y1 = self.cell_box(obj_id, r, 0)
                draw.rectangle((x0 - TAB - 2, y0, x0 - 3, y1), fill=EMPTY_BANK)
        label_every = max(1, -(-12 // self.cell))  # about one label per 12 pixels
        for r in range(0, len(rows), label_every):
            record = rows[r]
            text = f"{record['frame']} {'B' if record['direction'] == 'backward' else 'F'}"
            draw.text((x - LEFT + 4, y + r * self.cell), text, fill=TEXT, font=small)
            self.texts.append(text)
        tick_every = next(t for t in (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000) if t * self.cell >= 24
                          or t == 1000)
        for frame in range(0, self.num_frames, tick_every):
            draw.text((x + frame * self.cell, y - 14), str(frame), fill=TEXT, font=small)
        draw.text((x, y + height + 4), "slice attended / held in memory ->", fill=TEXT, font=small)
        self.texts.append("slice attended / held in memory ->")

    def _fill(self, draw, obj_id, row, frame, colour):
        if 0 <= frame < self.num_frames:
            draw.rectangle(self.cell_box(obj_id, row, frame), fill=colour)

    def _legend(self, draw, small):
        x, y = 8, self.size[1] - 22
        draw.text((x, y - 16), ROW_KEY, fill=TEXT, font=small)  # what "12 F" and "12 B" on the left mean
        self.texts.append(ROW_KEY)
        for colour, text in LEGEND:
            draw.rectangle((x, y + 2, x + 9, y + 11), fill=colour)
            draw.text((x + 13, y), text, fill=TEXT, font=small)
            x += 22 + int(draw.textlength(text, font=small))


def save_trace_picture(records: list[dict], num_frames: int, path) -> tuple[int, int]:
    """Draw the records into a PNG at `path`; returns its (width, height)."""
    picture = TracePicture(records, num_frames)
    picture.save(path)
    return picture.size
