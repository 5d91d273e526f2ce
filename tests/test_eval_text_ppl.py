"""eval `ppl:<spec>`: perplexity and bits per byte on any text equal the model's own token loss on it, for
one window and many; globs read like one file; bad specs are one clear error; results are cached by
content."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
import torch.nn.functional as F

from pipelines.data.tokenizer import load_tokenizer
from pipelines.model.checkpoint import load_model
from tests.conftest import Cocomix, eval_results, prepared_run, run_in
from tests.test_eval import STUDENT

BLOCK = 32  # the student's context: long texts span many windows


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A prepared run (the committed corpus, the test BPE, 32-token blocks) with a tiny NTP student."""
    from pipelines.stages import pretrain

    base = tmp_path_factory.mktemp("text-ppl")
    prepared_run(base, documents=60, block_size=BLOCK)
    run_in(base, pretrain.run, [f"{k}={v}" for k, v in {**STUDENT, "pretrain.objective": "ntp"}.items()])
    return base


def direct(model_dir, texts: list[str]) -> dict:
    """The definition, written out: `[sep] doc [sep] doc [sep]`, windows of L tokens with stride L - 1,
    each scored from scratch with the model's cross-entropy."""
    model = load_model(model_dir, "cpu").eval()
    tokenizer = load_tokenizer(str(model_dir / "tokenizer.json"))
    separator = json.loads((model_dir / "config.json").read_text())["tokenizer"]["separator_id"]
    stream = [separator]
    for text in texts:
        stream += tokenizer.backend.encode(text, add_special_tokens=False).ids + [separator]
    length = model.config.context_length
    total, count, windows = 0.0, 0, 0
    with torch.no_grad():
        for start in range(0, len(stream) - 1, length - 1):
            ids = torch.tensor([stream[start : start + length]])
            logits = model(ids).logits[0, :-1]
            total += F.cross_entropy(logits, ids[0, 1:], reduction="sum").item()
            count += ids.shape[1] - 1
            windows += 1
    size = sum(len(t.encode()) for t in texts)
    bits_per_byte = total / math.log(2) / size
    return {
        "loss": total / count,
        "tokens": count,
        "bytes": size,
        "bits_per_byte": bits_per_byte,
        "windows": windows,
    }


PARAGRAPHS = [
    "The quality of mercy is not strained; it droppeth as the gentle rain from heaven.",
    "Now is the winter of our discontent made glorious summer by this sun of York.",
    "All the world's a stage, and all the men and women merely players: they have their exits.",
    "If music be the food of love, play on; give me excess of it, that, surfeiting, the appetite may die.",
]


@pytest.mark.parametrize(
    "paragraphs, windows", [(["Mercy is not strained."], 1), (PARAGRAPHS * 3, 10)], ids=["one window", "many"]
)
def test_text_perplexity_is_the_models_token_loss_on_the_text(trained, tmp_path, paragraphs, windows):
    text = tmp_path / "heldout.jsonl"  # one document per record, its text exactly as written
    text.write_text("".join(json.dumps({"text": p}) + "\n" for p in paragraphs))
    task = f"ppl:{text}"
    results = run_in(trained, eval_results, [f"eval.tasks={json.dumps([task])}"])
    got = results["results"]["pretrain-ntp"][task]
    want = direct(trained / "run" / "pretrain-ntp" / "model", paragraphs)
    assert want["windows"] == 1 if windows == 1 else want["windows"] >= windows
    assert got["documents"] == len(paragraphs)
    assert (got["tokens"], got["bytes"]) == (want["tokens"], want["bytes"])
    assert got["loss"] == pytest.approx(want["loss"], rel=1e-5)
    assert got["perplexity"] == pytest.approx(math.exp(want["loss"]), rel=1e-5)
    assert got["bits_per_byte"] == pytest.approx(want["bits_per_byte"], rel=1e-5)


