"""Students as transformers models: `cocomix export`, remote code that runs without cocomix, the hub.

The central test loads an exported CoCoMix and pause folder with `AutoModelForCausalLM(...,
trust_remote_code=True)` in a subprocess from which cocomix cannot be imported (the editable install's
finder and the repository are removed from its import path, and the test checks that `pipelines` is not
found), and compares its logits, concept logits and cached greedy `generate()` with ours.
"""

import ast
import json
import subprocess
import sys
import textwrap
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from pipelines.model.checkpoint import load_model, save_model
from pipelines.model.generation import generate
from pipelines.model.gpt import GPT, ModelConfig
from pipelines.model.hf_export import REMOTE_CODE_FILES, export_student, upload_plan
from tests.cli.test_bad_input import assert_one_line_error
from tests.conftest import REPO, bpe_tokenizer, tiny_model_config

PROMPT_LENGTH, NEW_TOKENS = 9, 20
STUDENTS = {
    "cocomix": dict(variant="cocomix"),
    "cocomix-insert0": dict(variant="cocomix", insert_layer=0),
    "cocomix-add": dict(variant="cocomix", mixing="add"),
    "pause": dict(variant="pause", insert_layer=1),
    "ntp": dict(variant="ntp"),
}

# Runs in a fresh interpreter: cocomix must not be importable, then the folder loads as transformers code.
OUTSIDE_COCOMIX = textwrap.dedent(
    """
    import importlib.util, json, sys
    repo, folder, ids_file, out = sys.argv[1:5]  # then the prompt length and the tokens to generate
    sys.path[:] = [p for p in sys.path if p not in ("", ".", repo)]
    sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in str(f.__module__).lower()]
    assert importlib.util.find_spec("pipelines") is None, "cocomix is importable"
    import torch
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32).eval()
    ids = torch.tensor(json.load(open(ids_file)))
    with torch.no_grad():
        output = model(ids, use_cache=False)
    model.generation_config.eos_token_id = None  # our `generate` runs to max_new_tokens
    model.generation_config.pad_token_id = 0
    prompt, new_tokens = int(sys.argv[5]), int(sys.argv[6])
    tokens = model.generate(ids[:1, :prompt], max_new_tokens=new_tokens, do_sample=False, use_cache=True)
    concepts = output.concept_logits
    torch.save({"class": type(model).__module__ + "." + type(model).__name__, "logits": output.logits,
                "concept_logits": concepts, "tokens": tokens[0]}, out)
    """
)


def student(tmp_path: Path, name: str) -> tuple[GPT, Path]:
    """A seeded student of the kind `name`, saved as `pretrain` saves one (with the test BPE)."""
    tokenizer = bpe_tokenizer()
    torch.manual_seed(0)
    model = GPT(tiny_model_config(vocab_size=tokenizer.vocab_size, **STUDENTS[name])).eval()
    with torch.no_grad():  # larger weights than the init, so that greedy decoding is not one repeated token
        for param_name, param in model.named_parameters():
            if "ln" not in param_name:  # norms keep their unit gains
                param.mul_(4.0)
    folder = save_model(
        model,
        tmp_path / name / "model",
        {"tokenizer": {"separator": "<|endoftext|>", "separator_id": tokenizer.separator_id}},
    )
    (folder / "tokenizer.json").write_bytes(tokenizer.json.read_bytes())
    return model, folder


