"""eval: lm-eval prompts on known rows, full row counts, exact scoring, CoCoMix/pause models, caching."""

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from pipelines.config.loading import load_config
from pipelines.errors import InputError
from pipelines.eval.scoring import ScoringModel, rolling_windows
from pipelines.eval.tasks import TASKS, mean_and_stderr, wikitext_detokenizer
from pipelines.model.checkpoint import load_model
from pipelines.model.hf_export import export_hf_gpt2
from pipelines.stages import evaluate, pretrain
from tests.conftest import FIXTURE_EVAL, bpe_tokenizer, eval_results, prepared_run, run_in

ROWS = {  # the real files of the shared folder
    "hellaswag": 10042,
    "piqa": 1838,
    "social_iqa": 1954,
    "arc_easy": 2376,
    "winogrande": 1267,
    "lambada_openai": 5153,
    "wikitext": 62,  # articles of the WikiText-2 test split, as lm-eval's document-level dataset
}
FIXTURE_ROWS = {task: 14 for task in ROWS} | {"wikitext": 3}  # tests/data/eval (see its README)
CAPITALS = FIXTURE_EVAL / "custom" / "capitals.jsonl"
STUDENT = {
    "pretrain.preset": "tiny",
    "pretrain.n_layer": 2,
    "pretrain.n_head": 2,
    "pretrain.n_embd": 32,
    "pretrain.insert_layer": 1,
    "pretrain.batch_blocks": 4,
    "pretrain.max_steps": 4,
    "pretrain.eval_blocks": 2,
}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A prepared run (the committed corpus, the test BPE) with tiny NTP and pause students."""
    base = tmp_path_factory.mktemp("trained")
    prepared_run(base, documents=60, block_size=128)
    for objective in ("ntp", "pause"):
        run_in(
            base, pretrain.run, [f"{k}={v}" for k, v in {**STUDENT, "pretrain.objective": objective}.items()]
        )
    return base


def examples(task: str, root=FIXTURE_EVAL) -> list:
    t = TASKS[task]
    return [t.build(row) for row in t.read(root / t.local_file)]


def first_example(task: str, root=FIXTURE_EVAL):
    t = TASKS[task]
    return t.build(next(iter(t.read(root / t.local_file))))


# --- prompts and data -----------------------------------------------------------------------------------


@pytest.mark.real_data
def test_prompts_of_known_rows_are_lm_evals(shared_eval):
    hellaswag = first_example("hellaswag", shared_eval)
    assert hellaswag.requests()[3] == (
        "Roof shingle removal: A man is sitting on a roof. He",  # ctx_b capitalised, as lm-eval does
        " starts pulling up roofing on a roof.",
    )
    assert hellaswag.gold == 3 and hellaswag.choices_text[3] == "starts pulling up roofing on a roof."
    piqa = first_example("piqa", shared_eval)
    assert piqa.contexts == ("Question: How do I ready a guinea pig cage for it's new occupants?\nAnswer:",)
    assert piqa.continuations[0].startswith(" Provide the guinea pig") and piqa.gold == 0
    siqa = first_example("social_iqa", shared_eval)
    assert siqa.requests()[2] == (
        "Q: Tracy didn't go home that evening and resisted Riley's attacks. What does Tracy need to do "
        "before this?\nA:",
        " Find somewhere to go",
    )
    assert siqa.gold == 2  # the labels file says 3 (1-based)
    arc = first_example("arc_easy", shared_eval)
    assert arc.contexts == (
        "Question: Which statement best explains why photosynthesis is the foundation of most food webs?"
        "\nAnswer:",
    )
    assert (
        arc.continuations[0] == " Sunlight is the source of energy for nearly all ecosystems."
        and arc.gold == 0
    )
    wino = first_example("winogrande", shared_eval)
    assert wino.requests() == [
        ("Sarah was a much better surgeon than Maria so Sarah", " always got the easier cases."),
        ("Sarah was a much better surgeon than Maria so Maria", " always got the easier cases."),
    ]
    assert wino.gold == 1
    lambada = first_example("lambada_openai", shared_eval)
    assert lambada.contexts[0].endswith("I don't care about") and lambada.continuations == (" signs",)
    wiki = first_example("wikitext", shared_eval)
    assert wiki["text"].startswith(" = Robert Boulter =\n\nRobert Boulter is an English film, television")
    assert wiki["words"] > 1000 and wiki["bytes"] > wiki["words"]


def test_prompts_of_the_first_fixture_rows_are_lm_evals():
    """The twin of the test above on tests/data/eval: the strings lm-eval's stock templates build from each
    file's first row, written out by hand from the file."""
    hellaswag = first_example("hellaswag")
    assert hellaswag.contexts == (  # ctx_a + " " + ctx_b.capitalize(): "she" -> "She"
        "Washing dishes: A woman stands at a kitchen sink filled with soapy water. She",
    )
    assert hellaswag.continuations == (
        " scrubs a plate with a sponge and rinses it under the tap.",
        " throws the plate out of the window onto the lawn.",
        " puts the sponge in the oven and turns it on.",
        " paints the sink bright blue with a small brush.",
    )
    assert (
        hellaswag.gold == 0
        and hellaswag.choices_text[1] == "throws the plate out of the window onto the lawn."
    )
    hellaswag_rows = examples("hellaswag")
    # A two-word ctx_b ("then he") is capitalised too; a WikiHow row has ctx_b = "" and a placeholder
    # ending whose `[your name]` the stock preprocessing drops.
    assert hellaswag_rows[2].contexts[0].endswith("He spreads butter on each slice. Then he")
    assert hellaswag_rows[8].contexts == (
        "Work World: How to write a thank you note. Start with a greeting. Address the person by name at the "
        "top of the card.",
    )
    assert hellaswag_rows[8].continuations[0] == (
        ' Thank the person for the gift or favor and end the note with "Best wishes, ."'
    )
    piqa = first_example("piqa")
    assert piqa.requests() == [
        ("Question: How do I keep bread from going stale quickly?\nAnswer:",
         " Store it in a sealed bag or a bread box at room temperature."),
        ("Question: How do I keep bread from going stale quickly?\nAnswer:",
         " Leave it uncovered on the counter next to the stove."),
    ]  # fmt: skip
    assert piqa.gold == 0  # valid-labels.lst: 0
    siqa = first_example("social_iqa")
    assert siqa.contexts == (
        "Q: Maya forgot her lunch at home, so her friend Sam shared his sandwich with her. How would Maya "
        "feel as a result?\nA:",
    )
    assert siqa.continuations == (" grateful to Sam", " angry at Sam", " bored with lunch")
    assert siqa.gold == 0  # dev-labels.lst says 1 (1-based)
    arc = first_example("arc_easy")
    assert arc.requests() == [
        ("Question: Which of these is the main source of energy for most plants?\nAnswer:", f" {c}")
        for c in ("sunlight", "soil", "wind", "rocks")
    ]
    assert arc.gold == 0 and arc.choices_text == ("sunlight", "soil", "wind", "rocks")
    wino = first_example("winogrande")
    assert wino.requests() == [
        ("Anna poured water from the bottle into the cup until the bottle", " was full."),
        ("Anna poured water from the bottle into the cup until the cup", " was full."),
    ]
    assert wino.gold == 1
    lambada = first_example("lambada_openai")
    assert lambada.requests() == [
        (
            "Every morning before school, Ella fed her goldfish. She sprinkled a pinch of flakes on the "
            "water and watched the little orange fish swim up to eat. When her family went away for a "
            'weekend, she asked her neighbor to look after the tank.\n\n"Just a pinch of flakes each '
            'morning," she said. "Please don\'t forget to feed my',
            " goldfish",
        )
    ]
    wiki = first_example("wikitext")
    # One article per ` = Title = `; the detokenizer joins ` @.@ `, ` , `, ` 's`, brackets and headings.
    assert wiki["text"].startswith(
        " = Common kingfisher =\n\nThe common kingfisher (Alcedo atthis) is a small bird of the "
        "kingfisher family. It is found across much of Europe, Asia and North Africa, and it is the only "
        "kingfisher that breeds in most of Europe. The bird is about 16 – 17 cm (6.3 – 6.7 in) long"
    )
    assert "\n\n== Description ==\n\nThe male and the female look much alike." in wiki["text"]
    assert "blue-green" in wiki["text"] and "the female's lower bill" in wiki["text"]
    assert wiki["text"].endswith("but a population usually recovers within a few years.\n")
    # Words and bytes are counted on the raw page, with its blank ` ` rows around the headings restored.
    assert (wiki["words"], wiki["bytes"]) == (329, 1547)


