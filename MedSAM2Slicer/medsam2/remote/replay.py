"""The actions that made a remote session's state, kept to rebuild it after a re-open.

The engine is deterministic: replaying prompts, clears, removals and propagations (with their
arguments) in order on a fresh server session gives the same masks and memory bank. A reset
forgets everything before it. A propagation the caller stopped early is replayed up to the
items the caller received.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field

ADD_PROMPT = "add_prompt"
CLEAR_PROMPTS = "clear_prompts"
REMOVE_OBJECT = "remove_object"
RESET = "reset"
PROPAGATE = "propagate"


@dataclass
class Action:
    kind: str
    args: dict = field(default_factory=dict)  # the request's JSON body or query parameters
    seen: int = 0  # propagate: items the caller received
    completed: bool = True  # propagate: the server said it was done

    def replayable(self) -> bool:
        return self.kind != PROPAGATE or self.completed or self.seen > 0


class ActionLog:
    def __init__(self):
        self._actions: list[Action] = []

    def __iter__(self):
        return iter(list(self._actions))

    def __len__(self) -> int:
        return len(self._actions)

    def append(self, action: Action) -> Action:
        if action.kind == RESET:
            self._actions.clear()
        else:
            self._actions.append(action)
        return action

    def counts(self) -> collections.Counter:
        return collections.Counter(a.kind for a in self._actions if a.replayable())
