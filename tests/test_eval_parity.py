"""Parity with lm-evaluation-harness: one NTP student, lm-eval's `hf` model on its export vs `cocomix eval`.

Needs lm-eval 0.4 in the test environment (the `dev` extra brings it; without it the module is skipped,
which CI counts as a failure). lm-eval reads the eval files through the task configs in
benchmarks/lmeval/tasks (its stock prompts on the original HF layouts, data root `$COCOMIX_SHARED_DATA`);
cocomix reads the same files with its own loaders. Every test runs on the committed fixtures
(tests/data/eval, all of their rows) and, marked `real_data`, on the shared benchmark files.
"""

import json
import os
from pathlib import Path

import pytest
from tokenizers import Tokenizer

from pipelines.core.layout import HF_MODEL
from pipelines.eval.tasks import TASKS as OUR_TASKS
from pipelines.model.checkpoint import load_model
from pipelines.model.hf_export import export_student
from pipelines.stages import evaluate, pretrain
from tests.conftest import FIXTURE_EVAL, REPO, bpe_tokenizer, eval_results, prepared_run, run_in

lm_eval = pytest.importorskip("lm_eval", reason="lm-eval is not installed (pip install -e '.[dev]')")

INCLUDE = REPO / "benchmarks" / "lmeval" / "tasks"
REAL_LIMIT = int(os.environ.get("COCOMIX_PARITY_LIMIT", "300"))
FIXTURE_ROWS = {task: 14 for task in OUR_TASKS} | {"wikitext": 3}
TASKS = ["hellaswag", "piqa", "social_iqa", "arc_easy", "winogrande", "lambada_openai"]
STUDENT = {
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


class Source:
    """Where a test's eval files come from (`eval_dir` for cocomix, its parent as lm-eval's data root), how
    many rows it reads and the student's context: shorter than most fixture requests, so that the left
    truncation of long ones is compared too, and longer than the longest continuation (lm-eval's `hf`
    model refuses a continuation longer than its context)."""

    def __init__(self, eval_dir: Path, limit: int, wikitext_limit: int, block_size: int):
        self.eval_dir = eval_dir
        self.limit = limit  # 0: every row
        self.wikitext_limit = wikitext_limit
        self.block_size = block_size

    @property
    def lm_eval_limit(self) -> int | None:
        return self.limit or None

    def examples(self, task: str) -> int:
        return self.limit or FIXTURE_ROWS[task]


@pytest.fixture(
    params=[
        pytest.param("fixtures"),
        pytest.param("shared", marks=[pytest.mark.real_data, pytest.mark.slow]),
    ]
)
def source(request, monkeypatch) -> Source:
    if request.param == "fixtures":
        chosen = Source(FIXTURE_EVAL, limit=0, wikitext_limit=0, block_size=64)
    else:  # a PIQA solution among the first 300 is 306 tokens of the test BPE
        chosen = Source(request.getfixturevalue("shared_eval"), REAL_LIMIT, wikitext_limit=2, block_size=512)
    monkeypatch.setenv("COCOMIX_SHARED_DATA", str(chosen.eval_dir.parent))
    return chosen


@pytest.fixture(scope="module")
def students(tmp_path_factory):
    """`students(block_size)`: a tiny NTP student trained on the committed corpus with that context, and
    its transformers export with the same tokenizer, as (model folder, hf folder); built once each."""
    built: dict[int, tuple[Path, Path]] = {}

    def student(block_size: int) -> tuple[Path, Path]:
        if block_size not in built:
            base = tmp_path_factory.mktemp(f"student-{block_size}")
            prepared_run(base, documents=200, block_size=block_size)
            result = run_in(base, pretrain.run, [f"{k}={v}" for k, v in STUDENT.items()])
            model_dir = base / result.dir / "model"
            assert (model_dir / "tokenizer.json").read_bytes() == bpe_tokenizer().json.read_bytes()
            assert load_model(model_dir).config.context_length == block_size
            hf_dir = base / result.dir / HF_MODEL  # what pretrain exports beside the model
            assert (hf_dir / "tokenizer.json").exists() and base / result.summary["hf_model"] == hf_dir
            built[block_size] = model_dir, hf_dir
        return built[block_size]

    return student


def task_manager():
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(INCLUDE), include_defaults=False)


