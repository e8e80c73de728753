"""Entry point for ``ray job submit ... -- python launch/train.py --config FILE [key=value ...]``
and for local runs; a thin wrapper over ``magnet-dist train``."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from magnet_dist.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
