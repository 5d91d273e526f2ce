"""Save a tiny random GPT-2 (2 layers, d=64) with the real GPT-2 tokenizer, for lm-eval plumbing tests.

    /work/venv-lmeval/bin/python benchmarks/lmeval/make_tiny_model.py --out /tmp/tiny-gpt2

The weights are random (seeded), so metrics are near chance; the point is that lm-eval and
`cocomix eval` score the same requests with the same model and must agree exactly.
"""

from __future__ import annotations

import argparse
from pathlib import Path

SHARED = Path(__file__).resolve().parents[2].parent / "shared" / "data"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="/tmp/tiny-gpt2")
    ap.add_argument("--tokenizer", default=str(SHARED / "tokenizers" / "gpt2" / "tokenizer.json"))
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    torch.manual_seed(args.seed)
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=64, n_head=2))  # n_positions=1024, vocab 50257
    model.save_pretrained(args.out)
    tok = PreTrainedTokenizerFast(
        tokenizer_file=args.tokenizer, eos_token="<|endoftext|>", bos_token="<|endoftext|>"
    )
    tok.save_pretrained(args.out)
    print(f"saved tiny GPT-2 ({sum(p.numel() for p in model.parameters())} params) to {args.out}")


if __name__ == "__main__":
    main()