def test_hellaswag_ctx_split_recovers_ctx_b():
    from pipelines.eval.tasks import split_hellaswag_ctx

    assert split_hellaswag_ctx("A lady walks. She bends down. the lady") == (
        "A lady walks. She bends down.",
        "the lady",
    )
    assert split_hellaswag_ctx("How to cook rice. Rinse the rice.") == (
        "How to cook rice. Rinse the rice.",
        "",
    )


def test_hub_layouts_give_the_same_prompts():
    from pipelines.eval.tasks import build_arc, build_hellaswag, build_winogrande

    hub = build_hellaswag(
        {"activity_label": "Roof shingle removal", "ctx_a": "A man is sitting on a roof.", "ctx_b": "he",
         "endings": ["a [title] b", "c"], "label": "0"}
    )  # fmt: skip
    assert hub.contexts == ("Roof shingle removal: A man is sitting on a roof. He",)
    assert hub.continuations == (" a. b", " c")
    arc = build_arc(
        {"question": "Q?", "choices": {"text": ["x", "y"], "label": ["A", "B"]}, "answerKey": "B"}
    )
    assert (
        arc.requests() == [("Question: Q?\nAnswer:", " x"), ("Question: Q?\nAnswer:", " y")] and arc.gold == 1
    )
    wino = build_winogrande(
        {"sentence": "A beat B because _ was fast.", "option1": "A", "option2": "B", "answer": "1"}
    )
    assert wino.requests() == [("A beat B because A", " was fast."), ("A beat B because B", " was fast.")]
    assert wino.gold == 0


