"""Scaling benchmark: synthetic 1M users / 100k items / 20M interactions through the whole pipeline.

A thin wrapper over :mod:`magnet_dist.bench.scale` (also ``magnet-dist bench scale``), which
describes the stages and writes ``<out>/results.json`` and ``<out>/results.md``.

    OMP_NUM_THREADS=1 .venv/bin/python launch/scale.py --out runs/scale-1m --docs
    .venv/bin/python launch/scale.py --quick --out runs/scale-quick      # 50k users, minutes
    .venv/bin/python launch/scale.py --quick --users 5000 --steps 5 ...  # the test's size
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from magnet_dist.bench.scale import main  # noqa: E402

if __name__ == "__main__":
    main()
