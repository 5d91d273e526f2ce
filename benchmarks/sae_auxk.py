"""Dead latents with and without AuxK: `train-sae` twice on the same teacher, data and seed.

    python benchmarks/sae_auxk.py --latents 2048 --k 4 --lr 3e-3 --tokens 245760 --dead-after 16384
    python benchmarks/sae_auxk.py --teacher PATH/TO/model.gguf --layer 3 --latents 4096 --k 8 --lr 3e-3

Without `--teacher` the activations come from `tests.conftest.tiny_teacher` (a random GPT-2, d=32) on IMDb
reviews from ../shared/data; `--sparse-embeddings` replaces its token embeddings by sums of 2 of 512 unit
features in a 16-dimensional subspace and hooks `resid_pre` of block 0 (activations with a sparse ground
truth). Prints the dead fraction at every evaluation and the final FVU for AuxK off (`sae.aux_coef = 0`)
and on (the default 1/32), both with `sae.dead_latents = "auxk"` (so no resampling). Results and their
reading are in docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipelines.config.loading import load_config  # noqa: E402
from pipelines.stages import train_sae  # noqa: E402
from tests.conftest import prepared_run, tiny_teacher  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", default="", help="a teacher spec; default: a tiny random GPT-2")
    parser.add_argument("--layer", type=int, default=1)
    parser.add_argument("--sparse-embeddings", action="store_true")
    parser.add_argument("--documents", type=int, default=1500)
    parser.add_argument("--latents", type=int, default=2048)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--lr", type=float, default=0.0, help="0: the Gao-scaled default")
    parser.add_argument("--tokens", type=int, default=245_760)
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--dead-after", type=int, default=16_384)
    parser.add_argument("--evals", type=int, default=6)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        teacher, hook, layer = args.teacher, "resid_post", args.layer
        if not teacher:
            teacher = str(tiny_teacher(base / "teacher"))
            if args.sparse_embeddings:
                sparse_embeddings(base / "teacher")
                hook, layer = "resid_pre", 0
        extra = {"tokenizer": teacher} if args.teacher else {}
        prepared_run(base, documents=args.documents, block_size=64, **extra)
        os.chdir(base)
        lr = args.lr or "Gao default"
        print(f"teacher {teacher} layer {layer} {hook}; {args.latents} latents, k={args.k}, lr {lr}")
        for coef in (0.0, 1 / 32):
            values = {
                "teacher.model": teacher,
                "teacher.layer": layer,
                "teacher.hook": hook,
                "sae.latents": args.latents,
                "sae.k": args.k,
                "sae.lr": args.lr,
                "sae.train_tokens": args.tokens,
                "sae.batch_tokens": args.batch,
                "sae.buffer_tokens": 16_384,
                "sae.dead_after_tokens": args.dead_after,
                "sae.eval_every_tokens": args.tokens // args.evals,
                "sae.eval_tokens": 2048,
                "sae.dead_latents": "auxk",  # the default is `resample`; this script measures AuxK alone
                "sae.aux_coef": coef,
            }
            cfg = load_config(base / "cocomix.toml", [f"{k}={v}" for k, v in values.items()])
            train_sae.run(cfg, progress=False, force=True)
            rows = [
                json.loads(line) for line in (base / "run/train-sae/metrics.jsonl").read_text().splitlines()
            ]
            dead = " ".join(f"{r['dead_fraction']:.3f}" for r in rows)
            print(f"aux_coef {coef:.4f}: dead by eval [{dead}], final FVU {rows[-1]['fvu']:.4f}", flush=True)


def sparse_embeddings(folder: Path, features: int = 512, subspace: int = 16, per_token: int = 2) -> None:
    from safetensors.torch import load_file, save_file

    state = load_file(str(folder / "model.safetensors"))
    d = state["transformer.wte.weight"].shape[1]
    generator = torch.Generator().manual_seed(1)
    basis = torch.linalg.qr(torch.randn(d, subspace, generator=generator))[0]
    directions = torch.nn.functional.normalize(torch.randn(features, subspace, generator=generator), dim=-1)
    directions = directions @ basis.T
    vocab = state["transformer.wte.weight"].shape[0]
    ids = torch.stack([torch.randperm(features, generator=generator)[:per_token] for _ in range(vocab)])
    magnitudes = torch.rand(vocab, per_token, generator=generator) + 1
    state["transformer.wte.weight"] = (magnitudes[..., None] * directions[ids]).sum(1).contiguous()
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})


if __name__ == "__main__":
    main()
