"""Disks that fail: full in the middle of each stage, or read-only.

A full disk gives one clear line, nothing marked complete and no temporary files left, and the advised
command, once space is free, ends with what an uninterrupted run writes. A read-only `run.dir` is one line.

The disks are real: small tmpfs mounts in a private mount namespace (`unshare -m`), sized to fill up halfway
through the stage's own writes, then grown (`mount -o remount`) before the advised rerun.
"""

from __future__ import annotations

import json
import math
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import zarr
from safetensors.torch import load_file

from pipelines.sae.formats import save_saelens
from pipelines.stages import extract, pretrain
from tests.conftest import prepared_run, run_in, tiny_sae, tiny_teacher

STUDENT = [
    "pretrain.objective=cocomix",
    "pretrain.preset=tiny",
    "pretrain.n_layer=2",
    "pretrain.n_head=2",
    "pretrain.n_embd=32",
    "pretrain.insert_layer=1",
    "pretrain.concept_k=4",
    "pretrain.batch_blocks=4",
    "pretrain.max_steps=12",
    "pretrain.warmup_steps=2",
    "pretrain.save_every=4",
    "pretrain.eval_every=6",
    "pretrain.eval_blocks=8",
]
# What a stage leaves while it writes and must not leave after a failed write.
TEMPORARY = re.compile(r"\.tmp|\.creating|\.write-probe")


def _can_mount_a_private_tmpfs() -> bool:
    probe = "d=$(mktemp -d) && mount -t tmpfs -o size=64k cocomix-probe $d && umount $d && rmdir $d"
    try:
        return subprocess.run(["unshare", "-m", "sh", "-c", probe], capture_output=True).returncode == 0
    except FileNotFoundError:
        return False


pytestmark = pytest.mark.skipif(
    not _can_mount_a_private_tmpfs(), reason="needs `unshare -m` and tmpfs mounts (root or user namespaces)"
)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """An uninterrupted run of prepare, extract-concepts and pretrain (cocomix) on a normal disk."""
    base = tmp_path_factory.mktemp("reference")
    tiny_teacher(base / "teacher")
    save_saelens(tiny_sae(), base / "sae")
    prepared_run(base, documents=60)
    run_in(base, extract.run, settings(base))
    run_in(base, pretrain.run, settings(base))
    return base


def settings(base: Path) -> list[str]:
    return [
        f"teacher.model={base / 'teacher'}",
        "teacher.layer=1",
        f"sae.path={base / 'sae'}",
        "extract.blocks_per_chunk=4",
        "extract.tokens_per_batch=64",
        *STUDENT,
    ]


def pages(folder: Path) -> int:
    """The 4 KiB pages a folder's files take on tmpfs."""
    return sum(math.ceil(p.stat().st_size / 4096) for p in folder.rglob("*") if p.is_file())


def on_a_full_disk(work: Path, seed: list[str], command: list[str], free_kib: int) -> dict:
    """Run `cocomix COMMAND` from `work` with `run.dir` on a tmpfs holding the seed stages and `free_kib`
    more; then grow the disk, run the command the error line advises, and copy the disk back out."""
    disk, out = work / "disk", work / "out"
    disk.mkdir()
    out.mkdir()
    cli = f"{shlex.quote(sys.executable)} -m cocomix_cli --no-progress"
    set_args = " ".join(f"--set {shlex.quote(s)}" for s in [f"run.dir={disk / 'run'}", *settings(work)])
    seed_copy = "".join(f"cp -a {work / 'run' / stage} {disk / 'run'}/ && " for stage in seed)
    script = f"""
set -u
mount -t tmpfs -o size=64m cocomix-full {disk}
mkdir -p {disk / "run"} && cp {work / "run" / "run.json"} {disk / "run"}/ && {seed_copy} true
used=$(df --output=used -k {disk} | tail -1)
mount -o remount,size=$((used + {free_kib}))k {disk}
cd {work}
{cli} {set_args} {shlex.join(command)} > {out}/stdout1 2> {out}/stderr1; echo $? > {out}/rc1
(cd {disk} && find . | sort) > {out}/files1
{cli} {set_args} status --json > {out}/status1
mount -o remount,size=64m {disk}
advice=$(sed -n 's/.*then run `\\([^`]*\\)` to continue.*/\\1/p' {out}/stderr1)
echo "$advice" > {out}/advice
eval "{cli} ${{advice#cocomix }}" {set_args} > {out}/stdout2 2> {out}/stderr2; echo $? > {out}/rc2
cp -a {disk / "run"} {out}/run
"""
    subprocess.run(["unshare", "-m", "bash", "-c", script], check=True, timeout=900)
    read = lambda name: (out / name).read_text()  # noqa: E731
    return {
        "rc1": int(read("rc1")),
        "stderr1": read("stderr1"),
        "files1": read("files1").splitlines(),
        "status1": {s["stage"]: s["status"] for s in json.loads(read("status1"))["stages"]},
        "advice": read("advice").strip(),
        "rc2": int(read("rc2")),
        "stderr2": read("stderr2"),
        "run": out / "run",
    }


