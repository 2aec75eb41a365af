"""The model the module uses: a local checkpoint (downloaded on first use) or a remote server.

`ModelHolder` stands in for the model until the worker thread loads it, so a
SegmentationSession can be built on the main thread at once; the first engine job (on the worker)
loads the model. Only `open()` is used by the adapter.
"""

from dataclasses import dataclass

from medsam2.errors import CheckpointError, InputError

DEVICES = ("auto", "cuda", "mps", "cpu")


@dataclass(frozen=True)
class ModelSettings:
    name: str = "medsam2_latest"
    checkpoint: str = ""       # a local file; "" = the registry download, cached
    device: str = "auto"
    image_size: int = 0        # 0 = the model's own size
    server_url: str = ""       # set: run on a MedSAM2 server instead of in Slicer
    token: str = ""
    allow_random: bool = False  # random test weights allowed (Slicer developer mode only)

    def describe(self):
        if self.server_url:
            return f"{self.name} on server {self.server_url}"
        source = self.checkpoint or "registry download"
        return f"{self.name} ({source}, device {self.device})"


class ModelHolder:
    """Loads the model on first use (call from the worker thread) and then hands it out."""

    def __init__(self, settings):
        if settings.device not in DEVICES:
            raise InputError(f"Device must be one of {', '.join(DEVICES)}; got {settings.device!r}.")
        self.settings = settings
        self._model = None

    @property
    def loaded(self):
        return self._model is not None

    def get(self, on_progress=None, cancel=None):
        """The model; downloads and loads it first if needed. Worker side."""
        if self._model is None:
            self._model = self._load(on_progress, cancel)
        return self._model

    def open(self, volume, **kwargs):
        return self.get().open(volume, **kwargs)

    def open_images(self, images, **kwargs):
        model = self.get()
        if not hasattr(model, "open_images"):
            raise InputError("2D image set mode runs on a local model only; the remote server does not offer it. "
                             "Clear the server URL, or turn the 2D image set option off.")
        return model.open_images(images, **kwargs)

    def close(self):
        model, self._model = self._model, None
        if model is not None and hasattr(model, "close"):
            model.close()

    def _load(self, on_progress, cancel):
        import medsam2

        s = self.settings
        if s.server_url:
            model = medsam2.connect(s.server_url, s.token or None)
            source = f"the server at {s.server_url}"
        else:
            checkpoint = s.checkpoint or None
            if checkpoint is None:
                from medsam2 import checkpoints

                checkpoint = checkpoints.download(s.name, progress=False, cancel=cancel, on_progress=on_progress)
            model = medsam2.load_model(s.name, checkpoint=checkpoint, device=s.device,
                                       image_size=s.image_size or None)
            source = str(checkpoint)
        # the same refusal for a local file and for a server that runs test weights
        if getattr(model, "weights_are_random", False) and not s.allow_random:
            raise CheckpointError(
                f"{source} holds random test weights, not a trained model: its masks would be "
                "meaningless. Choose a registry model (leave the checkpoint field empty), a trained "
                "checkpoint file, or a server running one. (Developers can allow test weights by turning "
                "on Developer mode in Application Settings > Developer.)")
        return model
