"""``distill-serve``: any registered teacher (or the student) as a service, in the Fireworks dialect.

    distill-serve --model PATH [--backend hf] [--host 127.0.0.1] [--port 8000] [--api-key-env NAME]
                  [--weights-root DIR] [--max-body-bytes N] [--max-queue N] [--insecure]

A custom teacher can run on another machine and a run points a ``fireworks`` teacher at it; served
the student, a ``fireworks`` sampler samples from it and syncs weights through
``POST /distill/v1/load_weights`` (only with ``--weights-root``, and only folders inside it).
Anything beyond loopback needs ``--api-key-env`` (or an explicit ``--insecure``). Needs the ``serve`` extra (starlette, uvicorn). Fault injection
for testing clients (``faults.py``) is a test fixture, not a flag: tests put it in front of
:func:`build`'s app.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["build", "main", "parser"]


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="distill-serve", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="teacher model folder (or hub id)")
    parser.add_argument("--backend", default="hf", help="registered teacher backend to serve (default: hf)")
    parser.add_argument("--served-name", default=None, help="model name in responses (default: --model)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--api-key-env", default=None, metavar="NAME",
                        help="require Authorization: Bearer <the key in environment variable NAME>")
    parser.add_argument("--insecure", action="store_true", help="allow a non-loopback --host without --api-key-env")
    parser.add_argument("--weights-root", default=None, metavar="DIR",
                        help="allow POST /distill/v1/load_weights, for folders inside DIR only")
    parser.add_argument("--max-body-bytes", type=int, default=16 * 2**20, help="larger requests get 413")
    parser.add_argument("--max-queue", type=int, default=64, help="requests waiting or running before 429")
    return parser


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def _limits(args: argparse.Namespace) -> Any:
    """The serving limits the arguments ask for, or SystemExit saying what is wrong."""
    from distill.plugins.serve.app import Limits

    key = os.environ.get(args.api_key_env) if args.api_key_env else None
    if args.api_key_env and not key:
        raise SystemExit(f"distill-serve: --api-key-env {args.api_key_env}: that environment variable is empty or unset")
    if not key and not args.insecure and not _loopback(args.host):
        raise SystemExit(f"distill-serve: refusing to serve {args.host} without an API key: anyone who reaches the "
                         f"port could use it. Pass --api-key-env NAME, or --insecure on a trusted network")
    root = Path(args.weights_root).resolve() if args.weights_root else None
    return Limits(api_key=key, weights_root=root, max_body_bytes=args.max_body_bytes, max_queue=args.max_queue)


def build(args: argparse.Namespace) -> Any:
    """The ASGI application the parsed arguments describe."""
    from distill import BuildContext
    from distill.config import converter
    from distill.manager import PluginManager
    from distill.plugins.serve.app import build_app

    limits = _limits(args)  # before the model loads: a refusal is quick
    manager = PluginManager()
    options = converter.structure({"model": args.model}, manager.get("teacher", args.backend).config_cls)
    context = BuildContext(run_config=None, output_dir=Path("."), seed=0, device="cpu")
    teacher = manager.build("teacher", args.backend, options, context)
    return build_app(teacher, getattr(teacher, "tokenizer", None), args.served_name or args.model, limits)


def main(argv: Sequence[str] | None = None) -> int:
    import uvicorn

    args = parser().parse_args(argv)
    uvicorn.run(build(args), host=args.host, port=args.port, log_level="warning")
    return 0
