"""The SAM2 video predictor with our two hooks: a feature cache and the self-sorting memory bank.

Everything else (prompt encoding, mask decoding, memory encoding, the per-frame tracking step) is
the official `sam2` code, which is why `memory="sam2"` reproduces the official predictor exactly.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import metadata

import torch
import torch.nn.functional as F

SAM2_VERSION = "1.1.0"  # the version our equivalence with the official predictor is tested on
try:
    from sam2.modeling.sam2_utils import get_1d_sine_pe, select_closest_cond_frames
    from sam2.sam2_video_predictor import SAM2VideoPredictor
except ImportError as exc:
    raise ImportError(
        f"medsam2 needs the sam2 package {SAM2_VERSION} ({exc}). Install it with scripts/install.sh, or: "
        f"SAM2_BUILD_CUDA=0 pip install --no-build-isolation --no-deps sam2=={SAM2_VERSION} "
        "hydra-core iopath tqdm pillow") from exc
try:
    if metadata.version("sam2") != SAM2_VERSION:
        warnings.warn(f"sam2 {metadata.version('sam2')} is installed; medsam2 is tested with {SAM2_VERSION}",
                      stacklevel=2)
except metadata.PackageNotFoundError:  # a source checkout on sys.path: nothing to compare
    pass

from .memory_bank import MemoryEntry, Recall, SelfSortingMemoryBank, unit
from .prepared import PreparedFeatures


@dataclass
class MemoryRead:
    """What one frame attended to while it was tracked."""

    attended: list[int]  # frames whose memories (features) were attended: conditioning first
    pointers: list[int]  # frames whose object pointers were attended
    recalled: list[Recall] = field(default_factory=list)  # bank entries read (self-sorting), most similar first


@dataclass
class FrameTracking:
    """One tracked (frame, object): what it read, how confident its mask is, what the bank did."""

    frame: int
    reverse: bool
    read: MemoryRead
    confidence: float  # the chosen mask's predicted IoU; 0 where the object score says absent
    object_present: bool
    admission: str | None  # the bank's decision (None in sam2 mode)


@dataclass(frozen=True)
class DecoderVerdict:
    """What the mask decoder said about the mask it chose on one frame (batch of one object)."""

    confidence: float  # the chosen mask's predicted IoU; 0 where the object score says absent
    object_score: float  # the object-score logit (> 0: the object is present)


class _ReadLog:
    """Which stored outputs SAM2's own memory selection touched, by the keys it read from them."""

    def __init__(self):
        self.attended: list[int] = []
        self.pointers: list[int] = []

    def note(self, frame, key):
        seen = {"maskmem_features": self.attended, "obj_ptr": self.pointers}.get(key)
        if seen is not None and frame not in seen:
            seen.append(frame)


class _WatchedOutput(Mapping):
    def __init__(self, frame, output, log):
        self._frame, self._output, self._log = frame, output, log

    def __getitem__(self, key):
        self._log.note(self._frame, key)
        return self._output[key]

    def __iter__(self):
        return iter(self._output)

    def __len__(self):
        return len(self._output)


class _WatchedOutputs(Mapping):
    """A read-only view of {frame: output} that reports which outputs' memories are used."""

    def __init__(self, outputs, log):
        self._outputs, self._log = outputs, log

    def __getitem__(self, frame):
        return _WatchedOutput(frame, self._outputs[frame], self._log)

    def __iter__(self):
        return iter(self._outputs)

    def __len__(self):
        return len(self._outputs)


def _memory_in_input_dtype(module, args, kwargs):
    """Stored memories are bfloat16 (as in the official predictor). Without autocast, a memory made
    only of them (an object whose sole prompt lies ahead of the frame: no float32 object pointer
    to promote the concatenation) would crash the float32 attention on CPU, in the official code too.
    Upcasting is exact, so results equal the official ones wherever those run."""
    curr = kwargs.get("curr")
    dtype = (curr[0] if isinstance(curr, (list, tuple)) else curr).dtype
    for key in ("memory", "memory_pos"):
        value = kwargs.get(key)
        if value is not None and value.dtype != dtype and not torch.is_autocast_enabled(value.device.type):
            kwargs[key] = value.to(dtype)
    return args, kwargs