@pytest.mark.slow  # a subprocess per student that imports transformers
@pytest.mark.parametrize("name", ["cocomix", "cocomix-insert0", "pause"])
def test_an_export_runs_without_cocomix_with_our_logits_and_our_cached_greedy_tokens(tmp_path, name):
    model, folder = student(tmp_path, name)
    exported = export_student(folder, tmp_path / "export" / name)
    ids = torch.randint(0, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    (tmp_path / "ids.json").write_text(json.dumps(ids.tolist()))
    done = subprocess.run(
        [sys.executable, "-c", OUTSIDE_COCOMIX, str(REPO), str(exported), str(tmp_path / "ids.json"),
         str(tmp_path / "out.pt"), str(PROMPT_LENGTH), str(NEW_TOKENS)],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    theirs = torch.load(tmp_path / "out.pt")
    assert theirs["class"].startswith("transformers_modules.") and theirs["class"].endswith(
        "CocomixForCausalLM"
    )
    with torch.no_grad():
        ours = model(ids)
    assert (theirs["logits"] - ours.logits).abs().max() <= 1e-5
    if model.config.variant == "cocomix":
        assert (theirs["concept_logits"] - ours.concept_logits).abs().max() <= 1e-5
    else:
        assert theirs["concept_logits"] is None
    ours_tokens = generate(model, ids[0, :PROMPT_LENGTH], NEW_TOKENS, temperature=0)
    assert theirs["tokens"].tolist() == ours_tokens.tolist()
    assert len(set(ours_tokens[PROMPT_LENGTH:].tolist())) > 1  # the comparison is not of one repeated token


@pytest.mark.parametrize("name", ["cocomix", "cocomix-add", "pause", "ntp"])
def test_an_export_loads_back_into_cocomix_and_into_auto_classes_without_remote_code(tmp_path, name):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, folder = student(tmp_path, name)
    exported = export_student(folder, tmp_path / "hf")
    back = load_model(exported)
    if name == "ntp":  # GPT-2 has no concept fields: they come back as the defaults, which NTP ignores
        defaults = ModelConfig()
        fields = ("insert_layer", "n_concepts", "concept_k")
        assert back.config == replace(model.config, **{f: getattr(defaults, f) for f in fields})
    else:
        assert back.config == model.config
    assert all(torch.equal(back.state_dict()[k], v) for k, v in model.state_dict().items())

    # Registered on `import pipelines.model`: no trust_remote_code needed where cocomix is installed.
    hf = AutoModelForCausalLM.from_pretrained(exported).eval()
    expected = "GPT2LMHeadModel" if name == "ntp" else "CocomixForCausalLM"
    assert type(hf).__name__ == expected and type(hf).__module__.startswith(("pipelines.", "transformers."))
    ids = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert (hf(ids).logits - model(ids).logits).abs().max() <= 1e-5
    tokenizer = AutoTokenizer.from_pretrained(exported)
    assert tokenizer.eos_token == tokenizer.bos_token == "<|endoftext|>"
    assert tokenizer.eos_token_id == hf.config.eos_token_id == bpe_tokenizer().separator_id
    assert tokenizer("to be or not")["input_ids"] == bpe_tokenizer_ids("to be or not")


def bpe_tokenizer_ids(text: str) -> list[int]:
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(bpe_tokenizer().json)).encode(text).ids


def test_the_exported_code_is_the_code_cocomix_runs(tmp_path):
    """One implementation: the folder's modeling files are this package's files, byte for byte, and its
    config maps the Auto classes to them."""
    _, folder = student(tmp_path, "cocomix")
    exported = export_student(folder, tmp_path / "hf")
    package = REPO / "pipelines" / "model"
    for name in REMOTE_CODE_FILES:
        assert (exported / name).read_bytes() == (package / name).read_bytes(), name
    config = json.loads((exported / "config.json").read_text())
    assert config["model_type"] == "cocomix" and config["architectures"] == ["CocomixForCausalLM"]
    assert config["auto_map"] == {
        "AutoConfig": "configuration_cocomix.CocomixConfig",
        "AutoModelForCausalLM": "modeling_cocomix.CocomixForCausalLM",
    }
    # The three files import no cocomix module (only each other, relatively), so they run without it.
    for name in REMOTE_CODE_FILES:
        tree = ast.parse((package / name).read_text())
        imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.level == 0}
        imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        assert {m.split(".")[0] for m in imported} <= {
            "__future__",
            "dataclasses",
            "math",
            "torch",
            "transformers",
        }


def test_mixing_values_of_the_model_are_the_configs():
    import typing

    from pipelines.config.schema import Mixing
    from pipelines.model.gpt import MIXINGS

    assert MIXINGS == typing.get_args(Mixing)


def test_the_hf_loss_on_labels_is_the_shifted_next_token_loss(tmp_path):
    import torch.nn.functional as F

    from pipelines.model.configuration_cocomix import CocomixConfig
    from pipelines.model.modeling_cocomix import CocomixForCausalLM

    model, _ = student(tmp_path, "cocomix")
    hf = CocomixForCausalLM(CocomixConfig(**model.config.__dict__)).eval()
    hf.transformer.load_state_dict(model.state_dict())
    ids = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        loss = hf(ids, labels=ids).loss
        logits = model(ids).logits
    assert loss == pytest.approx(F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten()).item())
    with pytest.raises(ValueError, match="padded positions"):
        hf(ids, attention_mask=torch.tensor([[1] * 16, [0] + [1] * 15]))


