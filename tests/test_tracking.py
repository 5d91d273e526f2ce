"""pretrain's trackers, read back from their own files: TensorBoard's event files and W&B's offline run hold
the rows of metrics.jsonl at their steps, a resumed run neither repeats nor loses a step, a missing package
is a config error naming the field and the extra.

W&B runs offline with every folder of its own under tmp_path; the fixture checks that no W&B process
outlives the test.
"""

import json
import os
import struct
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from pipelines.config.schema import PretrainConfig
from pipelines.errors import ConfigError
from pipelines.stages import pretrain
from pipelines.training import tracking
from pipelines.training.trainer import Trainer
from tests.conftest import prepared_run, run_in

REPO = Path(__file__).resolve().parent.parent
STUDENT = {
    "pretrain.objective": "ntp",
    "pretrain.preset": "tiny",
    "pretrain.n_layer": 1,
    "pretrain.n_head": 2,
    "pretrain.n_embd": 32,
    "pretrain.batch_blocks": 4,
    "pretrain.max_steps": 12,
    "pretrain.warmup_steps": 2,
    "pretrain.log_every": 1,
    "pretrain.eval_every": 6,
    "pretrain.eval_blocks": 4,
    "pretrain.save_every": 4,
    "pretrain.tensorboard": "true",
    "pretrain.wandb_project": "cocomix-test",  # `pretrain.wandb_mode` left at its default, offline
}


@pytest.fixture
def offline_wandb(tmp_path, monkeypatch):
    """W&B with no network, no login and no folder outside tmp_path; its processes gone afterwards."""
    import wandb

    home = tmp_path / "wandb-home"
    for name in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR"):
        (home / name).mkdir(parents=True)
        monkeypatch.setenv(name, str(home / name))
    monkeypatch.setenv("WANDB_MODE", "offline")  # a safety net: the config's own mode is what is tested
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    repo_before = set(REPO.iterdir())
    yield home
    wandb.teardown()
    deadline = time.monotonic() + 30
    while _processes_with_env("WANDB_CONFIG_DIR", str(home / "WANDB_CONFIG_DIR")):
        assert time.monotonic() < deadline, "a W&B process outlived wandb.teardown()"
        time.sleep(0.2)
    assert set(REPO.iterdir()) == repo_before  # no `wandb/` left in the repository


@pytest.fixture
def run(tmp_path):
    prepared_run(tmp_path, documents=40)
    return tmp_path


def overrides(**extra) -> list[str]:
    return [f"{k}={v}" for k, v in {**STUDENT, **extra}.items()]


@pytest.mark.slow
def test_tensorboard_and_offline_wandb_hold_every_metrics_row_at_its_step(run, offline_wandb):
    stage_dir = run / "run" / "pretrain-ntp"
    run_in(run, pretrain.run, overrides())
    expected = expected_scalars(stage_dir)
    assert {step for values in expected.values() for step in values} == set(range(13))
    assert {"train/loss", "train/lr", "train/grad_norm", "val/val_loss", "val/val_ppl"} <= set(expected)

    assert tensorboard_scalars(stage_dir) == as_float32(expected)

    run_id = (stage_dir / "wandb" / "run_id").read_text().strip()
    (offline_run,) = sorted((stage_dir / "wandb").glob("offline-run-*"))
    assert offline_run.name.endswith(f"-{run_id}")
    assert wandb_run_ids(offline_run) == {run_id}
    assert wandb_scalars(offline_run) == expected
    assert not list(offline_wandb.rglob("offline-run-*")), "W&B wrote its run outside the stage folder"


@pytest.mark.slow
def test_a_resumed_run_continues_both_trackers_without_repeating_or_losing_a_step(
    run, offline_wandb, monkeypatch
):
    stage_dir = run / "run" / "pretrain-ntp"
    with monkeypatch.context() as patched, pytest.raises(KeyboardInterrupt):
        # Steps 9 and 10 are logged past the checkpoint of step 8, then lost to the interruption.
        patched.setattr(Trainer, "_train_step", interrupted_before(11))
        run_in(run, pretrain.run, overrides())
    first_id = (stage_dir / "wandb" / "run_id").read_text().strip()
    time.sleep(1)  # W&B names an offline run by its id and start second: two attempts need two seconds
    run_in(run, pretrain.run, overrides(), resume=True)
    expected = expected_scalars(stage_dir)
    assert {step for values in expected.values() for step in values} == set(range(13))

    # TensorBoard reads both attempts' event files and shows each step once: the second attempt's 9 to 12.
    assert len(list((stage_dir / "tensorboard").glob("events.out.tfevents.*"))) == 2
    assert tensorboard_scalars(stage_dir) == as_float32(expected)

    # W&B: one run id, an offline folder per attempt (both uploaded to that run by `wandb sync`); the first
    # holds steps 0 to 10, the second 9 to 12.
    assert (stage_dir / "wandb" / "run_id").read_text().strip() == first_id
    first, second = sorted((stage_dir / "wandb").glob("offline-run-*"))
    assert wandb_run_ids(first) == wandb_run_ids(second) == {first_id}
    before, after = wandb_scalars(first), wandb_scalars(second)
    assert steps_of(before) == set(range(11)) and steps_of(after) == set(range(9, 13))
    assert until_step(before, 8) == until_step(expected, 8)
    assert after == {tag: {s: v for s, v in values.items() if s > 8} for tag, values in expected.items()}