def arrays(store: Path) -> dict[str, np.ndarray]:
    group = zarr.open_group(str(store), mode="r")
    found = {}
    for split in ("train", "val"):
        node = group[split]
        if isinstance(node, zarr.Array):
            found[split] = node[:]
        else:
            found.update({f"{split}/{name}": node[name][:] for name in node.array_keys()})
    return found


def assert_same_arrays(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype and a[name].tobytes() == b[name].tobytes(), name


@pytest.mark.slow
@pytest.mark.parametrize(
    "stage, seed, command, output",
    [
        ("prepare", [], ["prepare"], "tokens.zarr"),
        ("extract-concepts", ["prepare"], ["extract-concepts"], "concepts.zarr"),
        ("pretrain-cocomix", ["prepare", "extract-concepts"], ["pretrain"], "model"),
    ],
)
def test_a_full_disk_is_one_line_leaves_no_temporary_files_and_the_advised_rerun_completes(
    reference, tmp_path, stage, seed, command, output
):
    for name in ("teacher", "sae", "corpus.jsonl", "cocomix.toml"):
        (shutil.copytree if (reference / name).is_dir() else shutil.copy)(reference / name, tmp_path / name)
    (tmp_path / "run").mkdir()
    shutil.copy(reference / "run" / "run.json", tmp_path / "run")
    for name in seed:
        shutil.copytree(reference / "run" / name, tmp_path / "run" / name)
    free_kib = 4 * (pages(reference / "run" / stage) // 2)  # the disk fills halfway through the stage
    result = on_a_full_disk(tmp_path, seed, command, free_kib)

    assert result["rc1"] == 2, result["stderr1"]
    lines = result["stderr1"].strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: No space left on device"), lines
    assert "Nothing was marked complete: free some space (or set `run.dir` on a larger disk)" in lines[0]
    assert result["status1"][stage] == "interrupted"
    assert [f for f in result["files1"] if TEMPORARY.search(f)] == []
    assert result["advice"].startswith(f"cocomix {command[0]}")

    assert result["rc2"] == 0, result["stderr2"]
    done, clean = result["run"] / stage / output, reference / "run" / stage / output
    if output == "model":
        a, b = load_file(str(done / "model.safetensors")), load_file(str(clean / "model.safetensors"))
        assert sorted(a) == sorted(b) and all(a[k].equal(b[k]) for k in a)
    else:
        assert_same_arrays(arrays(done), arrays(clean))
    manifest = lambda run: json.loads((run / stage / "manifest.json").read_text())  # noqa: E731
    assert manifest(result["run"])["fingerprint"] == manifest(reference / "run")["fingerprint"]


def test_a_read_only_run_dir_is_one_line_naming_it(reference, tmp_path):
    disk = tmp_path / "disk"
    disk.mkdir()
    cli = f"{shlex.quote(sys.executable)} -m cocomix_cli --no-progress"
    prepare = f"{cli} --set run.dir={disk / 'run'} prepare"
    script = f"mount -t tmpfs -o ro,size=64k cocomix-ro {disk} && cd {reference} && {prepare}"
    result = subprocess.run(
        ["unshare", "-m", "bash", "-c", script], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip() == (
        f"error: `run.dir` ({disk / 'run'}) cannot be written to (Read-only file system). Set `run.dir` to a "
        "folder you can write to."
    )


def test_a_finished_stage_on_a_read_only_mount_is_read_by_the_next_stage(tmp_path):
    """A shared, read-only copy of `prepare` (a cluster's read-only store): `train-sae` reads it and writes
    its own folder; nothing is left in the read-only one."""
    prepared_run(tmp_path, documents=200)
    tiny_teacher(tmp_path / "teacher")
    prepare_dir = tmp_path / "run" / "prepare"
    before = sorted(p.name for p in prepare_dir.iterdir())
    sets = " ".join(
        f"--set {k}={v}"
        for k, v in {
            "teacher.model": tmp_path / "teacher",
            "teacher.layer": 1,
            "sae.latents": 64,
            "sae.k": 4,
            "sae.train_tokens": 2048,
            "sae.batch_tokens": 256,
            "sae.buffer_tokens": 1024,
            "sae.eval_tokens": 256,
        }.items()
    )
    read_only = f"mount --bind {prepare_dir} {prepare_dir} && mount -o remount,bind,ro {prepare_dir}"
    train = f"{shlex.quote(sys.executable)} -m cocomix_cli --no-progress {sets} train-sae --json"
    probe = f"touch {prepare_dir}/probe 2>/dev/null && echo writable || echo read-only"
    result = subprocess.run(
        ["unshare", "-m", "bash", "-c", f"{read_only} && {probe} && cd {tmp_path} && {train}"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.splitlines()[0] == "read-only"  # the mount really refused writes
    assert json.loads(result.stdout.splitlines()[-1])["stage"] == "train-sae"
    manifest = json.loads((tmp_path / "run" / "train-sae" / "manifest.json").read_text())
    assert manifest["status"] == "complete"
    assert sorted(p.name for p in prepare_dir.iterdir()) == before
