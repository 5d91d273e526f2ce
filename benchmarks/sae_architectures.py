"""SAE families that `train-sae` trains (`sae.architecture`), compared at equal mean L0 on a real teacher.

The setting of `configs/study.toml`: SmolLM2-135M-Instruct (Q4_1 GGUF) at layer 9 (`resid_post`), the first
64,000 tokens of Shakespeare's plays (`prepare` of that config), 2,048 latents, k = 16, 56,000 training
tokens in batches of 1,024, Adam lr 2e-3, AuxK for dead latents; BatchTopK also at k = 15, where its mean
L0 matches TopK's 16 (`RUNS`). The teacher's activations of every train
and val block are computed once; each SAE is `pipelines.sae.trainer.SaeTrainer` with its buffers read from
them (the same block order, normalisation and shuffle as the stage) and the stage's loop without its
evaluations. Every family is trained with seeds 0 and 1 (`run.seed`: initialisation and data order).

Metrics on the val blocks, with the SAE as it is saved (BatchTopK: JumpReLU at its threshold): FVU (sum of
squared errors over the sum of squared deviations from the mean, raw activation space), L0 (mean active
latents per token), dead (fraction of latents silent for the last `sae.dead_after_tokens` training tokens,
as train-sae logs it), never on val (latents that fire on no val token), loss increase (the teacher's
next-token loss with the reconstruction spliced in at the hook, minus the clean loss).

Run from the repo root (one thread, as measured in docs/BENCHMARKS.md):

    OMP_NUM_THREADS=1 python benchmarks/sae_architectures.py [--run-dir /tmp/sae-architectures]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
# (family, k): the study's k for both, and BatchTopK at a k whose mean L0 on the val tokens matches TopK's
# (its threshold, estimated on training batches, gives about 7% more active latents on the val plays).
RUNS = (("topk", 16), ("batchtopk", 16), ("batchtopk", 15))
SEEDS = (0, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=ROOT / "configs/study.toml")
    parser.add_argument("--run-dir", type=Path, help="where `prepare` writes (default: a temporary folder)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    started = time.perf_counter()
    with contextlib.ExitStack() as stack:
        run_dir = args.run_dir or Path(stack.enter_context(tempfile.TemporaryDirectory()))
        cfg, store, teacher = prepared(args.config, run_dir, stack)
        train, val_ids, val = activations(store, teacher)
        print(
            f"activations: {len(train)} train blocks, {val.shape[0]:,} val tokens, "
            f"{time.perf_counter() - started:.0f} s",
            flush=True,
        )
        clean = teacher.next_token_loss(val_ids)
        rows = []
        for architecture, k in RUNS:
            for seed in SEEDS:
                trained = time.perf_counter()
                sae, trainer = train_sae(cfg, architecture, k, seed, train, store, teacher, run_dir)
                row = {"architecture": architecture, "k": k, "seed": seed, **measure(sae, trainer, val)}
                with torch.no_grad():
                    spliced = teacher.next_token_loss(val_ids, lambda h, sae=sae: sae(h.float()))
                row["loss_increase"] = spliced - clean
                row["train_s"] = time.perf_counter() - trained
                rows.append(row)
                print(f"trained {architecture} k={k} seed {seed} in {row['train_s']:.0f} s", flush=True)
    s = cfg.sae
    print(
        f"\n{teacher.spec} layer {cfg.teacher.layer} {cfg.teacher.hook}, {s.latents:,} latents, "
        f"{s.train_tokens:,} tokens in batches of {s.batch_tokens:,}, lr {s.lr:g}, dead latents "
        f"`{s.dead_latents}`; metrics on {val.shape[0]:,} val tokens; torch {torch.__version__}, "
        f"{torch.get_num_threads()} thread"
    )
    header = ("architecture", "k", "seed", "FVU", "L0", "dead", "never on val", "loss increase", "train s")
    print("| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for r in rows:
        print(
            f"| {r['architecture']} | {r['k']} | {r['seed']} | {r['fvu']:.4f} | {r['l0']:.2f} | "
            f"{r['dead']:.4f} | {r['never_on_val']:.4f} | {r['loss_increase']:+.4f} | {r['train_s']:.0f} |"
        )
    for architecture, k in RUNS:
        mine = [r for r in rows if (r["architecture"], r["k"]) == (architecture, k)]
        means = {key: statistics.mean(r[key] for r in mine) for key in ("fvu", "l0", "dead", "loss_increase")}
        print(
            f"| {architecture} | {k} | mean | {means['fvu']:.4f} | {means['l0']:.2f} | {means['dead']:.4f} "
            f"| | {means['loss_increase']:+.4f} | |"
        )
    print(f"wall time {time.perf_counter() - started:.0f} s")


def prepared(config: Path, run_dir: Path, stack: contextlib.ExitStack):
    """The study's config with `run.dir` here, its token store (`prepare` runs once) and its teacher."""
    from pipelines.concepts.teacher import load_teacher_for
    from pipelines.config.loading import load_config
    from pipelines.core import stage_inputs
    from pipelines.core.assets import resolve_assets
    from pipelines.data.token_store import open_prepared_tokens
    from pipelines.stages import prepare

    cfg = resolve_assets(load_config(config, [f"run.dir={run_dir}", "sae.device=cpu"]))
    prepare.run(cfg, progress=False)
    store, _ = open_prepared_tokens(stack, run_dir, stage_inputs.prepare(cfg))
    teacher = load_teacher_for(cfg.teacher, torch.device("cpu"), store.attrs)
    return cfg, store, teacher