def test_a_fresh_start_takes_a_new_wandb_run_and_a_resumed_one_keeps_it(tmp_path):
    folder = tmp_path / "wandb"
    first = tracking._wandb_run_id(folder, start_step=0)
    assert tracking._wandb_run_id(folder, start_step=8) == first
    assert tracking._wandb_run_id(folder, start_step=0) != first  # W&B drops steps a run already has
    (folder / "run_id").unlink()
    assert tracking._wandb_run_id(folder, start_step=8) not in ("", first)


@pytest.mark.parametrize(
    ("module", "setting", "field"),
    [
        ("torch.utils.tensorboard", {"tensorboard": True}, "`pretrain.tensorboard = true`"),
        ("wandb", {"wandb_project": "p"}, '`pretrain.wandb_project = "p"`'),
    ],
)
def test_a_tracker_without_its_package_is_a_config_error_naming_the_field_and_the_extra(
    tmp_path, monkeypatch, module, setting, field
):
    monkeypatch.setitem(sys.modules, module, None)  # what `import` sees when the package is not installed
    with pytest.raises(ConfigError) as error:
        tracking.Trackers(PretrainConfig(**setting), tmp_path, 0, "run", {})
    assert field in str(error.value) and 'pip install -e ".[tracking]"' in str(error.value)


def test_disabled_wandb_needs_no_package_and_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)
    trackers = tracking.Trackers(
        PretrainConfig(wandb_project="p", wandb_mode="disabled"), tmp_path, 0, "r", {}
    )
    trackers.log({"kind": "train", "step": 1, "loss": 1.0})
    trackers.close()
    assert list(tmp_path.iterdir()) == []


# --- what the files hold ----------------------------------------------------------------------------------


def expected_scalars(stage_dir: Path) -> dict[str, dict[int, float]]:
    """metrics.jsonl as the trackers log it: `kind/key` -> {step: value}, numbers only."""
    scalars: dict[str, dict[int, float]] = {}
    for row in map(json.loads, (stage_dir / "metrics.jsonl").read_text().splitlines()):
        for key, value in row.items():
            if key not in ("kind", "step") and isinstance(value, (int, float)):
                assert row["step"] not in scalars.setdefault(f"{row['kind']}/{key}", {}), row
                scalars[f"{row['kind']}/{key}"][row["step"]] = value
    return scalars


def tensorboard_scalars(stage_dir: Path) -> dict[str, dict[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(stage_dir / "tensorboard"), size_guidance={"scalars": 0}).Reload()
    scalars = {}
    for tag in events.Tags()["scalars"]:
        steps = [e.step for e in events.Scalars(tag)]
        assert len(steps) == len(set(steps)), f"{tag} repeats a step: {steps}"
        scalars[tag] = {e.step: e.value for e in events.Scalars(tag)}
    return scalars


def as_float32(scalars: dict[str, dict[int, float]]) -> dict[str, dict[int, float]]:
    """TensorBoard keeps scalars as float32."""
    return {tag: {s: float(np.float32(v)) for s, v in values.items()} for tag, values in scalars.items()}


def wandb_records(offline_run: Path):
    """The protobuf records of an offline run's `run-<id>.wandb`: W&B's transaction log, in the LevelDB log
    format (a 7-byte `:W&B` header, then 32 KiB blocks of chunks, each with a 7-byte header: CRC, length,
    type FULL/FIRST/MIDDLE/LAST). wandb 0.31 has no Python reader of its own (wandb-core writes it)."""
    from wandb.proto import wandb_internal_pb2

    (path,) = offline_run.glob("run-*.wandb")
    data = path.read_bytes()
    assert data[:4] == b":W&B", data[:7]
    block, position, chunks = 32768, 7, []
    while position + 7 <= len(data):
        left = block - position % block
        if left < 7:  # a block's tail too short for a chunk header is zero padding
            position += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[position : position + 7])
        chunks.append(data[position + 7 : position + 7 + length])
        position += 7 + length
        if kind in (1, 4):  # FULL, LAST
            record = wandb_internal_pb2.Record()
            record.ParseFromString(b"".join(chunks))
            chunks = []
            yield record


def wandb_scalars(offline_run: Path) -> dict[str, dict[int, float]]:
    scalars: dict[str, dict[int, float]] = {}
    for record in wandb_records(offline_run):
        if record.WhichOneof("record_type") != "history":
            continue
        items = {
            item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item
        }
        step = items.pop("_step")
        for key, value in items.items():
            if not key.startswith("_"):
                assert step not in scalars.setdefault(key, {}), (key, step)
                scalars[key][step] = value
    return scalars


def wandb_run_ids(offline_run: Path) -> set[str]:
    return {r.run.run_id for r in wandb_records(offline_run) if r.WhichOneof("record_type") == "run"}


def steps_of(scalars: dict[str, dict[int, float]]) -> set[int]:
    return {step for values in scalars.values() for step in values}


def until_step(scalars: dict[str, dict[int, float]], last: int) -> dict[str, dict[int, float]]:
    return {tag: {s: v for s, v in values.items() if s <= last} for tag, values in scalars.items()}


def interrupted_before(step: int):
    """`Trainer._train_step` that Ctrl-C (pressed twice) stops before optimiser step `step`: no checkpoint
    is saved for what came after the last one, and the trackers are closed on the way out."""
    train_step = Trainer._train_step

    def interrupted(self, micro_batches):
        if self.step == step - 1:
            raise KeyboardInterrupt
        return train_step(self, micro_batches)

    return interrupted


def _processes_with_env(name: str, value: str) -> list[int]:
    """Processes of this user whose environment has `name=value` (W&B's, started by this test)."""
    wanted = f"{name}={value}".encode()
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit() and int(proc.name) != os.getpid():
            try:
                if wanted in (proc / "environ").read_bytes().split(b"\0"):
                    found.append(int(proc.name))
            except OSError:
                continue
    return found
