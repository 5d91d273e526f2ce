"""Examples/s of `cocomix eval` against lm-evaluation-harness's `hf` backend: same model, data and limit.

    /work/venv-lmeval/bin/python benchmarks/eval_throughput.py --limit 200

Needs lm-eval 0.4 in the environment (`pip install -e ".[lmeval]"`). The model is a random student of
`--preset` (tiny: 4 layers, d=128, GPT-2 vocabulary, context 256) saved as a cocomix folder and exported
to a transformers GPT-2 folder; cocomix scores the folder, lm-eval's `hf` model the export, each on the
first `--limit` examples of each task from ../shared/data/eval (lm-eval through benchmarks/lmeval/tasks).
Both run with batch size `--batch-size` on the same device; model loading is excluded, and cocomix's
result cache is cleared first. Target: cocomix at least 1x lm-eval's examples/s.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
TASKS = ["hellaswag", "piqa", "arc_easy", "winogrande", "lambada_openai"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=200)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()

    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager
    from transformers import PreTrainedTokenizerFast

    from pipelines.eval.scoring import ScoringModel
    from pipelines.eval.tasks import TASKS as TASK_SPECS
    from pipelines.model.checkpoint import export_hf_gpt2, save_model
    from pipelines.model.gpt import GPT, preset

    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        model = GPT(preset(args.preset, "ntp", vocab_size=50257))
        folder = save_model(model, Path(tmp) / "model", {"tokenizer": {"separator_id": 50256}})
        tokenizer_file = SHARED / "tokenizers/gpt2/tokenizer.json"
        (folder / "tokenizer.json").write_bytes(tokenizer_file.read_bytes())
        hf_dir = export_hf_gpt2(model, Path(tmp) / "hf", separator_id=50256)
        PreTrainedTokenizerFast(
            tokenizer_file=str(tokenizer_file), eos_token="<|endoftext|>", bos_token="<|endoftext|>"
        ).save_pretrained(hf_dir)

        ours = ScoringModel(str(folder), args.device, args.batch_size)
        theirs = HFLM(pretrained=str(hf_dir), device=args.device, batch_size=args.batch_size, dtype="float32")
        manager = TaskManager(include_path=str(REPO / "benchmarks/lmeval/tasks"), include_defaults=False)
        print(
            f"device {args.device}, {torch.get_num_threads()} threads, preset {args.preset} "
            f"({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params), batch {args.batch_size}, "
            f"{args.limit} examples per task, lm-eval {lm_eval.__version__}"
        )
        print(f"{'task':16} {'cocomix ex/s':>13} {'lm-eval ex/s':>13} {'ratio':>7}")
        totals = [0.0, 0.0]
        for task in TASKS:
            spec = TASK_SPECS[task]
            rows = []
            for row in spec.read(SHARED / "eval" / spec.local_file):
                rows.append(row)
                if len(rows) == args.limit:
                    break
            started = time.perf_counter()
            examples = [spec.build(row) for row in rows]
            ours.loglikelihood([r for ex in examples for r in ex.requests()])
            ours_s = time.perf_counter() - started
            started = time.perf_counter()
            lm_eval.simple_evaluate(
                model=theirs, tasks=[f"local_{task}"], limit=args.limit, task_manager=manager, num_fewshot=0
            )
            theirs_s = time.perf_counter() - started
            totals[0] += ours_s
            totals[1] += theirs_s
            n = len(rows)
            print(f"{task:16} {n / ours_s:13.1f} {n / theirs_s:13.1f} {theirs_s / ours_s:6.2f}x", flush=True)
        n = args.limit * len(TASKS)
        print(f"{'all':16} {n / totals[0]:13.1f} {n / totals[1]:13.1f} {totals[1] / totals[0]:6.2f}x")


if __name__ == "__main__":
    main()