def load_tasks(names: list[str]) -> dict:
    """lm-eval's task objects by name (`TaskManager.load` where this 0.4 release has it)."""
    manager = task_manager()
    if hasattr(manager, "load"):
        return manager.load(names)["tasks"]
    from lm_eval.tasks import get_task_dict

    return get_task_dict(names, manager)


def save_with_export(model, folder: Path) -> tuple[Path, Path]:
    """`model` saved as ours (`folder/<variant>`, with the test BPE) and exported by `export_student`
    (`folder/hf`): a GPT-2 folder for NTP, a `CocomixForCausalLM` one with its code for the others."""
    from pipelines.model.checkpoint import save_model

    tokenizer = bpe_tokenizer()
    ours = save_model(
        model,
        folder / model.config.variant,
        {"tokenizer": {"separator": "<|endoftext|>", "separator_id": tokenizer.separator_id}},
    )
    (ours / "tokenizer.json").write_bytes(tokenizer.json.read_bytes())
    return ours, export_student(ours, folder / "hf")


def run_folder(path: Path) -> Path:
    (path / "cocomix.toml").write_text('[run]\ndir = "run"\n')
    return path


def test_lm_eval_builds_our_requests_on_every_row(source):
    """lm-eval's requests (stock templates on the HF layouts rebuilt by local_utils) are ours, row by row:
    contexts, continuations, gold, and for WikiText the detokenized page and its word and byte counts."""
    tasks = load_tasks([f"local_{t}" for t in [*TASKS, "wikitext"]])
    for name in [*TASKS, "wikitext"]:
        ours_task = OUR_TASKS[name]
        limit = source.wikitext_limit if name == "wikitext" else source.limit
        rows = list(ours_task.read(source.eval_dir / ours_task.local_file))
        ours = [ours_task.build(row) for row in (rows[:limit] if limit else rows)]
        assert len(ours) == (limit or FIXTURE_ROWS[name]), name
        theirs = tasks[f"local_{name}"]
        theirs.build_all_requests(limit=limit or None, rank=0, world_size=1)
        by_doc: dict[int, list] = {}
        for instance in theirs.instances:
            by_doc.setdefault(instance.doc_id, []).append(instance)
        assert sorted(by_doc) == list(range(len(ours))), name
        for doc_id, example in enumerate(ours):
            instances = sorted(by_doc[doc_id], key=lambda i: i.idx)
            doc = instances[0].doc
            if name == "wikitext":
                assert [i.arguments for i in instances] == [(example["text"],)]
                counts = theirs.process_results(doc, [0.0])
                assert counts["word_perplexity"][1] == example["words"], (name, doc_id)
                assert counts["byte_perplexity"][1] == example["bytes"], (name, doc_id)
                continue
            assert [i.arguments for i in instances] == example.requests(), (name, doc_id)
            if name == "winogrande":  # multiple inputs: doc_to_text is the gold context
                gold = theirs.doc_to_text(doc)
            elif name == "lambada_openai":
                gold = 0
            else:
                gold = theirs.doc_to_target(doc)
            assert gold == example.gold, (name, doc_id)


