"""Build a Wan 2.1 text-to-video pipeline with the published 1.3B architecture and random weights,
and Q8_0/Q4_0 GGUF files of its transformer (in <dir>/gguf/, where farm finds a local model's
q8/q4 variants). Nothing is downloaded; speed does not depend on the weights.

    .venv/bin/python scripts/build_bench_wan.py ~/farm-bench/wan2.1-1.3b-random            # ~2.8 GB
    .venv/bin/python scripts/build_bench_wan.py /tmp/toy-wan --size toy                     # for tests
    .venv/bin/python scripts/build_bench_wan.py DIR --device cuda   # make the weights on a GPU (faster)

The directory is then a model farm runs (``model: DIR``, ``render: {precision: q4}``) and what
``bench/gpu.py`` measures. Building again into an existing directory reuses it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from farm.models.benchwan import GGUF_QTYPES, SIZES, build_bench_wan


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("directory", type=Path)
    ap.add_argument("--size", choices=sorted(SIZES), default="1.3b")
    ap.add_argument("--device", default="cpu", help="where the random weights are made (cpu or cuda)")
    ap.add_argument("--no-gguf", action="store_true", help="skip the Q8_0/Q4_0 GGUF files")
    args = ap.parse_args()
    report = build_bench_wan(args.directory.expanduser(), args.size, args.device, () if args.no_gguf else GGUF_QTYPES)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
