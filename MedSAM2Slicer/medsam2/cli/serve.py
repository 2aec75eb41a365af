"""`medsam2 serve`: run the remote GPU server (see docs/remote.md).

Refuses to listen beyond loopback without a token unless --insecure is given, and checks every
argument before the model loads. The token is never printed or logged.
"""

import os
import stat

from ..remote.net import is_loopback
from .common import add_compile_argument, add_model_arguments, check_model_inputs, load_model_for_cli, say

TOKEN_ENV = "MEDSAM2_TOKEN"


def add_arguments(p):
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1: this machine only; 0.0.0.0: every interface, "
                        "needs a token)")
    p.add_argument("--port", type=int, default=8765, help="TCP port (default 8765)")
    add_model_arguments(p)
    add_compile_argument(p)
    token = p.add_mutually_exclusive_group()
    token.add_argument("--token", metavar="TOKEN",
                       help=f"clients must send this token (visible in the process list: prefer --token-file "
                            f"or the {TOKEN_ENV} environment variable)")
    token.add_argument("--token-file", metavar="FILE", help="read the token from the first line of FILE")
    p.add_argument("--insecure", action="store_true",
                   help="allow listening beyond loopback without a token (a trusted, isolated network only)")
    p.add_argument("--max-sessions", type=int, default=8, metavar="N",
                   help="open sessions at once (each holds a volume and its features; default 8)")
    p.add_argument("--session-ttl", type=float, default=1800.0, metavar="SECONDS",
                   help="free a session idle this long (default 1800)")
    p.add_argument("--max-upload-mb", type=float, default=1024.0, metavar="N",
                   help="largest volume accepted, in MiB (default 1024)")
    p.add_argument("--max-uploads", type=int, default=4, metavar="N",
                   help="uploads received at once; more wait their turn (default 4)")
    p.add_argument("--max-side", type=int, default=4096, metavar="PIXELS",
                   help="largest side of a volume on any axis: slices, rows or cols (default 4096)")
    p.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"),
                   help="server log level (default info)")


def read_token(args):
    """The token from --token, --token-file or $MEDSAM2_TOKEN (in that order); None if none."""
    from ..errors import InputError

    if args.token is not None:
        token = args.token.strip()
        if not token:
            raise InputError("--token is empty")
        return token
    if args.token_file is not None:
        return read_token_file(args.token_file)
    token = os.environ.get(TOKEN_ENV, "").strip()
    return token or None


def read_token_file(path, option="--token-file"):
    """The token on the first line of `path`; warns when other users can read the file."""
    from ..errors import InputError

    try:
        with open(path, encoding="utf-8") as f:
            token = f.readline().strip()
        mode = os.stat(path).st_mode
    except OSError as exc:
        raise InputError(f"{option} {path}: {exc.strerror}") from None
    if not token:
        raise InputError(f"{option} {path}: the first line is empty")
    if os.name == "posix" and mode & (stat.S_IRWXG | stat.S_IRWXO):
        say(f"warning: {path} is readable by other users; chmod 600 it")
    return token


def run(args):
    from ..errors import InputError

    if not 0 < args.port < 65536:
        raise InputError(f"--port {args.port}: must be 1..65535")
    if args.max_sessions < 1:
        raise InputError("--max-sessions must be at least 1")
    if args.session_ttl <= 0:
        raise InputError("--session-ttl must be positive")
    if args.max_upload_mb <= 0:
        raise InputError("--max-upload-mb must be positive")
    if args.max_uploads < 1:
        raise InputError("--max-uploads must be at least 1")
    if args.max_side < 1:
        raise InputError("--max-side must be at least 1")
    check_model_inputs(args)
    token = read_token(args)
    if token is None and not is_loopback(args.host) and not args.insecure:
        raise InputError(
            f"refusing to listen on {args.host} without a token: anyone on the network could use the GPU and "
            f"read uploaded images. Give --token-file FILE (or --token, or ${TOKEN_ENV}); --insecure overrides")

    from ..remote import server

    model = load_model_for_cli(args, "masks")
    if model.compiled:  # compile now, not in the first client's propagation (which could time out)
        from ..models.compilation import warm_up

        say(f"medsam2 serve: compiling the network ({model.compiled} mode); this takes minutes, once ...")
        say(f"medsam2 serve: compiled in {warm_up(model):.0f} s")
    shown = f"[{args.host}]" if ":" in args.host else args.host
    say(f"medsam2 serve: {model.name} at {model.image_size} px on {model.device}; "
         f"http://{shown}:{args.port}/v1 (API docs: /docs); "
         f"{'token required' if token else 'NO TOKEN: anyone who can connect may use it'}; "
         f"{args.max_sessions} sessions, idle TTL {args.session_ttl:g} s, uploads up to {args.max_upload_mb:g} MiB")
    server.run(model, host=args.host, port=args.port, token=token, log_level=args.log_level,
               max_sessions=args.max_sessions, session_ttl=args.session_ttl, max_upload_mb=args.max_upload_mb,
               max_uploads=args.max_uploads, max_side=args.max_side)
    return 0

