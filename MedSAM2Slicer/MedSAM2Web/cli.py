"""`medsam2 web`: MedSAM2 in the browser, on Slicer's own slice views (trame-slicer).

A plug-in verb of the `medsam2` command (entry point `medsam2.verbs`: web); this module stays
light to import, so `medsam2 --help` does not load trame or VTK.
"""

from __future__ import annotations

import os
import sys

HELP = "segment in a web browser: Slicer's slice views, prompts, propagation, save (needs the [web] extra)"
DEFAULT_PORT = 8080
DEFAULT_MAX_UPLOAD_MB = 1024.0
PAGE_TOKEN_ENV = "MEDSAM2_WEB_TOKEN"
WILDCARD_PROBE = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}  # where "every interface" answers here


def add_arguments(p) -> None:
    from medsam2.cli.common import add_model_arguments
    from medsam2.options import MEMORY_MODES

    p.add_argument("volume", nargs="?", metavar="VOLUME",
                   help="NRRD / NIfTI / MHA file or DICOM series folder to open (or open one from the page)")
    p.add_argument("--series", metavar="UID", help="SeriesInstanceUID to read when the DICOM folder holds several")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1: this machine only; beyond it needs --page-token-file "
                        "or --insecure)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"TCP port (default {DEFAULT_PORT})")
    p.add_argument("--output", "-o", metavar="OUT.seg.nrrd",
                   help="where Save writes the segmentation (default: VOLUME's name + .seg.nrrd in this folder)")
    p.add_argument("--overwrite", action="store_true", help="let Save replace OUT if it exists already")
    add_model_arguments(p, checkpoint_help="local checkpoint file instead of the registry download")
    p.add_argument("--memory", default="self-sorting", choices=MEMORY_MODES,
                   help="memory bank: MedSAM-2's self-sorting bank (default) or stock SAM2")
    p.add_argument("--server", metavar="URL", help="run the model on a `medsam2 serve` at URL instead of here")
    p.add_argument("--token-file", metavar="FILE",
                   help="that server's token (first line of FILE; default $MEDSAM2_TOKEN)")
    p.add_argument("--page-token-file", metavar="FILE",
                   help=f"the page asks for this token (first line of FILE; default ${PAGE_TOKEN_ENV}); required to "
                        "listen beyond loopback")
    p.add_argument("--insecure", action="store_true",
                   help="allow listening beyond loopback without a page token (a trusted, isolated network only)")
    p.add_argument("--public-url", metavar="URL",
                   help="the address browsers use when a reverse proxy (e.g. TLS) stands in front, e.g. "
                        "https://medsam2.example.org/ (requests naming it are accepted)")
    p.add_argument("--max-upload-mb", type=float, default=DEFAULT_MAX_UPLOAD_MB, metavar="N",
                   help=f"largest volume the page may upload, in MiB (default {DEFAULT_MAX_UPLOAD_MB:g})")


def _token_from(path, env, option):
    """The token on the first line of `path`, else in the environment variable `env`; None if neither."""
    from medsam2.cli.serve import read_token_file

    if path is None:
        return os.environ.get(env, "").strip() or None
    return read_token_file(path, option)


def default_output(volume) -> str:
    from .scene import volume_name

    return f"{volume_name(volume) if volume else 'segmentation'}.seg.nrrd"


