"""Each bad input is one line on stderr naming the thing and the fix, exit code 2, and nothing complete."""

import json
from pathlib import Path

import pytest

from tests.conftest import write_jsonl
from tests.test_prepare import write_config


def assert_one_line_error(result, *fragments):
    assert result.exit_code == 2, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    for fragment in fragments:
        assert fragment in lines[0]
    assert "Traceback" not in result.stderr


def assert_nothing_complete(run_dir: Path):
    manifest_path = run_dir / "prepare" / "manifest.json"
    if manifest_path.exists():
        assert json.loads(manifest_path.read_text())["status"] != "complete"
    store_attrs = run_dir / "prepare" / "tokens.zarr" / "zarr.json"
    if store_attrs.exists():
        assert json.loads(store_attrs.read_text())["attributes"]["complete"] is False


@pytest.fixture
def corpus(tmp_path):
    texts = [f"Review {i}: a film with a plot, actors and an ending." for i in range(50)]
    return write_jsonl(tmp_path / "corpus.jsonl", [{"id": i, "text": t} for i, t in enumerate(texts)])


def test_missing_file(tmp_path, cocomix, tokenizer_path):
    write_config(tmp_path, tmp_path / "missing.jsonl", tokenizer_path)
    assert_one_line_error(
        cocomix("prepare"), f"`data.source` file {tmp_path / 'missing.jsonl'} does not exist"
    )
    assert_nothing_complete(tmp_path / "run")


def test_glob_matching_nothing(tmp_path, cocomix, tokenizer_path):
    write_config(tmp_path, tmp_path / "shards" / "*.jsonl", tokenizer_path)
    assert_one_line_error(cocomix("prepare"), "glob", "*.jsonl' matches no files")


def test_jsonl_line_that_is_not_json(tmp_path, cocomix, tokenizer_path, corpus):
    lines = corpus.read_text().splitlines()
    lines[6] = '{"id": 6, "text": "unterminated'
    corpus.write_text("\n".join(lines) + "\n")
    write_config(tmp_path, corpus, tokenizer_path, block_size=8)
    assert_one_line_error(cocomix("prepare"), f"{corpus}:7: not valid JSON", "Fix or remove that line")
    assert_nothing_complete(tmp_path / "run")


@pytest.mark.parametrize(
    "value, kind",
    [("12", "a number (12)"), ("null", "null"), ('["a", "list"]', 'a JSON array (["a", "list"])')],
)
def test_jsonl_text_that_is_not_a_string(tmp_path, cocomix, tokenizer_path, corpus, value, kind):
    lines = corpus.read_text().splitlines()
    lines[9] = '{"id": 9, "text": ' + value + "}"
    corpus.write_text("\n".join(lines) + "\n")
    write_config(tmp_path, corpus, tokenizer_path, block_size=8, val_fraction=0.0)
    assert_one_line_error(
        cocomix("prepare"),
        f"{corpus}:10: field 'text' (`data.text_field`) is {kind}, not a string",
        'Make it a string, e.g. {"text": "..."}, or set `data.text_field`',
    )
    assert_nothing_complete(tmp_path / "run")


@pytest.mark.parametrize("kind", ["array", "binary"])
def test_jsonl_line_that_is_an_array_or_not_utf8_names_its_line(
    tmp_path, cocomix, tokenizer_path, corpus, kind
):
    lines = corpus.read_text().encode().splitlines()
    if kind == "array":
        lines[4] = b'["Review 4", "a film"]'
        expected = [f"{corpus}:5: a JSON array, not an object", 'e.g. {"text": "..."}']
    else:  # Latin-1 bytes in a file read as UTF-8
        lines[4] = '{"id": 4, "text": "caf\u00e9"}'.encode("latin-1")
        expected = [f"{corpus}:5: not UTF-8 (byte 0xe9 at column 23)", "Save the file as UTF-8"]
    corpus.write_bytes(b"\n".join(lines) + b"\n")
    write_config(tmp_path, corpus, tokenizer_path, block_size=8, val_fraction=0.0)
    assert_one_line_error(cocomix("prepare"), *expected)
    assert_nothing_complete(tmp_path / "run")


def test_text_field_that_does_not_exist(tmp_path, cocomix, tokenizer_path, corpus):
    write_config(tmp_path, corpus, tokenizer_path, block_size=8, text_field="body")
    assert_one_line_error(
        cocomix("prepare"),
        "`data.text_field` 'body' is not a field of",
        "fields found: id, text",
        "Set `data.text_field`",
    )
    assert_nothing_complete(tmp_path / "run")


@pytest.mark.parametrize("content", ["", '{"text": ""}\n{"text": ""}\n'])
def test_empty_corpus(tmp_path, cocomix, tokenizer_path, content):
    source = tmp_path / "empty.jsonl"
    source.write_text(content)
    write_config(tmp_path, source, tokenizer_path, block_size=8)
    assert_one_line_error(cocomix("prepare"), f"The corpus {source} holds no text")
    assert_nothing_complete(tmp_path / "run")


