"""`train-sae`'s TopK trainer against SAELens's TopK trainer on the same cached teacher activations.

Setup (once): SAELens is installed only for this benchmark, in its own virtual environment beside the
project's, with the CPU torch wheel installed first so that pip keeps it:

    python3 -m venv /work/venv-saelens
    /work/venv-saelens/bin/pip install torch==2.13.0      # the CPU wheel; check `pip install --dry-run`
    /work/venv-saelens/bin/pip install -e .                # cocomix itself (run from the repo root)
    /work/venv-saelens/bin/pip install sae-lens==6.54.12

Run (from the repo root):

    /work/venv-saelens/bin/python benchmarks/sae_vs_saelens.py                   # issue 5's settings
    /work/venv-saelens/bin/python benchmarks/sae_vs_saelens.py --regime dead     # where latents die

`--regime` picks the settings (REGIMES below); `--latents`, `--k`, `--tokens`, `--lr` and
`--dead-after-tokens` override them. Four trainers run one after the other on the same batches: ours with
`sae.dead_latents` `off`, `auxk` and `resample`, and SAELens's TopK trainer with its AuxK (`--only` picks
some).

Activations: SmolLM2-135M-Instruct (the GGUF in ../shared/models) at `--layer` (`resid_post`) on IMDb
reviews (../shared/data) tokenized with the teacher's tokenizer, documents joined by the separator
`prepare` uses, cut into blocks of 256 tokens. They are computed once and cached raw (float32) in a .npy
file (`--cache`), laid out as [held-out | train]; a cache with at least as many rows is reused. The SAE
input layer norm (`pipelines.sae.normalization.normalize_input`) is applied once to all of them, and the
training rows are shuffled once with a fixed seed, so all trainers see the same normalised batches in the
same order.

Ours: `pipelines.sae.trainer.SaeTrainer` (Gao et al. 2024) with its buffer fed from the cache; the loop
of `train()` (resampling, then `_train_step`) runs timed without `train()`'s teacher-based `evaluate()`.
SAELens: `TopKTrainingSAE` + `SAETrainer.fit()` with a data provider over the same batches, no wandb, no
checkpoints, its defaults otherwise (AuxK coefficient 1, decoder init norm 0.1, activations rescaled by
the decoder norm, unnormalised MSE, b_dec starting at 0, Adam eps 1e-8; it clips gradients at 1 as ours
does). All use the same width, k, batch, number of steps, Adam learning rate (ours' Gao-scaled default
when 0) and dead window (`--dead-after-tokens`, converted to steps for SAELens).

Metrics, from one function for every SAE after training: FVU = sum of squared errors / sum of squared
deviations from the mean, on the held-out activations (normalised space); L0 on the same; dead fraction =
latents that never activate (> 0) over the last `--dead-window` training tokens, encoded with the final
weights; loss increase = the teacher's next-token loss on the held-out blocks with the SAE's reconstruction
spliced in at the hook, minus its clean loss. Throughput: training tokens / wall seconds of the training loop
alone (caching and evaluation excluded). Targets: ours' FVU <= SAELens's + 0.01, ours' default dead
fraction <= SAELens's.
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


# `--regime`: the settings of each measured comparison; explicit flags override them.
REGIMES = {
    # issue 5: the default recipe on a width where no latent dies
    "default": {"latents": 4096, "k": 32, "tokens": 500_000, "lr": 0.0, "dead_after_tokens": 1_000_000},
    # issue 19: wider, sparser, a higher learning rate and a short dead window, so that latents die
    "dead": {"latents": 8192, "k": 8, "tokens": 393_216, "lr": 3e-3, "dead_after_tokens": 32_768},
}
# The four trainers, in the order they train and print; `dead_latents` is ours' `sae.dead_latents`.
TRAINERS = (
    ("cocomix AuxK off", "off"),
    ("cocomix AuxK", "auxk"),
    ("SAELens AuxK", None),
    ("cocomix resample", "resample"),
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--regime", choices=sorted(REGIMES), default="default", help="settings, see REGIMES")
    parser.add_argument("--latents", type=int, help="SAE width (d_sae)")
    parser.add_argument("--k", type=int, help="active latents per token")
    parser.add_argument("--tokens", type=int, help="training tokens (rounded up to batches)")
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
        help="the dead window of AuxK (both trainers) and of resampling (`sae.dead_after_tokens`)",
    )
    parser.add_argument("--lr", type=float, help="Adam lr for all; 0: ours' Gao-scaled default")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache", type=Path, default=None, help="activation .npy (default under .cache/)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--only", default="", help="comma-separated trainer names to run (default: all four)")
    args = parser.parse_args()
    for key, value in REGIMES[args.regime].items():
        if getattr(args, key) is None:
            setattr(args, key, value)

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
    held_out_raw = torch.from_numpy(np.array(raw[: args.eval_tokens]))
    del raw
    recent = train[n_train - dead_window :]

    from pipelines.config.schema import SaeConfig
    from pipelines.sae.trainer import SaeTrainer

    lr = args.lr or 2e-4 / math.sqrt(args.latents / 2**14)
    chosen = [name.strip() for name in args.only.split(",") if name.strip()]
    rows = {}
    for name, dead_latents in TRAINERS:
        if chosen and name not in chosen:
            continue
        if dead_latents is None:
            rows[name] = run_saelens(train, args, lr)
        else:
            with tempfile.TemporaryDirectory() as stage_dir:
                rows[name] = run_ours(SaeTrainer, train, args, lr, Path(stage_dir), dead_latents)
        print(f"trained {name} in {rows[name][2]:.0f} s", flush=True)

    print(
        f"\nSmolLM2-135M layer {args.layer} {HOOK}, d_in {train.shape[1]}, {args.latents:,} latents, "
        f"k={args.k}, {steps} steps x {args.batch:,} = {n_train:,} train tokens, Adam lr {lr:.3g} (all), "
        f"dead after {args.dead_after_tokens:,} tokens (AuxK and resampling); {torch.get_num_threads()} "
        f"threads, {args.device}, torch {torch.__version__}, sae-lens {sae_lens_version()}, "
        f"regime `{args.regime}`"
    )
    print(
        f"FVU, L0 and the teacher's loss increase with the SAE spliced in on {len(held_out):,} held-out "
        f"tokens; dead = never active over the last {dead_window:,} training tokens (final weights)"
    )
    spliced = spliced_loss_increase(args.layer, len(held_out_raw) // BLOCK, args.device)
    header = ("trainer", "FVU", "dead fraction", "L0", "loss increase", "train tokens/s", "wall s")
    print("{:<18} {:>7} {:>14} {:>7} {:>14} {:>15} {:>8}".format(*header))
    measured = {}
    for name, (sae_encode, sae_decode, wall) in rows.items():
        fvu, dead, l0 = measure(sae_encode, sae_decode, held_out, recent)
        increase = spliced(sae_encode, sae_decode)
        measured[name] = (fvu, dead, n_train / wall)
        print(
            f"{name:<18} {fvu:>7.4f} {dead:>14.4f} {l0:>7.2f} {increase:>+14.4f} {n_train / wall:>15,.0f} "
            f"{wall:>8.1f}"
        )
    if "SAELens AuxK" not in measured:
        return
    lens_fvu, lens_dead, lens_tps = measured["SAELens AuxK"]
    ours = [(n, m) for n, m in measured.items() if n != "SAELens AuxK"]
    eligible = [(m[0], n) for n, m in ours if m[1] <= lens_dead]
    best = min(eligible)[1] if eligible else "none"
    print(f"lowest FVU with a dead fraction <= SAELens's ({lens_dead:.4f}): {best}")
    default = dict((d, n) for n, d in TRAINERS if d)[SaeConfig().dead_latents]
    if default in measured:
        fvu, dead, tps = measured[default]
        verdict = "met" if dead <= lens_dead and fvu <= lens_fvu + 0.01 else "MISSED"
        print(
            f"default `sae.dead_latents = {SaeConfig().dead_latents!r}` ({default}): dead {dead:.4f} <= "
            f"{lens_dead:.4f} and FVU {fvu:.4f} <= {lens_fvu:.4f} + 0.01 -> {verdict}; "
            f"throughput {tps / lens_tps:.2f}x SAELens's"
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

    teacher = load_teacher(str(SMOLLM2), layer, HOOK, device)
    n_blocks = -(-tokens // BLOCK)
    blocks = imdb_blocks(teacher, n_blocks)
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


def imdb_blocks(teacher, n_blocks: int) -> torch.Tensor:
    """The first `n_blocks` blocks of IMDb reviews in the teacher's tokens, joined by `prepare`'s
    separator."""
    from pipelines.data.tokenizer import document_separator

    _, separator_id = document_separator(teacher.tokenizer, "")
    backend = teacher.tokenizer.backend
    encode = getattr(backend, "encode_batch_fast", backend.encode_batch)
    stream: list[int] = []
    with gzip.open(IMDB, "rt") as fh:
        while len(stream) < n_blocks * BLOCK:
            texts = [json.loads(line)["text"] for _, line in zip(range(1000), fh, strict=False)]
            if not texts:
                raise SystemExit(f"{IMDB} holds fewer than {n_blocks * BLOCK:,} tokens")
            for encoding in encode(texts, add_special_tokens=False):
                stream.extend(encoding.ids)
                stream.append(separator_id)
    return torch.tensor(stream[: n_blocks * BLOCK], dtype=torch.int64).view(n_blocks, BLOCK)


def prepare(raw: np.ndarray, eval_tokens: int, n_train: int, seed: int, device: str):
    """Layer-normed held-out rows and shuffled layer-normed training rows, both float32 on `device`."""
    from pipelines.sae.normalization import normalize_input

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


def run_ours(trainer_class, train: torch.Tensor, args, lr: float, stage_dir: Path, dead_latents: str):
    """Our SaeTrainer on the cached rows with `sae.dead_latents`; (encode, decode, training wall seconds)."""
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
            dead_latents=dead_latents,
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
    while trainer.step < trainer.total_steps:  # SaeTrainer.train's loop without its evaluations
        if trainer._resample_due():
            trainer.resample_dead_latents()
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


def spliced_loss_increase(layer: int, n_blocks: int, device: str):
    """`increase(encode, decode)`: the teacher's mean next-token loss on the held-out blocks with the SAE's
    reconstruction (un-normalised) in place of the hook's activations, minus the clean loss."""
    from pipelines.concepts.teacher import load_teacher
    from pipelines.sae.normalization import normalize_input

    teacher = load_teacher(str(SMOLLM2), layer, HOOK, device)
    chunks = imdb_blocks(teacher, n_blocks).to(device).split(8)  # (8, 256, vocab) logits at a time

    def loss(replace=None) -> float:
        with torch.no_grad():
            return sum(teacher.next_token_loss(ids, replace=replace) for ids in chunks) / len(chunks)

    clean = loss()

    def increase(encode, decode) -> float:
        def replace(hidden):
            x, mean, std = normalize_input(hidden.float())
            return (decode(encode(x.flatten(0, 1))).view_as(x) * std + mean).to(hidden.dtype)

        return loss(replace) - clean

    return increase


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def sae_lens_version() -> str:
    from importlib.metadata import version

    return version("sae-lens")


if __name__ == "__main__":
    main()
