"""Model registry: which checkpoint files exist, where they come from, and how to build them.

A small data table, no torch import: the Slicer module lists models before torch is installed.

Every sha256 below is copied from a public page that states it (the Hugging Face "Git LFS
Details" page or LFS pointer of that exact file); the page is named in a comment and in
`sha256_source`. A file with no published checksum has `sha256=None` and is pinned on its first
download (see `medsam2.models.checkpoints`). Never fill a checksum in from a local download.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from ..errors import InputError
from ..options import DEFAULT_MODEL  # noqa: F401  (the model a user gets when they do not choose one)

_SAM21_BASE = "https://dl.fbaipublicfiles.com/segment_anything_2/092824"
_MEDSAM2_BASE = "https://huggingface.co/wanglab/MedSAM2/resolve/main"

# bowang-lab/MedSAM2 builds its models from sam2/configs/sam2.1_hiera_t512.yaml, which differs from
# the sam2 package's configs/sam2.1/sam2.1_hiera_t.yaml only in image_size (1024 -> 512, carried
# by `image_size` here) and in the RoPE grid of the memory attention, 32x32 (= 512 / 16) instead of
# 64x64. sam2's RoPEAttention recomputes that grid when the feature map differs, so the override
# states the architecture rather than changing numbers; it keeps the built model identical to
# upstream's. Use `hydra_overrides_for()` when the image size is overridden.
_ROPE_32 = (
    "++model.memory_attention.layer.self_attention.feat_sizes=[32,32]",
    "++model.memory_attention.layer.cross_attention.feat_sizes=[32,32]",
)


@dataclass(frozen=True)
class ModelSpec:
    """One checkpoint file and the sam2 architecture it fits.

    Subscriptable (`spec["name"]`) so code written against plain dicts keeps working.
    """

    name: str
    family: str  # "sam2.1" | "medsam2" | "medsam2_pretrain"
    config: str  # hydra config name inside the installed `sam2` package
    image_size: int
    url: str
    filename: str
    sha256: str | None = None
    size: int | None = None  # bytes, only where a public source states the exact size
    note: str = ""
    hydra_overrides: tuple = ()
    sha256_source: str = ""  # the public page that states `sha256`

    def __getitem__(self, key):
        if key not in _FIELD_NAMES:
            raise KeyError(key)
        return getattr(self, key)

    def get(self, key, default=None):
        return getattr(self, key) if key in _FIELD_NAMES else default

    def keys(self):
        return list(_FIELD_NAMES)

    def as_dict(self) -> dict:
        d = asdict(self)
        d["hydra_overrides"] = list(self.hydra_overrides)
        return d


_FIELD_NAMES = tuple(f.name for f in fields(ModelSpec))


def _medsam2(name, filename, note):
    return ModelSpec(
        name=name,
        family="medsam2",
        config="configs/sam2.1/sam2.1_hiera_t.yaml",
        image_size=512,
        url=f"{_MEDSAM2_BASE}/{filename}",
        filename=filename,
        # huggingface.co/wanglab/MedSAM2 lists these files (about 156 MB each) without a checksum
        # we could find published; they are pinned on first download.
        sha256=None,
        size=None,
        note=note,
        hydra_overrides=_ROPE_32,
    )


_MODELS = (
    ModelSpec(
        name="sam2.1_hiera_tiny",
        family="sam2.1",
        config="configs/sam2.1/sam2.1_hiera_t.yaml",
        image_size=1024,
        url=f"{_SAM21_BASE}/sam2.1_hiera_tiny.pt",
        filename="sam2.1_hiera_tiny.pt",
        # source: https://huggingface.co/facebook/sam2.1-hiera-tiny/blob/main/sam2.1_hiera_tiny.pt
        # (Meta's own upload); exact size from the LFS pointer in
        # https://huggingface.co/camenduru/sam2-1-hiera/commit/cdd35a45a78a3a93bc99988f4b56db40131a823a
        sha256="7402e0d864fa82708a20fbd15bc84245c2f26dff0eb43a4b5b93452deb34be69",
        size=156008466,
        note="Meta SAM 2.1, Hiera tiny (38.9 M parameters)",
        sha256_source="https://huggingface.co/facebook/sam2.1-hiera-tiny/blob/main/sam2.1_hiera_tiny.pt",
    ),
    ModelSpec(
        name="sam2.1_hiera_small",
        family="sam2.1",
        config="configs/sam2.1/sam2.1_hiera_s.yaml",
        image_size=1024,
        url=f"{_SAM21_BASE}/sam2.1_hiera_small.pt",
        filename="sam2.1_hiera_small.pt",
        # source: https://huggingface.co/facebook/sam2.1-hiera-small/blob/main/sam2.1_hiera_small.pt
        # (Meta's own upload); exact size from the camenduru/sam2-1-hiera LFS pointer (same hash)
        sha256="6d1aa6f30de5c92224f8172114de081d104bbd23dd9dc5c58996f0cad5dc4d38",
        size=184416285,
        note="Meta SAM 2.1, Hiera small (46 M parameters)",
        sha256_source="https://huggingface.co/facebook/sam2.1-hiera-small/blob/main/sam2.1_hiera_small.pt",
    ),
    ModelSpec(
        name="sam2.1_hiera_base_plus",
        family="sam2.1",
        config="configs/sam2.1/sam2.1_hiera_b+.yaml",
        image_size=1024,
        url=f"{_SAM21_BASE}/sam2.1_hiera_base_plus.pt",
        filename="sam2.1_hiera_base_plus.pt",
        # source: LFS pointer of the file mirrored from Meta in
        # https://huggingface.co/camenduru/sam2-1-hiera/commit/cdd35a45a78a3a93bc99988f4b56db40131a823a
        # (the same sha256 and size are stated by the independent uploads Promethe-us/sam2 and
        # the Mar2Ding/SAM2Long-Demo space; Meta's own HF page for it was not found)
        sha256="a2345aede8715ab1d5d31b4a509fb160c5a4af1970f199d9054ccfb746c004c5",
        size=323606802,
        note="Meta SAM 2.1, Hiera base+ (80.8 M parameters)",
        sha256_source="https://huggingface.co/camenduru/sam2-1-hiera/blob/main/sam2.1_hiera_base_plus.pt",
    ),
    ModelSpec(
        name="sam2.1_hiera_large",
        family="sam2.1",
        config="configs/sam2.1/sam2.1_hiera_l.yaml",
        image_size=1024,
        url=f"{_SAM21_BASE}/sam2.1_hiera_large.pt",
        filename="sam2.1_hiera_large.pt",
        # source: LFS pointer of the file mirrored from Meta in
        # https://huggingface.co/camenduru/sam2-1-hiera/commit/cdd35a45a78a3a93bc99988f4b56db40131a823a
        # (the same sha256 and size are stated by the independent uploads
        # datasets/phenanthra/tmp discussion 2 and the wondervictor/Mask-Adapter space)
        sha256="2647878d5dfa5098f2f8649825738a9345572bae2d4350a2468587ece47dd318",
        size=898083611,
        note="Meta SAM 2.1, Hiera large (224.4 M parameters)",
        sha256_source="https://huggingface.co/camenduru/sam2-1-hiera/blob/main/sam2.1_hiera_large.pt",
    ),
    _medsam2(
        "medsam2_latest",
        "MedSAM2_latest.pt",
        "bowang-lab MedSAM2 (recommended): SAM 2.1 Hiera tiny at 512 px, trained on public and "
        "newly annotated 3D and video data",
    ),
    _medsam2(
        "medsam2_2411",
        "MedSAM2_2411.pt",
        "bowang-lab MedSAM2 base model of Nov. 2024 (SAM 2.1 Hiera tiny at 512 px)",
    ),
    _medsam2(
        "medsam2_us_heart",
        "MedSAM2_US_Heart.pt",
        "bowang-lab MedSAM2 fine-tuned for heart ultrasound video (SAM 2.1 Hiera tiny at 512 px)",
    ),
    _medsam2(
        "medsam2_mri_liverlesion",
        "MedSAM2_MRI_LiverLesion.pt",
        "bowang-lab MedSAM2 fine-tuned for liver lesions in MRI (SAM 2.1 Hiera tiny at 512 px)",
    ),
    _medsam2(
        "medsam2_ctlesion",
        "MedSAM2_CTLesion.pt",
        "bowang-lab MedSAM2 fine-tuned for CT lesions (SAM 2.1 Hiera tiny at 512 px)",
    ),
    ModelSpec(
        name="medsam2_pretrain",
        family="medsam2_pretrain",
        # SuperMedIntel/Medical-SAM2 (MedSAM-2) trains on SAM 2 (not 2.1) code; its pretrained
        # weight is loaded with its sam2_hiera_t.yaml at image_size 1024 (e.g. SKKU-IBE/
        # Medical-SAM2GUI loads it strictly with that config). Its yaml differs from the sam2
        # package's sam2_hiera_t.yaml only in RoPE feat_sizes [32, 32], which sam2 recomputes to
        # 64x64 at 1024 px, so no override is needed. At 78.1 MB the file is half the size of a
        # float32 Hiera tiny, so it most likely holds 16-bit tensors (Medical-SAM2 trains in
        # bfloat16); load_state_dict casts them to the model's dtype.
        config="configs/sam2/sam2_hiera_t.yaml",
        image_size=1024,
        url="https://huggingface.co/jiayuanz3/MedSAM2_pretrain/resolve/main/MedSAM2_pretrain.pth",
        filename="MedSAM2_pretrain.pth",
        # source: https://huggingface.co/jiayuanz3/MedSAM2_pretrain/blob/main/MedSAM2_pretrain.pth
        # ("Git LFS Details"; the page gives the size only as 78.1 MB, so size stays None)
        sha256="059572b072eff2e41975bf85b0dcca96bc58889db60a89e9f5b1f075236735d7",
        size=None,
        note="SuperMedIntel Medical SAM 2 (MedSAM-2) pretrained weights: SAM 2 Hiera tiny, 1024 px",
        sha256_source="https://huggingface.co/jiayuanz3/MedSAM2_pretrain/blob/main/MedSAM2_pretrain.pth",
    ),
)

_BY_NAME = {spec.name: spec for spec in _MODELS}


def list_models() -> list[ModelSpec]:
    """All registry entries, SAM 2.1 first, then MedSAM2, then MedSAM-2 pretrain."""
    return list(_MODELS)


def model_names() -> list[str]:
    return [spec.name for spec in _MODELS]


def get_spec(name) -> ModelSpec:
    """The entry for a registry name (case-insensitive) or its file name, e.g. "MedSAM2_latest.pt".

    A ModelSpec passes through unchanged, so callers may hand in their own entry.
    """
    if isinstance(name, ModelSpec):
        return name
    key = str(name).strip()
    spec = _BY_NAME.get(key)
    if spec is None:
        low = key.lower()
        for candidate in _MODELS:
            if low in (candidate.name.lower(), candidate.filename.lower()):
                spec = candidate
                break
    if spec is None:
        raise InputError(
            f"unknown model {name!r}; valid names: {', '.join(model_names())} (a local checkpoint file "
            "still needs the name of its architecture here, e.g. sam2.1_hiera_tiny or a medsam2_* model)"
        )
    return spec


def hydra_overrides_for(name, image_size=None) -> list[str]:
    """Hydra overrides that build `name`'s architecture at `image_size` (default: its own).

    Sets `model.image_size` and the memory-attention RoPE grid (image_size / 16, the stride-16
    feature map), plus the entry's other overrides. Pass the result to sam2's
    `build_sam2(..., hydra_overrides_extra=...)`.
    """
    spec = get_spec(name)
    size = int(image_size or spec.image_size)
    if size <= 0 or size % 16:
        raise InputError(f"image size must be a positive multiple of 16, got {size}")
    grid = size // 16
    rope = (
        f"++model.memory_attention.layer.self_attention.feat_sizes=[{grid},{grid}]",
        f"++model.memory_attention.layer.cross_attention.feat_sizes=[{grid},{grid}]",
    )
    others = [o for o in spec.hydra_overrides if ".feat_sizes=" not in o]
    return [f"++model.image_size={size}", *rope, *others]
