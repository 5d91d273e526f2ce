"""Throughput of `prepare` against a bare batched call of the same fast tokenizer on the same text.

    python benchmarks/prepare_throughput.py --documents 50000

Both sides tokenize the first N IMDb reviews from ../shared/data with the GPT-2 tokenizer. "bare" is one
`encode_batch_fast` call over texts already in memory (no reading, no EOS, no writing). "prepare" is the
whole stage, in this process: reading the gzipped JSON lines through `datasets`, tokenizing, routing to
train/val, writing tokens.zarr and its manifest, timed end to end (tokenizer loading included). Target:
prepare >= 0.7x bare. Each side runs `--repeats` times; the best time counts.
"""

from __future__ import annotations

import argparse
import gzip
import json
import tempfile
import time
from pathlib import Path

from pipelines.config.loading import load_config
from pipelines.config.schema import DataConfig
from pipelines.data.tokenizer import load_tokenizer
from pipelines.stages import prepare

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--documents", type=int, default=50_000)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument(
        "--corpus", type=Path, default=SHARED_DATA / "corpus/imdb/aclImdb_v1_reviews.jsonl.gz"
    )
    parser.add_argument("--tokenizer", type=Path, default=SHARED_DATA / "tokenizers/gpt2/tokenizer.json")
    parser.add_argument("--block-size", type=int, default=1024)
    args = parser.parse_args()

    texts = read_texts(args.corpus, args.documents)
    backend = load_tokenizer(str(args.tokenizer)).backend
    batch = DataConfig().batch_documents
    rows = [
        ("bare, one call", *best_of(args.repeats, lambda: bare(backend, texts, len(texts)))),
        (f"bare, batches of {batch}", *best_of(args.repeats, lambda: bare(backend, texts, batch))),
        ("cocomix prepare (end to end)", *best_of(args.repeats, lambda: whole_stage(args))),
    ]
    print(
        f"{args.documents:,} IMDb documents, GPT-2 tokenizer, block {args.block_size}, best of {args.repeats}"
    )
    print(f"{'what':<30} {'tokens':>12} {'seconds':>9} {'tokens/s':>12}")
    for name, seconds, tokens in rows:
        print(f"{name:<30} {tokens:>12,} {seconds:>9.2f} {tokens / seconds:>12,.0f}")
    assert len({tokens for _, _, tokens in rows}) == 1, "the sides did not tokenize the same text"
    fastest_bare = min(seconds for _, seconds, _ in rows[:2])
    print(f"prepare / fastest bare = {fastest_bare / rows[2][1]:.2f}x (target >= 0.70x)")


def read_texts(path: Path, limit: int) -> list[str]:
    texts = []
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        for line in fh:
            if len(texts) == limit:
                break
            texts.append(json.loads(line)["text"])
    return texts


def bare(backend, texts: list[str], batch: int) -> int:
    tokens = 0
    for start in range(0, len(texts), batch):
        tokens += sum(
            len(e.ids)
            for e in backend.encode_batch_fast(texts[start : start + batch], add_special_tokens=False)
        )
    return tokens


def whole_stage(args) -> int:
    with tempfile.TemporaryDirectory() as work:
        empty_config = Path(work) / "empty.toml"  # defaults, not the project's cocomix.toml
        empty_config.write_text("")
        cfg = load_config(
            empty_config,
            [
                f"run.dir={work}/run",
                f"data.source={args.corpus}",
                f"data.tokenizer={args.tokenizer}",
                f"data.block_size={args.block_size}",
                f"data.max_documents={args.documents}",
            ],
        )
        result = prepare.run(cfg, progress=False)
        # Tokens the tokenizer produced, without the EOS separators the bare call does not add.
        return result.summary["tokens_read"] - result.summary["documents"]


def best_of(repeats: int, fn) -> tuple[float, int]:
    best: tuple[float, int] | None = None
    for _ in range(repeats):
        start = time.perf_counter()
        tokens = fn()
        elapsed = time.perf_counter() - start
        best = (elapsed, tokens) if best is None or elapsed < best[0] else best
    return best


if __name__ == "__main__":
    main()