@pytest.mark.real_data
@pytest.mark.parametrize("task", sorted(ROWS))
def test_full_files_have_their_known_row_counts(task, shared_eval):
    t = TASKS[task]
    assert sum(1 for _ in t.read(shared_eval / t.local_file)) == ROWS[task]


@pytest.mark.parametrize("task", sorted(FIXTURE_ROWS))
def test_fixture_files_have_their_known_row_counts(task):
    t = TASKS[task]
    assert sum(1 for _ in t.read(FIXTURE_EVAL / t.local_file)) == FIXTURE_ROWS[task]
    labels = {"piqa": "piqa/valid-labels.lst", "social_iqa": "siqa/dev-labels.lst"}.get(task)
    if labels:  # and as many labels, one a line
        assert len((FIXTURE_EVAL / labels).read_text().split()) == FIXTURE_ROWS[task]


def test_the_custom_fixture_has_its_known_row_count():
    rows = [json.loads(line) for line in CAPITALS.read_text().splitlines() if line.strip()]
    assert len(rows) == 12 and all(row["answer"] in row["options"] for row in rows)


def test_wikitext_detokenizer_and_rolling_windows():
    assert (
        wikitext_detokenizer(' = = Career = = \n He said @-@ " hi " , ok')
        == ' == Career ==\nHe said-"hi", ok'
    )
    windows = rolling_windows(list(range(10)), prefix_token=99, max_length=4)
    # lm-eval's disjoint windows: each context keeps only what the window's first target needs.
    assert windows == [([99], [0, 1, 2, 3]), ([3], [4, 5, 6, 7]), ([5, 6, 7], [8, 9])]
    # Every token is predicted exactly once.
    assert [t for _, targets in windows for t in targets] == list(range(10))
    assert mean_and_stderr([1.0, 0.0, 1.0, 1.0]) == pytest.approx((0.75, 0.25))


