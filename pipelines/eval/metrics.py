"""Scoring one task with one model: the metrics lm-eval would report for it (with standard errors), the
perplexity of the val blocks for `ppl`, and the per-example samples of `--log-samples`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from pipelines.config.schema import Config
from pipelines.core.files import atomic_write_bytes
from pipelines.eval import data as task_data


def task_metrics(cfg: Config, scorer, name: str, task, path: Path | None, samples_path, val_blocks) -> dict:
    from pipelines.eval.tasks import is_text_perplexity, mean_and_stderr, multiple_choice_scores

    if is_text_perplexity(name):
        from pipelines.eval.text_perplexity import perplexity

        return perplexity(cfg, scorer, name)
    if task is None:
        return _perplexity_on_val_blocks(cfg, scorer, val_blocks())
    examples = task_data.examples(task, path, cfg.eval.limit)
    samples: list[dict] = []
    if task.kind == "rolling":
        lls = scorer.loglikelihood_rolling([ex["text"] for ex in examples])
        total = sum(lls)
        words, size = sum(ex["words"] for ex in examples), sum(ex["bytes"] for ex in examples)
        metrics = {
            "word_perplexity": math.exp(-total / words),
            "byte_perplexity": math.exp(-total / size),
            "bits_per_byte": -total / size / math.log(2),
        }
        samples = [{"doc": i, "loglikelihood": ll, "words": ex["words"], "bytes": ex["bytes"]}
                   for i, (ex, ll) in enumerate(zip(examples, lls, strict=True))]  # fmt: skip
    else:
        requests = [r for ex in examples for r in ex.requests()]
        scored = scorer.loglikelihood(requests)
        per_example, position = [], 0
        for index, ex in enumerate(examples):
            n = len(ex.requests())
            results = scored[position : position + n]
            position += n
            if task.kind == "lambada":
                scores = {"acc": float(results[0].is_greedy), "ll": results[0].loglikelihood}
            else:
                scores = multiple_choice_scores(ex, [r.loglikelihood for r in results])
            per_example.append(scores)
            samples.append(
                {
                    "doc": index,
                    "requests": ex.requests(),
                    "loglikelihoods": [r.loglikelihood for r in results],
                    "is_greedy": [r.is_greedy for r in results],
                    "gold": ex.gold,
                    **scores,
                }
            )
        metrics = {}
        for metric in task.metrics:
            if metric == "perplexity":
                metrics["perplexity"] = math.exp(-sum(s["ll"] for s in per_example) / len(per_example))
                continue
            value, stderr = mean_and_stderr([s[metric] for s in per_example])
            metrics[metric], metrics[f"{metric}_stderr"] = value, stderr
    metrics["examples"] = len(examples)
    if samples_path is not None:
        samples_path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(samples_path, "".join(json.dumps(s) + "\n" for s in samples).encode())
    return metrics


def _perplexity_on_val_blocks(cfg: Config, scorer, val) -> dict:
    import numpy as np
    import torch
    import torch.nn.functional as F

    blocks = val.shape[0] if not cfg.eval.limit else min(cfg.eval.limit, val.shape[0])
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, blocks, scorer.batch_size):
            ids = torch.from_numpy(val[start : min(start + scorer.batch_size, blocks)].astype(np.int64))
            ids = ids[:, : scorer.max_length].to(scorer.device)
            logits = scorer.forward(ids).float()
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten(), reduction="sum")
            total += loss.item()
            count += ids[:, 1:].numel()
    return {"loss": total / count, "perplexity": math.exp(total / count), "tokens": count}