@pytest.mark.slow  # trains the student (a few seconds)
def test_cocomix_eval_equals_lm_eval_hf_on_the_same_examples(students, source, tmp_path):
    from lm_eval.models.huggingface import HFLM

    model_dir, hf_dir = students(source.block_size)
    run_folder(tmp_path)
    ours = run_in(
        tmp_path,
        eval_results,
        [f"eval.data_dir={source.eval_dir}", f"eval.limit={source.limit}", f"eval.models=[\"{model_dir}\"]",
         "eval.tasks=[" + ",".join(f'"{t}"' for t in TASKS) + "]", "eval.device=cpu"],
    )["results"]["pretrain-ntp"]  # fmt: skip

    lm = HFLM(pretrained=str(hf_dir), device="cpu", batch_size=16, dtype="float32")
    assert lm.max_length == source.block_size
    theirs = lm_eval_on_every_task(lm, source)

    for task in TASKS:  # shown with `pytest -s`, for the record
        shown = {k: round(v, 6) for k, v in ours[task].items() if k in ("acc", "acc_norm", "perplexity")}
        print(
            task,
            "cocomix",
            shown,
            "lm-eval",
            {k: v for k, v in theirs[f"local_{task}"].items() if "stderr" not in k},
        )
    assert_same_metrics(ours, theirs, source)

    # The same student through `--backend lm-eval` (our LM adapter inside lm-eval) gives the same numbers.
    adapter = run_in(
        tmp_path,
        eval_results,
        [f"eval.models=[\"{model_dir}\"]", "eval.backend=lm-eval", f"eval.limit={min(source.limit, 50)}",
         'eval.tasks=["local_piqa"]', f"eval.lmeval_include={INCLUDE}"],
    )["results"]["pretrain-ntp"]["local_piqa"]  # fmt: skip
    native = run_in(
        tmp_path,
        eval_results,
        [
            f"eval.data_dir={source.eval_dir}",
            f"eval.limit={min(source.limit, 50)}",
            f'eval.models=["{model_dir}"]',
            'eval.tasks=["piqa"]',
        ],
    )["results"]["pretrain-ntp"]["piqa"]
    assert native["examples"] == (min(source.limit, 50) or FIXTURE_ROWS["piqa"])
    assert (adapter["acc"], adapter["acc_norm"]) == (native["acc"], native["acc_norm"])
    assert (adapter["acc_stderr"], adapter["acc_norm_stderr"]) == pytest.approx(
        (native["acc_stderr"], native["acc_norm_stderr"]), rel=1e-9
    )


def lm_eval_on_every_task(lm, source: Source) -> dict:
    """lm-eval's results of `lm` on the local twins of TASKS, zero-shot, on the source's rows."""
    return lm_eval.simple_evaluate(
        model=lm,
        tasks=[f"local_{t}" for t in TASKS],
        limit=source.lm_eval_limit,
        task_manager=task_manager(),
        num_fewshot=0,
    )["results"]


