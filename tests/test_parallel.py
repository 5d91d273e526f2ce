"""Many ranks and compilation, checked on CPU: gloo ranks under torchrun for FSDP2 and DDP, `torch.compile`
with Dynamo's counters, a patched `torch.cuda` for the calls only a GPU would take, the profiler for memory.
docs/SCALING.md ("What was tested") lists what each test stands for and what only a GPU can show."""

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch._inductor.config
from torch._dynamo.utils import counters

from pipelines.core import distributed
from pipelines.errors import ConfigError
from pipelines.stages import pretrain
from tests import test_pretrain
from tests.conftest import REPO, ReadBacks, peak_allocated_bytes
from tests.test_pretrain import cli_args, overrides, rows, run_in, weights

PROBE = REPO / "tests" / "rank_probe.py"

extracted = test_pretrain.extracted  # the module's tiny teacher, SAE and concept store, made once here too


@pytest.fixture
def run(tmp_path, extracted):
    shutil.copytree(extracted, tmp_path, dirs_exist_ok=True)
    return tmp_path


def torchrun(run: Path, settings: dict, port: int, probes: Path | None = None, timeout: float = 300):
    """`cocomix pretrain` on two gloo ranks (through the probes when `probes` names their folder); fails
    the test, and kills every rank, when it outlives `timeout` (a hang)."""
    entry = ["-m", "cocomix_cli"] if probes is None else [str(PROBE)]
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
        *entry, "--no-progress", "--verbose", *cli_args(run, **settings), "pretrain", "--json",
    ]  # fmt: skip
    # Inductor's caches off: a graph loaded from them leaves no trace in Dynamo's counters.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TORCHINDUCTOR_FORCE_DISABLE_CACHES": "1"}
    if probes is not None:
        probes.mkdir(exist_ok=True)
        env["COCOMIX_PROBE_DIR"] = str(probes)
    process = subprocess.Popen(
        command, cwd=run, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )  # fmt: skip
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_tree(process.pid)
        process.communicate()
        pytest.fail(f"two ranks still running after {timeout:.0f} s (a hang): {' '.join(command[-6:])}")
    assert process.returncode == 0, stderr[-3000:]
    return stdout, stderr


