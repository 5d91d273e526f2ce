"""An objective of the user's own, from a file outside the package named in `pretrain.plugins`: planned,
checked, trained as a variant and fingerprinted by its file's content, without a line of `pipelines/`
naming it; and each way a plugin can be wrong is one error line naming its file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipelines.objectives import declaration, plugins
from tests.cli.test_bad_input import assert_one_line_error
from tests.conftest import Cocomix, bpe_tokenizer, corpus_jsonl

REPOSITORY = Path(__file__).resolve().parents[1]

ZLOSS = '''"""NTP plus z_coef x the mean squared log-partition of the logits (PaLM's z-loss)."""
import torch

from pipelines.config.schema import Range
from pipelines.objectives.declaration import ObjectiveSpec, Setting, register_objective
from pipelines.training.objectives import Objective


class ZLoss(Objective):
    val_parts = ("z_loss",)

    def auxiliary(self, out, tokens, inputs):
        z_loss = torch.logsumexp(out.logits.float(), dim=-1).pow(2).mean()
        return {"z_loss": (z_loss, self.setting("z_coef"))}


register_objective(
    ObjectiveSpec(
        "zloss",
        ZLoss,
        "NTP + z_coef x the squared log-partition",
        settings={"z_coef": Setting(1e-4, "Weight of the z-loss.", accepts=Range(low=0))},
    )
)
'''


@pytest.fixture(autouse=True)
def own_registry(monkeypatch):
    """Each test declares its plugins afresh; none leaks into the other tests of the process."""
    monkeypatch.setattr(declaration, "_REGISTRY", dict(declaration.registered()))
    monkeypatch.setattr(plugins, "_loaded", {})


def write_run(directory: Path, plugin_text: str = ZLOSS, variant: str = '"pretrain.z_coef" = 0.001') -> Path:
    """A run of NTP and `smooth` (the plugin's objective as a variant), its plugin in a folder of its own."""
    plugin = directory / "my_objectives" / "zloss.py"
    plugin.parent.mkdir(parents=True, exist_ok=True)
    plugin.write_text(plugin_text)
    work = directory / "work"
    work.mkdir(exist_ok=True)
    (work / "cocomix.toml").write_text(
        f"""
[run]
dir = "run"
objectives = ["ntp", "smooth"]
[run.variants.smooth]
objective = "zloss"
{variant}
[data]
source = "{corpus_jsonl(work / "corpus.jsonl", 40)}"
tokenizer = "{bpe_tokenizer().json}"
block_size = 32
max_documents = 40
val_fraction = 0.2
[pretrain]
plugins = ["../my_objectives/zloss.py"]
preset = "tiny"
n_layer = 2
n_head = 2
n_embd = 32
batch_blocks = 4
max_steps = 6
warmup_steps = 1
eval_every = 3
save_every = 3
log_every = 3
[eval]
tasks = ["ppl"]
"""
    )
    return plugin


def plan_rows(cocomix: Cocomix, *args: str) -> dict[str, dict]:
    result = cocomix("run", "--dry-run", "--json", *args)
    assert result.exit_code == 0, result.stderr
    return {row["stage"]: row for row in json.loads(result.stdout)["plan"]}


def test_a_plugin_objective_is_planned_checked_trained_and_fingerprinted_by_its_file(tmp_path):
    plugin = write_run(tmp_path)
    cocomix = Cocomix(tmp_path / "work")
    rows = plan_rows(cocomix)
    assert rows["pretrain-smooth"]["action"] == "run"
    assert "smooth (zloss) student" in rows["pretrain-smooth"]["detail"]

    # Its own key is checked like any other: one line, under the place that set it.
    bad = cocomix("run", "--dry-run", "--set", "pretrain.z_coef=-1")
    assert_one_line_error(bad, "--set pretrain.z_coef=-1: `pretrain.z_coef` (-1.0) must be >= 0")

    trained = cocomix("run", "--until", "pretrain")
    assert trained.exit_code == 0, trained.stderr
    manifest = json.loads((tmp_path / "work/run/pretrain-smooth/manifest.json").read_text())
    assert manifest["inputs"]["pretrain.z_coef"] == 0.001
    assert manifest["summary"]["val_z_loss"] > 0  # its loss ran, with its val part reported
    ntp = json.loads((tmp_path / "work/run/pretrain-ntp/manifest.json").read_text())
    assert not any("z_coef" in key or "plugin" in key for key in ntp["inputs"])

    # Editing the file makes its student out of date, and nothing else.
    plugin.write_text(plugin.read_text().replace("PaLM's z-loss", "the z-loss of PaLM"))
    rows = plan_rows(cocomix)
    assert rows["pretrain-smooth"]["action"] == "refuse"
    assert "pretrain.plugin_sha256 changed" in rows["pretrain-smooth"]["state"]
    assert {stage: row["action"] for stage, row in rows.items() if stage != "pretrain-smooth"} == {
        "prepare": "skip",
        "pretrain-ntp": "skip",
        "eval": "run",
        "report": "run",
    }
    assert not [p for p in (REPOSITORY / "pipelines").rglob("*.py") if "zloss" in p.read_text()]


@pytest.mark.parametrize(
    ("plugin_text", "error"),
    [
        (
            "import torch\nraise RuntimeError('no GPU here')\n",
            "the plugin failed to import (RuntimeError: no GPU",
        ),
        (
            ZLOSS.replace('"zloss",\n        ZLoss', '"kd",\n        ZLoss'),
            "objective `kd` is already declared by cocomix; choose another name.",
        ),
        (
            ZLOSS.replace('"NTP + z_coef', 'reads=("teacher_topk", "valid"),\n        summary="NTP + z_coef'),
            "objective `zloss` reads `teacher_topk` from the concept store, which holds only "
            "concept_ids, valid",
        ),
    ],
    ids=["fails-to-import", "name-taken", "reads-no-such-array"],
)
def test_a_wrong_plugin_is_one_error_line_naming_its_file(tmp_path, plugin_text, error):
    plugin = write_run(tmp_path, plugin_text)
    result = Cocomix(tmp_path / "work")("run", "--dry-run")
    assert_one_line_error(result, error)
    assert str(Path("../my_objectives/zloss.py")) in result.stderr or str(plugin) in result.stderr


def test_a_plugin_that_reads_what_the_extraction_does_not_store_is_refused_by_the_plan(tmp_path):
    needs_hidden = ZLOSS.replace(
        'settings={"z_coef"',
        'reads=("hidden", "valid"),\n        needs=(Need("extract.store_hidden", "true", '
        '"the teacher\'s hidden states", ("hidden",)),),\n        settings={"z_coef"',
    ).replace("import ObjectiveSpec,", "import Need, ObjectiveSpec,")
    write_run(tmp_path, needs_hidden)
    (tmp_path / "work/cocomix.toml").write_text(
        (tmp_path / "work/cocomix.toml").read_text() + '[teacher]\nmodel = "gpt2"\n'
    )
    result = Cocomix(tmp_path / "work")("run", "--dry-run")
    assert_one_line_error(
        result,
        "`run.objectives` has `smooth` (`zloss`), which needs the teacher's hidden states: set "
        "`extract.store_hidden` (e.g. true).",
    )


def test_the_models_an_objective_may_train_are_the_student_s_variants():
    from pipelines.model.gpt import VARIANTS
    from pipelines.objectives.spec import MODELS

    assert MODELS == VARIANTS
