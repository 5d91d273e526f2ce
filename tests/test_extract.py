"""extract-concepts: exact attributions, formats, teacher dtypes and memory, resume after SIGKILL, shards,
torchrun ranks, bad input."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from pipelines.concepts.teacher import load_teacher
from pipelines.core.session import stage_states
from pipelines.sae.attribution import concept_targets, official_scores, paper_scores
from pipelines.sae.formats import load_sae, openai_state_dict, save_saelens
from pipelines.stages import extract
from tests.conftest import (
    assert_kills_during_the_force_clear_rerun_to_the_same_result,
    bpe_tokenizer,
    cocomix_subprocess,
    peak_allocated_bytes,
    prepared_run,
    run_in,
    tiny_sae,
    tiny_teacher,
)


@pytest.fixture
def models(tmp_path):
    teacher = tiny_teacher(tmp_path / "teacher")
    sae = tiny_sae()
    save_saelens(sae, tmp_path / "sae")
    torch.save(openai_state_dict(sae), tmp_path / "sae.pt")
    return teacher, sae


def extract_overrides(tmp_path, sae_path=None, **extra):
    values = {
        "teacher.model": str(tmp_path / "teacher"),
        "teacher.layer": 1,
        "sae.path": str(sae_path or tmp_path / "sae"),
        "extract.blocks_per_chunk": 4,
        "extract.tokens_per_batch": 64,
        **extra,
    }
    return [f"{k}={v}" for k, v in values.items()]


def set_args(overrides: list[str]) -> list[str]:
    """The `--set KEY=VALUE` command-line arguments of these overrides."""
    return [arg for override in overrides for arg in ("--set", override)]


def run_extract(directory: Path, overrides: list[str], **kwargs):
    return run_in(directory, extract.run, overrides, **kwargs)


def store_arrays(run_dir: Path) -> dict[str, np.ndarray]:
    group = zarr.open_group(str(run_dir / "extract-concepts" / "concepts.zarr"), mode="r")
    return {
        f"{split}/{name}": group[split][name][:]
        for split in ("train", "val")
        for name in group[split].array_keys()
    }


def assert_equal_to_one_process(tmp_path: Path, overrides: list[str], documents: int):
    """The store in tmp_path/run equals one made by a single in-process run on the same documents."""
    (tmp_path / "single").mkdir()
    prepared_run(tmp_path / "single", documents=documents)
    run_extract(tmp_path / "single", overrides)
    assert_same_arrays(store_arrays(tmp_path / "run"), store_arrays(tmp_path / "single" / "run"))
    # The same fingerprint too, although the other run's corpus lies elsewhere: files enter by content.
    manifests = [
        json.loads((d / "run/extract-concepts/manifest.json").read_text())
        for d in (tmp_path, tmp_path / "single")
    ]
    assert manifests[0]["status"] == manifests[1]["status"] == "complete"
    assert manifests[0]["fingerprint"] == manifests[1]["fingerprint"]


def assert_same_arrays(a: dict, b: dict):
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype and a[name].tobytes() == b[name].tobytes(), name


# --- attribution against a naive reference --------------------------------------------------------


def naive_hidden_and_grad(teacher_dir: Path, ids: torch.Tensor, layer: int, hook: str):
    """The official way: every weight requires grad, full backward, hidden states from transformers itself."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(teacher_dir)
    outputs = model(input_ids=ids, output_hidden_states=True, use_cache=False)
    hidden = outputs.hidden_states[layer + 1 if hook == "resid_post" else layer]
    hidden.retain_grad()
    logits = outputs.logits
    loss = torch.nn.functional.cross_entropy(
        logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten(), reduction="sum"
    )
    loss.backward()
    return hidden.detach(), hidden.grad


