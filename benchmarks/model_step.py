"""Forward+backward time per training step for NTP, CoCoMix and pause at the paper's 69M shapes.

    python benchmarks/model_step.py --batch 2 --seq-len 256 --steps 3

Each variant trains on random tokens (NTP loss, plus the concept loss for CoCoMix) with AdamW. The table
gives seconds per step, the analytic training FLOPs (pipelines.model.flops, 3x forward), the achieved
FLOP/s, and that as a fraction of a matmul peak measured in the same run (the best of square fp32 or bf16
products).
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from pipelines.model.flops import parameter_counts, train_flops_per_token
from pipelines.model.gpt import GPT, preset
from pipelines.training.objectives import concept_loss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="69m")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()

    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    peak = matmul_peak(args.device, dtype)
    print(
        f"{args.size} shapes, batch {args.batch} x {args.seq_len} tokens, {args.device}, {dtype}, "
        f"{torch.get_num_threads()} threads; matmul peak {peak / 1e9:,.1f} GFLOP/s"
    )
    header = ("variant", "params", "active", "s/step", "GFLOP/step", "GFLOP/s", "of peak")
    print("{:<9} {:>9} {:>9} {:>8} {:>11} {:>9} {:>8}".format(*header))
    for variant in ("ntp", "cocomix", "pause"):
        config = preset(args.size, variant)
        seconds = time_steps(config, args, dtype)
        flops = train_flops_per_token(config, args.seq_len) * args.batch * args.seq_len
        counts = parameter_counts(config)
        print(
            f"{variant:<9} {counts['total'] / 1e6:>8.1f}M {counts['active'] / 1e6:>8.1f}M {seconds:>8.3f} "
            f"{flops / 1e9:>11.1f} {flops / seconds / 1e9:>9.1f} {flops / seconds / peak:>8.1%}"
        )


def time_steps(config, args, dtype) -> float:
    torch.manual_seed(0)
    model = GPT(config).to(args.device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    idx = torch.randint(0, config.vocab_size, (args.batch, args.seq_len + 1), device=args.device)
    concept_targets = torch.randint(0, config.n_concepts, (args.batch, args.seq_len, 4), device=args.device)
    valid = torch.ones(args.batch, args.seq_len, dtype=torch.bool, device=args.device)

    def step() -> None:
        with torch.autocast(args.device.split(":")[0], dtype=dtype, enabled=dtype != torch.float32):
            out = model(idx[:, :-1])
            loss = F.cross_entropy(out.logits.flatten(0, 1).float(), idx[:, 1:].flatten())
            if out.concept_logits is not None:
                loss = loss + 0.1 * concept_loss(out.concept_logits, concept_targets, valid)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # warm-up: allocator, kernels, optimizer state
    synchronize(args.device)
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    synchronize(args.device)
    return (time.perf_counter() - start) / args.steps


def matmul_peak(device: str, dtype: torch.dtype, n: int = 2048, repeats: int = 10) -> float:
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    synchronize(device)
    return 2 * n**3 * repeats / (time.perf_counter() - start)


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


if __name__ == "__main__":
    main()