# --- scoring --------------------------------------------------------------------------------------------


def direct_loglikelihood(model, context_ids, continuation_ids) -> float:
    ids = torch.tensor([context_ids + continuation_ids])
    with torch.no_grad():
        logits = model(ids).logits if not hasattr(model, "transformer") else model(input_ids=ids).logits
    log_probs = F.log_softmax(logits[0, :-1].float(), dim=-1)
    n = len(continuation_ids)
    targets = torch.tensor(continuation_ids)
    return log_probs[-n:].gather(-1, targets[:, None]).sum().item()


def test_ntp_export_scores_the_same_through_transformers(trained, tmp_path):
    ntp = trained / "run/pretrain-ntp/model"
    ours = ScoringModel(str(ntp))
    export_hf_gpt2(load_model(ntp), tmp_path / "hf", bpe_tokenizer().separator_id)
    shutil.copy(ntp / "tokenizer.json", tmp_path / "hf" / "tokenizer.json")
    theirs = ScoringModel(f"hf:{tmp_path / 'hf'}")
    requests = [
        r for task in ("hellaswag", "winogrande", "lambada_openai") for r in first_example(task).requests()
    ]
    requests.append(("", "Hello world"))  # empty context: the prefix token
    a, b = ours.loglikelihood(requests), theirs.loglikelihood(requests)
    for x, y in zip(a, b, strict=True):
        assert x.loglikelihood == pytest.approx(y.loglikelihood, rel=1e-5) and x.is_greedy == y.is_greedy
    context, continuation = ours.encode_pair(*requests[0])
    assert a[0].loglikelihood == pytest.approx(
        direct_loglikelihood(load_model(ntp), context, continuation), rel=1e-5
    )


def test_trailing_space_moves_to_the_continuation(trained):
    ours = ScoringModel(str(trained / "run/pretrain-ntp/model"))
    assert ours.encode_pair("Answer: ", "yes") == ours.encode_pair("Answer:", " yes")
    context, continuation = ours.encode_pair("Question: x\nAnswer:", " Paris")
    assert ours.encode("Question: x\nAnswer: Paris") == context + continuation


def test_a_continuation_longer_than_the_context_is_scored_on_the_tokens_the_window_predicts(trained):
    folder = trained / "run/pretrain-ntp/model"
    scorer = ScoringModel(str(folder))
    n = scorer.max_length
    context, continuation = [5, 6, 7], list(range(100, 100 + n + 10))  # 10 more tokens than the window
    (scored,) = scorer.score_tokens([(context, continuation)])
    window = (context + continuation)[-(n + 1) :]  # the model reads window[:-1] and predicts window[1:]
    with torch.no_grad():
        logits = load_model(folder)(torch.tensor([window[:-1]])).logits[0].float()
    expected = F.log_softmax(logits, dim=-1).gather(-1, torch.tensor(window[1:])[:, None]).sum().item()
    assert scored.loglikelihood == pytest.approx(expected, rel=1e-5)


def test_pause_model_is_scored_through_its_slots(trained):
    folder = trained / "run/pretrain-pause/model"
    scorer = ScoringModel(str(folder))
    request = first_example("piqa").requests()[0]
    context, continuation = scorer.encode_pair(*request)
    expected = direct_loglikelihood(load_model(folder), context, continuation)
    assert scorer.loglikelihood([request])[0].loglikelihood == pytest.approx(expected, rel=1e-5)


