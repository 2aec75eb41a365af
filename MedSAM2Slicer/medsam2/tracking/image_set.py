"""One-prompt segmentation of a set of unrelated 2D images (MedSAM-2's "one-prompt" mode).

The images (a folder of PNG/JPEG/DICOM files, or the slices of a volume that are independent
images) have no temporal order. The user prompts one image (or a few) and every image gets a
mask: the images are streamed through SAM2's tracking step as if they were frames, and the
self-sorting memory bank makes each image attend to the stored memories whose images look most
like it, not to the ones that happen to precede it.

How images of different sizes go through one session:

* SAM2 only ever sees the model's square input: every image is windowed on its own unless a
  window is given for all (8-bit images, grey or colour: 0..255 as stored; others: the 0.5-99.5
  percentiles of that image), resized to the square and encoded; the feature cache keeps those
  encodings as for a volume.
* Prompts are given in each image's own pixel coordinates (x = column, y = row). Before a frame
  is prompted or tracked, the session tells SAM2 that frame's own size (the inference state's
  video height/width), so SAM2 scales the prompt into the square exactly as it would for that
  image alone, and resizes the low-resolution logits straight to that image's size before
  thresholding. A prompted image's mask therefore equals the mask of a one-image session on it.
* Results: `mask(obj_id)` and `masks()` return one array per image, each at the image's size.

Visiting order (documented, because there is no temporal one): `propagate()` goes forward from
the first prompted image to the last image, then backward from it to image 0, as for a volume.
With memory="self-sorting" (the default) the order only decides which images are already in the
bank when an image is segmented; which memories it reads is chosen by image similarity. The
conditioning (prompted) images are attended to by every image, as in SAM2. memory="sam2" (the
previous six images in list order) is allowed for comparison, but list order means nothing here.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch

from ..errors import InputError
from .frames import IMAGENET_MEAN, IMAGENET_STD, FrameSource, check_numeric, check_pixels, check_window, default_window
from .memory_bank import bank_params_for
from .session import Session

# ITU-R BT.601 luma: the usual grey level of an RGB picture (PIL's convert("L") uses it too)
GREY_WEIGHTS = np.array([0.299, 0.587, 0.114], dtype=np.float32)


def _grey_images(images) -> list[tuple[np.ndarray, bool]]:
    """(grey image, stored as 8 bits) for each image."""
    if isinstance(images, torch.Tensor):
        images = images.detach().cpu().numpy()
    if isinstance(images, np.ndarray):
        if images.ndim != 3:
            raise InputError(
                f"an image set given as one array must be (N, rows, cols); got shape {images.shape}. "
                "For colour images or images of different sizes pass a list of arrays.")
        images = list(images)
    else:
        try:
            images = list(images)
        except TypeError:
            raise InputError("images must be a list of 2-D arrays or an (N, rows, cols) array") from None
    if not images:
        raise InputError("the image set is empty: give at least one image")
    return [_grey(n, image) for n, image in enumerate(images)]


def _grey(n, image) -> tuple[np.ndarray, bool]:
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu().numpy()
    a = np.asarray(image)
    eight_bit = a.dtype == np.uint8
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    elif a.ndim == 3 and a.shape[-1] in (3, 4):  # RGB or RGBA; alpha is not image content
        a = check_numeric(a, f"image {n}:")[..., :3].astype(np.float32) @ GREY_WEIGHTS
    if a.ndim != 2:
        raise InputError(f"image {n}: shape {a.shape}; an image must be grey (rows, cols) or colour (rows, cols, 3|4)")
    return check_pixels(a, f"image {n}:", "pixels"), eight_bit


class ImageSetFrames(FrameSource):
    """Images of any sizes as model-ready square frames, each windowed on its own unless told."""

    def __init__(self, images, image_size: int, window=None):
        greys = _grey_images(images)
        self.images = [grey for grey, _ in greys]
        self.image_size = int(image_size)
        self.window = check_window(window) if window is not None else None
        # unrelated images (a photo, a CT slice in HU) need their own intensity range; an 8-bit
        # picture is shown as stored, so that similar pictures look alike to the memory bank
        self.windows = [self.window or ((0.0, 255.0) if eight_bit else default_window(grey))
                        for grey, eight_bit in greys]
        self._mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32)[:, None, None]
        self._std = torch.tensor(IMAGENET_STD, dtype=torch.float32)[:, None, None]
        self._fingerprint = None

    def __len__(self) -> int:
        return len(self.images)

    @property
    def frame_shape(self) -> tuple[int, int]:
        """The square canvas every image is drawn on (each image keeps its own size: image_shapes)."""
        return (self.image_size, self.image_size)

    @property
    def image_shapes(self) -> list[tuple[int, int]]:
        return [tuple(im.shape) for im in self.images]

    def scaled(self, index: int) -> np.ndarray:
        low, high = self.windows[int(index)]
        return np.clip((self.images[int(index)].astype(np.float32) - low) / (high - low), 0.0, 1.0)

    def fingerprint(self) -> str:
        if self._fingerprint is None:
            h = hashlib.blake2b(digest_size=16)
            h.update(f"image-set {self.image_size} {len(self.images)}".encode())
            for im, window in zip(self.images, self.windows):
                h.update(str((im.shape, str(im.dtype), window)).encode())
                h.update(np.ascontiguousarray(im).data)
            self._fingerprint = h.hexdigest()
        return self._fingerprint


class ImageSetSession(Session):
    """A Session over an image set: same prompt / propagate / correction API, per-image sizes.

    Differences from a volume Session: prompts are in the prompted image's own pixels, masks come
    back at each image's size, `mask()` / `masks()` return lists (one array per image), and
    `propagate(axes="all")` is refused (an image set has no other axes).
    """

    is_image_set = True
    _place = "this image"

    def _shape_of(self, frame: int) -> tuple[int, int]:
        # SAM2 is told this size before the image is prompted or tracked (TrackingState.use_frame)
        return self.frames.image_shapes[frame]

    @property
    def image_shapes(self) -> list[tuple[int, int]]:
        """(rows, cols) of every image, in the order given."""
        return self.frames.image_shapes

    def propagate(self, direction="both", start=None, stop=None, cancel=None, probabilities=False, axes=None,
                  packed=False, until=None):
        """Visit every image (order: see the module docstring); yields (image index, masks) as they finish."""
        if axes not in (None, "one"):
            raise InputError("axes='all' fuses the three axes of a volume; an image set has only its images")
        return super().propagate(direction, start, stop, cancel, probabilities, packed=packed, until=until)

    # -- results at each image's size --------------------------------------------------------
    def mask(self, obj_id) -> list[np.ndarray]:
        """The object's mask on every image: a list of bool (rows, cols), one per image."""
        self._tracking.known(obj_id)
        return [self._results.get(obj_id, f) for f in range(self.num_frames)]

    def masks(self) -> list[np.ndarray]:
        """All objects per image as uint16 label images (value = obj_id; a later object wins)."""
        out = [np.zeros(shape, np.uint16) for shape in self.image_shapes]
        for obj_id in self.obj_ids:
            for frame in self._results.frames(obj_id):
                out[frame][self._results.get(obj_id, frame)] = obj_id
        return out


def open_images(model, images, memory="self-sorting", window=None, memory_bank=None, feature_cache_mb=None):
    """Open a one-prompt session on a set of 2D images (see the module docstring).

    images: a list of 2-D grey or (rows, cols, 3|4) colour arrays of any sizes (colour becomes grey
    by BT.601 luma), or an (N, rows, cols) array (e.g. a volume whose slices are unrelated images).
    window: (low, high) for every image; None = 0..255 for 8-bit images, else each image's own
    0.5-99.5 percentiles.
    memory / memory_bank: as Model.open ("self-sorting" is the mode this is meant for).
    """
    bank_params = bank_params_for(memory, memory_bank)
    frames = ImageSetFrames(images, model.image_size, window)
    return ImageSetSession(model, frames, model.feature_cache_for(frames, feature_cache_mb), bank_params)
