"""The tiny reference-training overrides and a `magnet-dist train` call, shared by the
bad-input and checkpoint-integrity tests."""

from __future__ import annotations

from pathlib import Path

from magnet_dist.cli import main as cli_main

# one epoch of a small model, with a routing schedule short enough for the stage switch
TINY = [
    "train.epochs=1",
    "train.batch_size=512",
    "model.dim=8",
    "routing.min_steps=2",
    "routing.window=2",
    "routing.max_steps=6",
    "routing.ramp_steps=2",
]


def train_cli(capsys, data: Path, run: Path, *extra: str) -> tuple[int, str]:
    """Run ``magnet-dist train`` in-process on ``data`` into ``run``; (exit status, stderr)."""
    rc = cli_main(["train", "--quiet", f"data.path={data}", f"train.run_dir={run}", *TINY, *extra])
    return rc, capsys.readouterr().err
