"""``magnet-dist bench NAME [ARGS...]``: run ``launch/bench_NAME.py``, or the scaling benchmark
(:mod:`magnet_dist.bench.scale`, also ``launch/scale.py``).

The benchmarks ``bench_NAME`` live as scripts under ``launch/`` (each prints a table and writes
JSON); this subcommand only finds and runs them with the same interpreter. The scaling
benchmark is this package: :mod:`~magnet_dist.bench.scale` (the driver),
:mod:`~magnet_dist.bench.scale_stages`, :mod:`~magnet_dist.bench.scale_report` and
:mod:`~magnet_dist.bench.procmon`.
"""

from __future__ import annotations

import argparse
import runpy
import sys
from pathlib import Path

from magnet_dist.errors import MagnetError

ROOT = Path(__file__).resolve().parents[2]
LAUNCH = ROOT / "launch"


def available() -> list[str]:
    return sorted(p.stem.removeprefix("bench_") for p in LAUNCH.glob("bench_*.py")) + ["scale"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", help=f"benchmark to run: {', '.join(available())}")
    parser.add_argument("args", nargs=argparse.REMAINDER, help="arguments for the benchmark")


def script_for(name: str) -> Path:
    """The script of benchmark ``name``: one of :func:`available` only (never a path: this
    command runs code, and must run only the project's own benchmarks)."""
    names = available()
    if name not in names:
        raise MagnetError(
            f"unknown benchmark {name!r}; available: {', '.join(names)} "
            "(names of launch/bench_NAME.py, and scale; not paths)"
        )
    return LAUNCH / ("scale.py" if name == "scale" else f"bench_{name}.py")


def main(args: argparse.Namespace) -> int:
    script = script_for(args.name)
    sys.argv = [str(script), *args.args]
    if args.name == "scale":
        from magnet_dist.bench.scale import main as scale_main

        scale_main()  # reads sys.argv: results.json's command names launch/scale.py as before
    else:
        runpy.run_path(str(script), run_name="__main__")
    return 0
