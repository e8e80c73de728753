"""Time to quality: validation Recall@20 against training wall-clock for several training
paths (see magnet_dist/bench/time_to_quality.py)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from magnet_dist.bench.time_to_quality import main  # noqa: E402

if __name__ == "__main__":
    main()
