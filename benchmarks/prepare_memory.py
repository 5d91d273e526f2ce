"""Peak memory of `prepare` as the corpus grows: it must stay flat (the corpus is streamed, never held).

    python benchmarks/prepare_memory.py --copies 1 3

Each row is a fresh process that runs the whole stage on N copies of the IMDb corpus from ../shared/data
(a glob over symlinks, so the documents are read N times) and reports its own peak RSS.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

CHILD = """
import json, resource, sys
from pipelines.stages import prepare
from pipelines.config.loading import load_config
# sys.argv[1] is an empty config file: the benchmark must not read the project's cocomix.toml.
summary = prepare.run(load_config(sys.argv[1], sys.argv[2:]), progress=False).summary
peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"tokens": summary["tokens_read"], "peak_mib": peak_mib}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--copies", type=int, nargs="+", default=[1, 3])
    parser.add_argument(
        "--corpus", type=Path, default=SHARED_DATA / "corpus/imdb/aclImdb_v1_reviews.jsonl.gz"
    )
    parser.add_argument("--tokenizer", type=Path, default=SHARED_DATA / "tokenizers/gpt2/tokenizer.json")
    args = parser.parse_args()

    print(f"{'copies':>6} {'tokens':>12} {'peak RSS MiB':>13}")
    for copies in args.copies:
        with tempfile.TemporaryDirectory() as work:
            for i in range(copies):
                (Path(work) / f"part{i}.jsonl.gz").symlink_to(args.corpus.resolve())
            empty_config = Path(work) / "empty.toml"
            empty_config.write_text("")
            overrides = [
                f"run.dir={work}/run",
                f"data.source={work}/*.jsonl.gz",
                f"data.tokenizer={args.tokenizer}",
                "data.max_documents=0",
            ]
            out = subprocess.run(
                [sys.executable, "-c", CHILD, str(empty_config), *overrides],
                check=True,
                capture_output=True,
                text=True,
            ).stdout
            row = json.loads(out.strip().splitlines()[-1])
            print(f"{copies:>6} {row['tokens']:>12,} {row['peak_mib']:>13,.0f}")


if __name__ == "__main__":
    main()
