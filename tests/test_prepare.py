"""`prepare` against real data: exact tokens, idempotence, the validation split, caps, formats, resume."""

import gzip
import json
import os
import shutil
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import zarr

from pipelines.data.token_store import open_token_store
from pipelines.stages.prepare import is_validation_document
from tests.conftest import (
    Cocomix,
    assert_kills_during_the_force_clear_rerun_to_the_same_result,
    bpe_tokenizer,
    cocomix_subprocess,
    corpus_documents,
    corpus_jsonl,
    read_imdb_texts,
    stage_status,
    write_jsonl,
)


def write_config(directory: Path, source: Path, tokenizer: Path, **data) -> Path:
    lines = ["[run]", 'dir = "run"', "[data]", f'source = "{source}"', f'tokenizer = "{tokenizer}"']
    lines += [f"{key} = {json.dumps(value)}" for key, value in data.items()]
    path = directory / "cocomix.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def reference_blocks(texts, tokenizer_path, block_size, val_fraction, eos_id=None):
    """Tokenize each text on its own with the plain `transformers` call, join with EOS, cut into blocks."""
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(tokenizer_path))
    eos_id = tokenizer.convert_tokens_to_ids("<|endoftext|>") if eos_id is None else eos_id
    streams = {"train": [], "val": []}
    for text in texts:
        split = "val" if is_validation_document(text, val_fraction) else "train"
        streams[split] += tokenizer(text, add_special_tokens=False)["input_ids"] + [eos_id]
    return {
        split: np.array(ids[: len(ids) // block_size * block_size]).reshape(-1, block_size)
        for split, ids in streams.items()
    }


def store_arrays(run_dir: Path) -> dict[str, np.ndarray]:
    store = open_token_store(run_dir / "prepare" / "tokens.zarr")
    return {split: store.split(split)[:] for split in ("train", "val")}


def assert_exact_tokens_and_up_to_date_rerun(directory, cocomix, source, texts, tokenizer, vocab_size):
    write_config(directory, source, tokenizer, block_size=256, val_fraction=0.01, max_documents=len(texts))
    first = cocomix("prepare")
    assert first.exit_code == 0, first.stderr
    assert f"{len(texts):,} documents" in first.stdout

    expected = reference_blocks(texts, tokenizer, 256, 0.01)
    arrays = store_arrays(directory / "run")
    assert arrays["train"].dtype == np.uint16
    assert len(expected["val"]) > 0
    for split in ("train", "val"):
        np.testing.assert_array_equal(arrays[split], expected[split])

    attrs = open_token_store(directory / "run" / "prepare" / "tokens.zarr").attrs
    separator_id = reference_blocks(["x"], tokenizer, 1, 0.0)["train"][-1, 0]
    assert attrs["block_size"] == 256
    assert attrs["tokenizer"]["separator"] == "<|endoftext|>"
    assert attrs["tokenizer"]["separator_id"] == separator_id
    assert attrs["tokenizer"]["vocab_size"] == vocab_size and len(attrs["tokenizer"]["vocab_hash"]) == 64
    assert attrs["counts"]["documents"] == len(texts)
    assert attrs["counts"]["train_blocks"] == len(expected["train"])

    manifest_before = (directory / "run" / "prepare" / "manifest.json").read_text()
    second = cocomix("prepare")
    assert second.exit_code == 0
    assert "prepare: up to date" in second.stdout
    assert (directory / "run" / "prepare" / "manifest.json").read_text() == manifest_before


def test_whole_corpus_matches_direct_tokenization_and_rerun_is_up_to_date(tmp_path, cocomix):
    texts = corpus_documents()
    source = corpus_jsonl(tmp_path / "plays.jsonl")
    tokenizer = bpe_tokenizer()
    assert_exact_tokens_and_up_to_date_rerun(tmp_path, cocomix, source, texts, tokenizer.json, 1024)


@pytest.mark.real_data
def test_imdb_2000_reviews_match_direct_tokenization_and_rerun_is_up_to_date(
    tmp_path, cocomix, imdb_path, gpt2_tokenizer
):
    texts = read_imdb_texts(2000)
    assert_exact_tokens_and_up_to_date_rerun(tmp_path, cocomix, imdb_path, texts, gpt2_tokenizer, 50257)


def test_changed_config_is_refused_with_the_keys_then_forced(tmp_path, cocomix, plays, tokenizer_path):
    write_config(tmp_path, plays, tokenizer_path, block_size=64, max_documents=50, val_fraction=0.0)
    assert cocomix("prepare").exit_code == 0
    refused = cocomix("prepare", "--block-size", "32")
    assert refused.exit_code == 2
    assert "data.block_size: 64 -> 32" in refused.stderr and "--force" in refused.stderr
    assert store_arrays(tmp_path / "run")["train"].shape[1] == 64  # nothing was touched
    forced = cocomix("prepare", "--block-size", "32", "--force")
    assert forced.exit_code == 0
    assert store_arrays(tmp_path / "run")["train"].shape[1] == 32


def test_settings_that_do_not_change_output_do_not_invalidate(tmp_path, cocomix, plays, tokenizer_path):
    write_config(tmp_path, plays, tokenizer_path, block_size=64, max_documents=50, val_fraction=0.0)
    assert cocomix("prepare", "--set", "data.batch_documents=7").exit_code == 0
    again = cocomix("prepare", "--set", "data.batch_documents=1000", "--set", "data.commit_interval_s=0")
    assert again.exit_code == 0 and "up to date" in again.stdout


def test_batch_size_and_commits_do_not_change_the_tokens(tmp_path, cocomix, plays, tokenizer_path):
    write_config(tmp_path, plays, tokenizer_path, block_size=32, max_documents=200, val_fraction=0.05)
    assert cocomix("prepare").exit_code == 0
    reference = store_arrays(tmp_path / "run")
    small = cocomix(
        "--set",
        "run.dir=other",
        "--set",
        "data.batch_documents=7",
        "--set",
        "data.commit_interval_s=0",
        "prepare",
    )
    assert small.exit_code == 0
    for split, array in store_arrays(tmp_path / "other").items():
        np.testing.assert_array_equal(array, reference[split])


def test_validation_split_is_a_stable_fraction_of_documents():
    texts = [f"document number {i}" for i in range(20000)]
    held_out = [t for t in texts if is_validation_document(t, 0.1)]
    assert 0.09 < len(held_out) / len(texts) < 0.11
    assert held_out == [t for t in texts if is_validation_document(t, 0.1)]
    assert not any(is_validation_document(t, 0.0) for t in texts)


def test_max_tokens_caps_the_stream_exactly(tmp_path, cocomix, plays, tokenizer_path):
    write_config(tmp_path, plays, tokenizer_path, block_size=100, val_fraction=0.0, max_tokens=10_050)
    result = cocomix("prepare", "--json")
    assert result.exit_code == 0
    summary = json.loads(result.stdout)
    assert summary["tokens_read"] == 10_050
    assert summary["train_blocks"] == 100 and summary["dropped_tail_tokens"] == 50
    expected = reference_blocks(corpus_documents(summary["documents"]), tokenizer_path, 100, 0.0)
    np.testing.assert_array_equal(store_arrays(tmp_path / "run")["train"], expected["train"][:100])


@pytest.mark.parametrize("fmt", ["txt", "txt.gz", "parquet", "jsonl-glob"])
def test_local_formats_give_the_same_tokens(tmp_path, cocomix, tokenizer_path, fmt):
    texts = [document.replace("\n", " ") for document in corpus_documents(40)]  # one per line
    if fmt == "txt":
        source = tmp_path / "corpus.txt"
        source.write_text("\n".join(texts) + "\n")
    elif fmt == "txt.gz":
        source = tmp_path / "corpus.txt.gz"
        with gzip.open(source, "wt") as fh:
            fh.write("\n".join(texts) + "\n")
    elif fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        source = tmp_path / "corpus.parquet"
        pq.write_table(pa.table({"text": texts, "id": list(range(40))}), source)
    else:
        write_jsonl(tmp_path / "b.jsonl", [{"text": t} for t in texts[20:]])
        write_jsonl(tmp_path / "a.jsonl", [{"text": t} for t in texts[:20]])
        source = tmp_path / "*.jsonl"  # sorted: a.jsonl first
    write_config(tmp_path, source, tokenizer_path, block_size=16, val_fraction=0.0, txt_sample_by="line")
    assert cocomix("prepare").exit_code == 0
    expected = reference_blocks(texts, tokenizer_path, 16, 0.0)
    np.testing.assert_array_equal(store_arrays(tmp_path / "run")["train"], expected["train"])


def test_excluded_files_are_left_out_and_a_pattern_that_matches_nothing_is_an_error(
    tmp_path, cocomix, tokenizer_path
):
    texts = [document.replace("\n", " ") for document in corpus_documents(30)]
    (tmp_path / "texts").mkdir()
    for name, part in (("a.txt", texts[:10]), ("held_out.txt", texts[10:20]), ("c.txt", texts[20:])):
        (tmp_path / "texts" / name).write_text("\n".join(part) + "\n")
    settings = dict(block_size=16, val_fraction=0.0, txt_sample_by="line")
    write_config(tmp_path, tmp_path / "texts" / "*.txt", tokenizer_path, exclude=["held_*"], **settings)
    assert cocomix("prepare").exit_code == 0
    expected = reference_blocks(texts[:10] + texts[20:], tokenizer_path, 16, 0.0)
    np.testing.assert_array_equal(store_arrays(tmp_path / "run")["train"], expected["train"])

    write_config(tmp_path, tmp_path / "texts" / "*.txt", tokenizer_path, exclude=["tempest.txt"], **settings)
    result = cocomix("prepare", "--force")
    assert result.exit_code == 2
    assert result.stderr.strip().splitlines() == [
        f"error: `data.exclude` pattern 'tempest.txt' matches none of the 3 files of `data.source` "
        f"'{tmp_path / 'texts' / '*.txt'}' (a.txt, c.txt, held_out.txt). Patterns match file names, e.g. "
        "`tempest_gut.txt` or `*_test.jsonl`."
    ]


@pytest.mark.slow
@pytest.mark.parametrize("damage", [None, "truncated resume point"])
def test_sigkill_mid_run_then_resume_gives_byte_identical_arrays(tmp_path, tokenizer_path, damage):
    settings = dict(
        block_size=128, val_fraction=0.01, max_documents=12000, batch_documents=200, commit_interval_s=0.0
    )
    plays = corpus_jsonl(tmp_path / "plays.jsonl", copies=60)  # 14,100 documents
    write_config(tmp_path, plays, tokenizer_path, **settings)
    stage_dir = tmp_path / "run" / "prepare"

    process = cocomix_subprocess(["prepare"], cwd=tmp_path)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and _committed_documents(stage_dir) < 3000:
        assert process.poll() is None, "prepare finished before it could be killed; use more documents"
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    killed_at = _committed_documents(stage_dir)
    assert 0 < killed_at < settings["max_documents"]
    manifest = json.loads((stage_dir / "manifest.json").read_text())
    assert manifest["status"] == "running"

    if damage:
        point = stage_dir / "resume.json"
        point.write_bytes(point.read_bytes()[:20])
    resumed = cocomix_subprocess(["--verbose", "prepare"], cwd=tmp_path, stderr=-1, text=True)
    _, stderr = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, stderr
    if damage:
        assert "the resume point run/prepare/resume.json is damaged (" in stderr, stderr
        assert "tokenizing from the start" in stderr
    else:
        assert f"resuming prepare after {killed_at} documents" in stderr

    (tmp_path / "clean").mkdir()
    write_config(tmp_path / "clean", plays, tokenizer_path, **settings)
    clean = cocomix_subprocess(["prepare"], cwd=tmp_path / "clean")
    assert clean.wait(timeout=300) == 0

    resumed_arrays, clean_arrays = store_arrays(tmp_path / "run"), store_arrays(tmp_path / "clean" / "run")
    for split in ("train", "val"):
        assert resumed_arrays[split].tobytes() == clean_arrays[split].tobytes()
        assert len(resumed_arrays[split]) > 0
    assert _chunk_files(stage_dir) == _chunk_files(tmp_path / "clean" / "run" / "prepare")
    resumed_attrs = dict(zarr.open_group(str(stage_dir / "tokens.zarr"), mode="r").attrs)
    assert (
        resumed_attrs["counts"]
        == open_token_store(tmp_path / "clean/run/prepare/tokens.zarr").attrs["counts"]
    )


@pytest.mark.slow
def test_a_kill_at_any_step_of_the_force_clear_leaves_a_stage_that_reruns_clean(tmp_path, cocomix, plays):
    write_config(tmp_path, plays, bpe_tokenizer().json, block_size=32, val_fraction=0.1, max_documents=40)
    assert cocomix("prepare").exit_code == 0

    def same_arrays(result, reference):
        assert sorted(result) == sorted(reference)
        for split, array in result.items():
            np.testing.assert_array_equal(array, reference[split])

    assert_kills_during_the_force_clear_rerun_to_the_same_result(
        tmp_path, ["prepare"], "prepare", lambda: store_arrays(tmp_path / "run"), same_arrays
    )


def test_a_kill_while_the_token_store_is_created_then_a_rerun_gives_the_same_store(tmp_path, cocomix, plays):
    write_config(tmp_path, plays, bpe_tokenizer().json, block_size=32, val_fraction=0.1, max_documents=40)
    (tmp_path / "clean").mkdir()
    write_config(
        tmp_path / "clean", plays, bpe_tokenizer().json, block_size=32, val_fraction=0.1, max_documents=40
    )
    assert Cocomix(tmp_path / "clean")("prepare").exit_code == 0
    for instant in ["create:tokens.zarr", "create:tokens.zarr:train", "create:tokens.zarr:val"]:
        env = {**os.environ, "COCOMIX_KILL_AT": instant}
        killed = cocomix_subprocess(["prepare"], cwd=tmp_path, env=env)
        assert killed.wait(timeout=120) == -signal.SIGKILL, instant
        state = json.loads(cocomix("status", "--json").stdout)["stages"][0]
        assert state["status"] == "interrupted", instant
    assert cocomix("prepare").exit_code == 0
    clean = store_arrays(tmp_path / "clean" / "run")
    for split, array in store_arrays(tmp_path / "run").items():
        assert array.tobytes() == clean[split].tobytes() and len(array) > 0
    assert stage_status(tmp_path, "prepare") == "complete"
    fingerprints = [
        json.loads((d / "run/prepare/manifest.json").read_text())["fingerprint"]
        for d in (tmp_path, tmp_path / "clean")
    ]
    assert fingerprints[0] == fingerprints[1]


def test_the_same_corpus_and_tokenizer_under_other_paths_leave_the_stage_up_to_date(tmp_path, cocomix, plays):
    write_config(tmp_path, plays, bpe_tokenizer().json, block_size=32, val_fraction=0.1, max_documents=40)
    assert cocomix("prepare").exit_code == 0
    moved = tmp_path / "elsewhere"
    moved.mkdir()
    shutil.copy(plays, moved / plays.name)
    shutil.copy(bpe_tokenizer().json, moved / "tokenizer.json")
    write_config(
        tmp_path,
        moved / plays.name,
        moved / "tokenizer.json",
        block_size=32,
        val_fraction=0.1,
        max_documents=40,
    )
    again = cocomix("prepare")
    assert again.exit_code == 0 and "up to date" in again.stdout, again.stdout + again.stderr
    (moved / plays.name).write_text((moved / plays.name).read_text().replace("Caesar", "Pompey", 1))
    changed = cocomix("prepare")
    assert changed.exit_code == 2 and f"file:data.source/{plays.name}:" in changed.stderr, changed.stderr


def _committed_documents(stage_dir: Path) -> int:
    try:
        return json.loads((stage_dir / "resume.json").read_text())["documents"]
    except (FileNotFoundError, json.JSONDecodeError):
        return 0


def _chunk_files(stage_dir: Path) -> dict[str, bytes]:
    store = stage_dir / "tokens.zarr"
    return {str(p.relative_to(store)): p.read_bytes() for p in sorted(store.rglob("c/*")) if p.is_file()}


def test_hf_prefix_streams_through_the_datasets_repository_loader(tmp_path, cocomix, tokenizer_path):
    # A local dataset folder goes through the same `load_dataset(id, subset, split=...)` call as a hub id.
    texts = corpus_documents(30)
    (tmp_path / "repo" / "data").mkdir(parents=True)
    write_jsonl(tmp_path / "repo" / "data" / "train-00000.jsonl", [{"text": t} for t in texts])
    write_config(tmp_path, f"hf:{tmp_path / 'repo'}", tokenizer_path, block_size=16, val_fraction=0.0)
    result = cocomix("prepare")
    assert result.exit_code == 0, result.stderr
    expected = reference_blocks(texts, tokenizer_path, 16, 0.0)
    np.testing.assert_array_equal(store_arrays(tmp_path / "run")["train"], expected["train"])


@pytest.fixture
def plays(tmp_path) -> Path:
    """Every document of the committed plays as a jsonl corpus."""
    return corpus_jsonl(tmp_path / "plays.jsonl")