# Image descriptors are pooled to this grid so their size does not grow with the image size.
DESCRIPTOR_GRID = 16
BANK_KEY = "memory_bank"  # where a per-object bank lives inside that object's output dict
PREPARED_KEY = "prepared_clicks"  # where a session's PreparedClicks live in its inference state


class MedSAM2Predictor(SAM2VideoPredictor):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.last_tracking: FrameTracking | None = None  # set by each tracked frame (under the model's lock)
        self.last_verdict: DecoderVerdict | None = None  # set by every decoded frame: prompted or tracked
        self._last_read = self._descriptor = None
        self._reuse: PreparedFeatures | None = None  # prepared features the running step uses
        self.memory_attention.register_forward_pre_hook(_memory_in_input_dtype, with_kwargs=True)

    # -- image features ---------------------------------------------------------------------
    def _get_image_feature(self, inference_state, frame_idx, batch_size):
        cache = inference_state.get("feature_cache")
        if cache is None:  # a plain official state: official behaviour
            return super()._get_image_feature(inference_state, frame_idx, batch_size)
        device = inference_state["device"]
        backbone_out = cache.get(frame_idx, device)
        prefetcher = inference_state.get("prefetcher")
        if backbone_out is None and prefetcher is not None:
            prefetcher.wait_for(frame_idx)  # it may be encoding this very frame right now
            backbone_out = cache.get(frame_idx, device)
        if backbone_out is None:
            image = inference_state["images"][frame_idx].to(device).float().unsqueeze(0)
            backbone_out = self.forward_image(image)
            cache.put(frame_idx, backbone_out)
        expanded = {
            "backbone_fpn": [f.expand(batch_size, -1, -1, -1) for f in backbone_out["backbone_fpn"]],
            "vision_pos_enc": [p.expand(batch_size, -1, -1, -1) for p in backbone_out["vision_pos_enc"]],
        }
        # the first element (the input image) is unused by tracking; not kept in the cache
        return (None,) + self._prepare_backbone_features(expanded)

    # -- objects ----------------------------------------------------------------------------
    def _obj_id_to_idx(self, inference_state, obj_id):
        obj_idx = super()._obj_id_to_idx(inference_state, obj_id)
        params = inference_state.get("memory_bank_params")
        out_dict = inference_state["output_dict_per_obj"][obj_idx]
        if params is not None and BANK_KEY not in out_dict:
            out_dict[BANK_KEY] = SelfSortingMemoryBank(params)
        return obj_idx

    # -- what each tracked frame read, how confident it is, what the bank did with it ----------
    def _track_step(self, *args, **kwargs):
        current_out, sam_outputs, high_res_features, pix_feat = super()._track_step(*args, **kwargs)
        ious, object_score_logits = sam_outputs[2], sam_outputs[6]
        # the chosen mask is the best-scoring one (multimask) or the only one: its IoU is the max
        iou = ious.max(dim=-1).values
        self._last_object_score = object_score_logits[:, 0]
        self._last_present = object_score_logits[:, 0] > 0
        self._last_confidence = torch.where(self._last_present, iou, torch.zeros_like(iou))
        return current_out, sam_outputs, high_res_features, pix_feat

    def _run_single_frame_inference(self, inference_state, output_dict, frame_idx, batch_size,
                                    is_init_cond_frame, point_inputs, mask_inputs, reverse,
                                    run_mem_encoder, prev_sam_mask_logits=None):
        """The official step; for a tracked frame, also `self.last_tracking` (and the bank's admission)."""
        self.last_tracking = self.last_verdict = self._last_read = self._descriptor = None
        prepared = inference_state.get(PREPARED_KEY)
        if prepared is not None and not is_init_cond_frame:
            self._reuse = prepared.matching(frame_idx, _obj_id_of(inference_state, output_dict), reverse,
                                            output_dict.get(BANK_KEY))
            prepared.reused += self._reuse is not None
        try:
            compact_out, pred_masks = super()._run_single_frame_inference(
                inference_state, output_dict, frame_idx, batch_size, is_init_cond_frame, point_inputs,
                mask_inputs, reverse, run_mem_encoder, prev_sam_mask_logits)
        finally:
            self._reuse = None
        self.last_verdict = DecoderVerdict(float(self._last_confidence[0]), float(self._last_object_score[0]))
        tracked = run_mem_encoder and point_inputs is None and mask_inputs is None and not is_init_cond_frame
        if not tracked:
            return compact_out, pred_masks
        bank = output_dict.get(BANK_KEY)
        present, confidence = bool(self._last_present[0]), float(self._last_confidence[0])
        admission = None
        if bank is not None and compact_out["maskmem_features"] is not None:
            admission = bank.admit(MemoryEntry(
                frame=frame_idx,
                confidence=confidence,
                memory_descriptor=unit(compact_out["maskmem_features"]),
                image_descriptor=self._frame_descriptor(inference_state, frame_idx),
                payload={"maskmem_features": compact_out["maskmem_features"],
                         "maskmem_pos_enc": compact_out["maskmem_pos_enc"],
                         "obj_ptr": compact_out["obj_ptr"]},
                object_present=present,
            ))
        self.last_tracking = FrameTracking(frame_idx, reverse, self._last_read or MemoryRead([], []),
                                           confidence, present, admission)
        return compact_out, pred_masks

    def _frame_descriptor(self, inference_state, frame_idx):
        cached = self._descriptor
        if cached is not None and cached[0] == frame_idx:  # computed when the frame read the bank
            return cached[1]
        return self._image_descriptor(self._get_image_feature(inference_state, frame_idx, 1)[2][-1])

    def _image_descriptor(self, top_level_feat):
        """Pooled, unit-length image embedding from the (HW, B, C) top-level feature."""
        hw, _, c = top_level_feat.shape
        side = int(round(hw ** 0.5))
        grid = top_level_feat[:, :1].permute(1, 2, 0).reshape(1, c, side, hw // side)
        pooled = F.adaptive_avg_pool2d(grid.float(), DESCRIPTOR_GRID)
        return unit(pooled.cpu())

    def recency_window(self, frame_idx, reverse) -> list[int]:
        """The non-conditioning frames SAM2 reads (where it holds them) when it tracks `frame_idx`:
        the official selection (sam2_base._prepare_memory_conditioned_features), nearest first."""
        stride, frames = self.memory_temporal_stride_for_eval, []
        for t_rel in range(1, self.num_maskmem):
            if t_rel == 1:
                frames.append(frame_idx + 1 if reverse else frame_idx - 1)
            elif reverse:
                frames.append(-(-(frame_idx + 2) // stride) * stride + (t_rel - 2) * stride)
            else:
                frames.append(((frame_idx - 2) // stride) * stride - (t_rel - 2) * stride)
        return frames

    # -- prepared clicks (prepared.py) -------------------------------------------------------
    def prepared_features(self, inference_state, output_dict, frame_idx, reverse, version) -> PreparedFeatures:
        """What a click on a tracked frame computes before its prompt matters: the frame's features
        conditioned on the object's memory, exactly as track_step computes them for that click.
        The bank's read generator is left where it was (the click that reuses them advances it)."""
        _, _, feats, pos, sizes = self._get_image_feature(inference_state, frame_idx, 1)
        bank = output_dict.get(BANK_KEY)
        rng_before = bank.rng_state() if bank is not None and bank.params.read == "softmax" else None
        self._last_read = self._descriptor = None
        pix_feat = self._prepare_memory_conditioned_features(
            frame_idx=frame_idx, is_init_cond_frame=False, current_vision_feats=feats[-1:],
            current_vision_pos_embeds=pos[-1:], feat_sizes=sizes[-1:], output_dict=output_dict,
            num_frames=inference_state["num_frames"], track_in_reverse=reverse)
        rng_after = None
        if rng_before is not None:
            rng_after = bank.rng_state()
            bank.set_rng_state(rng_before)
        return PreparedFeatures(reverse, version, pix_feat, self._last_read, self._descriptor, rng_before, rng_after)

    def _reused_features(self, output_dict):
        entry = self._reuse
        self._last_read, self._descriptor = entry.read, entry.descriptor
        if entry.rng_after is not None:
            output_dict[BANK_KEY].set_rng_state(entry.rng_after)
        return entry.pix_feat

    # -- which memories a frame attends to --------------------------------------------------
    def _prepare_memory_conditioned_features(self, frame_idx, is_init_cond_frame, current_vision_feats,
                                             current_vision_pos_embeds, feat_sizes, output_dict,
                                             num_frames, track_in_reverse=False):
        if self._reuse is not None and not is_init_cond_frame:
            return self._reused_features(output_dict)
        if is_init_cond_frame or self.num_maskmem == 0:
            return super()._prepare_memory_conditioned_features(
                frame_idx, is_init_cond_frame, current_vision_feats, current_vision_pos_embeds,
                feat_sizes, output_dict, num_frames, track_in_reverse)
        bank = output_dict.get(BANK_KEY)
        if bank is not None:
            return self._self_sorting_memory_features(
                bank, frame_idx, current_vision_feats, current_vision_pos_embeds, feat_sizes,
                output_dict, num_frames, track_in_reverse)
        # stock SAM2 memory, unchanged; the views only note which frames' memories it uses
        log = _ReadLog()
        watched = {key: _WatchedOutputs(output_dict[key], log)
                   for key in ("cond_frame_outputs", "non_cond_frame_outputs")}
        pix_feat = super()._prepare_memory_conditioned_features(
            frame_idx, is_init_cond_frame, current_vision_feats, current_vision_pos_embeds,
            feat_sizes, watched, num_frames, track_in_reverse)
        # SAM2 reads its selected conditioning frames first, then its slots from the farthest
        # frame to the nearest; listed here nearest first, as the self-sorting read is
        cond = len(output_dict["cond_frame_outputs"])
        selected = cond if self.max_cond_frames_in_attn == -1 else min(cond, self.max_cond_frames_in_attn)
        self._last_read = MemoryRead(log.attended[:selected] + log.attended[selected:][::-1], log.pointers)
        return pix_feat

    def _self_sorting_memory_features(self, bank, frame_idx, current_vision_feats,
                                      current_vision_pos_embeds, feat_sizes, output_dict,
                                      num_frames, track_in_reverse):
        """Conditioning frames as in SAM2, plus the bank entries most similar to this frame.

        Temporal position slots are given by similarity rank: the most similar entry takes the slot
        SAM2 gives the previous frame (t_pos = num_maskmem - 1), the next one the slot before, and
        so on. Object pointers: conditioning frames at their signed slice distance (as SAM2), bank
        entries at distance rank + 1.
        """
        B = current_vision_feats[-1].size(1)
        C = self.hidden_dim
        H, W = feat_sizes[-1]
        device = current_vision_feats[-1].device

        cond_outputs = output_dict["cond_frame_outputs"]
        selected_cond, _ = select_closest_cond_frames(frame_idx, cond_outputs, self.max_cond_frames_in_attn)
        descriptor = self._image_descriptor(current_vision_feats[-1])
        self._descriptor = (frame_idx, descriptor)
        recalled = bank.read(descriptor, self.num_maskmem - 1, frame=frame_idx)

        memories = [(0, out) for out in selected_cond.values()]
        memories += [(self.num_maskmem - 1 - rank, r.entry.payload) for rank, r in enumerate(recalled)]
        to_cat_memory, to_cat_pos = [], []
        for t_pos, mem in memories:
            feats = mem["maskmem_features"].to(device, non_blocking=True)
            to_cat_memory.append(feats.flatten(2).permute(2, 0, 1))
            pos = mem["maskmem_pos_enc"][-1].to(device).flatten(2).permute(2, 0, 1)
            to_cat_pos.append(pos + self.maskmem_tpos_enc[self.num_maskmem - t_pos - 1])

        num_obj_ptr_tokens = 0
        pointer_frames = []
        if self.use_obj_ptrs_in_encoder:
            max_ptrs = min(num_frames, self.max_obj_ptrs_in_encoder)
            sign = -1 if track_in_reverse else 1
            past_cond = {t: o for t, o in selected_cond.items()
                         if not self.only_obj_ptrs_in_the_past_for_eval
                         or (t >= frame_idx if track_in_reverse else t <= frame_idx)}
            pos_and_ptrs = [((frame_idx - t) * sign if self.use_signed_tpos_enc_to_obj_ptrs
                             else abs(frame_idx - t), o["obj_ptr"]) for t, o in past_cond.items()]
            bank_ptrs = [(rank + 1, r.entry.payload["obj_ptr"]) for rank, r in enumerate(recalled)][: max_ptrs - 1]
            pos_and_ptrs += bank_ptrs
            pointer_frames = list(past_cond) + [r.frame for r in recalled][: len(bank_ptrs)]
            if pos_and_ptrs:
                pos_list, ptr_list = zip(*pos_and_ptrs)
                obj_ptrs = torch.stack(ptr_list, dim=0)
                if self.add_tpos_enc_to_obj_ptrs:
                    tpos_dim = C if self.proj_tpos_enc_in_obj_ptrs else self.mem_dim
                    obj_pos = torch.tensor(pos_list, device=device)
                    obj_pos = get_1d_sine_pe(obj_pos / (max_ptrs - 1), dim=tpos_dim)
                    obj_pos = self.obj_ptr_tpos_proj(obj_pos).unsqueeze(1).expand(-1, B, self.mem_dim)
                else:
                    obj_pos = obj_ptrs.new_zeros(len(pos_list), B, self.mem_dim)
                if self.mem_dim < C:  # a pointer is split into C // mem_dim memory tokens
                    obj_ptrs = obj_ptrs.reshape(-1, B, C // self.mem_dim, self.mem_dim)
                    obj_ptrs = obj_ptrs.permute(0, 2, 1, 3).flatten(0, 1)
                    obj_pos = obj_pos.repeat_interleave(C // self.mem_dim, dim=0)
                to_cat_memory.append(obj_ptrs)
                to_cat_pos.append(obj_pos)
                num_obj_ptr_tokens = obj_ptrs.shape[0]

        self._last_read = MemoryRead(list(selected_cond) + [r.frame for r in recalled], pointer_frames, recalled)
        pix_feat = self.memory_attention(
            curr=current_vision_feats,
            curr_pos=current_vision_pos_embeds,
            memory=torch.cat(to_cat_memory, dim=0),
            memory_pos=torch.cat(to_cat_pos, dim=0),
            num_obj_ptr_tokens=num_obj_ptr_tokens,
        )
        return pix_feat.permute(1, 2, 0).view(B, C, H, W)


def _obj_id_of(inference_state, output_dict):
    """The id of the object whose output dict this is (SAM2 hands the dict, not the object)."""
    for obj_idx, out in inference_state["output_dict_per_obj"].items():
        if out is output_dict:
            return inference_state["obj_idx_to_id"][obj_idx]
    return None