def test_cocomix_model_is_scored_through_its_concept_slots(tmp_path):
    from pipelines.model.checkpoint import save_model
    from pipelines.model.gpt import GPT
    from tests.conftest import tiny_model_config

    tokenizer = bpe_tokenizer()
    saved = {"tokenizer": {"separator_id": tokenizer.separator_id}}
    torch.manual_seed(0)
    model = GPT(tiny_model_config(variant="cocomix", vocab_size=tokenizer.vocab_size, context_length=128))
    model.eval()
    folder = save_model(model, tmp_path / "cocomix", saved)
    shutil.copy(tokenizer.json, folder / "tokenizer.json")
    scorer = ScoringModel(str(folder))
    requests = first_example("arc_easy").requests()
    for request, scored in zip(requests, scorer.loglikelihood(requests), strict=True):
        context, continuation = scorer.encode_pair(*request)
        assert scored.loglikelihood == pytest.approx(
            direct_loglikelihood(model, context, continuation), rel=1e-5
        )
    # The concept branch is in the path: zeroing its compression changes the scores.
    with torch.no_grad():
        model.concepts.compress_weight.zero_()
    save_model(model, folder, saved)
    changed = ScoringModel(str(folder)).loglikelihood(requests[:1])[0].loglikelihood
    assert changed != pytest.approx(scorer.loglikelihood(requests[:1])[0].loglikelihood, rel=1e-6)


# --- the stage ------------------------------------------------------------------------------------------


def test_offline_runs_skip_benchmarks_without_local_data(trained, tmp_path):
    run = tmp_path / "run-copy"
    shutil.copytree(trained, run)
    tasks = 'eval.tasks=["ppl", "piqa"]'
    absent = [f"eval.data_dir={tmp_path / 'nowhere'}", "eval.missing_data=skip", tasks, "eval.limit=4"]
    results = run_in(run, eval_results, absent)
    assert results["tasks"] == ["ppl"] and results["skipped_tasks"] == ["piqa"]
    assert results["skipped_reasons"] == {"piqa": "no local data (eval.missing_data = skip)"}
    assert sorted(results["results"]["pretrain-ntp"]) == ["ppl"]
    with pytest.raises(InputError, match="`eval.data_dir` .*nowhere is not a folder"):
        run_in(run, eval_results, [f"eval.data_dir={tmp_path / 'nowhere'}", tasks])


def test_side_by_side_results_are_cached_per_task(trained, tmp_path):
    run = tmp_path / "run-copy"
    shutil.copytree(trained, run)
    args = [f"eval.data_dir={FIXTURE_EVAL}", "eval.limit=6", 'eval.tasks=["ppl", "piqa", "winogrande"]']
    results = run_in(run, eval_results, args, log_samples=True)
    assert sorted(results["results"]) == ["pretrain-ntp", "pretrain-pause"]
    piqa = results["results"]["pretrain-ntp"]["piqa"]
    assert piqa["examples"] == 6 and 0 <= piqa["acc"] <= 1 and piqa["acc_stderr"] is not None
    samples = (run / "run/eval/samples/pretrain-ntp/piqa.jsonl").read_text().splitlines()
    assert len(samples) == 6
    assert json.loads(samples[0])["requests"] == [list(r) for r in first_example("piqa").requests()]
    ppl = results["results"]["pretrain-ntp"]["ppl"]
    assert ppl["perplexity"] == pytest.approx(torch.tensor(ppl["loss"]).exp().item(), rel=1e-6)

    cache = run / "run/eval/cache"
    stamps = {p.name: p.stat().st_mtime_ns for p in cache.iterdir()}
    assert len(stamps) == 6
    # The same eval again is up to date: nothing is scored or written.
    results_file = run / "run/eval/results.json"
    written = results_file.stat().st_mtime_ns
    assert run_in(run, evaluate.run, args).up_to_date and results_file.stat().st_mtime_ns == written
    # Another eval (the tasks in another order) needs no --force: it scores only what the cache lacks.
    removed = sorted(stamps)[0]
    (cache / removed).unlink()
    reordered = [*args[:2], 'eval.tasks=["winogrande", "ppl", "piqa"]']
    again = run_in(run, eval_results, reordered)
    assert (cache / removed).exists()

    def metrics(r):  # everything but the timing
        return {
            m: {t: {k: v for k, v in x.items() if k != "seconds"} for t, x in d.items()} for m, d in r.items()
        }

    assert metrics(again["results"]) == metrics(results["results"])
    assert {p.name: p.stat().st_mtime_ns for p in cache.iterdir() if p.name != removed} == {
        k: v for k, v in stamps.items() if k != removed
    }