def kill_tree(pid: int) -> None:
    """SIGKILL `pid` and every process below it (torchrun starts its ranks in sessions of their own, so a
    process group would miss them, and they would hold the output pipes open)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # gone meanwhile
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    for child in children.get(pid, []):
        kill_tree(child)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


def probe(folder: Path, rank: int = 0) -> dict:
    return json.loads((folder / f"probe-{rank}.json").read_text())


def symbolic_shapes(dynamo: dict) -> list[str]:
    """The matmuls Dynamo compiled with a symbolic size (`s27`): a dynamic-shape graph."""
    return [name for name in dynamo.get("aten_mm_info", {}) if any(p.startswith("s") for p in _sizes(name))]


def _sizes(mm_name: str) -> list[str]:
    return [part for size in mm_name.split("_")[1:] for part in size.split("*")]


def skipped_frames(dynamo: dict) -> list[str]:
    return [reason for reason in dynamo.get("unimplemented", {}) if "frame skipped" in reason]


STUDENT = {"pretrain.objective": "cocomix", "pretrain.fsdp": "true", "pretrain.log_every": 1}


# --- finding 2: FSDP evaluation with unequal val batches -------------------------------------------------


@pytest.mark.slow
def test_fsdp_evaluation_completes_with_one_to_four_val_blocks_and_equals_one_process(run):
    """4 blocks per rank on 2 ranks: with 1 to 4 val blocks rank 1 has no val rows; under FSDP its
    missing forwards used to leave rank 0 in the all-gather of its own forever."""
    settings = {**STUDENT, "pretrain.max_steps": 2, "pretrain.eval_every": 2, "pretrain.save_every": 100}
    for port, val_blocks in enumerate((1, 2, 3, 4), start=29541):
        each = {**settings, "pretrain.eval_blocks": val_blocks}
        single = run_in(run, pretrain.run, overrides(run, **each, **{"pretrain.batch_blocks": 8}))
        expected = [r["val_loss"] for r in rows(single.dir, "val")]
        single.dir.rename(run / f"single-{val_blocks}")
        torchrun(run, {**each, "pretrain.batch_blocks": 4}, port, timeout=240)
        ranked = [r["val_loss"] for r in rows(single.dir, "val")]
        assert len(ranked) == len(expected) == 2
        np.testing.assert_allclose(ranked, expected, rtol=0, atol=1e-5, err_msg=f"{val_blocks} val blocks")
        single.dir.rename(run / f"ranked-{val_blocks}")


# --- finding 3: accumulation and compilation under FSDP ---------------------------------------------------


@pytest.fixture(scope="module")
def accumulated(tmp_path_factory, extracted):
    """The same CoCoMix student on two ranks with 2 micro-steps per optimizer step: DDP, FSDP, and FSDP
    compiled (the paper configs' setting), the FSDP runs through the probes. Each run's train rows,
    weights, probes and log."""
    base = tmp_path_factory.mktemp("accumulated")
    shutil.copytree(extracted, base, dirs_exist_ok=True)
    settings = {
        **STUDENT,
        "pretrain.max_steps": 3,
        "pretrain.grad_accum": 2,
        "pretrain.batch_blocks": 2,
        "pretrain.eval_every": 3,
    }
    stage = base / "run" / "pretrain-cocomix"
    runs = {}
    for port, (name, more) in enumerate(
        [("ddp", {"pretrain.fsdp": "false"}), ("fsdp", {}), ("compiled", {"pretrain.compile": "true"})],
        start=29551,
    ):
        probes = None if name == "ddp" else base / f"probes-{name}"
        stdout, log = torchrun(base, {**settings, **more}, port, probes=probes)
        runs[name] = {
            "rows": rows(stage, "train"),
            "weights": weights(stage),
            "probes": [probe(probes, rank) for rank in (0, 1)] if probes else None,
            "log": log,
            "summary": json.loads(next(line for line in stdout.splitlines() if line.startswith("{"))),
            "vocab_size": _vocab_size(stage),
        }
        stage.rename(base / name)
    return runs


def assert_same_training(trained: dict, reference: dict) -> None:
    for name in ("loss", "ntp_loss", "concept_loss"):
        got, expected = ([r[name] for r in each["rows"]] for each in (trained, reference))
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5, err_msg=name)
    for name, tensor in trained["weights"].items():  # Adam magnifies FSDP's tiny gradient differences
        torch.testing.assert_close(tensor, reference["weights"][name], atol=1e-4, rtol=0)


def _vocab_size(stage: Path) -> int:
    return json.loads((stage / "model" / "config.json").read_text())["model"]["vocab_size"]


@pytest.mark.slow
def test_fsdp_with_grad_accum_reduce_scatters_once_per_step_and_equals_ddp(accumulated):
    units = 2 + 1  # FSDP units: the student's two blocks and the root
    for name in ("fsdp", "compiled"):
        for found in accumulated[name]["probes"]:
            assert found["reduce_scatters_per_step"] == [units] * 3, name
    assert_same_training(accumulated["fsdp"], accumulated["ddp"])
    # Before step 1, one line per node, then the batch split.
    log = accumulated["fsdp"]["log"]
    assert ": 2 rank(s) (cpu): rank 0 on cpu, rank 1 on cpu" in log, log[-2000:]
    assert "2 block(s) per rank x 2 ranks x 2 accumulation = 8 blocks (256 tokens) per optimizer step" in log
    assert accumulated["fsdp"]["summary"]["global_batch_blocks"] == 8


@pytest.mark.slow
def test_compiled_fsdp_equals_eager_with_no_skipped_frame_the_head_compiled_and_static_blocks(accumulated):
    compiled = accumulated["compiled"]
    for found in compiled["probes"]:
        dynamo = found["dynamo"]
        assert not skipped_frames(dynamo), skipped_frames(dynamo)
        assert not symbolic_shapes(dynamo), symbolic_shapes(dynamo)
        assert not dynamo.get("graph_break"), dynamo.get("graph_break")
        # The LM head is the only matmul with the vocabulary (the tiny tokenizer's 1,024) as a size: it is in
        # a compiled graph, and with it the loss (one function, no graph break).
        sizes = {size for name in dynamo["aten_mm_info"] for size in _sizes(name)}
        assert str(compiled["vocab_size"]) in sizes, sorted(sizes)
    assert_same_training(compiled, accumulated["fsdp"])


# --- finding 3: what FSDP gathers in --------------------------------------------------------------------


@pytest.mark.parametrize(("device", "param_dtype"), [("cuda", torch.bfloat16), ("cpu", None)])
def test_fsdp_gathers_bf16_and_reduces_float32_on_cuda(monkeypatch, device, param_dtype):
    """`fully_shard` patched to record the policy each unit gets (no GPU or process group here)."""
    import torch.distributed.fsdp as fsdp

    from pipelines.model.gpt import GPT
    from pipelines.training.objectives import Objective, ObjectiveLoss
    from pipelines.training.parallel import Parallelism
    from tests.conftest import tiny_model_config

    policies = []
    monkeypatch.setattr(fsdp, "fully_shard", lambda module, mp_policy: policies.append(mp_policy) or module)
    model = GPT(tiny_model_config(variant="ntp"))
    loss = ObjectiveLoss(model, Objective.__new__(Objective), torch.bfloat16)
    ranks = distributed.Ranks(rank=0, world=2)
    Parallelism(ranks, torch.device(device), fsdp=True, compute_dtype=torch.bfloat16).apply(model, loss)
    assert len(policies) == len(model.h) + 1  # each block, then the root
    for policy in policies:
        assert policy.param_dtype == param_dtype
        assert policy.reduce_dtype == (torch.float32 if param_dtype else None)


# --- finding 5: compile state between students ------------------------------------------------------------


@pytest.mark.slow
def test_two_compiled_students_in_one_process_each_compile_static_shapes(run, monkeypatch):
    """As `cocomix run` (or `gpu_bench --batches 4x1,2x1`) trains them: students of other batch sizes one
    after the other, each compiled as if alone."""
    monkeypatch.setattr(torch._inductor.config, "force_disable_caches", True)  # see `torchrun`
    settings = {"pretrain.compile": "true", "pretrain.max_steps": 2, "pretrain.eval_every": 2}
    for objective, batch_blocks in (("ntp", 4), ("cocomix", 2)):
        counters.clear()
        student = {"pretrain.objective": objective, "pretrain.batch_blocks": batch_blocks}
        run_in(run, pretrain.run, overrides(run, **settings, **student))
        found = {name: dict(values) for name, values in counters.items()}
        assert not symbolic_shapes(found), (objective, symbolic_shapes(found))
        assert not skipped_frames(found), objective
        # One graph for the training step (eager evaluation adds none): far from the recompile limit (8).
        assert found["stats"]["unique_graphs"] == 1, (objective, found["stats"])


# --- finding 4: the speed reported ------------------------------------------------------------------------


def test_slow_evaluation_and_checkpoints_leave_the_reported_speed_within_ten_percent(run, monkeypatch):
    from pipelines.training.trainer import Trainer

    step_seconds: list[float] = []
    train_step, evaluate, save = Trainer._train_step, Trainer.evaluate, Trainer.save_checkpoint

    # Steps of 0.2 s and more, so that what the loop does between them (a few ms, more on a loaded machine,
    # as under `pytest -n`) stays far below the 10%, while an evaluation or a checkpoint (0.5 s) counted as
    # training would be far above it.
    def timed_step(trainer, *args):
        began = time.perf_counter()
        result = train_step(trainer, *args)
        time.sleep(0.2)
        step_seconds.append(time.perf_counter() - began)
        return result

    def slow(method):
        def slowed(trainer):
            time.sleep(0.5)
            return method(trainer)

        return slowed

    monkeypatch.setattr(Trainer, "_train_step", timed_step)
    monkeypatch.setattr(Trainer, "evaluate", slow(evaluate))
    monkeypatch.setattr(Trainer, "save_checkpoint", slow(save))
    settings = {"pretrain.log_every": 3, "pretrain.eval_every": 3, "pretrain.save_every": 3}
    result = run_in(run, pretrain.run, overrides(run, **settings))
    train = rows(result.dir, "train")
    tokens_per_step = result.summary["tokens"] / result.summary["steps"]
    for row, seconds in zip(train, np.reshape(step_seconds, (-1, 3)).sum(axis=1), strict=True):
        steps_rate = 3 * tokens_per_step / seconds
        assert row["tokens_per_s"] == pytest.approx(steps_rate, rel=0.10), (row["step"], steps_rate)
    assert result.summary["tokens_per_s"] == pytest.approx(
        float(np.median([r["tokens_per_s"] for r in train])), rel=1e-3
    )
    assert result.summary["mfu"] is None  # no known peak on a CPU


# --- finding 7: evaluation's memory, the checkpoint's finite check ------------------------------------


def test_evaluation_memory_at_a_49152_token_vocabulary_stays_within_one_chunk(tmp_path, monkeypatch):
    """Evaluation forwards a rank's batch in chunks whose float32 logits stay under `EVAL_LOGITS_BYTES`;
    here one row: 256 tokens x 49,152 x 4 bytes = 50.3 MB of logits, where the batch's 8 rows have 403 MB."""
    from pipelines.training import trainer as trainer_module

    trainer = _trainer_at_the_paper_vocabulary(tmp_path, per_rank=8)
    row_bytes = 256 * 49152 * 4
    monkeypatch.setattr(trainer_module, "EVAL_LOGITS_BYTES", row_bytes, raising=False)
    peak = peak_allocated_bytes(trainer.evaluate)
    # The row's logits and the loss's log-softmax of them, plus 1 MiB for the small rest: measured 100.7 MB,
    # where the batch's 8 rows at once held 805.6 MB.
    assert peak <= 2 * row_bytes + (1 << 20), f"peak {peak / 1e6:.1f} MB"
    assert trainer.eval_rows_per_forward() == 1


def test_a_checkpoint_checks_its_parameters_with_one_read_back(run, monkeypatch):
    """Step 4 only saves a checkpoint: the trainer reads back one stacked finiteness flag per parameter (under
    FSDP, one collective), not one value per parameter."""
    from pipelines.training.trainer import Trainer

    settings = {"pretrain.objective": "cocomix", "pretrain.log_every": 5, "pretrain.eval_every": 6}
    with ReadBacks(monkeypatch, Trainer) as recorder:
        run_in(run, pretrain.run, overrides(run, **settings, **{"pretrain.save_every": 4}))
    trainer_reads = [event for event in recorder.after_step()[4] if event.startswith("trainer.py")]
    assert trainer_reads == ["trainer.py:tolist"], trainer_reads


def _trainer_at_the_paper_vocabulary(folder: Path, per_rank: int):
    from pipelines.config.loading import load_config
    from pipelines.data.batches import SplitArrays
    from pipelines.model.gpt import preset
    from pipelines.training.objectives import objective_for
    from pipelines.training.trainer import Trainer, TrainingData

    (folder / "cocomix.toml").write_text("")
    cfg = load_config(folder / "cocomix.toml", ["pretrain.objective=ntp", "pretrain.eval_blocks=0"])
    model_config = preset("tiny", "ntp", vocab_size=49152, n_layer=1, n_embd=32, n_head=2)
    tokens = np.random.default_rng(0).integers(0, 49152, size=(8, 256), dtype=np.int32)
    data = TrainingData(
        train=SplitArrays({"tokens": tokens}),
        val=SplitArrays({"tokens": tokens}),
        input_artifacts={},
        objective=objective_for(cfg),
    )
    return Trainer(
        cfg,
        model_config=model_config,
        data=data,
        ranks=distributed.Ranks(),
        device=torch.device("cpu"),
        stage_dir=folder,
        fingerprint="test",
        per_rank=per_rank,
    )


# --- finding 1: each process's GPU ------------------------------------------------------------------------


class CudaCalls:
    """`torch.cuda` and `torch.distributed` patched to record, in order, the calls a rank makes while it
    joins the group (no GPU or NCCL here: only which calls, with what, in which order)."""

    def __init__(self, monkeypatch, device_count: int = 8):
        self.calls: list[tuple] = []
        dist = torch.distributed
        record = self.calls.append
        monkeypatch.setattr(torch.cuda, "device_count", lambda: device_count)
        monkeypatch.setattr(torch.cuda, "set_device", lambda device: record(("set_device", device)))
        monkeypatch.setattr(dist, "is_initialized", lambda: any(c[0] == "init" for c in self.calls))
        monkeypatch.setattr(dist, "init_process_group", lambda **kw: record(("init", kw)))
        monkeypatch.setattr(dist, "get_backend", lambda *a: "nccl")
        monkeypatch.setattr(dist, "new_group", lambda **kw: record(("new_group", kw)) or "host group")
        monkeypatch.setattr(dist, "get_rank", lambda *a: 3)
        monkeypatch.setattr(dist, "get_world_size", lambda *a: 8)
        monkeypatch.setattr(distributed, "_host_group", None)


def test_each_rank_takes_its_gpu_before_the_group_is_made(monkeypatch):
    calls = CudaCalls(monkeypatch)
    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setenv("LOCAL_RANK", "3")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    ranks = distributed.start(torch.device("cuda"))
    assert [c[0] for c in calls.calls] == ["set_device", "init", "new_group"]
    assert calls.calls[0][1] == torch.device("cuda", 3)
    assert calls.calls[1][1]["backend"] == "nccl" and calls.calls[1][1]["device_id"] == torch.device(
        "cuda", 3
    )
    assert calls.calls[2][1]["backend"] == "gloo" and calls.calls[2][1]["timeout"] == distributed.HOST_TIMEOUT
    assert ranks.host_group == "host group" and ranks.local_rank == 3


@pytest.mark.parametrize(
    ("device", "local_world", "message"),
    [
        (
            "cuda:0",
            2,
            "`pretrain.device` is `cuda:0` for all 2 ranks on this node; NCCL needs one GPU per rank. "
            'Set `pretrain.device` to "cuda" or "auto"',
        ),
        ("cuda", 9, "torchrun started 9 ranks on"),
    ],
)
def test_two_ranks_on_one_gpu_is_a_one_line_error(monkeypatch, device, local_world, message):
    calls = CudaCalls(monkeypatch, device_count=8)
    monkeypatch.setenv("WORLD_SIZE", str(local_world))
    monkeypatch.setenv("LOCAL_RANK", "8" if device == "cuda" else "1")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(local_world))
    with pytest.raises(ConfigError) as caught:
        distributed.start(torch.device(device), "pretrain.device")
    assert str(caught.value).startswith(message) and "\n" not in str(caught.value)
    assert not calls.calls  # refused before any group exists


