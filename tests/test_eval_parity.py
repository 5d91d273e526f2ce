"""Parity with lm-evaluation-harness: one NTP student, lm-eval's `hf` model on its export vs `cocomix eval`.

Needs lm-eval 0.4 in the test environment (`pip install -e ".[lmeval]"`); skipped otherwise. lm-eval reads
the shared local files through the task configs in benchmarks/lmeval/tasks (its stock prompts on the
original HF layouts); cocomix reads the same files with its own loaders.
"""

import os

import pytest

from pipelines import evaluate, pretrain
from pipelines.checkpoint import export_hf_gpt2, load_model
from tests.conftest import REPO, prepared_run, run_in

lm_eval = pytest.importorskip("lm_eval", reason="lm-eval is not installed (pip install -e '.[lmeval]')")

EVAL_DATA = REPO.parent / "shared" / "data" / "eval"
LIMIT = int(os.environ.get("COCOMIX_PARITY_LIMIT", "300"))
TASKS = ["hellaswag", "piqa", "arc_easy", "winogrande", "lambada_openai"]


@pytest.mark.slow
def test_cocomix_eval_equals_lm_eval_hf_on_the_same_examples(tmp_path):
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager
    from transformers import PreTrainedTokenizerFast

    if not EVAL_DATA.is_dir():
        pytest.skip(f"{EVAL_DATA} is absent")
    prepared_run(tmp_path, documents=200, block_size=256)
    student = {
        "pretrain.objective": "ntp",
        "pretrain.preset": "tiny",
        "pretrain.n_layer": 2,
        "pretrain.n_head": 2,
        "pretrain.n_embd": 64,
        "pretrain.batch_blocks": 8,
        "pretrain.max_steps": 30,
        "pretrain.lr": 3e-3,
        "pretrain.warmup_steps": 3,
        "pretrain.eval_blocks": 2,
    }
    result = run_in(tmp_path, pretrain.run, [f"{k}={v}" for k, v in student.items()])
    model_dir = tmp_path / result.dir / "model"
    hf_dir = export_hf_gpt2(load_model(model_dir), tmp_path / "hf")
    PreTrainedTokenizerFast(
        tokenizer_file=str(model_dir / "tokenizer.json"), eos_token="<|endoftext|>", bos_token="<|endoftext|>"
    ).save_pretrained(hf_dir)

    ours = run_in(
        tmp_path,
        evaluate.run,
        [f"eval.data_dir={EVAL_DATA}", f"eval.limit={LIMIT}", f"eval.models=[\"{model_dir}\"]",
         "eval.tasks=[" + ",".join(f'"{t}"' for t in TASKS) + "]", "eval.device=cpu"],
    )["results"]["pretrain-ntp"]  # fmt: skip

    lm = HFLM(pretrained=str(hf_dir), device="cpu", batch_size=16, dtype="float32")
    manager = TaskManager(include_path=str(REPO / "benchmarks/lmeval/tasks"), include_defaults=False)
    theirs = lm_eval.simple_evaluate(
        model=lm, tasks=[f"local_{t}" for t in TASKS], limit=LIMIT, task_manager=manager, num_fewshot=0
    )["results"]

    for task in TASKS:  # shown with `pytest -s`, for the record
        shown = {k: round(v, 6) for k, v in ours[task].items() if k in ("acc", "acc_norm", "perplexity")}
        print(
            task,
            "cocomix",
            shown,
            "lm-eval",
            {k: v for k, v in theirs[f"local_{task}"].items() if "stderr" not in k},
        )
    for task in TASKS:
        reference = theirs[f"local_{task}"]
        for metric in ("acc", "acc_norm"):
            if f"{metric},none" in reference:
                assert ours[task][metric] == reference[f"{metric},none"], (task, metric)
                assert ours[task][f"{metric}_stderr"] == pytest.approx(
                    reference[f"{metric}_stderr,none"], rel=1e-9
                )
        if "perplexity,none" in reference:
            assert ours[task]["perplexity"] == pytest.approx(reference["perplexity,none"], rel=1e-3), task
        assert ours[task]["examples"] == LIMIT

    # The same student through `--backend lm-eval` (our LM adapter inside lm-eval) gives the same numbers.
    adapter = run_in(
        tmp_path,
        evaluate.run,
        [f"eval.models=[\"{model_dir}\"]", "eval.backend=lm-eval", "eval.limit=50",
         'eval.tasks=["local_piqa"]', f"eval.lmeval_include={REPO / 'benchmarks/lmeval/tasks'}"],
    )["results"]["pretrain-ntp"]["local_piqa"]  # fmt: skip
    native = run_in(
        tmp_path,
        evaluate.run,
        [
            f"eval.data_dir={EVAL_DATA}",
            "eval.limit=50",
            f'eval.models=["{model_dir}"]',
            'eval.tasks=["piqa"]',
        ],
    )["results"]["pretrain-ntp"]["piqa"]
    assert (adapter["acc"], adapter["acc_norm"]) == (native["acc"], native["acc_norm"])


@pytest.mark.slow
def test_wikitext_rolling_perplexities_equal_lm_evals(tmp_path):
    """Rolling windows on two whole articles, with a context short enough to need many windows."""
    import torch
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager
    from transformers import PreTrainedTokenizerFast

    from pipelines.checkpoint import save_model
    from pipelines.model import GPT
    from tests.conftest import GPT2_TOKENIZER, tiny_model_config

    torch.manual_seed(0)
    model = GPT(tiny_model_config(vocab_size=50257, context_length=128))
    folder = save_model(model, tmp_path / "ntp", {"tokenizer": {"separator_id": 50256}})
    (folder / "tokenizer.json").write_bytes(GPT2_TOKENIZER.read_bytes())
    hf_dir = export_hf_gpt2(model, tmp_path / "hf")
    PreTrainedTokenizerFast(
        tokenizer_file=str(GPT2_TOKENIZER), eos_token="<|endoftext|>", bos_token="<|endoftext|>"
    ).save_pretrained(hf_dir)
    (tmp_path / "cocomix.toml").write_text('[run]\ndir = "run"\n')
    ours = run_in(
        tmp_path,
        evaluate.run,
        [
            f"eval.data_dir={EVAL_DATA}",
            "eval.limit=2",
            f'eval.models=["{folder}"]',
            'eval.tasks=["wikitext"]',
        ],
    )["results"]["ntp"]["wikitext"]
    lm = HFLM(pretrained=str(hf_dir), device="cpu", batch_size=16, dtype="float32")
    manager = TaskManager(include_path=str(REPO / "benchmarks/lmeval/tasks"), include_defaults=False)
    theirs = lm_eval.simple_evaluate(model=lm, tasks=["local_wikitext"], limit=2, task_manager=manager)[
        "results"
    ]
    for metric in ("word_perplexity", "byte_perplexity", "bits_per_byte"):
        assert ours[metric] == pytest.approx(theirs["local_wikitext"][f"{metric},none"], rel=1e-3), metric
