"""The engine's choices, by name, importable without torch (the CLI's --help, Slicer's settings
panel and the web page list them before torch is installed). One place for each list."""

DEFAULT_MODEL = "medsam2_latest"
MEMORY_MODES = ("self-sorting", "sam2")  # MedSAM-2's self-sorting bank, or stock SAM2 memory
DEVICES = ("auto", "cpu", "cuda", "mps")  # "cuda:N" is accepted too wherever a device is given
PRECISIONS = ("auto", "float32", "bfloat16")
AXES = ("one", "all")  # propagate along the prompted axis, or along all three and fuse
DIRECTIONS = ("forward", "backward", "both")  # propagation: from the start frame up, down, or both


def image_size_problem(size: int) -> str | None:
    """What is wrong with a model input size, or None: the one rule (the model's patch grid is 16 px
    and its feature pyramid halves twice more, so sizes step by 32; below 128 the grid collapses)."""
    if size % 32 or size < 128:
        return f"must be a multiple of 32 and at least 128; got {size}"
    return None