# --- the command --------------------------------------------------------------------------------------------


def test_export_command_writes_a_folder_and_a_summary(tmp_path, cocomix):
    _, folder = student(tmp_path, "pause")
    result = cocomix("export", str(folder.parent), str(tmp_path / "out"), "--json")
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["class"] == "CocomixForCausalLM" and summary["out"] == str(tmp_path / "out")
    assert {f["path"] for f in summary["files"]} >= {
        "config.json", "model.safetensors", "tokenizer.json", "README.md", *REMOTE_CODE_FILES,
    }  # fmt: skip
    assert summary["bytes"] == sum(size for _, size in upload_plan(tmp_path / "out"))
    assert not (tmp_path / "out.partial").exists()
    # Again over its own earlier export: replaced, same files.
    assert cocomix("export", str(folder), str(tmp_path / "out")).exit_code == 0


def test_export_refuses_what_is_not_a_student_and_a_folder_it_would_overwrite(tmp_path, cocomix):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "config.json").write_text('{"format": "something-else"}')
    (tmp_path / "notes" / "model.safetensors").write_bytes(b"")
    assert_one_line_error(cocomix("export", "notes", "out"), "is not a cocomix student")
    assert_one_line_error(cocomix("export", "nowhere", "out"), "nowhere", "is not a cocomix model folder")
    _, folder = student(tmp_path, "ntp")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "thesis.tex").write_text("precious")
    assert_one_line_error(cocomix("export", str(folder), "busy"), "busy", "--force")
    assert (tmp_path / "busy" / "thesis.tex").read_text() == "precious"


def test_push_to_hub_without_a_token_is_one_line_before_any_export(tmp_path, cocomix, monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))  # no stored login either
    _, folder = student(tmp_path, "cocomix")
    result = cocomix("export", str(folder), "out", "--push-to-hub", "someone/cocomix-tiny")
    assert_one_line_error(result, "--push-to-hub someone/cocomix-tiny", "token", "HF_TOKEN")
    assert not (tmp_path / "out").exists()


def test_push_to_hub_dry_run_lists_the_files_and_uploads_nothing(tmp_path, cocomix, monkeypatch):
    from huggingface_hub import HfApi

    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setattr(HfApi, "upload_folder", lambda *a, **k: pytest.fail("a dry run uploaded"))
    _, folder = student(tmp_path, "cocomix")
    result = cocomix("export", str(folder), "out", "--push-to-hub", "someone/tiny", "--dry-run")
    assert result.exit_code == 0, result.stderr
    listed = [line.split()[0] for line in result.stdout.splitlines() if line.startswith("  ")]
    assert listed == [path for path, _ in upload_plan(tmp_path / "out")]
    assert "would upload to someone/tiny" in result.stdout


def test_push_to_hub_uploads_the_exported_folder(tmp_path, cocomix, monkeypatch):
    """Up to the upload call: the hub is not reachable here, so the client's two calls are recorded."""
    from huggingface_hub import HfApi

    calls = []
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **k: calls.append(("create", repo_id, k)))

    def upload_folder(self, **kwargs):
        calls.append(
            ("upload", self.token, kwargs, sorted(p.name for p in Path(kwargs["folder_path"]).iterdir()))
        )
        return "https://huggingface.co/someone/tiny/commit/abc"

    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    _, folder = student(tmp_path, "pause")
    result = cocomix("export", str(folder), "out", "--push-to-hub", "someone/tiny", "--private", "--json")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["commit"] == "https://huggingface.co/someone/tiny/commit/abc"
    (create, repo, create_kwargs), (upload, token, upload_kwargs, names) = calls
    assert (create, repo, create_kwargs["private"], create_kwargs["repo_type"]) == (
        "create",
        "someone/tiny",
        True,
        "model",
    )
    assert upload_kwargs["repo_id"] == "someone/tiny" and upload_kwargs["folder_path"] == str(
        tmp_path / "out"
    )
    assert token == "hf_test_token"
    assert names == sorted(p.name for p in (tmp_path / "out").iterdir())
