"""Step time and MFU of every `pretrain` objective on one student and batch, against the bare model step.

    python benchmarks/pretrain_step.py --steps 20

Each row runs the real stage (`pipelines.stages.pretrain.run`: data read ahead from the Zarr stores, metrics,
checkpoint cadence off) and reports the median step time after `--skip` warm-up steps. "bare" rows are the
same model's forward + backward + AdamW step on one batch already in memory: the floor the stage's step
time is compared with. Teacher for CoCoMix targets and KD: a random GPT-2-small-shaped model (12 layers,
d=768, the paper's teacher shape) hooked after block 5, with a random 32k-latent k=32 SAE (the paper's SAE
shape); targets are extracted once before the timed runs, except for `cocomix --online-teacher`, which
computes them every step as the official code does. Targets: CoCoMix (cached) at most 1.1x its bare step,
and well under the online step. MFU is printed on CUDA devices with a known peak (see
`pipelines.model.flops.PEAK_FLOPS`); on CPU the achieved GFLOP/s is shown instead.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from pipelines.config.loading import load_config
from pipelines.model.flops import peak_flops, train_flops_per_token
from pipelines.model.gpt import GPT
from pipelines.sae.formats import save_saelens
from pipelines.sae.topk_sae import TopKSAE
from pipelines.stages import extract, prepare, pretrain
from pipelines.training import trainer
from pipelines.training.objectives import concept_loss, next_token_loss
from pipelines.training.optim import build_optimizer

SHARED = Path(__file__).resolve().parents[2] / "shared"
GPT2_TOKENIZER = SHARED / "data/tokenizers/gpt2/tokenizer.json"
IMDB = SHARED / "data/corpus/imdb/aclImdb_v1_reviews.jsonl.gz"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--skip", type=int, default=3, help="warm-up steps left out of the median")
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--batch-blocks", type=int, default=8)
    parser.add_argument("--block-size", type=int, default=256)
    parser.add_argument("--documents", type=int, default=1500)
    parser.add_argument("--sae-latents", type=int, default=32768)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        settings = setup(base, args)
        print(
            f"device {args.device}, {torch.get_num_threads()} threads, preset {args.preset}, batch "
            f"{args.batch_blocks} x {args.block_size} tokens, {args.steps} steps (median after {args.skip})"
        )
        rows = []
        for label, objective, online in [
            ("ntp", "ntp", False),
            ("cocomix (cached)", "cocomix", False),
            ("cocomix (--online-teacher)", "cocomix", True),
            ("pause", "pause", False),
            ("kd (cached top-32)", "kd", False),
        ]:
            stage_seconds, model_config = time_stage(base, settings, objective, online, args)
            rows.append((label, stage_seconds, model_config))
            if objective in ("ntp", "cocomix") and not online:
                rows.append(
                    (f"  bare {objective} model step", time_bare_step(model_config, args), model_config)
                )
    tokens = args.batch_blocks * args.block_size
    print(f"{'run':30} {'step ms':>9} {'tok/s':>9} {'GFLOP/s':>9} {'MFU':>7} {'vs bare':>8}")
    bare = {label.split()[1]: seconds for label, seconds, _ in rows if label.strip().startswith("bare")}
    for label, seconds, config in rows:
        flops = train_flops_per_token(config, args.block_size) * tokens / seconds
        mfu = mfu_of(flops, args.device)
        base_seconds = bare.get(config.variant)
        ratio = (
            f"{seconds / base_seconds:.2f}x" if base_seconds and not label.strip().startswith("bare") else ""
        )
        print(
            f"{label:30} {seconds * 1e3:9.1f} {tokens / seconds:9.0f} {flops / 1e9:9.1f} "
            f"{mfu if mfu is not None else '-':>7} {ratio:>8}"
        )


def setup(base: Path, args) -> dict:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(n_layer=12, n_embd=768, n_head=12)).save_pretrained(base / "teacher")
    (base / "teacher" / "tokenizer.json").write_bytes(GPT2_TOKENIZER.read_bytes())
    save_saelens(TopKSAE(768, args.sae_latents, 32, normalize="layer_norm"), base / "sae")
    settings = {
        "run.dir": str(base / "run"),
        "data.source": str(IMDB),
        "data.tokenizer": str(GPT2_TOKENIZER),
        "data.block_size": args.block_size,
        "data.max_documents": args.documents,
        "data.val_fraction": 0.02,
        "teacher.model": str(base / "teacher"),
        "teacher.layer": 5,
        "sae.path": str(base / "sae"),
        "extract.store_teacher_topk": 32,
        "extract.device": args.device,
    }
    cfg = load_config(None, [f"{k}={v}" for k, v in settings.items()])
    prepare.run(cfg, progress=False)
    started = time.monotonic()
    extract.run(cfg, progress=False)
    print(f"setup: prepared and extracted in {time.monotonic() - started:.0f} s (not timed below)")
    return settings


def time_stage(base: Path, settings: dict, objective: str, online: bool, args) -> tuple[float, object]:
    values = {
        **settings,
        "pretrain.objective": objective,
        "pretrain.preset": args.preset,
        "pretrain.batch_blocks": args.batch_blocks,
        "pretrain.max_steps": args.steps,
        "pretrain.log_every": 1,
        "pretrain.eval_every": 10**9,
        "pretrain.eval_blocks": 1,
        "pretrain.save_every": 10**9,
        "pretrain.device": args.device,
    }
    cfg = load_config(None, [f"{k}={v}" for k, v in values.items()])
    result = pretrain.run(cfg, online_teacher=online, progress=False, force=True)
    lines = (result.dir / trainer.METRICS).read_text().splitlines()
    speeds = [r["tokens_per_s"] for r in map(json.loads, lines) if r["kind"] == "train"][args.skip :]
    tokens = args.batch_blocks * args.block_size
    config = json.loads((result.dir / "model" / "config.json").read_text())["model"]
    from pipelines.model.gpt import ModelConfig

    return tokens / statistics.median(speeds), ModelConfig(**config)


def time_bare_step(config, args) -> float:
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = GPT(config).to(device)
    p = load_config(None, []).pretrain
    optimizer = build_optimizer(model, p, device)
    tokens = torch.randint(0, config.vocab_size, (args.batch_blocks, args.block_size), device=device)
    targets = torch.randint(0, config.n_concepts, (args.batch_blocks, args.block_size, 4), device=device)
    valid = torch.ones(args.batch_blocks, args.block_size, dtype=torch.bool, device=device)
    dtype = torch.bfloat16 if device.type == "cuda" else None
    times = []
    for _ in range(args.steps):
        started = time.perf_counter()
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            out = model(tokens)
        loss = next_token_loss(out.logits, tokens)
        if config.variant == "cocomix":
            loss = loss + 0.1 * concept_loss(out.concept_logits, targets, valid)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    return float(np.median(times[args.skip :]))


def mfu_of(flops_per_s: float, device: str) -> str | None:
    peak = peak_flops(device)
    return f"{flops_per_s / peak:.1%}" if peak else None


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
