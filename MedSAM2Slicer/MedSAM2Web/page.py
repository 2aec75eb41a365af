"""The page: Slicer's slice views beside the MedSAM2 panel (segments, prompt tools, propagation,
undo/redo, progress, window/level, save), in Vuetify through trame.

Only layout and bindings live here: every control calls a method of the WebApp (app.py) and shows
trame state the WebApp keeps. Controls carry accessible names (text, aria-label or title) that
the browser tests and screen readers use.
"""

from __future__ import annotations

from trame.widgets import client, html
from trame.widgets import vuetify3 as v3
from trame_vuetify.ui.vuetify3 import VAppLayout

from MedSAM2Lib.shortcuts import SHORTCUTS, browser_key

# keys that move the slice in the view under the mouse (else the last prompted one), as in Slicer
SLICE_KEYS = {"ArrowUp": 1, "ArrowRight": 1, "PageUp": 1, "ArrowDown": -1, "ArrowLeft": -1, "PageDown": -1}

# Keys pressed anywhere on the page but in a text field go to the server's `medsam2_key` trigger.
KEYS_SCRIPT = """
if (!window.__medsam2Keys) {
  window.__medsam2Keys = true;
  const keys = new Set(%s);
  const NOT_TEXT = new Set(['color', 'checkbox', 'radio', 'button', 'submit', 'range', 'file']);
  let hovered = null;  // the slice view under the mouse: the one the arrow keys move
  document.addEventListener('mouseover', (e) => {
    const view = e.target.closest && e.target.closest('[data-view]');
    hovered = view ? view.getAttribute('data-view') : hovered;
  });
  document.addEventListener('keydown', (e) => {
    const t = e.target;  // typing in a text field is not a shortcut; a colour or check box is no text field
    const typing = t && ((t.tagName === 'INPUT' && !NOT_TEXT.has(t.type)) || t.tagName === 'TEXTAREA' ||
                         t.isContentEditable);
    if (typing) return;
    const key = e.key.length === 1 ? e.key.toUpperCase() : e.key;
    const combo = (e.ctrlKey || e.metaKey ? 'Ctrl+' : '') + (e.shiftKey ? 'Shift+' : '') + key;
    if (keys.has(combo) && window.trame) {
      e.preventDefault();
      window.trame.trigger('medsam2_key', [combo, hovered]);
    }
  });
}
"""

# Open a volume: the file goes to the server as the request body, then the page reloads its state.
OPEN_SCRIPT = """
window.medsam2Open = async (input) => {
  const file = input.files && input.files[0];
  if (!file) return;
  const response = await fetch('/medsam2/open?name=' + encodeURIComponent(file.name),
                               {method: 'POST', body: file, credentials: 'same-origin'});
  if (!response.ok) window.trame.trigger('medsam2_error', [await response.text()]);
  input.value = '';
};
"""

DRAWER_WIDTH = 360


def aria(label: str) -> list[str]:
    return [f'aria-label="{label}"']


def build(app) -> VAppLayout:
    """The whole page, bound to `app` (a WebApp)."""
    keys = "[" + ", ".join(f"'{k}'" for k in (*(browser_key(row[0]) for row in SHORTCUTS), *SLICE_KEYS)) + "]"
    with VAppLayout(app.server, theme="dark") as layout:
        client.Script(KEYS_SCRIPT % keys)
        client.Script(OPEN_SCRIPT)
        # the panel scrolls inside itself; a page scroll bar coming and going would resize the views
        client.Style("html { overflow: hidden; }")
        _app_bar(app)
        with v3.VNavigationDrawer(permanent=True, width=DRAWER_WIDTH, raw_attrs=aria("MedSAM2 panel")):
            with html.Div(classes="pa-3 d-flex flex-column ga-3"):
                _segments(app)
                _prompts(app)
                _propagation(app)
                _review(app)
                _history_and_progress(app)
                _window_level(app)
                _save(app)
                _messages()
        with v3.VMain(style="height: 100vh;"):
            with html.Div(style="height: 100%; display: flex;"):
                app.layouts.initialize_layout_grid(layout)
    return layout