def assert_same_metrics(ours: dict, theirs: dict, source: Source) -> None:
    """cocomix's results per task equal lm-eval's: accuracies exactly, standard errors to 1e-9,
    perplexities to 1e-3, every metric of ours compared, on every example."""
    for task in TASKS:
        reference = theirs[f"local_{task}"]
        compared = 0
        for metric in ("acc", "acc_norm"):
            if f"{metric},none" in reference:
                assert ours[task][metric] == reference[f"{metric},none"], (task, metric)
                assert ours[task][f"{metric}_stderr"] == pytest.approx(
                    reference[f"{metric}_stderr,none"], rel=1e-9
                ), (task, metric)
                compared += 1
        if "perplexity,none" in reference:
            assert ours[task]["perplexity"] == pytest.approx(reference["perplexity,none"], rel=1e-3), task
            compared += 1
        assert compared == len(OUR_TASKS[task].metrics), task  # every metric of ours has lm-eval's twin
        assert ours[task]["examples"] == source.examples(task)


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["cocomix", "pause"])
def test_lm_eval_hf_scores_exported_cocomix_and_pause_students_as_cocomix_eval_does(
    variant, source, tmp_path
):
    """lm-eval's own `hf` model on the export (its remote code, `trust_remote_code=True`) against
    `cocomix eval` on our folder. The students are seeded, with weights scaled up from the init so that
    their choices are not near-ties, and have the source's context (left truncation compared too)."""
    import torch
    from lm_eval.models.huggingface import HFLM

    from pipelines.model.gpt import GPT
    from tests.conftest import tiny_model_config

    torch.manual_seed(0)
    config = tiny_model_config(
        variant=variant, vocab_size=bpe_tokenizer().vocab_size, context_length=source.block_size
    )
    model = GPT(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "ln" not in name:
                param.mul_(4.0)
    folder, hf_dir = save_with_export(model, tmp_path)
    ours = run_in(
        run_folder(tmp_path),
        eval_results,
        [f"eval.data_dir={source.eval_dir}", f"eval.limit={source.limit}", f'eval.models=["{folder}"]',
         "eval.tasks=[" + ",".join(f'"{t}"' for t in TASKS) + "]", "eval.device=cpu"],
    )["results"][variant]  # fmt: skip
    lm = HFLM(pretrained=str(hf_dir), device="cpu", batch_size=16, dtype="float32", trust_remote_code=True)
    assert type(lm.model).__name__ == "CocomixForCausalLM" and lm.max_length == source.block_size
    theirs = lm_eval_on_every_task(lm, source)
    for task in TASKS:  # shown with `pytest -s`, for the record
        print(variant, task, {k: round(v, 6) for k, v in ours[task].items() if k in ("acc", "acc_norm")})
    assert_same_metrics(ours, theirs, source)


def test_wikitext_rolling_perplexities_equal_lm_evals(source, tmp_path):
    """Rolling windows on whole articles, with a context short enough to need several windows each."""
    import torch
    from lm_eval.models.huggingface import HFLM

    from pipelines.eval.scoring import ScoringModel, rolling_windows
    from pipelines.model.gpt import GPT
    from tests.conftest import tiny_model_config

    context_length = 64
    torch.manual_seed(0)
    model = GPT(tiny_model_config(vocab_size=bpe_tokenizer().vocab_size, context_length=context_length))
    folder, hf_dir = save_with_export(model, tmp_path)

    # Every article is longer than the context: several windows, the later ones conditioned on the earlier.
    task = OUR_TASKS["wikitext"]
    pages = list(task.read(source.eval_dir / task.local_file))
    pages = pages[: source.wikitext_limit] if source.wikitext_limit else pages
    assert len(pages) == (source.wikitext_limit or FIXTURE_ROWS["wikitext"])
    scorer = ScoringModel(str(folder))
    assert scorer.max_length == context_length
    for page in pages:
        ids = scorer.encode(task.build(page)["text"])
        assert len(ids) > 3 * context_length
        assert len(rolling_windows(ids, scorer.prefix_token_id, context_length)) > 3

    ours = run_in(
        run_folder(tmp_path),
        eval_results,
        [
            f"eval.data_dir={source.eval_dir}",
            f"eval.limit={source.wikitext_limit}",
            f'eval.models=["{folder}"]',
            'eval.tasks=["wikitext"]',
        ],
    )["results"]["ntp"]["wikitext"]
    assert ours["examples"] == len(pages)
    lm = HFLM(pretrained=str(hf_dir), device="cpu", batch_size=16, dtype="float32")
    assert lm.max_length == context_length
    theirs = lm_eval.simple_evaluate(
        model=lm, tasks=["local_wikitext"], limit=source.wikitext_limit or None, task_manager=task_manager()
    )["results"]["local_wikitext"]
    for metric in ("word_perplexity", "byte_perplexity", "bits_per_byte"):
        assert ours[metric] == pytest.approx(theirs[f"{metric},none"], rel=1e-3), metric


def test_lambada_accuracy_counts_greedy_last_words_as_lm_eval_does(tmp_path, monkeypatch):
    """LAMBADA's acc is "every continuation token is the argmax". A tiny model whose final norm is biased
    towards " the" predicts it after almost any context: every other fixture row gets "the" as its last word
    where the model's next token is " the", so acc is the share of those rows, the same in lm-eval."""
    import json

    import torch
    from lm_eval.models.huggingface import HFLM

    from pipelines.eval.scoring import ScoringModel
    from pipelines.model.gpt import GPT
    from tests.conftest import tiny_model_config

    torch.manual_seed(0)
    model = GPT(tiny_model_config(vocab_size=bpe_tokenizer().vocab_size, context_length=64)).eval()
    the = Tokenizer.from_file(str(bpe_tokenizer().json)).encode(" the").ids
    assert len(the) == 1
    with torch.no_grad():
        model.ln_f.bias.copy_(model.wte.weight[the[0]] / model.wte.weight[the[0]].norm() * 10.0)
    folder, hf_dir = save_with_export(model, tmp_path)
    scorer = ScoringModel(str(folder))
    task = OUR_TASKS["lambada_openai"]
    rows, greedy = [], []
    for index, row in enumerate(task.read(FIXTURE_EVAL / task.local_file)):
        context = scorer.encode(row["context"])
        with torch.no_grad():  # the next token after the window's last `max_length` context tokens
            predicted = int(model(torch.tensor([context[-scorer.max_length :]])).logits[0, -1].argmax())
        if index % 2 == 0 and predicted == the[0]:
            row = {**row, "continuation": "the"}
            assert scorer.encode_pair(row["context"], " the") == (context, the)
            greedy.append(index)
        else:  # the original last word, whose first token is not the one predicted: not greedy
            assert scorer.encode_pair(row["context"], " " + row["continuation"])[1][0] != predicted
        rows.append(row)
    assert len(rows) == 14 and greedy == list(range(0, 14, 2))
    data = tmp_path / "data"
    (data / "eval" / "lambada_openai").mkdir(parents=True)
    (data / "eval" / "lambada_openai" / "lambada_openai.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in rows)
    )
    monkeypatch.setenv("COCOMIX_SHARED_DATA", str(data))

    ours = run_in(
        run_folder(tmp_path),
        eval_results,
        [f"eval.data_dir={data / 'eval'}", f'eval.models=["{folder}"]', 'eval.tasks=["lambada_openai"]'],
    )["results"]["ntp"]["lambada_openai"]
    lm = HFLM(pretrained=str(hf_dir), device="cpu", batch_size=16, dtype="float32")
    theirs = lm_eval.simple_evaluate(model=lm, tasks=["local_lambada_openai"], task_manager=task_manager())[
        "results"
    ]["local_lambada_openai"]
    assert ours["examples"] == 14 and ours["acc"] == len(greedy) / 14 == 0.5
    assert ours["acc"] == theirs["acc,none"]
    assert ours["acc_stderr"] == pytest.approx(theirs["acc_stderr,none"], rel=1e-9)
    assert ours["perplexity"] == pytest.approx(theirs["perplexity,none"], rel=1e-3)


# --- tasks declared in cocomix.toml ---------------------------------------------------------------------

DIGITS_PROMPT = "Question: How many stones are in bag {bag}?\\nAnswer:"


def digits_task(folder: Path) -> Path:
    """A declared task whose choices are digit strings in rotated order and whose gold is a digit string
    that is the text of another choice ("1" among "1", "2", "0" is the second choice, not the first), plus
    two rows whose gold is a word. Writes the data, lm-eval's config of it (its stock way: the choices
    field, a template target) and the `[eval.task.digits]` table; returns the data file."""
    rows = []
    for bag in range(12):
        shift = 1 + bag % 2
        options = [str((i + shift) % 3) for i in range(3)]
        rows.append({"bag": bag, "options": options, "answer": str(bag % 3)})
    rows += [{"bag": 12, "options": ["one", "two", "three"], "answer": "two"},
             {"bag": 13, "options": ["four", "five", "six"], "answer": "six"}]  # fmt: skip
    data = folder / "digits.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "lmeval-tasks").mkdir()
    (folder / "lmeval-tasks" / "local_digits.yaml").write_text(
        "task: local_digits\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "output_type: multiple_choice\ntest_split: test\n"
        'doc_to_text: "Question: How many stones are in bag {{bag}}?\\nAnswer:"\n'
        'doc_to_choice: options\ndoc_to_target: "{{answer}}"\n'
        "metric_list:\n"
        + "".join(
            f"  - metric: {m}\n    aggregation: mean\n    higher_is_better: true\n"
            for m in ("acc", "acc_norm")
        )
    )
    config = folder / "cocomix.toml"
    config.write_text(
        config.read_text()
        + f'[eval.task.digits]\ndata = "{data}"\nprompt = "{DIGITS_PROMPT}"\n'
        + 'choices = "options"\ngold = "answer"\n'
    )
    return data


def test_a_declared_task_reads_a_digit_gold_as_an_index_as_lm_eval_does(tmp_path):
    """lm-eval reads a template target that renders to digits as the index of a choice, even where the
    digits are also a choice's text: so does a declared task, row by row, and in acc and acc_norm."""
    import torch
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from pipelines.config.loading import load_config
    from pipelines.model.gpt import GPT
    from tests.conftest import tiny_model_config

    torch.manual_seed(0)
    model = GPT(tiny_model_config(vocab_size=bpe_tokenizer().vocab_size, context_length=64))
    folder, hf_dir = save_with_export(model, tmp_path)
    data = digits_task(run_folder(tmp_path))
    manager = TaskManager(include_path=str(tmp_path / "lmeval-tasks"), include_defaults=False)

    theirs_task = manager.load(["local_digits"])["tasks"]["local_digits"]
    theirs_task.build_all_requests(rank=0, world_size=1)
    ours_task = evaluate.task_specs(load_config(tmp_path / "cocomix.toml"))["digits"]
    ours = [ours_task.build(row) for row in ours_task.read(data)]
    assert len(ours) == 14
    for doc_id, example in enumerate(ours):
        instances = sorted((i for i in theirs_task.instances if i.doc_id == doc_id), key=lambda i: i.idx)
        assert [i.arguments for i in instances] == example.requests(), doc_id
        target = theirs_task.doc_to_target(instances[0].doc)
        if isinstance(target, str):  # a choice's text: its index, as lm-eval's `process_results` takes it
            target = theirs_task.doc_to_choice(instances[0].doc).index(target)
        assert target == example.gold, doc_id
    assert ours[0].gold == 0 and ours[0].choices_text == ("1", "2", "0")  # "0" is the third choice's text

    native = run_in(tmp_path, eval_results, [f'eval.models=["{folder}"]', 'eval.tasks=["digits"]'])
    ours_metrics = native["results"]["ntp"]["digits"]
    lm = HFLM(pretrained=str(hf_dir), device="cpu", batch_size=16, dtype="float32")
    reference = lm_eval.simple_evaluate(model=lm, tasks=["local_digits"], task_manager=manager)["results"][
        "local_digits"
    ]
    assert ours_metrics["examples"] == 14
    for metric in ("acc", "acc_norm"):
        assert ours_metrics[metric] == reference[f"{metric},none"], metric
        assert ours_metrics[f"{metric}_stderr"] == pytest.approx(reference[f"{metric}_stderr,none"], rel=1e-9)


def test_lm_eval_backend_runs_declared_tasks_with_progress_into_its_own_file(tmp_path, capsys):
    """`--backend lm-eval` scores the declared tasks through lm-eval (the same acc as the native backend),
    shows a bar per model and task, and writes eval/results-lm-eval.json beside the native results.json,
    which it leaves as it was."""
    import torch

    from pipelines.config.loading import load_config
    from pipelines.model.gpt import GPT
    from tests.conftest import FIXTURE_EVAL, tiny_model_config

    torch.manual_seed(0)
    model = GPT(tiny_model_config(vocab_size=bpe_tokenizer().vocab_size, context_length=64))
    folder, _ = save_with_export(model, tmp_path)
    digits_task(run_folder(tmp_path))
    config = tmp_path / "cocomix.toml"
    config.write_text(
        config.read_text()
        + f'[eval.task.capitals]\ndata = "{FIXTURE_EVAL / "custom" / "capitals.jsonl"}"\n'
        + 'prompt = "Question: {question}\\nAnswer:"\nchoices = "options"\ngold = "answer"\n'
    )
    args = [f'eval.models=["{folder}"]', 'eval.tasks=["digits", "capitals"]']
    native = run_in(tmp_path, eval_results, args)["results"]["ntp"]
    native_file = tmp_path / "run" / "eval" / "results.json"
    written = native_file.read_bytes()
    capsys.readouterr()

    cfg = load_config(config, [*args, "eval.backend=lm-eval"])
    previous = Path.cwd()
    os.chdir(tmp_path)
    try:
        results = evaluate.run(cfg, progress=True).summary
    finally:
        os.chdir(previous)
    shown = capsys.readouterr().err
    assert "ntp digits" in shown and "ntp capitals" in shown

    assert evaluate.results_path(cfg) == Path(cfg.run.dir) / "eval" / "results-lm-eval.json"
    assert json.loads((tmp_path / "run" / "eval" / "results-lm-eval.json").read_text()) == results
    assert native_file.read_bytes() == written
    for task, rows in (("digits", 14), ("capitals", 12)):
        theirs = results["results"]["ntp"][task]
        assert theirs["examples"] == native[task]["examples"] == rows, task
        for metric in ("acc", "acc_norm"):
            assert theirs[metric] == native[task][metric], (task, metric)
            assert theirs[f"{metric}_stderr"] == pytest.approx(native[task][f"{metric}_stderr"], rel=1e-9)
