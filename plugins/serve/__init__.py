"""``distill-serve``: any registered teacher (or the student) as a service, in the Fireworks dialect.

    distill-serve --model PATH [--backend hf] [--host 127.0.0.1] [--port 8000]
                  [--faults 429=0.05,500=0.05,reset=0.02,stall=0.01,truncate=0.02,corrupt=0.02]

A custom teacher can run on another machine and a run points a ``fireworks`` teacher at it; served
the student, a ``fireworks`` sampler samples from it and syncs weights through
``POST /distill/v1/load_weights``. ``--faults`` puts a fault injector in front (for testing
clients; ``GET /faults`` reports what it injected). Needs the ``serve`` extra (starlette, uvicorn).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="distill-serve", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="teacher model folder (or hub id)")
    parser.add_argument("--backend", default="hf", help="registered teacher backend to serve (default: hf)")
    parser.add_argument("--served-name", default=None, help="model name in responses (default: --model)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--faults", default="", help="fault rates, e.g. 429=0.05,500=0.05,reset=0.02")
    parser.add_argument("--fault-seed", type=int, default=0)
    parser.add_argument("--stall-s", type=float, default=30.0, help="how long an injected stall lasts")
    args = parser.parse_args(argv)

    import uvicorn

    from distill import BuildContext
    from distill.config import converter
    from distill.manager import PluginManager
    from distill.plugins.serve.app import build_app

    manager = PluginManager()
    options = converter.structure({"model": args.model}, manager.get("teacher", args.backend).config_cls)
    context = BuildContext(run_config=None, output_dir=Path("."), seed=0, device="cpu")
    teacher = manager.build("teacher", args.backend, options, context)
    app = build_app(teacher, getattr(teacher, "tokenizer", None), args.served_name or args.model)
    if args.faults:
        from distill.plugins.serve.faults import FaultInjector, FaultPlan

        app = FaultInjector(app, FaultPlan.parse(args.faults, args.fault_seed, args.stall_s))
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0