def check_arguments(args):
    """Every refusal before anything heavy loads. Returns (page token, server token, output path)."""
    from medsam2.cli.common import check_model_inputs
    from medsam2.remote.net import is_loopback
    from medsam2.errors import InputError
    from medsam2.io.volume_io import check_output_path

    if not 0 < args.port < 65536:
        raise InputError(f"--port {args.port}: must be 1..65535")
    if args.max_upload_mb <= 0:
        raise InputError("--max-upload-mb must be positive")
    if args.public_url is not None:
        from urllib.parse import urlsplit

        parts = urlsplit(args.public_url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise InputError(f"--public-url {args.public_url}: give the full address, e.g. https://medsam2.example.org/")
    if args.volume is not None and not os.path.exists(args.volume):
        raise InputError(f"{args.volume}: no such file or folder (VOLUME must be a NIfTI/NRRD/MHA file or a DICOM folder)")
    if args.server and args.checkpoint:
        raise InputError("--server runs the model on that server: drop --checkpoint (the server has its own)")
    if args.token_file and not args.server:
        raise InputError("--token-file is the token of --server URL; give --server too (the page's own token is "
                         "--page-token-file)")
    output = args.output or default_output(args.volume)
    if not output.lower().endswith(".seg.nrrd"):
        raise InputError(f"--output {output}: the web page saves Slicer segmentations; name it .seg.nrrd")
    check_output_path(output, overwrite=args.overwrite)
    check_model_inputs(args)  # last: --random-weights writes its checkpoint once everything else is right
    page_token = _token_from(args.page_token_file, PAGE_TOKEN_ENV, "--page-token-file")
    if page_token is None and not is_loopback(args.host) and not args.insecure:
        raise InputError(
            f"refusing to listen on {args.host} without a page token: anyone on the network could see the images. "
            f"Give --page-token-file FILE (or ${PAGE_TOKEN_ENV}); --insecure overrides")
    server_token = _token_from(args.token_file, "MEDSAM2_TOKEN", "--token-file") if args.server else None
    return page_token, server_token, output


def prepare_rendering() -> None:
    """Offscreen rendering without a display: VTK's EGL window (Mesa works) unless the user chose."""
    if sys.platform.startswith("linux") and not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
        os.environ.setdefault("VTK_DEFAULT_OPENGL_WINDOW", "vtkEGLRenderWindow")
    os.environ["TRAME_ARGS"] = ""  # trame would otherwise parse our command line as its own


def page_url(host: str, port: int) -> str:
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}/"


def run(args) -> int:
    from medsam2.cli.common import require_extra

    require_extra("web", ("trame", "trame_slicer", "slicer"))  # one line naming the command, not a traceback
    page_token, server_token, output = check_arguments(args)
    prepare_rendering()
    from trame.app import get_server

    from medsam2.cli.common import random_weights_banner
    from medsam2.remote.net import is_loopback

    from . import routes
    from .access import AccessGate, SameOriginGuard
    from .app import WebApp
    from .scene import volume_name
    from .segmenter import ModelSettings

    volume = None
    if args.volume is not None:  # a file that cannot be read fails now, before the model loads
        from medsam2.io.volume_io import read_volume

        volume = read_volume(args.volume, args.series)
    # the command line asked for this model: a random-weight file gets the banner, not a refusal
    settings = ModelSettings(name=args.model, checkpoint=args.checkpoint or "", device=args.device,
                             image_size=args.image_size or 0, server_url=args.server or "", token=server_token or "",
                             allow_random=True, precision=args.precision)
    server = get_server("medsam2_web", client_type="vue3")
    web_app = WebApp(server, settings, output, memory=args.memory)
    if web_app.segmenter.weights_are_random:
        random_weights_banner("masks")
    if volume is not None:
        web_app.show_volume(volume, volume_name(args.volume))
    gate = AccessGate(page_token)
    guard = SameOriginGuard(loopback_only=is_loopback(args.host), public_url=args.public_url)
    url = page_url(args.host, args.port)

    def bind(wslink_server):
        gate.install(wslink_server.app)
        guard.install(wslink_server.app)
        routes.install(wslink_server.app, web_app, args.max_upload_mb)

    server.controller.on_server_bind.add(bind)
    server.controller.on_server_ready.add(lambda **_: _announce_when_answering(url, args.host, args.port))
    _say(f"medsam2 web: {settings.describe()}; {'page token required' if gate.enabled else 'no page token'}; "
         f"Save writes {os.path.abspath(output)}")
    try:
        server.start(port=args.port, host=args.host, open_browser=False, show_connection_info=False, timeout=0)
    finally:
        web_app.shutdown()
    return 0


def _announce_when_answering(url: str, host: str, port: int) -> None:
    """Print the page's address on stdout once it answers over HTTP (scripts wait for this line)."""
    import asyncio

    async def announce():
        import aiohttp

        probe = page_url(WILDCARD_PROBE.get(host, host), port)
        async with aiohttp.ClientSession() as session:
            for _ in range(200):
                try:
                    async with session.get(probe, allow_redirects=False) as response:
                        if response.status in (200, 302, 401):
                            print(f"MedSAM2 web page: {url}", flush=True)
                            return
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.05)
        _say(f"medsam2 web: the page at {url} does not answer")

    asyncio.get_event_loop().create_task(announce())


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)
