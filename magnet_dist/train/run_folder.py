"""The run folder every trainer writes: metrics.csv (a row per step), TensorBoard events,
metrics.json (final numbers), config.yaml, plots/ and checkpoints/.

Only rank 0 writes; other ranks pass ``enabled=False``.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

from magnet_dist import atomic
from magnet_dist.config import Config, dump_config
from magnet_dist.errors import output_error


class StepLog:
    """Append-only per-step CSV (header fixed by the first row) + TensorBoard scalars."""

    def __init__(self, run_dir: Path, enabled: bool = True, tensorboard: bool = True) -> None:
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.csv"
        self._fields: list[str] | None = None
        self._file = None
        self._writer = None
        self._tb = None
        self._tb_dir = Path(run_dir) / "tensorboard" if enabled and tensorboard else None
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def _open_tensorboard(self, purge_step: int | None = None) -> None:
        if self._tb_dir is not None and self._tb is None:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(self._tb_dir), purge_step=purge_step)

    def resume_at(self, step: int) -> None:
        """Drop rows logged after ``step`` (a resumed or restarted run re-logs them; ``step``
        0: a fresh start, everything goes) and keep appending. TensorBoard: events of an
        earlier start are removed (step 0), or purged from ``step + 1`` on by the reader."""
        if not self.enabled:
            return
        if step == 0:
            self.path.unlink(missing_ok=True)
            self._fields = None
            if self._tb_dir is not None and self._tb is None and self._tb_dir.is_dir():
                for events in self._tb_dir.glob("events.out.tfevents.*"):
                    events.unlink()
            return
        self._open_tensorboard(purge_step=step + 1)
        if not self.path.exists():
            return
        with self.path.open() as f:
            rows = list(csv.DictReader(f))
        if not rows:
            return
        self._fields = list(rows[0].keys())
        # a killed writer can leave a partial last row (fields missing): drop it with the rest
        kept = [
            r
            for r in rows
            if None not in r.values()
            and None not in r
            and str(r["step"]).isdigit()
            and int(r["step"]) <= step
        ]
        with self.path.open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=self._fields)
            w.writeheader()
            w.writerows(kept)

    def log(self, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        if self._file is None:
            exists = self.path.exists() and self.path.stat().st_size > 0
            if self._fields is None:
                self._fields = list(row.keys())
            self._file = self.path.open("a", newline="")
            self._writer = csv.DictWriter(
                self._file, fieldnames=self._fields, extrasaction="ignore"
            )
            if not exists:
                self._writer.writeheader()
        try:
            self._writer.writerow(row)
        except OSError as err:  # disk full: name metrics.csv rather than "an output file"
            raise output_error(err, self.path) from None
        self._open_tensorboard()
        if self._tb is not None:
            for key, value in row.items():
                if key != "step" and isinstance(value, int | float):
                    self._tb.add_scalar(key, value, int(row["step"]))

    def flush(self) -> None:
        if self._file is not None:
            try:
                self._file.flush()
            except OSError as err:
                raise output_error(err, self.path) from None
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def write_json_atomic(path: Path, payload: dict[str, Any]) -> None:
    """Temp file + rename; a failed write (disk full) leaves no ``.tmp`` and raises
    OutputError naming the path."""
    atomic.write_json_atomic(path, payload)


DATASET_FILE = "dataset.json"


def write_config(run_dir: Path, cfg: Config) -> None:
    """config.yaml, and dataset.json: the checksum of the dataset the run trains on, so
    evaluate / recommend can refuse a dataset replaced under the run."""
    atomic.write_text_atomic(Path(run_dir) / "config.yaml", dump_config(cfg))
    record_dataset(run_dir, cfg.data.path)


def record_dataset(run_dir: Path, data_path: str | Path) -> None:
    from magnet_dist.data.dataset import load_manifest

    manifest = load_manifest(data_path)
    write_json_atomic(
        Path(run_dir) / DATASET_FILE,
        {
            "path": str(Path(data_path).expanduser().absolute()),
            "checksum": manifest["checksum"],
            "num_users": manifest["num_users"],
            "num_items": manifest["num_items"],
        },
    )


def recorded_dataset_checksum(run_dir: Path) -> str | None:
    """The checksum in ``dataset.json`` (None for runs written before it existed)."""
    import json

    path = Path(run_dir) / DATASET_FILE
    if not path.is_file():
        return None
    try:
        checksum = json.loads(path.read_text()).get("checksum")
    except (OSError, ValueError, AttributeError):
        checksum = None
    if not isinstance(checksum, str):
        from magnet_dist.errors import MagnetError

        raise MagnetError(f"{path} is damaged (no 'checksum'); re-train, or delete it to skip")
    return checksum
