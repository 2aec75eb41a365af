"""`medsam2 bench` runs the official predictor and our engine in separate processes and prints the table."""

from medsam2.cli import main


def test_bench_prints_the_table_and_sam2_mode_is_identical(capsys, tmp_path):
    out_json = tmp_path / "bench.json"
    code = main(["bench", "--model", "sam2.1_hiera_tiny", "--image-size", "256", "--slices", "6",
                 "--variants", "official,sam2", "--device", "cpu", "--json", str(out_json)])
    assert code == 0
    text = capsys.readouterr().out
    assert "RANDOM WEIGHTS" in text  # no checkpoint given: it says so
    header = next(line for line in text.splitlines() if line.startswith("| variant"))
    for column in ("compiled", "first prompt s", "propagate both s", "correction s", "slices/s", "peak RSS MB", "identical"):
        assert column in header
    import json

    rows = {r["variant"]: r for r in json.loads(out_json.read_text())}
    assert rows["sam2"]["identical_to_official"] is True
    assert 0.0 < rows["sam2"]["mask_fraction"] < 1.0  # the compared masks are not trivially empty/full
    assert rows["official"]["peak_rss_mb"] > 0 and rows["sam2"]["cached_click_s"] is not None
    # on a CPU the table says what bfloat16 would cost on it
    from medsam2.models.cpu_support import has_bf16_units

    units = has_bf16_units()
    assert rows["sam2"]["cpu_bf16_units"] == units
    if units is False:
        assert "bfloat16 here: this CPU has no bfloat16 units (AVX512-BF16 or AMX)" in text and "8.6-9.8x" in text
    elif units:
        assert "this CPU has bf16 units" in text


def test_correction_loop_bench_prints_the_click_and_correction_tables(capsys, tmp_path):
    import json

    out_json = tmp_path / "loop.json"
    code = main(["bench", "--correction-loop", "--model", "sam2.1_hiera_tiny", "--click-size", "256",
                 "--click-slices", "8", "--correction-slices", "12", "--repeats", "1", "--memory", "sam2",
                 "--device", "cpu", "--json", str(out_json)])
    assert code == 0
    text = capsys.readouterr().out
    assert "RANDOM WEIGHTS" in text and "Click cost on the engine at 256 px" in text
    assert "Correction on 12 slices at 256 px" in text and "Agreement sweep" in text
    data = json.loads(out_json.read_text())
    gflop = {(r["when"], r["slice"], r["prepared"]): r["gflop"] for r in data["clicks"]}
    before = gflop[("before propagation", "prompted", False)]
    for kind in ("prompted", "propagated"):  # a prepared click does the work of one before propagation
        assert gflop[("after propagation", kind, True)] < 1.1 * before < gflop[("after propagation", kind, False)]
    rows = {r["until"]: r for r in data["correction"]["rows"]}
    assert rows["agreement"]["retracked"] <= rows["conditioning"]["retracked"]
    assert rows["conditioning"]["dice_vs_conditioning"] == 1.0 and 0 < rows["agreement"]["dice_vs_conditioning"] <= 1
    assert any(r["chosen"] for r in data["correction"]["sweep"])
