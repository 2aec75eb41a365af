"""bfloat16 on a CPU without bf16 units is emulated and many times slower than float32: a user who
asks for it there is told once, with the figure, by the engine and by the CLI; `auto` stays float32.

Whether this machine has the units is read here independently (/proc/cpuinfo), so each test holds
on CPUs with and without them.
"""

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from medsam2.models import cpu_support
from medsam2.cli.common import load_model_for_cli
from medsam2.cli.main import build_parser

ROOT = Path(__file__).resolve().parents[1]

# "flags" lines of /proc/cpuinfo, trimmed to the relevant part
AVX2_ONLY = "fpu sse sse2 ssse3 sse4_1 sse4_2 avx f16c avx2 fma bmi2 sha_ni"  # AMD EPYC (Zen 2/3)
ZEN4 = AVX2_ONLY + " avx512f avx512dq avx512bw avx512vl avx512_bf16 avx512_vnni"
SAPPHIRE_RAPIDS = AVX2_ONLY + " avx512f avx512_bf16 amx_bf16 amx_tile amx_int8"
AVX512_WITHOUT_BF16 = AVX2_ONLY + " avx512f avx512dq avx512bw avx512vl"  # Skylake-SP: AVX-512 is not enough


def _this_cpu_lacks_bf16_units():
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False  # unknown elsewhere: nothing is said
    try:
        flags = next(line for line in open("/proc/cpuinfo") if line.startswith("flags")).split()
    except (OSError, StopIteration):
        pytest.skip("no /proc/cpuinfo flags to compare with")
    return "avx512_bf16" not in flags and "amx_bf16" not in flags


@pytest.mark.parametrize("flags, units", [(AVX2_ONLY, False), (AVX512_WITHOUT_BF16, False), (ZEN4, True),
                                          (SAPPHIRE_RAPIDS, True)])
def test_bf16_units_are_read_from_the_cpu_flags(flags, units):
    assert cpu_support.bf16_units_in_flags(flags.split()) is units


def test_only_bf16_on_a_cpu_without_units_is_slow():
    slow = _this_cpu_lacks_bf16_units()
    assert cpu_support.bf16_is_slow("bfloat16", "cpu") is slow
    assert not cpu_support.bf16_is_slow("float32", "cpu") and not cpu_support.bf16_is_slow("bfloat16", "cuda")


def test_engine_warns_once_with_the_figure(random_checkpoint):
    script = (
        "import warnings, medsam2\n"
        "from medsam2.models.cpu_support import SlowPrecisionWarning\n"
        "with warnings.catch_warnings(record=True) as seen:\n"
        "    warnings.simplefilter('always')\n"
        "    for precision in ('bfloat16', 'bfloat16', 'auto', 'float32'):\n"
        f"        m = medsam2.load_model('sam2.1_hiera_tiny', checkpoint={str(random_checkpoint)!r}, device='cpu',\n"
        "                               image_size=256, precision=precision)\n"
        "        print(precision, m.precision)\n"
        "for w in seen:\n"
        "    if issubclass(w.category, SlowPrecisionWarning):\n"
        "        print('WARNING', w.message)\n")
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": str(ROOT / "MedSAM2Slicer")})
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    # auto stays float32 on a CPU; bfloat16 is given when asked for
    assert lines[:4] == ["bfloat16 bfloat16", "bfloat16 bfloat16", "auto float32", "float32 float32"]
    warned = [line for line in lines if line.startswith("WARNING")]
    if _this_cpu_lacks_bf16_units():
        assert len(warned) == 1  # two loads in bf16, one warning
        assert "no bfloat16 units (AVX512-BF16 or AMX)" in warned[0] and "8.6-9.8x" in warned[0]
    else:
        assert warned == []


def test_cli_says_what_bf16_costs_here(random_checkpoint, capsys):
    base = ["one-prompt", "images", "-p", "p.json", "-o", "out", "--model", "sam2.1_hiera_tiny",
            "--checkpoint", str(random_checkpoint), "--device", "cpu", "--image-size", "256"]
    for precision in ("bfloat16", "auto"):
        load_model_for_cli(build_parser().parse_args(base + ["--precision", precision]))
        err = capsys.readouterr().err
        note = [line for line in err.splitlines() if line.startswith("note: --precision bfloat16")]
        if precision == "bfloat16" and _this_cpu_lacks_bf16_units():
            assert len(note) == 1 and "8.6-9.8x" in note[0] and "--precision float32" in note[0]
        else:
            assert note == []
        assert "RANDOM WEIGHTS" in err and "SlowPrecisionWarning" not in err  # the CLI's words, not Python's