def _app_bar(app):
    with v3.VAppBar(density="compact", color="#2b2b2b"):
        v3.VAppBarTitle("MedSAM2 - {{ volume_name }}")
        v3.VChip("RANDOM WEIGHTS: masks are meaningless", v_if=("random_weights",), color="error",
                 variant="flat", size="small", classes="mr-3")
        v3.VSelect(v_model=("layout_name",), items=("layout_names",), label="Layout", density="compact",
                   hide_details=True, style="max-width: 200px;", classes="mr-3")
        with v3.VBtn(variant="tonal", classes="mr-3", raw_attrs=aria("Open volume"),
                     click="document.getElementById('medsam2-open').click()"):
            v3.VIcon("mdi-folder-open", start=True)
            html.Span("Open volume")
        html.Input(type="file", id="medsam2-open", style="display: none;",
                   accept=".nrrd,.nii,.nii.gz,.mha,.mhd,.gz", change="window.medsam2Open($event.target)",
                   raw_attrs=aria("Volume file"))


def _section(title: str):
    html.Div(title, classes="text-overline")


def _segments(app):
    _section("Segments")
    with v3.VList(density="compact", classes="py-0", raw_attrs=aria("Segments")):
        with v3.VListItem(v_for="seg in segments", key="seg.id", active=("seg.id === segment_id",),
                          click=(app.select_segment, "[seg.id]"), classes="px-1"):
            with html.Div(classes="d-flex align-center ga-2"):
                html.Input(type="color", value=("seg.color",), style="width: 28px; height: 24px; border: 0;",
                           change=(app.recolor_segment, "[seg.id, $event.target.value]"),
                           raw_attrs=[':aria-label="`Colour of ${seg.name}`"'])
                v3.VTextField(model_value=("seg.name",), density="compact", hide_details=True, variant="plain",
                              blur=(app.rename_segment, "[seg.id, $event.target.value]"),
                              raw_attrs=[':aria-label="`Name of ${seg.name}`"', '@keyup.enter="$event.target.blur()"'])
                # .stop: deleting a row must not also select it (trame has no keyword for modifiers)
                delete = app.server.trigger_name(app.delete_segment)
                with v3.VBtn(icon=True, size="x-small", variant="text",
                             raw_attrs=[f'@click.stop="trigger(\'{delete}\', [seg.id])"',
                                        ':aria-label="`Delete ${seg.name}`"', ':title="`Delete ${seg.name}`"']):
                    v3.VIcon("mdi-delete", size="small")
    with v3.VBtn(variant="tonal", size="small", click=app.add_segment):
        v3.VIcon("mdi-plus", start=True)
        html.Span("Add segment")


def _prompts(app):
    _section("Prompts (click or drag in a slice view)")
    with html.Div(classes="d-flex flex-wrap ga-1", raw_attrs=['role="group"', 'aria-label="Prompt tool"']):
        for value, text, icon, key in (("include", "Include point", "mdi-plus-circle", "I"),
                                       ("exclude", "Exclude point", "mdi-minus-circle", "X"),
                                       ("box", "Box", "mdi-selection", "O")):
            with v3.VBtn(size="small", variant=(f"tool === '{value}' ? 'flat' : 'outlined'",),
                         color=(f"tool === '{value}' ? 'primary' : undefined",),
                         click=(app.choose_tool, f"[tool === '{value}' ? null : '{value}']"),
                         raw_attrs=[f'title="{text} ({key})"', f':aria-pressed="tool === \'{value}\'"']):
                v3.VIcon(icon, start=True)
                html.Span(text)


def _propagation(app):
    _section("Propagation")
    with html.Div(classes="d-flex align-center ga-2"):
        with v3.VBtnToggle(v_model=("direction",), mandatory=True, density="compact", variant="outlined",
                           divided=True, raw_attrs=aria("Direction")):
            v3.VBtn("Both", value="both", size="small", raw_attrs=['title="Propagate both ways"'])
            v3.VBtn("Up", value="up", size="small", raw_attrs=['title="Propagate up (Shift+U)"'])
            v3.VBtn("Down", value="down", size="small", raw_attrs=['title="Propagate down (Shift+D)"'])
        v3.VCheckbox(v_model=("limit_range",), label="Slice range", density="compact", hide_details=True)
    with html.Div(v_if=("limit_range",), classes="d-flex ga-2"):
        v3.VTextField(v_model_number=("range_first",), type="number", label="First slice", density="compact",
                      hide_details=True, raw_attrs=['min="0"', ':max="slice_count - 1"'])
        v3.VTextField(v_model_number=("range_last",), type="number", label="Last slice", density="compact",
                      hide_details=True, raw_attrs=['min="0"', ':max="slice_count - 1"'])
        v3.VBtn("From view", size="small", variant="text", click=app.range_from_view,
                raw_attrs=['title="Ten slices either side of the Red view\'s slice"'])
    with html.Div(classes="d-flex ga-2"):
        with v3.VBtn(color="primary", click=app.propagate, disabled=("busy",), raw_attrs=['title="Propagate (Shift+P)"']):
            html.Span("Propagate")
        with v3.VBtn(variant="tonal", click=app.refine, disabled=("busy",),
                     raw_attrs=['title="Propagate again from the Red view\'s slice after correcting it (Shift+R)"']):
            html.Span("Refine from this slice")


