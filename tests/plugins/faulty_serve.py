"""``distill-serve`` behind the test-only fault injector (``distill.plugins.serve.faults``):

    python -m tests.plugins.faulty_serve [--faults 429=0.1,...] [--fault-seed N] [--stall-s S]
                                         [--first KIND=N ...] [--omit FIELD ...] DISTILL-SERVE-ARGS
"""

import argparse

import uvicorn

from distill.plugins.serve import build, parser
from distill.plugins.serve.faults import FaultInjector, FaultPlan


def main() -> None:
    faults = argparse.ArgumentParser()
    faults.add_argument("--faults", default="", help="fault rates, e.g. 429=0.05,500=0.05,reset=0.02")
    faults.add_argument("--fault-seed", type=int, default=0)
    faults.add_argument("--stall-s", type=float, default=30.0, help="how long an injected stall lasts")
    faults.add_argument("--first", action="append", default=[], help="KIND=N: that fault for the first N requests")
    faults.add_argument("--omit", action="append", default=[], help="an optional field to leave out of answers")
    args, rest = faults.parse_known_args()
    first = {kind: int(n) for kind, _, n in (item.partition("=") for item in args.first)}
    plan = FaultPlan.parse(args.faults, args.fault_seed, args.stall_s, first, frozenset(args.omit))
    served = parser().parse_args(rest)
    uvicorn.run(FaultInjector(build(served), plan), host=served.host, port=served.port, log_level="warning")


if __name__ == "__main__":
    main()
