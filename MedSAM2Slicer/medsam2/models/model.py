"""A loaded model: the predictor, its weights' provenance, and sessions opened on volumes."""

from __future__ import annotations

import contextlib
import os
import threading
import warnings
import weakref

import torch

from ..errors import InputError
from ..tracking.features import FeatureCache
from ..tracking.frames import FrameSource
from ..tracking.image_set import ImageSetSession, open_images
from ..tracking.memory_bank import bank_params_for
from ..options import DEVICES, PRECISIONS, image_size_problem
from ..tracking.prefetch import FramePrefetcher
from ..tracking.session import Session

RANDOM_WEIGHTS_WARNING = (
    "RANDOM WEIGHTS: this checkpoint was generated for tests and benchmarks; its masks are meaningless. "
    "Load a registry model (medsam2 download NAME) for real segmentation."
)


def pick_device(device="auto") -> torch.device:
    """'auto' picks CUDA, then Apple MPS, then the CPU."""
    if device in (None, "auto"):
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise InputError(f"unknown device {device!r}; use one of {', '.join(DEVICES)} (or cuda:N)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError("device 'cuda' asked for, but this PyTorch has no CUDA GPU; use --device cpu or auto")
    if dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise InputError("device 'mps' asked for, but Apple MPS is not available here; use cpu or auto")
    return dev


def resolve_precision(precision, device: torch.device) -> str:
    """'auto': bfloat16 autocast on CUDA GPUs that support it, float32 elsewhere (CPU float32 gives
    exactly the official predictor's masks; CPU bfloat16 is faster where the CPU has bf16 units)."""
    if precision not in PRECISIONS:
        raise InputError(f"precision must be one of {PRECISIONS}; got {precision!r}")
    if precision == "auto":
        return "bfloat16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "float32"
    if precision == "bfloat16" and device.type == "mps":
        raise InputError("bfloat16 autocast is not supported on Apple MPS here; use precision='float32'")
    return precision


class Model:
    """What `load_model` returns. Thread-safe: one lock serialises use of the network."""

    def __init__(self, predictor, name, image_size, device, checkpoint_path=None, weights_are_random=False, spec=None,
                 precision="auto"):
        self.predictor = predictor
        self.name = name
        self.image_size = int(image_size)
        self.device = torch.device(device)
        self.checkpoint_path = checkpoint_path
        self.weights_are_random = bool(weights_are_random)
        self.spec = spec
        self.compiled = None  # the torch.compile mode of the network's parts, if compiled
        self.lock = threading.RLock()
        # Speed settings (docs/performance.md). On CUDA: bfloat16 autocast, as the official demos
        # run SAM2, and the encoder runs ahead in batches. On CPU: float32 (exactly the official
        # results) unless bfloat16 is asked for, and frames encoded ahead on a background thread.
        cuda = self.device.type == "cuda"
        self.precision = resolve_precision(precision, self.device)
        # frames encoded ahead of the tracker; 0 (or MEDSAM2_PREFETCH=0) turns encode-ahead off
        self.prefetch_lookahead = int(os.environ.get("MEDSAM2_PREFETCH", 16 if cuda else 2))
        self.encode_batch = 8 if cuda else 1
        # sessions on the same frames (e.g. one per segment) share one feature cache
        self._feature_caches = weakref.WeakValueDictionary()

    def __repr__(self):
        random = ", RANDOM WEIGHTS" if self.weights_are_random else ""
        return f"Model({self.name!r}, image_size={self.image_size}, device={self.device}{random})"

    def open(self, volume, memory="self-sorting", window=None, memory_bank=None, feature_cache_mb=None) -> Session:
        """Open a session on a (slices, rows, cols) volume; frames run along axis 0.

        memory: "self-sorting" (MedSAM-2's bank) or "sam2" (stock SAM2 memory).
        window: (low, high) intensity window; None = the 0.5-99.5 percentiles of the volume.
        memory_bank: BankParams or a dict of its fields (capacity, min_confidence, replace_margin,
        read, temperature, seed) for the self-sorting bank.
        """
        bank_params = bank_params_for(memory, memory_bank)
        frames = FrameSource(volume, self.image_size, window)
        return Session(self, frames, self.feature_cache_for(frames, feature_cache_mb), bank_params)

    def open_images(self, images, memory="self-sorting", window=None, memory_bank=None,
                    feature_cache_mb=None) -> ImageSetSession:
        """One-prompt session on a set of unrelated 2D images of any sizes (see image_set.py)."""
        return open_images(self, images, memory=memory, window=window, memory_bank=memory_bank,
                           feature_cache_mb=feature_cache_mb)

    @property
    def mixed_precision(self) -> bool:
        return self.precision == "bfloat16"

    def autocast(self):
        """The precision context every model call runs in."""
        if self.mixed_precision:
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def prefetcher(self, inference_state, order):
        """A background encoder for one propagation pass, or None when encode-ahead is off."""
        cache = inference_state.get("feature_cache")
        if self.prefetch_lookahead <= 0 or cache is None or all(f in cache for f in order):
            return None
        prefetcher = FramePrefetcher(self.predictor, inference_state["images"], cache, self.device, order,
                                     lookahead=self.prefetch_lookahead, batch_size=self.encode_batch,
                                     autocast=self.autocast)
        inference_state["prefetcher"] = prefetcher
        return prefetcher

    def feature_cache_for(self, frames: FrameSource, ram_mb=None) -> FeatureCache:
        """The cache of encoded frames for these frames (content, window, size): sessions on the
        same frames share one, so no frame is encoded twice."""
        key = frames.fingerprint()
        with self.lock:
            cache = self._feature_caches.get(key)
            if cache is None:
                cache = FeatureCache(ram_mb=ram_mb)
                self._feature_caches[key] = cache
            return cache


def load_model(name, checkpoint=None, device="auto", image_size=None, precision="auto", compile=False) -> Model:
    """Load a registry model: `checkpoint` is a local file, or None for the verified cached download.

    image_size overrides the registry's input size (smaller is faster, at some cost in detail).
    precision: "auto" (bfloat16 on CUDA, float32 elsewhere), "float32" or "bfloat16".
    compile: False, True or an inductor mode (compilation.py): torch.compile the network's parts.
    Faster tracking once compiled, slower first propagation, not bit-identical to the official code.
    """
    from . import checkpoints, registry
    from .build import build_predictor
    from .compilation import compile_mode, compile_parts
    from .cpu_support import warn_if_bf16_is_slow

    spec = registry.get_spec(name)
    size = int(image_size or spec.image_size)
    problem = image_size_problem(size)
    if problem:
        raise InputError(f"image_size {problem}")
    dev = pick_device(device)
    # refuse bad values before any download or build; bf16 emulated on a CPU is said once
    warn_if_bf16_is_slow(resolve_precision(precision, dev), dev.type)
    mode = compile_mode(compile)
    path = checkpoints.resolve(name, checkpoint)
    ckpt = checkpoints.read_checkpoint(path, users_file=checkpoint is not None)
    predictor = build_predictor(spec.config, size, "cpu", spec.hydra_overrides)
    checkpoints.load_state_dict_strict(predictor, ckpt.state_dict, source=str(path))
    predictor = predictor.to(dev).eval()
    if mode:
        compile_parts(predictor, mode)
    if ckpt.random_weights:
        warnings.warn(RANDOM_WEIGHTS_WARNING, stacklevel=2)
    model = Model(predictor, name, size, dev, checkpoint_path=path, weights_are_random=ckpt.random_weights, spec=spec,
                  precision=precision)
    model.compiled = mode
    return model