# a strip cell: coloured by confidence (grey: no result); a flagged slice stands taller, capped in white
CELL_STYLE = ("{flex: '1 1 0', minWidth: '2px', cursor: 'pointer', background: cell.color, "
              "height: cell.flagged ? '22px' : '12px', borderTop: cell.flagged ? '5px solid #ffffff' : 'none'}")


def _review(app):
    _section("Review")
    show = app.server.trigger_name(app.show_review_slice)
    with html.Div(v_if=("review_cells.length",), classes="d-flex align-end",
                  style="gap: 1px; height: 24px;", raw_attrs=['role="group"', 'aria-label="Review strip"']):
        html.Div(v_for="cell in review_cells", key="cell.frame",
                 raw_attrs=[f':style="{CELL_STYLE}"', ':title="cell.title"', 'role="button"',
                            ':aria-label="`Show slice ${cell.frame}`"', ':data-flagged="cell.flagged"',
                            f'@click="trigger(\'{show}\', [cell.frame])"'])
    with html.Div(classes="d-flex align-center ga-2"):
        with v3.VBtn(variant="tonal", size="small", click=(app.next_uncertain_slice, "[false]"),
                     raw_attrs=['title="Show the next flagged slice (N; Shift+N: the previous one)"']):
            v3.VIcon("mdi-alert-circle-outline", start=True)
            html.Span("Next uncertain slice")
        html.Span("{{ review_flagged }} flagged", classes="text-caption")
    v3.VTextField(v_model_number=("review_min_confidence",), type="number", label="Flag below confidence",
                  density="compact", hide_details=True, raw_attrs=['min="0"', 'max="1"', 'step="0.05"'])


def _history_and_progress(app):
    with html.Div(classes="d-flex ga-2"):
        with v3.VBtn(variant="tonal", click=app.undo, disabled=("!can_undo",), raw_attrs=['title="Undo (Ctrl+Z)"']):
            v3.VIcon("mdi-undo", start=True)
            html.Span("Undo")
        with v3.VBtn(variant="tonal", click=app.redo, disabled=("!can_redo",), raw_attrs=['title="Redo (Ctrl+Y)"']):
            v3.VIcon("mdi-redo", start=True)
            html.Span("Redo")
    with html.Div(v_if=("busy",), classes="d-flex align-center ga-2"):
        with html.Div(style="flex: 1;"):
            html.Div("{{ progress_text }}", classes="text-caption")
            v3.VProgressLinear(model_value=("progress_percent",), height=8, color="primary",
                               raw_attrs=aria("Progress"))
        v3.VBtn("Cancel", size="small", variant="outlined", click=app.cancel, raw_attrs=['title="Cancel"'])


def _window_level(app):
    _section("Window / level")
    with html.Div(classes="d-flex flex-wrap ga-1"):
        v3.VBtn("{{ preset }}", v_for="preset in window_presets", key="preset", size="x-small", variant="tonal",
                click=(app.set_window_preset, "[preset]"), raw_attrs=[':title="`Window/level: ${preset}`"'])
    html.Div("W {{ window_width }} / L {{ window_level }}", classes="text-caption")


def _save(app):
    _section("Result")
    with html.Div(classes="d-flex align-center ga-3"):
        with v3.VBtn(color="success", click=app.save, raw_attrs=['title="Save (writes the output file)"']):
            v3.VIcon("mdi-content-save", start=True)
            html.Span("Save")
        html.A("Download {{ output_name }}", v_if=("saved",), href="/medsam2/download",
               raw_attrs=['download', ':aria-label="`Download ${output_name}`"'])
    html.Div("Save writes {{ output_shown }}", classes="text-caption text-medium-emphasis",
             raw_attrs=[':title="output_path"', 'aria-label="Output file"'])


def _messages():
    v3.VAlert(v_if=("error",), text=("error",), type="error", density="compact", closable=True,
              click_close="error = ''", raw_attrs=['role="alert"'])
    v3.VAlert(v_if=("message",), text=("message",), type="info", density="compact", closable=True,
              click_close="message = ''", raw_attrs=['role="status"'])  # news, not an error
    html.Div("Keys: " + ", ".join(f"{k} {what}" for k, _action, _arg, what in SHORTCUTS)
             + "; arrow keys, Page Up / Page Down: next or previous slice", classes="text-caption text-disabled")
