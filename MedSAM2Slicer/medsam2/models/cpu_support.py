"""Whether this CPU runs bfloat16 fast, and the one warning when a user asks for bf16 where it is slow.

x86 CPUs compute bfloat16 in hardware only with AVX512-BF16 or AMX (Intel Cooper Lake / Sapphire
Rapids and later, AMD Zen 4 and later); elsewhere PyTorch converts every bf16 operand to float32
and back, which costs far more than it saves. Measured with `medsam2 bench` (MedSAM2, 512 px, a
full propagation, our engine in bf16 against float32): 8.6-9.8x the float32 time on an AVX2-only
AMD EPYC (12-21x on a busy 2-core one), 0.54x on a CPU with bf16 units (docs/performance.md).
`precision="auto"` therefore keeps float32 on every CPU; this module speaks up only when bf16 is
asked for explicitly.

No torch import unless /proc/cpuinfo is missing (Windows, macOS): the CLI and Slicer's settings
panel may ask before torch is loaded.
"""

from __future__ import annotations

import functools
import platform
import threading
import warnings

BF16_FLAGS = ("avx512_bf16", "amx_bf16")  # /proc/cpuinfo names of the x86 bf16 units
SLOW_BF16_FACTOR = "8.6-9.8x"  # bf16 / float32 propagation time without them (AVX2-only AMD EPYC)
SLOW_BF16_BUSY = "21x"  # the most measured without them, on a busy 2-core AMD EPYC
FAST_BF16_FACTOR = "0.54x"  # the same with them
SLOW_BF16_TEXT = (
    f"this CPU has no bfloat16 units (AVX512-BF16 or AMX), so bfloat16 runs emulated: a propagation takes "
    f"{SLOW_BF16_FACTOR} as long as in float32 (AVX2-only AMD EPYC; up to {SLOW_BF16_BUSY} on a busy 2-core one), "
    f"against {FAST_BF16_FACTOR} on a CPU with bf16 units. Use float32 (or auto, which is float32 on a CPU)"
)
_X86 = {"x86_64", "amd64", "i386", "i686", "x86"}


class SlowPrecisionWarning(UserWarning):
    """The precision asked for runs much slower on this hardware than the default."""


def bf16_units_in_flags(flags) -> bool:
    """True when an x86 flag list (as /proc/cpuinfo's "flags" line) names a bf16 unit."""
    return any(flag in BF16_FLAGS for flag in flags)


def _cpuinfo_flags(path: str = "/proc/cpuinfo") -> list[str] | None:
    try:
        with open(path, encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return line.partition(":")[2].split()
    except OSError:
        return None
    return None


@functools.lru_cache(maxsize=1)
def has_bf16_units() -> bool | None:
    """True / False for an x86 CPU with / without bf16 units; None where it is not known (other
    architectures: Arm's bf16 has not been measured here)."""
    if platform.machine().lower() not in _X86:
        return None
    flags = _cpuinfo_flags()
    if flags is not None:
        return bf16_units_in_flags(flags)
    try:  # no /proc: ask PyTorch's own CPU probe (cpuinfo), private but present since torch 2.3
        import torch

        probes = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
        if all(p is None for p in probes):
            return None
        return any(bool(p()) for p in probes if p is not None)
    except Exception:  # an unknown answer must never stop a model from loading
        return None


def bf16_is_slow(precision: str, device_type: str) -> bool:
    """Whether `precision` on a `device_type` device is bfloat16 emulated on a CPU without bf16 units."""
    return precision == "bfloat16" and device_type == "cpu" and has_bf16_units() is False


_warned = threading.Event()


def warn_if_bf16_is_slow(precision: str, device_type: str) -> bool:
    """Warn (once per process) when bf16 is asked for on a CPU without bf16 units; True if slow."""
    slow = bf16_is_slow(precision, device_type)
    if slow and not _warned.is_set():
        _warned.set()
        warnings.warn(f"precision='bfloat16': {SLOW_BF16_TEXT}.", SlowPrecisionWarning, stacklevel=3)
    return slow