def naive_dense_official(sae, hidden, grad):
    mean = hidden.mean(-1, keepdim=True)
    std = (hidden - mean).std(-1, keepdim=True)
    pre = ((hidden - mean) / (std + 1e-5) - sae.b_dec) @ sae.W_enc + sae.b_enc
    top = pre.topk(sae.k, dim=-1)
    activations = torch.zeros_like(pre).scatter(-1, top.indices, top.values.relu())
    return (grad @ sae.W_dec.t()) * activations, pre


def test_a_tf32_teacher_sets_tf32_matmuls_only_while_it_runs_and_is_float32_on_the_cpu(models):
    teacher_dir, _ = models
    ids = torch.randint(0, bpe_tokenizer().vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    matmul = torch.backends.cuda.matmul
    setting = "fp32_precision" if hasattr(matmul, "fp32_precision") else "allow_tf32"
    before = getattr(matmul, setting)
    teacher = load_teacher(str(teacher_dir), layer=1, hook="resid_post", dtype="tf32")
    seen = []
    teacher.block.register_forward_pre_hook(lambda *_: seen.append(getattr(matmul, setting)))
    out = teacher.hidden_and_grad(ids)
    teacher.hidden_states(ids)
    assert seen == [{"fp32_precision": "tf32", "allow_tf32": True}[setting]] * 2
    assert getattr(matmul, setting) == before
    assert next(teacher.model.parameters()).dtype == torch.float32
    reference = load_teacher(str(teacher_dir), layer=1, hook="resid_post").hidden_and_grad(ids)
    assert torch.equal(out.hidden, reference.hidden) and torch.equal(out.grad, reference.grad)


@pytest.mark.parametrize(
    "architecture, hook", [("gpt2", "resid_post"), ("gpt2", "resid_pre"), ("llama", "resid_post")]
)
def test_attributions_equal_a_naive_dense_reference(tmp_path, models, architecture, hook):
    teacher_dir, sae = models
    if architecture != "gpt2":
        teacher_dir = tiny_teacher(tmp_path / architecture, architecture=architecture)
    vocab_size = bpe_tokenizer().vocab_size
    ids = torch.randint(0, vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    ours = load_teacher(str(teacher_dir), layer=1, hook=hook).hidden_and_grad(ids)
    hidden, grad = naive_hidden_and_grad(teacher_dir, ids, 1, hook)
    torch.testing.assert_close(ours.hidden, hidden, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(ours.grad, grad, atol=1e-6, rtol=1e-5)
    assert ours.grad[:, -1].abs().max() == 0  # the last position has no next token

    h, g = hidden.flatten(0, 1), grad.flatten(0, 1)
    with torch.no_grad():
        dense, pre = naive_dense_official(sae, h, g)
        encoding = sae.encode_topk(h)
        sparse = official_scores(sae, g, encoding.values, encoding.ids)
        scattered = torch.zeros_like(dense).scatter(-1, encoding.ids, sparse)
        torch.testing.assert_close(scattered, dense, atol=1e-6, rtol=1e-5)
        inactive = torch.ones_like(dense, dtype=torch.bool).scatter(-1, encoding.ids, False)
        assert scattered[inactive].abs().max() == 0 and dense[inactive].abs().max() == 0
        torch.testing.assert_close(paper_scores(sae, h, g), pre * (g @ sae.W_dec.t()), atol=1e-6, rtol=1e-5)
        targets = concept_targets(sae, h, g, 4, "official")
        expected = dense.topk(4, dim=-1)
        decided = (expected.values[:, -1] > 0) & (
            expected.values[:, 3] > expected.values[:, 3:].max()
        )  # no ties
        assert torch.equal(targets.ids[decided], expected.indices[decided])


def test_openai_and_saelens_files_of_one_sae_give_identical_targets(tmp_path, models):
    prepared_run(tmp_path, documents=20)
    run_extract(tmp_path, extract_overrides(tmp_path))
    from_saelens = store_arrays(tmp_path / "run")
    assert load_sae(str(tmp_path / "sae.pt")).format == "openai"
    run_extract(tmp_path, extract_overrides(tmp_path, sae_path=tmp_path / "sae.pt"), force=True)
    assert_same_arrays(store_arrays(tmp_path / "run"), from_saelens)
    valid = from_saelens["train/valid"]
    assert valid[:, :-1].all() and not valid[:, -1].any()


def test_optional_arrays_and_attributes(tmp_path, models):
    prepared_run(tmp_path, documents=10)
    overrides = extract_overrides(
        tmp_path,
        **{"extract.store_hidden": "true", "extract.store_sae_topk": "true", "extract.store_teacher_topk": 5},
    )
    result = run_extract(tmp_path, overrides)
    arrays = store_arrays(tmp_path / "run")
    n = arrays["train/valid"].shape[0]
    assert arrays["train/hidden"].shape == (n, 32, 32) and arrays["train/hidden"].dtype == np.float16
    assert arrays["train/sae_ids"].shape == (n, 32, 8) and arrays["train/concept_ids"].dtype == np.uint16
    assert arrays["train/teacher_logprobs"].shape == (n, 32, 5)
    assert (np.diff(arrays["train/teacher_logprobs"].astype(np.float32), axis=-1) <= 0).all()
    # Targets are among the SAE's active latents.
    assert np.all(
        (arrays["train/concept_ids"][..., :, None] == arrays["train/sae_ids"][..., None, :]).any(-1)
    )
    attrs = zarr.open_group(str(tmp_path / "run/extract-concepts/concepts.zarr"), mode="r").attrs
    assert attrs["complete"] and attrs["teacher"]["layer"] == 1 and attrs["sae"]["d_sae"] == 128
    assert attrs["attribution"] == "official" and attrs["concepts_per_token"] == 4
    assert result.summary["bytes_per_token"] > 0
    again = run_extract(tmp_path, overrides)
    assert again.up_to_date


def test_a_bfloat16_teacher_stores_the_float32_teachers_hidden_states_within_bfloat16_tolerance(
    tmp_path, models
):
    prepared_run(tmp_path, documents=10)
    run_extract(tmp_path, extract_overrides(tmp_path, **{"extract.store_hidden": "true"}))
    float32 = store_arrays(tmp_path / "run")
    bfloat16_teacher = {"extract.store_hidden": "true", "teacher.dtype": "bfloat16"}
    run_extract(tmp_path, extract_overrides(tmp_path, **bfloat16_teacher), force=True)
    bfloat16 = store_arrays(tmp_path / "run")
    for split in ("train", "val"):
        assert bfloat16[f"{split}/hidden"].dtype == bfloat16[f"{split}/grad"].dtype == np.float16
        stored = torch.from_numpy(bfloat16[f"{split}/hidden"]).float()
        expected = torch.from_numpy(float32[f"{split}/hidden"]).float()
        # bfloat16 keeps 8 significant bits (eps 2**-7): allow two of its roundings at the hidden states'
        # scale (after two blocks computed in bfloat16, the largest difference here is 1.1 of them).
        torch.testing.assert_close(stored, expected, rtol=1.6e-2, atol=2**-6 * expected.abs().max().item())


def test_the_clock_synchronises_its_own_device_not_the_current_one(monkeypatch):
    synchronised = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: synchronised.append(device))
    clock = extract._Clock(torch.device("cuda", 1))
    clock.start()
    clock.stop()
    assert synchronised == [torch.device("cuda", 1)] * 2


# --- teacher memory -------------------------------------------------------------------------------------

VOCAB = 49_152  # SmolLM2's


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_top_log_probs_equal_a_full_log_softmax_and_peak_below_one_float32_copy_of_the_logits(dtype):
    from pipelines.concepts import teacher as teacher_module

    rows, k = 1024, 5
    logits = (4 * torch.randn(rows, VOCAB, generator=torch.Generator().manual_seed(0))).to(dtype)
    float32_logits = rows * VOCAB * 4  # 201,326,592 bytes
    # The logsumexp goes over slices of rows; at most two float32 slices are alive at once (a bfloat16
    # slice's float32 copy and logsumexp's temporary), plus 1 MiB for the small outputs.
    slice_bytes = teacher_module._LOGSUMEXP_BUDGET // VOCAB * VOCAB * 4  # 67,043,328 bytes
    bound = 2 * slice_bytes + (1 << 20)
    assert bound < float32_logits

    values, ids = teacher_module.top_log_probs(logits, k)
    exact = logits.double().log_softmax(-1).topk(k, dim=-1)
    assert values.dtype == torch.float32 and torch.equal(ids, exact.indices)
    # Within 1e-5 of float64 (~1e-6 here); extraction's float32 log-softmax before was ~2e-5 off.
    torch.testing.assert_close(values, exact.values.float(), atol=1e-5, rtol=0)
    before = peak_allocated_bytes(lambda: logits.float().log_softmax(-1).topk(k, dim=-1))
    assert before >= float32_logits
    assert peak_allocated_bytes(lambda: teacher_module.top_log_probs(logits, k)) <= bound


def test_the_teacher_in_slices_of_rows_equals_one_pass_and_peaks_below_one_float32_copy_of_the_logits(
    monkeypatch,
):
    from transformers import GPT2Config, GPT2LMHeadModel

    from pipelines.concepts import teacher as teacher_module
    from pipelines.concepts.teacher import Teacher

    torch.manual_seed(0)
    config = GPT2Config(
        n_layer=2, n_embd=32, n_head=2, n_positions=64, vocab_size=VOCAB, bos_token_id=0, eos_token_id=0
    )
    teacher = Teacher(GPT2LMHeadModel(config), bpe_tokenizer(), "tiny", layer=0, hook="resid_post")
    blocks, T, k = 8, 64, 5
    ids = torch.randint(0, VOCAB, (blocks, T), generator=torch.Generator().manual_seed(0))
    float32_logits = blocks * T * VOCAB * 4  # 100,663,296 bytes
    # One block's float32 logits at a time: the logits, the cross-entropy's log-softmax and the two gradients
    # of its backward, 4 x 12,582,912 bytes, plus 4 MiB for activations and outputs.
    bound = 4 * T * VOCAB * 4 + (4 << 20)
    assert bound < float32_logits

    monkeypatch.setattr(teacher_module, "_LOGITS_BUDGET", blocks * T * VOCAB)
    one_pass = teacher.hidden_and_grad(ids, top_tokens=k)
    one_pass_peak = peak_allocated_bytes(lambda: teacher.hidden_and_grad(ids, top_tokens=k))
    monkeypatch.setattr(teacher_module, "_LOGITS_BUDGET", T * VOCAB)  # one block per slice
    sliced = teacher.hidden_and_grad(ids, top_tokens=k)
    sliced_peak = peak_allocated_bytes(lambda: teacher.hidden_and_grad(ids, top_tokens=k))

    for name in ("hidden", "grad", "top_ids", "top_log_probs"):
        assert torch.equal(getattr(sliced, name), getattr(one_pass, name)), name
    assert one_pass_peak >= 3 * float32_logits
    assert sliced_peak <= bound, (sliced_peak, one_pass_peak)


# --- resume, shards, ranks ----------------------------------------------------------------------------------


@pytest.mark.slow
def test_sigkill_then_resume_gives_identical_arrays_and_recomputes_a_corrupt_chunk(tmp_path, models):
    prepared_run(tmp_path, documents=100)
    overrides = extract_overrides(tmp_path)
    args = set_args(overrides)
    chunks = tmp_path / "run" / "extract-concepts" / "chunks"
    process = cocomix_subprocess([*args, "extract-concepts"], cwd=tmp_path)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and len(list(chunks.glob("*.json"))) < 10:
        assert process.poll() is None, "extraction finished before it could be killed"
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    done = sorted(chunks.glob("*.json"))
    assert 10 <= len(done) < 200
    # Corrupt one finished chunk on disk: the resume must notice, name it and recompute it.
    victim = tmp_path / "run/extract-concepts/concepts.zarr/train/concept_ids/c/1/0/0"
    victim.write_bytes(b"garbage")
    resumed = cocomix_subprocess(
        ["--verbose", *args, "extract-concepts"], cwd=tmp_path, stderr=subprocess.PIPE, text=True
    )
    _, stderr = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, stderr
    assert "chunk train-000001" in stderr and "recomputing" in stderr

    (tmp_path / "clean").mkdir()
    prepared_run(tmp_path / "clean", documents=100)
    run_extract(tmp_path / "clean", overrides)
    assert_same_arrays(store_arrays(tmp_path / "run"), store_arrays(tmp_path / "clean" / "run"))


@pytest.mark.slow
def test_a_kill_at_each_step_of_the_store_creation_then_a_rerun_gives_the_same_store(tmp_path, models):
    prepared_run(tmp_path, documents=20)
    overrides = extract_overrides(tmp_path)
    args = set_args(overrides)
    instants = ["create:concepts.zarr"] + [
        f"create:concepts.zarr:{split}{suffix}"
        for split in ("train", "val")
        for suffix in ("", "/concept_ids", "/concept_scores", "/valid")
    ]
    for instant in instants:  # each killed run starts from what the previous kill left
        env = {**os.environ, "COCOMIX_KILL_AT": instant}
        killed = cocomix_subprocess([*args, "extract-concepts"], cwd=tmp_path, env=env)
        assert killed.wait(timeout=120) == -signal.SIGKILL, instant
        states = {s["stage"]: s["status"] for s in stage_states(tmp_path / "run")}
        assert states["extract-concepts"] == "interrupted", instant
        assert not (tmp_path / "run/extract-concepts/concepts.zarr").exists(), instant  # no half-made store
    run_extract(tmp_path, overrides)
    assert_equal_to_one_process(tmp_path, overrides, documents=20)


@pytest.mark.slow
def test_a_kill_at_each_step_of_the_force_clear_then_a_rerun_gives_the_same_store(tmp_path, models):
    prepared_run(tmp_path, documents=20)
    args = [*set_args(extract_overrides(tmp_path)), "extract-concepts"]
    run_extract(tmp_path, extract_overrides(tmp_path))
    assert_kills_during_the_force_clear_rerun_to_the_same_result(
        tmp_path, args, "extract-concepts", lambda: store_arrays(tmp_path / "run"), assert_same_arrays
    )


def test_a_store_left_half_created_by_a_kill_is_created_again(tmp_path, models):
    import shutil

    prepared_run(tmp_path, documents=20)
    overrides = extract_overrides(tmp_path)
    run_extract(tmp_path, overrides)
    reference = store_arrays(tmp_path / "run")
    # The files a SIGKILL while the store's groups and arrays were being created leaves: the stage
    # running, no chunk done, the store's root with part of its layout (as a store made in place is left)
    # and the skeleton being built beside it.
    stage = tmp_path / "run" / "extract-concepts"
    store = stage / "concepts.zarr"
    shutil.rmtree(stage / "chunks")
    shutil.rmtree(store / "val")
    shutil.rmtree(store / "train" / "valid")
    (stage / "concepts.zarr.creating" / "train").mkdir(parents=True)
    manifest = json.loads((stage / "manifest.json").read_text())
    (stage / "manifest.json").write_text(json.dumps({**manifest, "status": "running"}))

    result = run_extract(tmp_path, overrides)
    assert result.summary["chunks_done"] == result.summary["chunks_total"]
    assert_same_arrays(store_arrays(tmp_path / "run"), reference)
    assert not (stage / "concepts.zarr.creating").exists()


@pytest.mark.slow
def test_two_shards_as_separate_processes_equal_one_process(tmp_path, models):
    prepared_run(tmp_path, documents=20)
    overrides = extract_overrides(tmp_path)
    args = set_args(overrides)
    first = cocomix_subprocess(
        [*args, "extract-concepts", "--shard", "0/2"], cwd=tmp_path, stdout=subprocess.PIPE, text=True
    )
    assert first.wait(timeout=300) == 0
    assert "it completes when every shard has finished" in first.stdout.read()
    manifest = json.loads((tmp_path / "run/extract-concepts/manifest.json").read_text())
    assert manifest["status"] == "running"
    second = cocomix_subprocess([*args, "extract-concepts", "--shard", "1/2"], cwd=tmp_path)
    assert second.wait(timeout=300) == 0
    manifest = json.loads((tmp_path / "run/extract-concepts/manifest.json").read_text())
    assert manifest["status"] == "complete"

    assert_equal_to_one_process(tmp_path, overrides, documents=20)


@pytest.mark.slow
def test_two_gloo_ranks_under_torchrun_equal_one_process(tmp_path, models):
    prepared_run(tmp_path, documents=20)
    overrides = extract_overrides(tmp_path)
    args = set_args(overrides)
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        "29517",
        "-m",
        "cocomix_cli",
        "--no-progress",
        *args,
        "extract-concepts",
    ]
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    manifest = json.loads((tmp_path / "run/extract-concepts/manifest.json").read_text())
    assert manifest["status"] == "complete"
    assert_equal_to_one_process(tmp_path, overrides, documents=20)


# --- a real teacher -------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.real_data
def test_smollm2_teacher_on_a_few_blocks(tmp_path, smollm2_gguf):
    prepared_run(tmp_path, documents=3, block_size=64, tokenizer=str(smollm2_gguf), val_fraction=0.0)
    save_saelens(tiny_sae(d_in=576, d_sae=1024, k=16), tmp_path / "sae")
    overrides = [
        f"teacher.model={smollm2_gguf}",
        "teacher.layer=9",
        f"sae.path={tmp_path / 'sae'}",
        "extract.blocks_per_chunk=2",
        "extract.tokens_per_batch=256",
    ]
    result = run_extract(tmp_path, overrides)
    arrays = store_arrays(tmp_path / "run")
    assert result.summary["chunks_done"] == result.summary["chunks_total"] > 0
    ids, scores = arrays["train/concept_ids"], arrays["train/concept_scores"].astype(np.float32)
    assert ids.shape[1:] == (64, 4) and ids.max() < 1024
    assert (scores[:, :-1, 0] != 0).mean() > 0.9  # a real teacher's gradient reaches nearly every position
    assert (np.diff(scores, axis=-1) <= 0).all()  # best first


@pytest.mark.slow
@pytest.mark.real_data
@pytest.mark.parametrize("flag", ["--no-progress", None])
def test_no_progress_hides_the_bar_transformers_draws_while_it_dequantises_a_gguf_teacher(
    tmp_path, smollm2_gguf, flag
):
    prepared_run(tmp_path, documents=2, block_size=64, tokenizer=str(smollm2_gguf), val_fraction=0.0)
    save_saelens(tiny_sae(d_in=576, d_sae=256, k=4), tmp_path / "sae")
    sets = [f"teacher.model={smollm2_gguf}", "teacher.layer=9", f"sae.path={tmp_path / 'sae'}"]
    command = [sys.executable, "-m", "cocomix_cli", *([flag] if flag else [])]
    command += [*(a for s in sets for a in ("--set", s)), "extract-concepts", "--json"]
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    bars = "Converting and de-quantizing GGUF tensors" in result.stderr, "it/s]" in result.stderr
    assert bars == ((False, False) if flag else (True, True)), result.stderr[-2000:]


# --- bad input ------------------------------------------------------------------------------------


def test_bad_inputs_are_one_line_errors(tmp_path, models, cocomix):
    prepared_run(tmp_path, documents=5)

    def error(*overrides):
        result = cocomix(*[a for o in overrides for a in ("--set", o)], "extract-concepts")
        assert result.exit_code == 2, result.stdout + result.stderr
        assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
        return result.stderr

    base = extract_overrides(tmp_path)
    save_saelens(tiny_sae(d_in=48), tmp_path / "wide-sae")
    assert "reads vectors of size 48, but teacher" in error(*base, f"sae.path={tmp_path / 'wide-sae'}")
    assert "`teacher.layer` (7) is out of range" in error(*base, "teacher.layer=7")
    (tmp_path / "sae.npz").write_bytes(b"\0" * 8)
    assert "is in no format cocomix reads" in error(*base, f"sae.path={tmp_path / 'sae.npz'}")
    accepted = error(*base, f"sae.path={tmp_path / 'sae.npz'}")
    for layout in (
        "OpenAI sparse_autoencoder TopK state dict (.pt)",
        "SAELens folder",
        "Gemma Scope",
        "sparsify",
    ):
        assert layout in accepted
    other = json.loads(bpe_tokenizer().json.read_text())
    vocab = other["model"]["vocab"]
    vocab["!"], vocab['"'] = vocab['"'], vocab["!"]  # a valid tokenizer with two ids swapped
    (tmp_path / "teacher" / "tokenizer.json").write_text(json.dumps(other))
    assert "uses a different tokenizer than the token store" in error(*base)
    tiny_teacher(tmp_path / "teacher")
    assert (
        not json.loads((tmp_path / "run/extract-concepts/manifest.json").read_text())["status"] == "complete"
    )
    long_blocks = ["--set", "data.block_size=256"]
    assert cocomix(*long_blocks, "prepare", "--force").exit_code == 0  # the teacher reads 128 positions
    message = error(*base, "data.block_size=256")
    assert "`data.block_size` (256) is longer than the context of teacher" in message
    assert "(128 tokens). Set `data.block_size` to at most 128 and run `cocomix prepare --force`." in message
    assert cocomix("prepare", "--force").exit_code == 0

    assert cocomix(*[a for o in base for a in ("--set", o)], "extract-concepts").exit_code == 0
    changed = error(*base, "extract.concepts_per_token=2")
    assert (
        "holds a complete `extract-concepts` of a different run (extract.concepts_per_token: 4 -> 2)"
        in changed
    )
    assert "--shard I/N" not in error(*base, "extract.attribution=dense")


def test_targets_recomputed_from_stored_hidden_states_without_the_teacher(tmp_path, models):
    import shutil

    _, sae = models
    prepared_run(tmp_path, documents=10)
    run_extract(tmp_path, extract_overrides(tmp_path, **{"extract.store_hidden": "true"}))
    cache = tmp_path / "hidden.zarr"
    shutil.move(tmp_path / "run/extract-concepts/concepts.zarr", cache)
    overrides = extract_overrides(
        tmp_path,
        **{
            "extract.hidden_from": cache,
            "extract.attribution": "paper",
            "extract.concepts_per_token": 2,
            "teacher.model": tmp_path / "no-such-teacher",  # proves the teacher is never loaded
        },
    )
    run_extract(tmp_path, overrides, force=True)
    arrays = store_arrays(tmp_path / "run")
    stored = zarr.open_group(str(cache), mode="r")
    for split in ("train", "val"):
        hidden = torch.from_numpy(stored[split]["hidden"][:].astype(np.float32))
        grad = torch.from_numpy(stored[split]["grad"][:].astype(np.float32))
        expected = []
        for first in range(0, len(hidden), 2):  # the stage's batches: 64 tokens = 2 blocks
            h, g = hidden[first : first + 2].flatten(0, 1), grad[first : first + 2].flatten(0, 1)
            expected.append(concept_targets(sae, h, g, 2, "paper").ids.reshape(-1, 32, 2))
        assert np.array_equal(arrays[f"{split}/concept_ids"], torch.cat(expected).numpy().astype(np.uint16))
    attrs = zarr.open_group(str(tmp_path / "run/extract-concepts/concepts.zarr"), mode="r").attrs
    assert attrs["hidden_from"] == str(cache) and attrs["attribution"] == "paper"
