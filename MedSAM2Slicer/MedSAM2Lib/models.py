"""Which engine the module uses: a model in a child process on this machine, or a remote server."""

from __future__ import annotations

from dataclasses import dataclass, replace

from medsam2.errors import InputError
from medsam2.options import DEFAULT_MODEL, DEVICES

# what a failed download tells the module's user to do instead (the panel's words, not Python's)
CHECKPOINT_WAY = "the 'Checkpoint file' field in MedSAM2's Settings (a .pt file you downloaded yourself)"


@dataclass(frozen=True)
class ModelSettings:
    name: str = DEFAULT_MODEL
    checkpoint: str = ""       # a local file; "" = the registry download, cached
    device: str = "auto"
    image_size: int = 0        # 0 = the model's own size
    server_url: str = ""       # set: run on a MedSAM2 server instead of on this machine
    token: str = ""
    allow_random: bool = False  # random test weights allowed (Slicer developer mode only)
    precision: str = "auto"     # as medsam2.load_model: auto = bfloat16 on CUDA, float32 elsewhere
    idle_unload_minutes: float = 30.0  # unload the model after this long unused (0: never)

    def same_engine(self, other: "ModelSettings") -> bool:
        """Whether `other` needs no new engine (only the idle time differs)."""
        return replace(self, idle_unload_minutes=0.0) == replace(other, idle_unload_minutes=0.0)

    def describe(self) -> str:
        if self.server_url:
            return f"{self.name} on server {self.server_url}"
        return f"{self.name} ({self.checkpoint or 'registry download'}, device {self.device})"

    def check(self) -> None:
        if not self.idle_unload_minutes >= 0:
            raise InputError(f"Unload after idle must be 0 (never) or more minutes; got {self.idle_unload_minutes!r}.")
        if self.device not in DEVICES and not self.device.startswith("cuda:"):
            raise InputError(f"Device must be one of {', '.join(DEVICES)} (or cuda:N); got {self.device!r}.")

    def create_engine(self, python: str | None = None):
        """A LocalEngine or RemoteEngine for these settings (its child starts on first use)."""
        from .engine_process import LocalEngine, RemoteEngine

        self.check()
        if self.server_url:
            return RemoteEngine(self.server_url, self.token or None, allow_random_weights=self.allow_random,
                                python=python)
        return LocalEngine(self.name, checkpoint=self.checkpoint or None, device=self.device,
                           image_size=self.image_size or None, precision=self.precision,
                           allow_random_weights=self.allow_random, python=python,
                           checkpoint_way=CHECKPOINT_WAY)
