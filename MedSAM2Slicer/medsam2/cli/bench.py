"""`medsam2 bench`: time and memory of the official predictor vs this engine, as a table; with
`--suite NAME`, any other benchmark of the project (bench_suites.py): one entry point for all; with
--correction-loop, the correction loop's tables instead (click latency after propagation, a
correction's refine against the first pass)."""

import json

from ..options import MEMORY_MODES
from .bench_suites import SUITES, run_suite
from .common import add_compile_argument, add_memory_argument, add_model_arguments, check_model_inputs


def add_arguments(p):
    add_model_arguments(
        p, checkpoint_help="checkpoint file; default: a random-weight one (timings are real; the table says so)",
        precision_help="our engine's precision (auto: bfloat16 on CUDA, float32 on a CPU). The official predictor "
                       "runs as its demos do (bf16 autocast on CUDA) unless float32 is asked: then both are float32. "
                       "The table notes whether this CPU has bf16 units (without them bfloat16 is 9-21x slower)")
    p.add_argument("--slices", default="20", metavar="N[,N...]",
                   help="slice count(s), e.g. 20 or 20,200 (memory flatness); default 20")
    p.add_argument("--variants", metavar="LIST",
                   help=f"comma-separated, from official, {', '.join(MEMORY_MODES)} (default: all): the official "
                        "SAM2 predictor and our engine in each memory mode")
    add_compile_argument(p)
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON to FILE")
    p.add_argument("--suite", default="engine", choices=SUITES,
                   help="which benchmark: engine (default: this table), bank (memory-bank study), batch "
                        "(cohorts on Ray), module (the Slicer module under Slicer's GIL policy), web (the web page)")
    p.add_argument("--suite-args", default="", metavar="ARGS",
                   help='the chosen suite\'s own arguments, quoted as one string, e.g. --suite module '
                        '--suite-args "--sizes 512 --repeat 3" (--suite-args=--help lists them)')
    loop = p.add_argument_group("correction loop (--correction-loop)")
    loop.add_argument("--correction-loop", action="store_true",
                      help="instead of the table above: the median click latency after propagation (prompted and "
                           "propagated slice, prepared or not) and a correction's refine against the first pass "
                           "(until=agreement vs until=conditioning, with the Dice between them)")
    loop.add_argument("--click-size", type=int, default=512, metavar="N", help="image size of the click table (512)")
    loop.add_argument("--click-slices", type=int, default=24, metavar="N", help="volume length of the click table (24)")
    loop.add_argument("--correction-slices", type=int, default=200, metavar="N", help="volume length (200)")
    loop.add_argument("--correction-size", type=int, default=256, metavar="N",
                      help="image size of the correction table (256)")
    loop.add_argument("--repeats", type=int, default=5, metavar="N", help="clicks per latency row (5)")
    add_memory_argument(p)


def run_correction_loop(args, spec):
    import tempfile
    import warnings
    from pathlib import Path

    import medsam2
    from ..errors import InputError
    from ..study.correction_bench import (click_latency, correction_cost, format_click_table,
                                          format_correction_table)

    if args.correction_slices < 8 or args.click_slices < 8 or args.repeats < 1:
        raise InputError("--correction-slices and --click-slices must be at least 8, --repeats at least 1")
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = args.checkpoint
        if checkpoint is None:
            from ..testing import write_random_checkpoint

            checkpoint = write_random_checkpoint(Path(tmp) / "random.pt", spec.name)
            print(f"no --checkpoint: using RANDOM WEIGHTS for {spec.name} (timings are real, masks are not)", flush=True)

        def load(size):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return medsam2.load_model(spec.name, checkpoint=checkpoint, device=args.device, image_size=size,
                                          precision=args.precision)

        print("  clicks ...", flush=True)
        clicks = click_latency(load(args.click_size), args.click_slices, args.repeats, memory=args.memory)
        print(format_click_table(clicks, args.click_size) + "\n", flush=True)
        print(f"  correction on {args.correction_slices} slices ...", flush=True)
        correction = correction_cost(load(args.correction_size), args.correction_slices, memory=args.memory)
        print(format_correction_table(correction), flush=True)
    if args.json:
        from ..io.files import atomic_output

        with atomic_output(args.json) as tmp_json, open(tmp_json, "w") as f:
            json.dump({"clicks": clicks, "correction": correction}, f, indent=2)
    return 0


def run(args):
    if args.suite != "engine":
        return run_suite(args.suite, args.suite_args)
    from ..study.bench import VARIANTS, format_table, run_bench
    from ..errors import InputError
    from ..models.registry import get_spec

    check_model_inputs(args)
    spec = get_spec(args.model)
    if args.correction_loop:
        return run_correction_loop(args, spec)
    try:
        counts = [int(v) for v in str(args.slices).split(",")]
    except ValueError:
        raise InputError(f"--slices takes integers separated by commas; got {args.slices!r}") from None
    if any(c < 4 for c in counts):
        raise InputError("--slices must be at least 4 (a prompt, a correction and room to propagate)")
    variants = list(VARIANTS) if args.variants is None else [v.strip() for v in args.variants.split(",")]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise InputError(f"unknown variant(s) {unknown}; choose from {list(VARIANTS)}")
    size = args.image_size or spec.image_size
    results = run_bench(spec.name, args.checkpoint, size, counts, args.device, variants,
                        log=lambda m: print(m, flush=True), precision=args.precision,
                        compile=args.compile or False)
    print(format_table(results))
    if args.json:
        from ..io.files import atomic_output

        with atomic_output(args.json) as tmp, open(tmp, "w") as f:
            json.dump(results, f, indent=2)
    return 0
