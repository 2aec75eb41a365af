"""`medsam2 models` (the registry and what is cached) and `medsam2 download NAME`."""

from __future__ import annotations

import json

from ..models import checkpoints, registry
from ..options import DEFAULT_MODEL


def _human(n):
    if n is None:
        return "?"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


def _rows(verify):
    pins = checkpoints.read_pins()
    rows = []
    for spec in registry.list_models():
        path = checkpoints.cached_path(spec)
        cached = path.is_file()
        if spec.sha256:
            sha_state, sha = "published", spec.sha256
        elif spec.name in pins:
            sha_state, sha = "pinned", pins[spec.name].get("sha256")
        else:
            sha_state, sha = "pin on download", None
        status = None
        if cached and verify:
            try:
                checkpoints.verify_file(spec, path)
                status = "ok"
            except Exception as exc:  # report every file, do not stop at the first bad one
                status = f"BAD: {exc}"
        rows.append({
            **spec.as_dict(),
            "sha256_state": sha_state,
            "sha256_expected": sha,
            "cached": str(path) if cached else None,
            "verified": status,
        })
    return rows


def add_models_arguments(p):
    p.add_argument("--json", action="store_true", help="print the registry as JSON")
    p.add_argument("--verify", action="store_true",
                   help="also check the sha256 of every cached file (reads each file)")


def run_models(args):
    rows = _rows(args.verify)
    if args.json:
        print(json.dumps({"cache_dir": str(checkpoints.cache_dir()), "models": rows}, indent=2))
        return 0
    header = ("name", "image", "file size", "sha256", "cached")
    table = [header]
    for r in rows:
        cached = r["cached"] or "no"
        if r["verified"]:
            cached = f"{cached}  [{r['verified']}]"
        table.append((r["name"], f"{r['image_size']} px", _human(r["size"]),
                      r["sha256_state"], cached))
    widths = [max(len(row[i]) for row in table) for i in range(len(header) - 1)]
    for row in table:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  " + row[-1])
    print(f"\ncache: {checkpoints.checkpoints_dir()}  (set MEDSAM2_CACHE_DIR to move it)")
    print(f"default model: {DEFAULT_MODEL}; `medsam2 download NAME` fetches one; "
          "'pin on download' files record their sha256 on first download")
    bad = [r for r in rows if r["verified"] and r["verified"] != "ok"]
    return 1 if bad else 0


def add_download_arguments(p):
    p.add_argument("name", metavar="NAME", help=f"registry name, e.g. {DEFAULT_MODEL} (`medsam2 models` lists them)")
    p.add_argument("--url", metavar="URL", help="download from this URL instead of the registry's (a mirror)")
    p.add_argument("--force", action="store_true",
                   help="download again even if a verified copy is cached (re-pins a file "
                        "that has no published sha256)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def run_download(args):
    spec = registry.get_spec(args.name)
    path = checkpoints.download(spec, url=args.url, progress=not args.quiet, force=args.force)
    sha, origin = checkpoints.expected_sha256(spec)
    print(f"{spec.name}: {path}")
    print(f"sha256 {sha} ({origin}, verified)")
    return 0
