"""`medsam2 bench`: time and memory of the official predictor vs this engine, as a table."""

import json

from ..cli.common import add_compile_argument


def add_arguments(p):
    p.add_argument("--model", default="medsam2_latest", help="registry model (default: medsam2_latest)")
    p.add_argument("--checkpoint", help="checkpoint file; default: a random-weight one (the table says so)")
    p.add_argument("--image-size", type=int, default=None, help="model input size (default: the model's)")
    p.add_argument("--slices", default="20", help="slice count(s), e.g. 20 or 20,200 (memory flatness)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | mps")
    p.add_argument("--variants", default="official,sam2,self-sorting", help="which of official,sam2,self-sorting")
    p.add_argument("--precision", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="our engine's precision (auto: bfloat16 on CUDA, float32 on CPU). The official predictor "
                        "runs as its demos do (bf16 autocast on CUDA) unless float32 is asked: then both are float32")
    add_compile_argument(p)
    p.add_argument("--json", help="also write the results as JSON to this file")


def run(args):
    from ..bench import VARIANTS, format_table, run_bench
    from ..errors import InputError
    from ..registry import get_spec

    spec = get_spec(args.model)
    try:
        counts = [int(v) for v in str(args.slices).split(",")]
    except ValueError:
        raise InputError(f"--slices takes integers separated by commas; got {args.slices!r}") from None
    if any(c < 4 for c in counts):
        raise InputError("--slices must be at least 4 (a prompt, a correction and room to propagate)")
    variants = [v.strip() for v in args.variants.split(",")]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise InputError(f"unknown variant(s) {unknown}; choose from {list(VARIANTS)}")
    size = args.image_size or spec.image_size
    results = run_bench(spec.name, args.checkpoint, size, counts, args.device, variants,
                        log=lambda m: print(m, flush=True), precision=args.precision,
                        compile=args.compile or False)
    print(format_table(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0