def test_a_glob_reads_its_files_in_order_as_one_corpus(trained, tmp_path):
    folder = tmp_path / "texts"
    folder.mkdir()
    records = [{"text": p} for p in PARAGRAPHS]
    for name, part in (("a.jsonl", records[:2]), ("b.jsonl", records[2:])):
        (folder / name).write_text("".join(json.dumps(r) + "\n" for r in part))
    (tmp_path / "all.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    tasks = [f"ppl:{folder}/*.jsonl", f"ppl:{tmp_path / 'all.jsonl'}"]
    results = run_in(trained, eval_results, [f"eval.tasks={json.dumps(tasks)}"])["results"]["pretrain-ntp"]
    split, whole = (results[t] for t in tasks)
    assert {k: v for k, v in split.items() if k != "seconds"} == {
        k: v for k, v in whole.items() if k != "seconds"
    }
    assert split["documents"] == 4


def test_a_spec_that_names_no_files_is_one_clear_error_naming_the_task(trained):
    run = ["--set", f"run.dir={trained / 'run'}", "eval"]
    result = Cocomix(trained)(*run, "--tasks", "ppl:/nowhere/*.txt")
    assert result.exit_code == 2, result.stderr
    assert result.stderr.strip() == (
        "error: Eval task `ppl:/nowhere/*.txt`: glob '/nowhere/*.txt' matches no files. Check the pattern."
    )
    result = Cocomix(trained)(*run, "--tasks", "ppl:someone/dataset")
    assert result.exit_code == 2 and len(result.stderr.strip().splitlines()) == 1
    assert (
        "Eval task `ppl:someone/dataset`: 'someone/dataset' is not a file, folder or glob here"
        in result.stderr
    )
    result = Cocomix(trained)(*run, "--tasks", "ppl:x.txt", "--set", "eval.backend=lm-eval")
    assert result.exit_code == 2 and "The lm-eval backend cannot score `ppl:x.txt`" in result.stderr


def test_text_perplexity_is_cached_by_the_texts_content(trained, tmp_path):
    run = tmp_path / "copy"
    shutil.copytree(trained, run)
    text = tmp_path / "heldout.txt"
    text.write_text("\n\n".join(PARAGRAPHS) + "\n")
    task = f"ppl:{text}"
    args = [f"eval.tasks={json.dumps([task])}"]
    first = run_in(run, eval_results, args)["results"]["pretrain-ntp"][task]
    cache = run / "run" / "eval" / "cache"
    entries = sorted(p.name for p in cache.iterdir())
    again = run_in(run, eval_results, args)["results"]["pretrain-ntp"][task]
    assert again == first and sorted(p.name for p in cache.iterdir()) == entries  # nothing scored again
    text.write_text("\n\n".join(reversed(PARAGRAPHS)) + " And one more line.\n")
    changed = run_in(run, eval_results, args)["results"]["pretrain-ntp"][task]
    assert changed["perplexity"] != first["perplexity"] and len(list(cache.iterdir())) == len(entries) + 1


def test_files_of_the_same_name_in_two_folders_are_two_entries_and_empty_text_is_an_error(trained, tmp_path):
    from pipelines.config.loading import load_config
    from pipelines.eval.text_perplexity import data_identity

    for folder in ("a", "b"):
        (tmp_path / "texts" / folder).mkdir(parents=True)
        (tmp_path / "texts" / folder / "t.jsonl").write_text(
            json.dumps({"text": f"Text of {folder}."}) + "\n"
        )
    cfg = load_config(trained / "cocomix.toml")
    identity = data_identity(cfg, f"ppl:{tmp_path}/texts/*/t.jsonl")
    assert sorted(identity["files"]) == ["a/t.jsonl", "b/t.jsonl"]
    (tmp_path / "empty.jsonl").write_text(json.dumps({"text": ""}) + "\n")
    result = Cocomix(trained)(
        "--set", f"run.dir={trained / 'run'}", "eval", "--tasks", f"ppl:{tmp_path}/empty.jsonl"
    )
    assert result.exit_code == 2 and "its documents hold no text" in result.stderr


def test_a_relative_text_path_in_a_config_file_is_read_next_to_it(tmp_path):
    from pipelines.config.loading import load_config

    (tmp_path / "exp").mkdir()
    config = tmp_path / "exp" / "a.toml"
    config.write_text('[eval]\ntasks = ["ppl", "ppl:held/*.txt", "ppl:pypi:x==1/y.txt"]\n')
    tasks = load_config(config).eval.tasks
    assert tasks == ["ppl", f"ppl:{tmp_path / 'exp' / 'held'}/*.txt", "ppl:pypi:x==1/y.txt"]
