"""Reference numbers from lm-evaluation-harness on the shared local eval files.

Runs lm-eval's Python API (`lm_eval.simple_evaluate`, HF backend) with the local task configs in
benchmarks/lmeval/tasks and writes one JSON file: per-task metrics and stderrs, and per-example
records (doc index, each request's arguments, the returned loglikelihood / is_greedy, the per-doc
metric values and, for loglikelihood requests, the token ids lm-eval scored). It is the oracle that
`cocomix eval` must match (acc / acc_norm identical, perplexities to 1e-3 relative).

Needs a venv with lm-eval 0.4.x (see docs/LMEVAL_NOTES.md), not the project's own:

    /work/venv-lmeval/bin/python benchmarks/lmeval/reference.py --model /tmp/tiny-gpt2 \
        --tasks all --limit 20 --out /tmp/lmeval_ref_tiny.json
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

TASKS_DIR = Path(__file__).resolve().parent / "tasks"
ALL_TASKS = [
    "local_hellaswag",
    "local_piqa",
    "local_social_iqa",
    "local_arc_easy",
    "local_winogrande",
    "local_lambada_openai",
    "local_wikitext",
]


def _task_names(spec: str) -> list[str]:
    if spec == "all":
        return list(ALL_TASKS)
    out = []
    for name in spec.split(","):
        name = name.strip()
        if name and not name.startswith("local_"):
            name = "local_" + name
        if name:
            out.append(name)
    return out


def _jsonable(x):
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (str, int, float, bool)) or x is None:
        return x
    try:  # numpy scalars
        return x.item()
    except AttributeError:
        return str(x)


def _request_record(lm, args, resp, with_tokens: bool) -> dict:
    rec: dict = {}
    if len(args) == 2:  # loglikelihood: (context, continuation)
        ctx, cont = args
        rec["context"], rec["continuation"] = ctx, cont
        ll, greedy = resp
        rec["loglikelihood"], rec["is_greedy"] = float(ll), bool(greedy)
        if with_tokens:
            # Same encoding as TemplateLM.loglikelihood (empty context -> prefix token).
            if ctx == "":
                cont_enc = lm.tok_encode(cont, add_special_tokens=False)
                if lm.prefix_token_id != cont_enc[0]:
                    ctx_enc = [lm.prefix_token_id]
                else:
                    ctx_enc, cont_enc = cont_enc[:1], cont_enc[1:]
            else:
                ctx_enc, cont_enc = lm._encode_pair(ctx, cont)
            rec["context_tokens"], rec["continuation_tokens"] = ctx_enc, cont_enc
    else:  # loglikelihood_rolling: (string,)
        (string,) = args
        rec["string"] = string
        rec["loglikelihood"] = float(resp if not isinstance(resp, (list, tuple)) else resp[0])
        if with_tokens:
            rec["n_tokens"] = len(lm.tok_encode(string))
    return rec


def main() -> None:
    ap = argparse.ArgumentParser(description="lm-eval reference run on the local eval files")
    ap.add_argument("--model", required=True, help="HF causal LM folder (config + weights + tokenizer)")
    ap.add_argument("--tasks", default="all", help="comma list (local_ prefix optional) or 'all'")
    ap.add_argument("--limit", type=float, default=None, help="first N docs per task (lm-eval --limit)")
    ap.add_argument("--out", required=True, help="JSON file to write")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch-size", default="1")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--max-length", type=int, default=None, help="override the model's max length")
    ap.add_argument("--bootstrap-iters", type=int, default=100000, help="lm-eval default; 0 = no stderrs")
    ap.add_argument("--no-tokens", action="store_true", help="do not record token ids per request")
    args = ap.parse_args()

    import lm_eval
    import torch
    import transformers
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    tasks = _task_names(args.tasks)
    limit = None if args.limit is None else (int(args.limit) if args.limit >= 1 else args.limit)

    t0 = time.perf_counter()
    lm_kwargs = dict(pretrained=args.model, device=args.device, batch_size=args.batch_size, dtype=args.dtype)
    if args.max_length:
        lm_kwargs["max_length"] = args.max_length
    lm = HFLM(**lm_kwargs)
    load_s = time.perf_counter() - t0
    tm = TaskManager(include_path=str(TASKS_DIR), include_defaults=False)

    out: dict = {
        "lm_eval_version": lm_eval.__version__ if hasattr(lm_eval, "__version__") else None,
        "versions": {
            "lm_eval": _pkg_version("lm_eval"),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "python": platform.python_version(),
        },
        "model": str(args.model),
        "model_args": {k: str(v) for k, v in lm_kwargs.items()},
        "max_length": lm.max_length,
        "prefix_token_id": lm.prefix_token_id,
        "eot_token_id": lm.eot_token_id,
        "limit": limit,
        "bootstrap_iters": args.bootstrap_iters,
        "model_load_s": round(load_s, 3),
        "tasks": {},
    }

    for task in tasks:
        t1 = time.perf_counter()
        res = lm_eval.simple_evaluate(
            model=lm,
            tasks=[task],
            limit=limit,
            log_samples=True,
            task_manager=tm,
            bootstrap_iters=args.bootstrap_iters,
            num_fewshot=0,
        )
        dt = time.perf_counter() - t1
        metrics = {k: _jsonable(v) for k, v in res["results"][task].items() if k != "alias"}
        samples = sorted(res["samples"][task], key=lambda s: s["doc_id"])
        examples = []
        for s in samples:
            reqs = [
                _request_record(lm, a, r[0] if isinstance(r, list) and len(r) == 1 else r, not args.no_tokens)
                for a, r in zip(s["arguments"], s["resps"], strict=True)
            ]
            per_doc = {m: _jsonable(s[m]) for m in s["metrics"]}
            examples.append(
                {
                    "doc_id": s["doc_id"],
                    "target": _jsonable(s["target"]),
                    "requests": reqs,
                    "metrics": per_doc,
                }
            )
        n = len(examples)
        n_req = sum(len(e["requests"]) for e in examples)
        out["tasks"][task] = {
            "n_docs": n,
            "n_requests": n_req,
            "metrics": metrics,
            "seconds": round(dt, 3),
            "examples_per_s": round(n / dt, 3) if dt > 0 else None,
            "examples": examples,
        }
        shown = {k: v for k, v in metrics.items() if not k.endswith("_stderr,none")}
        print(f"{task}: {n} docs, {n_req} requests, {dt:.1f}s ({n / dt:.2f} examples/s) {shown}", flush=True)

    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(out, f, indent=1, ensure_ascii=False)
    print(f"wrote {args.out} (model load {load_s:.1f}s)")


def _pkg_version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


if __name__ == "__main__":
    main()