def test_eval_holds_its_stage_lock_and_force_scores_everything_again(trained, tmp_path):
    """`eval` runs in a StageSession: a second writer of `eval/` is refused naming it, and `--force`
    deletes the cache and results and scores again (to the same numbers)."""
    import subprocess
    import sys

    from pipelines.errors import StageError

    run = tmp_path / "run-copy"
    shutil.copytree(trained, run)
    args = [f"eval.data_dir={FIXTURE_EVAL}", "eval.limit=4", 'eval.tasks=["ppl", "piqa"]']
    first = run_in(run, evaluate.run, args)
    assert not first.up_to_date and first.dir == Path("run") / "eval"  # run.dir as the config has it
    manifest = json.loads((run / "run/eval/manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["summary"] == first.summary
    assert manifest["inputs"]["eval.tasks"] == ["ppl", "piqa"] and set(manifest["inputs"]["models"]) == {
        "pretrain-ntp",
        "pretrain-pause",
    }

    hold = (  # another writer of eval/: a real process holding its lock until its stdin closes
        "import sys; from pipelines.core.locks import StageLock; lock = StageLock(sys.argv[1], 'eval'); "
        "lock.acquire(); print('held', flush=True); sys.stdin.read()"
    )
    holder = subprocess.Popen(
        [sys.executable, "-c", hold, str(run / "run/eval")],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline() == "held\n"
        with pytest.raises(StageError, match=f"Stage `eval` is being written by pid {holder.pid}"):
            run_in(run, evaluate.run, args)
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)

    cache = run / "run/eval/cache"
    before = {p.name: p.stat().st_mtime_ns for p in cache.iterdir()}
    again = run_in(run, evaluate.run, args, force=True)
    assert not again.up_to_date
    after = {p.name: p.stat().st_mtime_ns for p in cache.iterdir()}
    assert set(after) == set(before) and all(after[name] != before[name] for name in before)  # scored anew

    def metrics(results):  # everything but the timing
        return {
            m: {t: {k: v for k, v in x.items() if k != "seconds"} for t, x in d.items()}
            for m, d in results["results"].items()
        }

    assert metrics(again.summary) == metrics(first.summary)


def test_missing_data_says_where_to_put_it(trained, cocomix, monkeypatch):
    # The hub libraries' own offline mode (what HF_HUB_OFFLINE=1 sets at import), whether or not CI has a
    # network: the real load fails at once instead of after its retries.
    monkeypatch.setattr("datasets.config.HF_HUB_OFFLINE", True)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    result = cocomix(
        "--set", f"run.dir={trained / 'run'}", "eval", "--tasks", "hellaswag", "--data", "piqa=/nope.jsonl"
    )
    assert result.exit_code == 2 and "Data file /nope.jsonl for task `piqa` does not exist" in result.stderr
    result = cocomix("--set", f"run.dir={trained / 'run'}", "eval", "--tasks", "hellaswag", "--limit", "2")
    assert result.exit_code == 2 and len(result.stderr.strip().splitlines()) == 1
    assert "No data for task `hellaswag`: the hub dataset Rowan/hellaswag" in result.stderr
    assert (
        "cannot be loaded (Couldn't reach 'Rowan/hellaswag' on the Hub (OfflineModeIsEnabled))"
        in result.stderr
    )
    assert "<eval.data_dir>/hellaswag/hellaswag_val.jsonl" in result.stderr
    assert "--data hellaswag=PATH" in result.stderr
    result = cocomix("--set", f"run.dir={trained / 'run'}", "eval", "--tasks", "mmlu")
    assert result.exit_code == 2 and "Unknown eval task(s) mmlu" in result.stderr


@pytest.mark.parametrize(
    "prompt, options, message",
    [
        ("Q: {question", ["x", "y"], "prompt 'Q: {question' is not a format string over the row's fields"),
        ("Q: {}", ["x", "y"], "prompt 'Q: {}' is not a format string over the row's fields"),
        ("Q: {question}", ["x", ""], "a choice is empty; every choice needs at least one character"),
    ],
)
def test_a_declared_task_with_a_bad_prompt_or_an_empty_choice_is_one_clear_error(prompt, options, message):
    from pipelines.config.schema import CustomTaskConfig
    from pipelines.eval.tasks import custom_task

    spec = CustomTaskConfig(data="mini.jsonl", prompt=prompt, choices="options", gold="answer")
    with pytest.raises(InputError, match=re.escape(message)) as caught:
        custom_task("mini", spec).build({"question": "Why?", "options": options, "answer": "x"})
    assert str(caught.value).startswith("`[eval.task.mini]`")
    literal = CustomTaskConfig(data="mini.jsonl", prompt="{{Q}} {question}", choices="options", gold="answer")
    assert custom_task("mini", literal).build(
        {"question": "Why?", "options": ["x"], "answer": "x"}
    ).contexts == ("{Q} Why?",)


def test_a_multiple_choice_task_declared_in_the_config(trained, tmp_path):
    rows = [json.loads(line) for line in CAPITALS.read_text().splitlines() if line.strip()]
    run = tmp_path / "run-copy"
    shutil.copytree(trained, run)
    config = run / "cocomix.toml"
    config.write_text(
        config.read_text()
        + f'[eval]\ntasks = ["capitals"]\n[eval.task.capitals]\ndata = "{CAPITALS}"\n'
        + 'prompt = "Question: {question}\\nAnswer:"\nchoices = "options"\ngold = "answer"\n'
    )
    from pipelines.config.render import to_toml

    assert load_config(config, []).eval.task["capitals"].gold == "answer"
    assert "[eval.task.capitals]" in to_toml(load_config(config, []))
    results = run_in(run, eval_results, ['eval.models=["run/pretrain-ntp/model"]'])
    capitals = results["results"]["pretrain-ntp"]["capitals"]
    # By hand: each option scored after the prompt, acc = argmax is the answer, acc_norm divides by length.
    scorer = ScoringModel(str(run / "run/pretrain-ntp/model"))
    acc, acc_norm = [], []
    for row in rows:
        requests = [(f"Question: {row['question']}\nAnswer:", " " + o) for o in row["options"]]
        lls = [s.loglikelihood for s in scorer.loglikelihood(requests)]
        normed = [ll / len(o) for ll, o in zip(lls, row["options"], strict=True)]
        gold = row["options"].index(row["answer"])
        acc.append(float(lls.index(max(lls)) == gold))
        acc_norm.append(float(normed.index(max(normed)) == gold))
    assert capitals["examples"] == 12
    assert capitals["acc"] == pytest.approx(sum(acc) / 12, abs=1e-12)
    assert capitals["acc_norm"] == pytest.approx(sum(acc_norm) / 12, abs=1e-12)
    assert (capitals["acc_stderr"], capitals["acc_norm_stderr"]) == pytest.approx(
        (mean_and_stderr(acc)[1], mean_and_stderr(acc_norm)[1])
    )


def test_a_declared_task_whose_choices_field_holds_a_string_is_refused():
    """`choices = "FIELD"` on a string would make each character a choice: one error naming the task, the
    field and the two forms `choices` takes."""
    from pipelines.config.schema import CustomTaskConfig
    from pipelines.eval.tasks import custom_task

    spec = CustomTaskConfig(data="mini.jsonl", prompt="Q: {question}", choices="answer", gold="answer")
    with pytest.raises(InputError) as caught:
        custom_task("mini", spec).build({"question": "Capital of France?", "answer": "Paris"})
    assert str(caught.value) == (
        "`[eval.task.mini]` choices = 'answer': field `answer` holds \"Paris\", not a list. Name a field "
        "that holds the list of choices, or the fields that hold one choice each, separated by commas "
        '(choices = "option1,option2").'
    )
    fields = CustomTaskConfig(data="mini.jsonl", prompt="Q: {question}", choices="a, b", gold="answer")
    assert custom_task("mini", fields).build(
        {"question": "Capital of France?", "a": "Lyon", "b": "Paris", "answer": "Paris"}
    ).continuations == (" Lyon", " Paris")


def test_a_declared_task_with_a_missing_file_blocks_only_itself(trained, tmp_path):
    from tests.conftest import Cocomix

    run = tmp_path / "run-copy"
    shutil.copytree(trained, run)
    config = run / "cocomix.toml"
    config.write_text(
        config.read_text() + '[eval.task.broken]\ndata = "missing.jsonl"\nprompt = "Q: {q}"\n'
        'choices = "options"\ngold = "answer"\n'
    )
    cocomix = Cocomix(run)
    result = cocomix("eval", "--tasks", "ppl", "--limit", "2")
    assert result.exit_code == 0, result.stderr
    assert json.loads((run / "run/eval/results.json").read_text())["tasks"] == ["ppl"]
    result = cocomix("eval", "--tasks", "ppl,broken")
    assert result.exit_code == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert result.stderr.startswith("error: `[eval.task.broken]` data file missing.jsonl does not exist.")


def test_a_declared_task_with_a_relative_file_is_read_next_to_the_config_from_any_folder(trained, tmp_path):
    from tests.conftest import Cocomix

    run = tmp_path / "experiment"
    shutil.copytree(trained, run)
    shutil.copy(CAPITALS, run / "capitals.jsonl")
    config = run / "cocomix.toml"
    config.write_text(
        config.read_text().replace(f'"{trained}/', '"')  # the corpus path relative to the config's folder
        + '[eval.task.capitals]\ndata = "capitals.jsonl"\nprompt = "Question: {question}\\nAnswer:"\n'
        'choices = "options"\ngold = "answer"\n'
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    result = Cocomix(elsewhere)("-c", str(config), "eval", "--tasks", "capitals", "--limit", "4")
    assert result.exit_code == 0, result.stderr
    scores = json.loads((run / "run/eval/results.json").read_text())["results"]["pretrain-ntp"]["capitals"]
    assert scores["examples"] == 4
    assert not (elsewhere / "run").exists()


def test_the_eval_table_groups_seeds_and_keeps_other_models_apart():
    from pipelines.eval.table import eval_table

    def scores(acc, stderr=0.1):
        return {"piqa": {"acc": acc, "acc_stderr": stderr, "acc_norm": acc, "examples": 8}}

    results = {
        "pretrain-cocomix-seed0": scores(0.5),
        "pretrain-cocomix-seed1": scores(0.7),
        "pretrain-ntp-seed0": scores(0.25),
        "hf:gpt2": scores(0.75, 0.05),
    }
    headers, rows = eval_table(results)
    assert headers == ["cocomix", "ntp", "hf:gpt2"]
    assert rows[0] == ("seeds", ["2", "1", "1"])
    assert rows[1] == ("piqa acc (n=8)", ["0.6000 ± 0.1414", "0.2500 ± 0.1000", "0.7500 ± 0.0500"])
    # A folder named like a grouped student keeps every model's full label.
    headers, _ = eval_table({"pretrain-ntp-seed0": scores(0.5), "ntp": scores(0.5)})
    assert headers == ["pretrain-ntp-seed0", "ntp"]
