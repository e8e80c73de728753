"""``magnet-dist``: one console script, a subcommand per pipeline stage.

Each stage module owns its arguments and its entry point (``add_arguments(parser)`` and
``main(args) -> int``), so this file only dispatches; ``--help`` shows every default.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable

from magnet_dist.errors import NO_SPACE_ERRNOS, MagnetError, output_error

# subcommand -> (module, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "prepare": ("magnet_dist.data.prepare", "build a dataset folder (Parquet + manifest.json)"),
    "content": ("magnet_dist.graph.content", "build item-item content edges with HNSW"),
    "partition": ("magnet_dist.graph.partition", "partition the graph with DGL"),
    "train": ("magnet_dist.train.run", "train MAGNET (reference or distributed)"),
    "evaluate": ("magnet_dist.eval.run", "evaluate a trained run (full ranking)"),
    "recommend": ("magnet_dist.eval.recommend", "write top-K recommendations to Parquet"),
    "bench": ("magnet_dist.bench", "run a benchmark script from launch/"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="magnet-dist",
        description="Distributed trainer for MAGNET multimodal recommendation.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(
            name,
            help=help_text,
            description=help_text,
            formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        )
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as err:
            if not err.name or not module_name.startswith(err.name):
                raise
            p.set_defaults(_missing=module_name)
            continue
        module.add_arguments(p)
        p.set_defaults(_main=module.main)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "_missing", None):
        print(f"magnet-dist {args.command}: not available yet ({args._missing})", file=sys.stderr)
        return 2
    return report_errors(lambda: args._main(args))


def report_errors(run: Callable[[], object]) -> int:
    """The exit status of ``run()``: a MagnetError (bad input) or a full disk is one line on
    stderr and status 2, not a traceback. Also for the scripts under launch/, whose ``main``
    may return its result (an int is taken as the status, anything else as 0)."""
    try:
        status = run()
    except MagnetError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        # a full disk (or file-size limit, quota) wherever it happens is the user's to fix;
        # writers name their path (OutputError), this catches the rest (a log line, a plot)
        if err.errno not in NO_SPACE_ERRNOS:
            raise
        print(f"error: {output_error(err, err.filename or 'an output file')}", file=sys.stderr)
        return 2
    return status if isinstance(status, int) else 0


if __name__ == "__main__":
    sys.exit(main())
