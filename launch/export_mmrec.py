"""Write a prepared dataset in MMRec's layout, to train MMRec's own models on the same split.

    python launch/export_mmrec.py --data data/ml-100k --out ~/MMRec/data/ml100k --image meta --text text
    cd ~/MMRec/src && python main.py -m FREEDOM -d ml100k   # after adding configs/dataset/ml100k.yaml

Every interaction keeps its split (``x_label``); MMRec has an image and a text slot, filled with
the named modalities (either may be left out).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from magnet_dist.data.dataset import load_dataset  # noqa: E402
from magnet_dist.data.mmrec import export_mmrec  # noqa: E402
from magnet_dist.errors import MagnetError  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, required=True, help="a prepared dataset folder")
    parser.add_argument("--out", type=Path, required=True, help="new folder; its name is MMRec's")
    parser.add_argument("--image", default=None, help="modality for image_feat.npy")
    parser.add_argument("--text", default=None, help="modality for text_feat.npy")
    args = parser.parse_args(argv)
    try:
        info = export_mmrec(load_dataset(args.data), args.out, args.image, args.text)
    except MagnetError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}: {info}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
