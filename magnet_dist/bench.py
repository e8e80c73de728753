"""``magnet-dist bench NAME [ARGS...]``: run ``launch/bench_NAME.py`` (or ``launch/NAME.py``).

Benchmarks live as scripts under ``launch/`` (each prints a table and writes JSON); this
subcommand only finds and runs them with the same interpreter.
"""

from __future__ import annotations

import argparse
import runpy
import sys
from pathlib import Path

LAUNCH = Path(__file__).resolve().parent.parent / "launch"


def available() -> list[str]:
    return sorted(p.stem.removeprefix("bench_") for p in LAUNCH.glob("bench_*.py")) + ["scale"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", help=f"benchmark to run: {', '.join(available())}")
    parser.add_argument("args", nargs=argparse.REMAINDER, help="arguments for the benchmark")


def main(args: argparse.Namespace) -> int:
    for candidate in (LAUNCH / f"bench_{args.name}.py", LAUNCH / f"{args.name}.py"):
        if candidate.is_file():
            sys.argv = [str(candidate), *args.args]
            runpy.run_path(str(candidate), run_name="__main__")
            return 0
    print(f"unknown benchmark {args.name!r}; available: {', '.join(available())}", file=sys.stderr)
    return 2