def test_host_side_collectives_run_on_the_host_group(monkeypatch):
    seen = []
    dist = torch.distributed
    monkeypatch.setattr(dist, "barrier", lambda **kw: seen.append(("barrier", kw.get("group"))))
    monkeypatch.setattr(
        dist, "broadcast_object_list", lambda box, src, group=None: seen.append(("broadcast", group))
    )
    ranks = distributed.Ranks(rank=0, world=2, host_group="host group")
    ranks.barrier()
    ranks.broadcast({"decision": 1})
    assert seen == [("barrier", "host group"), ("broadcast", "host group")]


def test_a_checkpoint_holds_this_ranks_gpu_generator_only(monkeypatch):
    from pipelines.training.state import rng_state, set_rng_state

    seen = []
    monkeypatch.setattr(
        torch.cuda, "get_rng_state_all", lambda: pytest.fail("every visible GPU's state read")
    )
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device: seen.append(("get", device)) or "state")
    monkeypatch.setattr(
        torch.cuda, "set_rng_state", lambda state, device: seen.append(("set", device, state))
    )
    state = rng_state(torch.device("cuda", 5))
    set_rng_state(state, torch.device("cuda", 5))
    assert seen == [("get", torch.device("cuda", 5)), ("set", torch.device("cuda", 5), "state")]
