"""Times loading the CIFAR-10 archive: the first load decodes every image, the second reads the cache.

    python -m simulations.benchmarks.bench_data [--path ARCHIVE]

Uses a fresh, temporary cache folder so the first load is really cold.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import torch

from common.config import DataConfig
from common.data import load_dataset
from common.runtime import describe_machine


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--path", default=None, help="archive or folder (default: data.path resolution)")
    parser.add_argument("--repeats", type=int, default=5, help="cached loads to time")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as cache:
        os.environ["FEDDISTILL_CACHE"] = cache
        cfg = DataConfig(name="cifar10", path=args.path)
        start = time.perf_counter()
        dataset = load_dataset(cfg)
        first = time.perf_counter() - start
        cached = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            load_dataset(cfg)
            cached.append(time.perf_counter() - start)
    print(f"machine: {describe_machine(torch.device('cpu'))}")
    print(f"train {len(dataset.train)} ({dataset.train.per_class(10).tolist()} per class)")
    print(f"test  {len(dataset.test)} ({dataset.test.per_class(10).tolist()} per class)")
    print(f"first load (decode + cache write): {first:.2f} s")
    print(f"cached load: median {sorted(cached)[len(cached) // 2]:.3f} s, max {max(cached):.3f} s over {len(cached)}")


if __name__ == "__main__":
    main()
