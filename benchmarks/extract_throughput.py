"""Throughput of `extract-concepts` against an official-style extraction (same teacher, SAE and batches).

    python benchmarks/extract_throughput.py --blocks 16 --smollm2-blocks 8

"official-style" is what the paper's code does every training step: teacher weights require grad, a full
backward (weight gradients included) from the mean next-token loss, and the dense attribution
`(g @ W_dec^T) * TopK(acts)` over all C latents, then top-4. "cocomix" is the stage itself
(`pipelines.stages.extract.run` on a token store holding the same blocks, same batches), timed over its
chunk loop
(model loading excluded on both sides). Rows: a random GPT-2-small-shaped teacher (12 layers, d=768, hook
after block 5) with a random 32k-latent k=32 SAE, and SmolLM2-135M from ../shared/models (hook after block 9)
with a random 4,096-latent k=32 SAE. Targets: >= 1.7x official-style, and SAE + attribution + storage at most
15% of the teacher's forward+backward time.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from pipelines.concepts.teacher import load_teacher
from pipelines.config.loading import load_config
from pipelines.data.token_store import open_token_store
from pipelines.sae.formats import save_saelens
from pipelines.sae.topk_sae import TopKSAE
from pipelines.stages import extract, prepare

SHARED = Path(__file__).resolve().parents[2] / "shared"
GPT2_TOKENIZER = SHARED / "data/tokenizers/gpt2/tokenizer.json"
IMDB = SHARED / "data/corpus/imdb/aclImdb_v1_reviews.jsonl.gz"
SMOLLM2 = SHARED / "models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=16, help="blocks of --block-size tokens (GPT-2 shape)")
    parser.add_argument("--smollm2-blocks", type=int, default=8)
    parser.add_argument("--block-size", type=int, default=256)
    parser.add_argument("--tokens-per-batch", type=int, default=1024)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()

    print(
        f"device {args.device}, {torch.get_num_threads()} threads, block {args.block_size}, "
        f"{args.tokens_per_batch} tokens per batch"
    )
    header = (
        "teacher",
        "tokens",
        "official tok/s",
        "cocomix tok/s",
        "speed-up",
        "SAE+attr+store",
        "bytes/tok",
    )
    print("{:<22} {:>7} {:>14} {:>13} {:>9} {:>15} {:>10}".format(*header))
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        gpt2 = random_gpt2(work / "gpt2")
        save_saelens(random_sae(768, 32768, 32), work / "sae-gpt2")
        report(
            "GPT-2-small (random)",
            work / "a",
            gpt2,
            str(GPT2_TOKENIZER),
            5,
            work / "sae-gpt2",
            args.blocks,
            args,
        )
        if SMOLLM2.exists():
            save_saelens(random_sae(576, 4096, 32), work / "sae-smollm2")
            report(
                "SmolLM2-135M",
                work / "b",
                SMOLLM2,
                str(SMOLLM2),
                9,
                work / "sae-smollm2",
                args.smollm2_blocks,
                args,
            )
        else:
            print(f"SmolLM2-135M: skipped ({SMOLLM2} is absent)")


def report(
    name, run_root: Path, teacher: Path, tokenizer: str, layer: int, sae_dir: Path, blocks: int, args
) -> None:
    run_root.mkdir()
    overrides = [
        f"run.dir={run_root / 'run'}",
        f"data.source={IMDB}",
        f"data.tokenizer={tokenizer}",
        f"data.block_size={args.block_size}",
        f"data.max_tokens={blocks * args.block_size + args.block_size - 1}",
        "data.val_fraction=0",
        f"teacher.model={teacher}",
        f"teacher.layer={layer}",
        f"sae.path={sae_dir}",
        "extract.blocks_per_chunk=4",
        f"extract.tokens_per_batch={args.tokens_per_batch}",
        f"extract.device={args.device}",
    ]
    empty = run_root / "empty.toml"
    empty.write_text("")
    cfg = load_config(empty, overrides)
    prepare.run(cfg, progress=False)
    ours = extract.run(cfg, progress=False).summary
    tokens = ours["tokens"]
    seconds = ours["seconds"]
    overhead = (seconds["sae_and_attribution"] + seconds["storage"]) / seconds["teacher"]

    store = open_token_store(run_root / "run" / "prepare" / "tokens.zarr")
    official_s = official_style(cfg, store.split("train")[:], args)
    print(
        f"{name:<22} {tokens:>7,} {tokens / official_s:>14,.0f} {ours['tokens_per_s']:>13,.0f} "
        f"{ours['tokens_per_s'] * official_s / tokens:>8.2f}x {overhead:>14.1%} "
        f"{ours['bytes_per_token']:>10.2f}"
    )


def official_style(cfg, blocks, args) -> float:
    """Seconds for the paper's code path over the same blocks and batches."""
    from pipelines.sae.formats import load_sae

    teacher = load_teacher(cfg.teacher.model, cfg.teacher.layer, "resid_post", args.device)
    model = teacher.model.requires_grad_(True)  # the official extractor leaves the weights trainable
    sae = load_sae(cfg.sae.path).sae.to(args.device)
    per_batch = max(1, args.tokens_per_batch // args.block_size)
    captured = {}
    handle = teacher.block.register_forward_hook(
        lambda module, inputs, output: captured.__setitem__("h", output)
    )
    synchronize(args.device)
    start = time.perf_counter()
    for first in range(0, len(blocks), per_batch):
        ids = torch.from_numpy(blocks[first : first + per_batch].astype("int64")).to(args.device)
        model.zero_grad(set_to_none=True)
        logits = model(input_ids=ids, use_cache=False).logits
        hidden = captured["h"][0] if isinstance(captured["h"], tuple) else captured["h"]
        hidden.retain_grad()
        F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten()).backward()
        with torch.no_grad():
            h, g = hidden.flatten(0, 1), hidden.grad.flatten(0, 1)
            pre = sae.pre_activation(sae.prepare_input(h)[0])
            top = pre.topk(sae.k, dim=-1)
            activations = torch.zeros_like(pre).scatter(-1, top.indices, top.values.relu())
            (g @ sae.W_dec.t() * activations).topk(4, dim=-1)
    synchronize(args.device)
    handle.remove()
    return time.perf_counter() - start


def random_gpt2(folder: Path) -> Path:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(n_layer=12, n_embd=768, n_head=12, vocab_size=50257)).save_pretrained(folder)
    shutil.copy(GPT2_TOKENIZER, folder / "tokenizer.json")
    return folder


def random_sae(d_in: int, d_sae: int, k: int) -> TopKSAE:
    torch.manual_seed(0)
    sae = TopKSAE(d_in, d_sae, k)
    with torch.no_grad():
        for param in sae.parameters():
            param.normal_(0.0, 0.05)
    return sae


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
