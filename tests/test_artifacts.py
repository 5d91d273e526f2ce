import json
import subprocess
import sys

import pytest

from pipelines.core.files import atomic_write_json
from pipelines.core.fingerprints import file_identity, fingerprint
from pipelines.core.layout import STAGES
from pipelines.core.session import StageSession, ensure_run_dir, stage_states
from pipelines.errors import InputError, StageError


def session(tmp_path, inputs, **kwargs):
    return StageSession(tmp_path / "run", "prepare", inputs, **kwargs)


def test_fingerprint_is_order_independent_and_sensitive():
    assert fingerprint({"a": 1, "b": [1, 2]}) == fingerprint({"b": [1, 2], "a": 1})
    assert fingerprint({"a": 1}) != fingerprint({"a": 2})


def test_atomic_write_replaces_without_leftovers(tmp_path):
    path = tmp_path / "m.json"
    atomic_write_json(path, {"x": 1})
    atomic_write_json(path, {"x": 2})
    assert json.loads(path.read_text()) == {"x": 2}
    assert [p.name for p in tmp_path.iterdir()] == ["m.json"]


def test_file_identity_reuses_the_hash_only_when_size_and_mtime_match(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("hello")
    first = file_identity(path)
    known = {first["path"]: {**first, "sha256": "cached"}}
    assert file_identity(path, known)["sha256"] == "cached"
    path.write_text("hello world")
    assert file_identity(path, known)["sha256"] == file_identity(path)["sha256"] != "cached"


def test_stage_lifecycle_up_to_date_refuse_and_force(tmp_path):
    with session(tmp_path, {"data.block_size": 8}) as s:
        assert not s.up_to_date and not s.resuming
        (s.dir / "out.bin").write_bytes(b"x")
        s.complete({"blocks": 3})
    with session(tmp_path, {"data.block_size": 8}) as s:
        assert s.up_to_date and s.summary == {"blocks": 3}
    with pytest.raises(StageError) as info:
        with session(tmp_path, {"data.block_size": 16}):
            pass
    assert "holds a complete `prepare` of a different run (data.block_size: 8 -> 16)" in str(info.value)
    assert "--force" in str(info.value)
    with session(tmp_path, {"data.block_size": 16}, force=True) as s:
        assert not s.up_to_date
        assert not (s.dir / "out.bin").exists()  # a forced start clears the old output


def test_unfinished_stage_resumes_with_same_fingerprint(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        with session(tmp_path, {"k": 1}) as s:
            raise KeyboardInterrupt
    assert stage_states(tmp_path / "run")[0]["status"] == "interrupted"
    with session(tmp_path, {"k": 1}) as s:
        assert s.resuming


def test_user_error_marks_the_stage_failed_and_a_new_config_starts_fresh(tmp_path):
    with pytest.raises(InputError):
        with session(tmp_path, {"k": 1}):
            raise InputError("empty corpus")
    state = stage_states(tmp_path / "run")[0]
    assert state["status"] == "failed" and state["error"] == "empty corpus"
    with session(tmp_path, {"k": 2}) as s:  # no --force needed: nothing of value to protect
        assert not s.resuming and not s.up_to_date


@pytest.mark.parametrize("failure", [InputError("hub unreachable"), KeyboardInterrupt(), RuntimeError("bug")])
def test_a_failed_rerun_of_a_complete_cache_stage_leaves_it_complete(tmp_path, failure):
    """`eval` (rerun_on_change) redone for other inputs: should the attempt fail, for any reason, the stage
    is what it was, complete with its summary and manifest, not failed or interrupted."""
    with session(tmp_path, {"eval.tasks": ["ppl"]}, rerun_on_change=True) as s:
        s.complete({"results": 1})
    before = (tmp_path / "run" / "prepare" / "manifest.json").read_bytes()
    with pytest.raises(type(failure)):
        with session(tmp_path, {"eval.tasks": ["ppl", "arc"]}, rerun_on_change=True):
            raise failure
    assert (tmp_path / "run" / "prepare" / "manifest.json").read_bytes() == before
    assert stage_states(tmp_path / "run")[0]["status"] == "complete"
    with session(tmp_path, {"eval.tasks": ["ppl"]}, rerun_on_change=True) as s:
        assert s.up_to_date and s.summary == {"results": 1}


def test_run_dir_holding_other_files_is_refused(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "notes.txt").write_text("mine")
    with pytest.raises(StageError, match=r"holds files that are not a cocomix run \(no run.json\)"):
        with session(tmp_path, {}):
            pass


def test_lock_names_the_holder(tmp_path):
    ensure_run_dir(tmp_path / "run")
    stage_dir = tmp_path / "run" / "prepare"
    stage_dir.mkdir()
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import time; from pipelines.core.locks import StageLock; "
            f"lock = StageLock({str(stage_dir)!r}, 'prepare'); lock.acquire(); "
            "print('held', flush=True); time.sleep(30)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(StageError) as info:
            with session(tmp_path, {}):
                pass
        assert f"Stage `prepare` is being written by pid {holder.pid} (`-c`) on " in str(info.value)
        assert stage_states(tmp_path / "run")[0]["status"] != "interrupted"
    finally:
        holder.kill()
        holder.wait()
    with session(tmp_path, {}) as s:  # the kernel released the dead holder's lock
        assert not s.up_to_date


def test_stage_states_lists_every_stage(tmp_path):
    states = stage_states(tmp_path / "nothing")
    assert [s["stage"] for s in states] == list(STAGES)
    assert {s["status"] for s in states} == {"not started"}


def test_a_failed_attempt_with_the_same_fingerprint_resumes(tmp_path):
    with pytest.raises(InputError):
        with session(tmp_path, {"k": 1}) as s:
            (s.dir / "partial.bin").write_bytes(b"kept")
            raise InputError("transient")
    with session(tmp_path, {"k": 1}) as s:
        assert s.resuming and (s.dir / "partial.bin").exists()
        assert s.manifest["status"] == "running" and "error" not in s.manifest


def test_a_dead_readers_file_is_removed_by_the_next_reader(tmp_path):
    """SIGKILL gives a reader no chance to remove its `.reader-PID-N`; the next reader of the stage does."""
    import signal
    import subprocess
    import sys

    from pipelines.core.locks import READER_PREFIX, ReadLock

    stage_dir = tmp_path / "prepare"
    stage_dir.mkdir()
    hold = (
        "import time; from pipelines.core.locks import ReadLock; "
        f"lock = ReadLock({str(stage_dir)!r}, 'prepare').__enter__(); "
        "print('held', flush=True); time.sleep(60)"
    )
    reader = subprocess.Popen([sys.executable, "-c", hold], stdout=subprocess.PIPE, text=True)
    assert reader.stdout.readline().strip() == "held"
    (left,) = stage_dir.glob(f"{READER_PREFIX}*")
    with ReadLock(stage_dir, "prepare"):  # a live reader's file is kept
        assert left.exists()
    reader.send_signal(signal.SIGKILL)
    reader.wait()
    assert left.exists()
    with ReadLock(stage_dir, "prepare") as mine:
        assert [p.name for p in stage_dir.iterdir()] == [mine.path.name]
    assert list(stage_dir.iterdir()) == []
