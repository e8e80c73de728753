"""``magnet-dist train`` and ``python launch/train.py``: load the config, run the missing
stages, train in the chosen mode, print the metrics."""

from __future__ import annotations

import argparse
import sys

from magnet_dist.config import Config, dump_config, load_config


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=None, help="YAML config file (defaults if omitted)")
    parser.add_argument("--run-dir", default=None, help="run folder (overrides train.run_dir)")
    parser.add_argument(
        "--print-config", action="store_true", help="print the merged config and exit"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument(
        "overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. train.epochs=3"
    )


def main(args: argparse.Namespace) -> int:
    overrides = list(args.overrides)
    if args.run_dir:
        overrides.append(f"train.run_dir={args.run_dir}")
    cfg = load_config(args.config, overrides)
    if args.print_config:
        print(dump_config(cfg), end="")
        return 0
    from magnet_dist.train.common import print_metrics
    from magnet_dist.train.pipeline import ensure_stages

    progress = not args.quiet and sys.stderr.isatty()
    check_resume(cfg)  # a refused resume changes nothing, not even the dataset's content edges
    ensure_stages(cfg, quiet=not progress)
    if cfg.trainer.mode == "reference":
        from magnet_dist.train.reference import train_reference

        metrics = train_reference(cfg, progress=progress)
    else:
        from magnet_dist.train.distributed import train_distributed

        metrics = train_distributed(cfg, progress=progress)
    print(f"[train] run folder: {cfg.run_dir}")
    print_metrics(metrics)
    return 0


def check_resume(cfg: Config) -> None:
    """What a trainer would refuse to resume from, refused before any stage runs (a changed
    graph setting would otherwise rebuild the content edges in the shared dataset folder).
    A run folder another process is training into is named first."""
    from magnet_dist.locks import check_run_folder_free

    check_run_folder_free(cfg.run_dir)
    if cfg.trainer.mode == "reference":
        path = cfg.run_dir / "checkpoints" / "reference.pt"
        if path.exists():
            from magnet_dist.train.checkpoint import load_checkpoint

            load_checkpoint(path, cfg, resume=True)
        return
    from magnet_dist.train.distributed import (
        check_resume_checkpoint,
        experiment_dir,
        with_absolute_paths,
    )

    cfg = with_absolute_paths(cfg)
    check_resume_checkpoint(cfg, experiment_dir(cfg))