@torch.no_grad()
def activations(store, teacher):
    """(train block -> (T, D) raw activations, val token ids (B, T), val activations (N, D))."""
    blocks = store.split("train")
    train = {}
    for start in range(0, blocks.shape[0], 16):
        ids = torch.from_numpy(np.asarray(blocks[start : start + 16]).astype(np.int64))
        for offset, hidden in enumerate(teacher.hidden_states(ids).float()):
            train[start + offset] = hidden
    val_ids = torch.from_numpy(np.asarray(store.split("val")).astype(np.int64))
    return train, val_ids, teacher.hidden_states(val_ids).float().flatten(0, 1)


def train_sae(cfg, architecture: str, k: int, seed: int, train: dict, store, teacher, run_dir: Path):
    """The SAE `train-sae` trains for this family and seed, its buffers read from `train`."""
    from pipelines.sae.trainer import SaeTrainer

    class CachedActivations(SaeTrainer):
        def _buffer_activations(self, index: int):  # SaeTrainer's, with the teacher's forward cached
            if self._buffer is not None and self._buffer[0] == index:
                return self._buffer[1]
            positions = range(index * self.blocks_per_buffer, (index + 1) * self.blocks_per_buffer)
            acts = torch.cat([train[self._block_order(p)] for p in positions])
            acts = self.sae.prepare_input(acts)[0]
            generator = torch.Generator().manual_seed(self.cfg.run.seed * 1_000_003 + index)
            acts = acts[torch.randperm(len(acts), generator=generator)]
            self._buffer = (index, acts)
            return acts

    cfg = dataclasses.replace(
        cfg,
        run=dataclasses.replace(cfg.run, seed=seed),
        sae=dataclasses.replace(cfg.sae, architecture=architecture, k=k),
    )
    stage_dir = run_dir / f"sae-{architecture}-{k}-{seed}"
    stage_dir.mkdir(exist_ok=True)
    trainer = CachedActivations(cfg, teacher, store, stage_dir, torch.device("cpu"))
    with torch.no_grad():  # as `restore` on a fresh run: the pre-bias starts at the data's centre
        trainer.sae.b_dec.copy_(trainer._batch(0).mean(0))
    while trainer.step < trainer.total_steps:  # `train`'s loop without its evaluations and checkpoints
        trainer._advance()
    return trainer.sae.eval(), trainer


@torch.no_grad()
def measure(sae, trainer, val: torch.Tensor) -> dict[str, float]:
    recon = sae(val)
    acts = sae.encode(val)
    return {
        "fvu": ((val - recon).pow(2).sum() / (val - val.mean(0)).pow(2).sum()).item(),
        "l0": (acts > 0).sum(-1).float().mean().item(),
        "dead": trainer.dead_latents().float().mean().item(),
        "never_on_val": 1 - (acts > 0).any(0).float().mean().item(),
    }


if __name__ == "__main__":
    main()
