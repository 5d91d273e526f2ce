"""What the output digests cost: hashing a token store at completion and verifying it before a reader starts.

    python benchmarks/verify_digests.py --mib 512

Writes a token store of about `--mib` MiB of uint16 tokens (random ids below 50,257, zstd as `prepare`
writes them: random ids barely compress, so the store is about as large as its data) with `prepare`'s own
`create_token_store`, then times, each the best of `--repeats`:
- `digest`: `integrity.tree_digests`, what a stage pays once when it completes;
- `verify`: `integrity.verify`, what every reading stage pays before it starts;
- `read`: decoding every block through zarr, one pass of what an epoch of pretraining reads.
Reads come from the page cache after the first pass (the store was just written), so these are CPU costs.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from pipelines.core import integrity
from pipelines.data.token_store import create_token_store


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=512)
    parser.add_argument("--block-size", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as folder:
        store = Path(folder) / "tokens.zarr"
        rows = args.mib * (1 << 20) // (args.block_size * 2)
        group = create_token_store(store, args.block_size, np.dtype(np.uint16))
        train = group["train"]
        train.resize((rows, args.block_size))
        rng = np.random.default_rng(0)
        step = 4096
        for start in range(0, rows, step):
            stop = min(rows, start + step)
            train[start:stop] = rng.integers(0, 50_257, (stop - start, args.block_size), dtype=np.uint16)
        size = sum(p.stat().st_size for p in store.rglob("*") if p.is_file())
        files = sum(1 for p in store.rglob("*") if p.is_file())

        recorded = {}

        def digest():
            recorded.update(integrity.tree_digests(store))

        def verify():
            integrity.verify(store, recorded, "cocomix prepare --force")

        def read():
            for start in range(0, rows, step):
                train[start : min(rows, start + step)]

        print(f"store: {size / (1 << 20):,.0f} MiB in {files:,} files, {rows:,} blocks of {args.block_size}")
        print(f"{'step':<8} {'seconds':>8} {'MiB/s':>8} {'x read':>7}")
        timings = {
            name: best_of(fn, args.repeats)
            for name, fn in (("digest", digest), ("verify", verify), ("read", read))
        }
        for name, seconds in timings.items():
            speed, relative = size / (1 << 20) / seconds, seconds / timings["read"]
            print(f"{name:<8} {seconds:>8.2f} {speed:>8,.0f} {relative:>7.2f}")


def best_of(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - started)
    return best


if __name__ == "__main__":
    main()
