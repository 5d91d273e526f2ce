"""`train-sae`'s TopK trainer against SAELens's TopK trainer on the same cached teacher activations.

Setup (once): SAELens is installed only for this benchmark, in its own virtual environment beside the
project's, with the CPU torch wheel installed first so that pip keeps it:

    python3 -m venv /work/venv-saelens
    /work/venv-saelens/bin/pip install torch==2.13.0      # the CPU wheel; check `pip install --dry-run`
    /work/venv-saelens/bin/pip install -e .                # cocomix itself (run from the repo root)
    /work/venv-saelens/bin/pip install sae-lens

Run (from the repo root):

    /work/venv-saelens/bin/python benchmarks/sae_vs_saelens.py --latents 4096 --k 32 --tokens 500000

Activations: SmolLM2-135M-Instruct (the GGUF in ../shared/models) at `--layer` (`resid_post`) on IMDb
reviews (../shared/data) tokenized with the teacher's tokenizer, documents joined by the separator
`prepare` uses, cut into blocks of 256 tokens. They are computed once and cached raw (float32) in a .npy
file (`--cache`), laid out as [held-out | train]; a cache with at least as many rows is reused. The SAE
input layer norm (`pipelines.sae.topk.normalize_input`) is applied once to all of them, and the training rows
are shuffled once with a fixed seed, so both trainers see the same normalised batches in the same order.

Ours: `pipelines.stages.train_sae.SaeTrainer` (Gao et al. 2024) with its buffer fed from the cache; its
`_train_step` is called in a timed loop (`train()` would also run the teacher-based `evaluate()`).
SAELens: `TopKTrainingSAE` + `SAETrainer.fit()` with a data provider over the same batches, no wandb, no
checkpoints, its defaults otherwise (AuxK coefficient 1, decoder init norm 0.1, activations rescaled by
the decoder norm, unnormalised MSE, b_dec starting at 0, Adam eps 1e-8; it clips gradients at 1 as ours
does). Both use the same width, k, batch, number of steps, Adam learning rate (ours' Gao-scaled default
unless `--lr`) and dead window for AuxK (`--dead-after-tokens`, converted to steps for SAELens).

Metrics, from one function for both SAEs after training: FVU = sum of squared errors / sum of squared
deviations from the mean, on the held-out activations (normalised space); L0 on the same; dead fraction =
latents that never activate (> 0) over the last `--dead-window` training tokens, encoded with the final
weights. Throughput: training tokens / wall seconds of the training loop alone (caching and evaluation
excluded). Targets: ours' FVU <= SAELens's + 0.01, ours' tokens/s >= SAELens's.
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
IMDB = SHARED / "data/corpus/imdb/aclImdb_v1_reviews.jsonl.gz"
SMOLLM2 = SHARED / "models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf"
BLOCK = 256
HOOK = "resid_post"
BUFFER_BATCHES = 32  # our trainer's shuffling buffer, in batches (131,072 tokens at batch 4,096)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--latents", type=int, default=4096, help="SAE width (d_sae)")
    parser.add_argument("--k", type=int, default=32, help="active latents per token")
    parser.add_argument("--tokens", type=int, default=500_000, help="training tokens (rounded up to batches)")
    parser.add_argument("--batch", type=int, default=4096, help="activations per optimiser step")
    parser.add_argument("--layer", type=int, default=3, help="teacher layer (resid_post) of 0-29")
    parser.add_argument("--eval-tokens", type=int, default=16_384, help="held-out activations for FVU, L0")
    parser.add_argument(
        "--dead-window",
        type=int,
        default=0,
        help="tokens for the dead fraction; 0: the last 25%% of training",
    )
    parser.add_argument(
        "--dead-after-tokens",
        type=int,
        default=1_000_000,
        help="AuxK's dead window in both trainers (ours' `sae.dead_after_tokens` default)",
    )
    parser.add_argument("--lr", type=float, default=0.0, help="Adam lr for both; 0: ours' Gao-scaled default")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache", type=Path, default=None, help="activation .npy (default under .cache/)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--saelens-first", action="store_true", help="train SAELens before ours (to check for order effects)"
    )
    args = parser.parse_args()

    try:
        import sae_lens  # noqa: F401
    except ImportError:
        sys.exit(
            "sae_lens is not importable; install it in a separate venv: python3 -m venv /work/venv-saelens, "
            "then its pip: torch==2.13.0, -e ., sae-lens (see this script's docstring)"
        )

    steps = -(-args.tokens // args.batch)
    n_train = steps * args.batch
    dead_window = args.dead_window or n_train // 4
    cache = args.cache or ROOT / ".cache" / f"sae_vs_saelens-{SMOLLM2.stem}-layer{args.layer}-{HOOK}.npy"

    started = time.perf_counter()
    raw = cached_activations(cache, args.layer, args.eval_tokens + n_train, args.device)
    print(f"activations: {cache} ({raw.shape[0]:,} x {raw.shape[1]}), {time.perf_counter() - started:.1f} s")
    held_out, train = prepare(raw, args.eval_tokens, n_train, args.seed, args.device)
    del raw
    recent = train[n_train - dead_window :]

    from pipelines.stages.train_sae import SaeTrainer

    lr = args.lr or 2e-4 / math.sqrt(args.latents / 2**14)
    rows = {}
    for name in ("SAELens TopK", "cocomix SaeTrainer")[:: 1 if args.saelens_first else -1]:
        if name == "SAELens TopK":
            rows[name] = run_saelens(train, args, lr)
        else:
            with tempfile.TemporaryDirectory() as stage_dir:
                rows[name] = run_ours(SaeTrainer, train, args, lr, Path(stage_dir))

    print(
        f"\nSmolLM2-135M layer {args.layer} {HOOK}, d_in {train.shape[1]}, {args.latents:,} latents, "
        f"k={args.k}, {steps} steps x {args.batch:,} = {n_train:,} train tokens, Adam lr {lr:.3g} (both), "
        f"AuxK dead after {args.dead_after_tokens:,} tokens; {torch.get_num_threads()} threads, "
        f"{args.device}, torch {torch.__version__}, sae-lens {sae_lens_version()}"
    )
    print(
        f"FVU and L0 on {len(held_out):,} held-out tokens; dead = never active over the last "
        f"{dead_window:,} training tokens (final weights); trained {' then '.join(rows)}"
    )
    header = ("trainer", "FVU", "dead fraction", "L0", "train tokens/s", "wall s")
    print("{:<20} {:>7} {:>14} {:>7} {:>15} {:>8}".format(*header))
    measured = []
    for name in ("cocomix SaeTrainer", "SAELens TopK"):
        sae_encode, sae_decode, wall = rows[name]
        fvu, dead, l0 = measure(sae_encode, sae_decode, held_out, recent)
        measured.append((fvu, n_train / wall))
        print(f"{name:<20} {fvu:>7.4f} {dead:>14.4f} {l0:>7.2f} {n_train / wall:>15,.0f} {wall:>8.1f}")
    (ours_fvu, ours_tps), (lens_fvu, lens_tps) = measured
    print(
        f"FVU: ours {ours_fvu:.4f} vs SAELens {lens_fvu:.4f} + 0.01 -> "
        f"{'met' if ours_fvu <= lens_fvu + 0.01 else 'MISSED'}"
    )
    print(
        f"throughput: ours / SAELens = {ours_tps / lens_tps:.2f}x (target >= 1.00x) -> "
        f"{'met' if ours_tps >= lens_tps else 'MISSED'}"
    )
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}")


# --- activations ----------------------------------------------------------------------------------------


def cached_activations(path: Path, layer: int, tokens: int, device: str) -> np.ndarray:
    """At least `tokens` raw teacher activations (rows), computed once and reused from `path`."""
    if path.exists():
        acts = np.load(path, mmap_mode="r")
        if acts.shape[0] >= tokens:
            return acts
        print(f"{path} holds {acts.shape[0]:,} rows, {tokens:,} needed: recomputing")
    from pipelines.concepts.teacher import load_teacher
    from pipelines.data.tokenizer import document_separator

    teacher = load_teacher(str(SMOLLM2), layer, HOOK, device)
    _, separator_id = document_separator(teacher.tokenizer, "")
    backend = teacher.tokenizer.backend
    encode = getattr(backend, "encode_batch_fast", backend.encode_batch)
    n_blocks = -(-tokens // BLOCK)
    stream: list[int] = []
    with gzip.open(IMDB, "rt") as fh:
        while len(stream) < n_blocks * BLOCK:
            texts = [json.loads(line)["text"] for _, line in zip(range(1000), fh, strict=False)]
            if not texts:
                raise SystemExit(f"{IMDB} holds fewer than {tokens:,} tokens")
            for encoding in encode(texts, add_special_tokens=False):
                stream.extend(encoding.ids)
                stream.append(separator_id)
    blocks = torch.tensor(stream[: n_blocks * BLOCK], dtype=torch.int64).view(n_blocks, BLOCK)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial.npy")
    out = np.lib.format.open_memmap(
        partial, mode="w+", dtype=np.float32, shape=(n_blocks * BLOCK, teacher.d_model)
    )
    per_batch = 16
    for start in range(0, n_blocks, per_batch):
        hidden = teacher.hidden_states(blocks[start : start + per_batch].to(device)).float().flatten(0, 1)
        out[start * BLOCK : start * BLOCK + len(hidden)] = hidden.cpu().numpy()
        print(f"\rcaching activations: {min(start + per_batch, n_blocks)}/{n_blocks} blocks", end="")
    print()
    out.flush()
    del out
    partial.replace(path)
    return np.load(path, mmap_mode="r")


def prepare(raw: np.ndarray, eval_tokens: int, n_train: int, seed: int, device: str):
    """Layer-normed held-out rows and shuffled layer-normed training rows, both float32 on `device`."""
    from pipelines.sae.topk import normalize_input

    def normalized(rows: np.ndarray) -> torch.Tensor:
        out = torch.empty(rows.shape, dtype=torch.float32)
        for start in range(0, len(rows), 65_536):
            out[start : start + 65_536] = normalize_input(
                torch.from_numpy(np.array(rows[start : start + 65_536]))
            )[0]
        return out

    held_out = normalized(raw[:eval_tokens])
    train = normalized(raw[eval_tokens : eval_tokens + n_train])
    train = train[torch.randperm(n_train, generator=torch.Generator().manual_seed(seed))]
    return held_out.to(device), train.to(device)


# --- the two trainers -----------------------------------------------------------------------------------


def run_ours(trainer_class, train: torch.Tensor, args, lr: float, stage_dir: Path):
    """Our SaeTrainer on the cached rows; returns (encode, decode, training wall seconds)."""
    from pipelines.config.schema import Config, RunConfig, SaeConfig

    class CachedSaeTrainer(trainer_class):
        """SaeTrainer whose buffer r is rows [r * buffer, (r + 1) * buffer) of the pre-shuffled cache."""

        def _buffer_activations(self, index: int):
            size = self.blocks_per_buffer * self.block_size
            return train[index * size : (index + 1) * size]

    cfg = Config(
        run=RunConfig(seed=args.seed),
        sae=SaeConfig(
            latents=args.latents,
            k=args.k,
            train_tokens=len(train),
            batch_tokens=args.batch,
            buffer_tokens=BUFFER_BATCHES * args.batch,
            lr=lr,
            dead_after_tokens=args.dead_after_tokens,
            device=args.device,
        ),
    )
    trainer = CachedSaeTrainer(
        cfg,
        SimpleNamespace(d_model=train.shape[1]),
        SimpleNamespace(block_size=BLOCK),  # only `block_size` is read; the buffers come from the cache
        stage_dir,
        torch.device(args.device),
    )
    with torch.no_grad():  # as SaeTrainer.restore on a fresh run: the pre-bias starts at the data's centre
        trainer.sae.b_dec.copy_(trainer._batch(0).mean(0))
    sync(args.device)
    started = time.perf_counter()
    while trainer.step < trainer.total_steps:
        trainer._train_step(trainer._batch(trainer.step))
        trainer.step += 1
    sync(args.device)
    wall = time.perf_counter() - started
    sae = trainer.sae

    def encode(x):
        values, ids = sae.pre_activation(x).topk(sae.k, dim=-1)
        return torch.zeros(len(x), sae.d_sae, device=x.device).scatter_(-1, ids, values.relu())

    def decode(acts):
        return acts @ sae.W_dec + sae.b_dec

    return encode, decode, wall


def run_saelens(train: torch.Tensor, args, lr: float):
    """SAELens's TopKTrainingSAE + SAETrainer.fit() over the same batches; (encode, decode, wall seconds)."""
    from sae_lens import LoggingConfig, SAETrainer, TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.config import SAETrainerConfig

    steps = len(train) // args.batch

    def batches():
        step = 0
        while True:  # fit() draws exactly `steps` batches; cycle anyway rather than raise StopIteration
            i = step % steps
            yield train[i * args.batch : (i + 1) * args.batch]
            step += 1

    torch.manual_seed(args.seed)
    sae = TopKTrainingSAE(
        TopKTrainingSAEConfig(
            d_in=train.shape[1], d_sae=args.latents, k=args.k, dtype="float32", device=args.device
        )
    )
    trainer = SAETrainer(
        cfg=SAETrainerConfig(
            total_training_samples=len(train),
            train_batch_size_samples=args.batch,
            lr=lr,
            lr_end=lr
            / 10,  # unused by the constant schedule, but SAETrainer asserts it is set (its runner does)
            device=args.device,
            dead_feature_window=-(-args.dead_after_tokens // args.batch),
            n_checkpoints=0,
            checkpoint_path=None,
            save_final_checkpoint=False,
            logger=LoggingConfig(log_to_wandb=False),
        ),
        sae=sae,
        data_provider=batches(),
    )
    sync(args.device)
    started = time.perf_counter()
    trainer.fit()
    sync(args.device)
    wall = time.perf_counter() - started
    assert trainer.n_training_samples == len(train), trainer.n_training_samples
    sae.eval()
    return sae.encode, sae.decode, wall


# --- metrics ----------------------------------------------------------------------------------------------


@torch.no_grad()
def measure(encode, decode, held_out: torch.Tensor, recent: torch.Tensor, chunk: int = 8192):
    """(FVU, dead fraction, L0) of one SAE given as dense `encode(x) -> acts` and `decode(acts) -> x`."""
    mean = held_out.double().mean(0)
    error = total = active = 0.0
    for x in held_out.split(chunk):
        acts = encode(x)
        error += (x - decode(acts)).double().pow(2).sum().item()
        total += (x.double() - mean).pow(2).sum().item()
        active += (acts > 0).sum().item()
    fired = None
    for x in recent.split(chunk):
        now = (encode(x) > 0).any(0)
        fired = now if fired is None else fired | now
    return error / total, 1 - fired.float().mean().item(), active / len(held_out)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def sae_lens_version() -> str:
    from importlib.metadata import version

    return version("sae-lens")


if __name__ == "__main__":
    main()
