"""Building the predictor from a sam2 config, the way the official video predictor is built.

We compose the official sam2 hydra config with the same post-processing overrides as
`sam2.build_sam.build_sam2_video_predictor`, plus ours: our predictor class, corrections as
conditioning frames, and the image size. The official predictor built with `official_overrides`
is therefore the same network with the same behaviour, which is what the equivalence tests compare.
"""

from __future__ import annotations

import torch
from hydra import compose
from hydra.utils import instantiate
from omegaconf import OmegaConf

import sam2  # noqa: F401  (registers sam2's config module with hydra)

# the official video-predictor post-processing (sam2.build_sam.build_sam2_video_predictor)
_OFFICIAL_POSTPROCESSING = (
    "++model.sam_mask_decoder_extra_args.dynamic_multimask_via_stability=true",
    "++model.sam_mask_decoder_extra_args.dynamic_multimask_stability_delta=0.05",
    "++model.sam_mask_decoder_extra_args.dynamic_multimask_stability_thresh=0.98",
    "++model.binarize_mask_from_pts_for_mem_enc=true",
    "++model.fill_hole_area=8",
)


def official_overrides(image_size: int, extra=()) -> list[str]:
    """Overrides our engine applies on top of a sam2 config; pass them to the official builder too."""
    return [
        # a prompt on an already tracked slice is a correction: it conditions tracking from then on
        "++model.add_all_frames_to_correct_as_cond=true",
        f"++model.image_size={int(image_size)}",
        *extra,
    ]


def build_predictor(config: str, image_size: int, device="cpu", extra_overrides=()):
    """An untrained MedSAM2Predictor for `config` at `image_size` (load weights separately)."""
    overrides = [
        "++model._target_=medsam2.tracking.predictor.MedSAM2Predictor",
        *_OFFICIAL_POSTPROCESSING,
        *official_overrides(image_size, extra_overrides),
    ]
    cfg = compose(config_name=config, overrides=overrides)
    OmegaConf.resolve(cfg)
    model = instantiate(cfg.model, _recursive_=True)
    return model.to(torch.device(device)).eval()
