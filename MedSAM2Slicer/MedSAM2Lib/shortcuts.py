"""The module's keyboard shortcuts, one table for both shells (Qt in Slicer, the web page).

Each row: (key as Qt's QKeySequence writes it, action, argument, what it does). The action names
are the shells' own verbs for them: "tool" (argument: include | exclude | box | None), "propagate"
(argument: a direction, or None for the one set on the panel), "refine", "use_edited_slice",
"undo", "redo". A shell binds every row, and shows the table as its list of keys.
"""

from __future__ import annotations

SHORTCUTS: tuple[tuple[str, str, str | None, str], ...] = (
    ("I", "tool", "include", "include point tool"),
    ("X", "tool", "exclude", "exclude point tool"),
    ("O", "tool", "box", "box tool (two opposite corners)"),
    ("Esc", "tool", None, "stop placing prompts"),
    ("Shift+P", "propagate", None, "propagate (direction as set)"),
    ("Shift+U", "propagate", "up", "propagate up"),
    ("Shift+D", "propagate", "down", "propagate down"),
    ("Shift+R", "refine", None, "refine from this slice"),
    ("Shift+E", "use_edited_slice", None, "use edited slice"),
    ("Ctrl+Z", "undo", None, "undo"),
    ("Ctrl+Y", "redo", None, "redo"),
    ("Ctrl+Shift+Z", "redo", None, "redo"),
)

# Qt's names of keys where a browser's KeyboardEvent.key differs
_BROWSER_KEY = {"Esc": "Escape"}


def browser_key(key: str) -> str:
    """The combination as the web page reports a keydown ("Ctrl+Shift+Z", "Escape")."""
    *modifiers, last = key.split("+")
    return "+".join([*modifiers, _BROWSER_KEY.get(last, last)])


def help_rows() -> list[tuple[str, str]]:
    """(key, what it does) for a shell's list of keys."""
    return [(key, what) for key, _action, _arg, what in SHORTCUTS]