def test_block_size_larger_than_the_corpus(tmp_path, cocomix, tokenizer_path, corpus):
    write_config(tmp_path, corpus, tokenizer_path, block_size=4096, val_fraction=0.0)
    assert_one_line_error(
        cocomix("prepare"),
        "`data.block_size` (4096) is larger than the training text",
        "Lower `data.block_size`",
    )
    assert_nothing_complete(tmp_path / "run")


def test_too_little_validation_text(tmp_path, cocomix, tokenizer_path, corpus):
    write_config(tmp_path, corpus, tokenizer_path, block_size=256, val_fraction=0.05)
    assert_one_line_error(cocomix("prepare"), "No validation block", "Raise `data.val_fraction`")


@pytest.mark.parametrize("kind", ["garbage", "missing", "folder"])
def test_tokenizer_that_cannot_be_loaded(tmp_path, cocomix, corpus, kind):
    tokenizer = {"garbage": tmp_path / "tok.json", "missing": tmp_path / "nope.json", "folder": tmp_path}[
        kind
    ]
    if kind == "garbage":
        tokenizer.write_text("{not a tokenizer")
    write_config(tmp_path, corpus, tokenizer, block_size=8)
    expected = "does not exist" if kind == "missing" else "Cannot load tokenizer"
    assert_one_line_error(cocomix("prepare"), f"`{tokenizer}`", expected)
    assert_nothing_complete(tmp_path / "run")


def test_run_dir_holding_a_different_run(tmp_path, cocomix, tokenizer_path, corpus):
    write_config(tmp_path, corpus, tokenizer_path, block_size=8, val_fraction=0.0)
    assert cocomix("prepare").exit_code == 0
    assert_one_line_error(
        cocomix("prepare", "--set", "data.val_fraction=0.5"),
        "holds a complete `prepare` of a different run (data.val_fraction: 0.0 -> 0.5)",
        "Pass --force",
    )


def test_run_dir_holding_something_else(tmp_path, cocomix, tokenizer_path, corpus):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "thesis.tex").write_text("%")
    write_config(tmp_path, corpus, tokenizer_path, block_size=8)
    assert_one_line_error(cocomix("prepare"), "`run.dir` (run) holds files that are not a cocomix run")


def test_config_mistake_names_the_file_and_the_closest_key(tmp_path, cocomix):
    (tmp_path / "cocomix.toml").write_text("[data]\ntokeniser = 'gpt2'\n")
    assert_one_line_error(
        cocomix("config", "show"),
        "cocomix.toml: unknown key `data.tokeniser`; did you mean `data.tokenizer`?",
    )


def test_unset_source(tmp_path, cocomix):
    assert_one_line_error(cocomix("prepare"), "`data.source` is not set")


def test_cocomix_run_names_the_process_writing_a_stage_and_says_to_wait(
    tmp_path, cocomix, tokenizer_path, corpus
):
    import socket
    import subprocess
    import sys

    config = write_config(tmp_path, corpus, tokenizer_path, block_size=8)
    config.write_text(config.read_text().replace("[data]", 'objectives = ["ntp"]\n[data]'))  # no teacher
    stage = tmp_path / "run" / "prepare"
    stage.mkdir(parents=True)
    (tmp_path / "run" / "run.json").write_text("{}")
    (stage / "manifest.json").write_text(json.dumps({"stage": "prepare", "status": "running"}))
    hold = (  # another writer of the stage: a real process holding its lock until its stdin closes
        "import sys; from pipelines.core.locks import StageLock; lock = StageLock(sys.argv[1], 'prepare'); "
        "lock.acquire(); print('held', flush=True); sys.stdin.read()"
    )
    holder = subprocess.Popen(
        [sys.executable, "-c", hold, str(stage)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline() == "held\n"
        result = cocomix("run")
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
    assert_one_line_error(
        result, f"being written by pid {holder.pid}", socket.gethostname(), "Wait for it to finish or stop it"
    )
    assert "--force" not in result.stderr


def test_a_range_error_in_a_set_value_names_the_set_flag_and_the_key(tmp_path, cocomix):
    (tmp_path / "cocomix.toml").write_text("[pretrain]\nmax_steps = 0\n")
    result = cocomix("--set", "pretrain.lr=-1", "config", "show")
    assert_one_line_error(
        result,
        "--set pretrain.lr=-1: `pretrain.lr` (-1.0) must be > 0",
        "cocomix.toml: `pretrain.max_steps` (0) must be >= 1",  # the file's own mistake is still the file's
    )
    assert "cocomix.toml: `pretrain.lr`" not in result.stderr


def test_run_dir_that_is_a_file(tmp_path, cocomix, tokenizer_path, corpus):
    write_config(tmp_path, corpus, tokenizer_path, block_size=8)
    (tmp_path / "run").write_text("not a folder\n")
    assert_one_line_error(cocomix("prepare"), "`run.dir` (run) is a file. Set `run.dir` to a folder.")
    assert (tmp_path / "run").read_text() == "not a folder\n"
