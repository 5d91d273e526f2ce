"""steer: scale 1 is plain generation, a big scale changes it deterministically, --inspect = the logits."""

import json
import shutil

import pytest
import torch

from pipelines.config.loading import load_config
from pipelines.model.checkpoint import save_model
from pipelines.model.generation import generate
from pipelines.model.gpt import GPT, ConceptIntervention
from pipelines.model.steering import SteeringModel, sweep
from tests.conftest import bpe_tokenizer, tiny_model_config

PROMPT = "My lord, the"


@pytest.fixture
def cocomix_model(tmp_path):
    """A random CoCoMix student whose concept branch matters (larger compression weights than at init)."""
    torch.manual_seed(0)
    tokenizer = bpe_tokenizer()
    config = tiny_model_config(
        variant="cocomix", vocab_size=tokenizer.vocab_size, context_length=64, concept_k=2
    )
    model = GPT(config).eval()
    with torch.no_grad():
        model.concepts.compress_weight.normal_(0.0, 1.0)
    folder = save_model(model, tmp_path / "model", {"tokenizer": {"separator_id": tokenizer.separator_id}})
    shutil.copy(tokenizer.json, folder / "tokenizer.json")
    return folder, model


def settings(**values):
    return load_config(None, [f"steer.{k}={v}" for k, v in {"max_new_tokens": 12, **values}.items()]).steer


def test_scale_one_reproduces_plain_generation_exactly(cocomix_model):
    folder, model = cocomix_model
    steering = SteeringModel.load(str(folder))
    result = sweep(steering, PROMPT, settings(), [3, 7], scales=[1.0])
    assert result["runs"][1]["text"] == result["runs"][0]["text"]
    # The unsteered text is the model's own sampling with the same seed.
    ids = torch.tensor(steering.encode(PROMPT))
    plain = generate(model, ids, 12, temperature=0.8, top_k=50, seed=0)
    assert result["runs"][0]["text"] == steering.decode(plain[len(ids) :].tolist())


def test_a_large_scale_changes_the_continuation_deterministically(cocomix_model):
    folder, model = cocomix_model
    steering = SteeringModel.load(str(folder))
    logits = model(torch.tensor([steering.encode(PROMPT)])).concept_logits[0, -1]
    concept = int(logits.argmin())  # least likely now: amplifying its (negative) logit by -10 brings it in
    s = settings(temperature=0)
    first = sweep(steering, PROMPT, s, [concept], scales=[-10.0])
    again = sweep(steering, PROMPT, s, [concept], scales=[-10.0])
    assert first == again
    assert first["runs"][1]["text"] != first["runs"][0]["text"]
    # And it is the intervention that changed it: the same edit applied by hand gives the same text.
    ids = torch.tensor(steering.encode(PROMPT))
    by_hand = generate(
        model, ids, 12, temperature=0, intervention=ConceptIntervention((concept,), scale=-10.0)
    )
    assert first["runs"][1]["text"] == steering.decode(by_hand[len(ids) :].tolist())


def test_inspect_lists_the_top_concepts_of_the_models_logits(cocomix_model, cocomix):
    folder, model = cocomix_model
    result = cocomix("steer", "--model", str(folder), "--prompt", PROMPT, "--inspect", "--json")
    assert result.exit_code == 0, result.stderr
    (entry,) = json.loads(result.stdout)
    steering = SteeringModel.load(str(folder))
    ids = steering.encode(PROMPT)
    logits = model(torch.tensor([ids])).concept_logits[0]
    assert [row["token"] for row in entry["tokens"]] == [steering.decode([i]) for i in ids]
    for t, row in enumerate(entry["tokens"]):
        expected = logits[t].topk(5)
        assert [c["id"] for c in row["concepts"]] == expected.indices.tolist()
        assert [c["logit"] for c in row["concepts"]] == pytest.approx(expected.values.tolist(), abs=1e-4)


def test_sweep_from_the_command_line_and_bad_input(cocomix_model, cocomix):
    folder, _ = cocomix_model
    result = cocomix(
        "steer", "--model", str(folder), "--prompt", PROMPT, "--concept", "1,2", "--sweep", "-5,0,5", "--json"
    )
    assert result.exit_code == 0, result.stderr
    (entry,) = json.loads(result.stdout)
    assert [r["setting"] for r in entry["runs"]] == ["unsteered", "scale -5", "scale 0", "scale 5"]

    def error(*args):
        result = cocomix("steer", "--model", str(folder), *args)
        assert result.exit_code == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
        return result.stderr

    assert "Concept id(s) [999] are out of range" in error(
        "--prompt", "x", "--concept", "999", "--scale", "5"
    )
    assert "needs --concept" in error("--prompt", "x", "--scale", "5")
    assert "Give a prompt" in error("--concept", "1", "--scale", "5")
    assert "--sweep takes comma-separated numbers" in error(
        "--prompt", "x", "--concept", "1", "--sweep", "a,b"
    )


# --- teacher-side steering ------------------------------------------------------------------------------


@pytest.fixture
def teacher_and_sae(tmp_path):
    from pipelines.concepts.teacher import load_teacher
    from tests.conftest import tiny_sae, tiny_teacher

    tiny_teacher(tmp_path / "teacher")
    return load_teacher(str(tmp_path / "teacher"), layer=1, hook="resid_post"), tiny_sae().eval()


def test_amplify_latents_scales_exactly_the_latents_contribution(teacher_and_sae):
    from pipelines.model.steering import amplify_latents
    from pipelines.sae.normalization import normalize_input

    _, sae = teacher_and_sae
    torch.manual_seed(1)
    h = torch.randn(3, 5, 32)
    with torch.no_grad():
        assert torch.equal(amplify_latents(sae, [4, 9], 1.0)(h), h)
        x, mean, std = normalize_input(h)
        pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
        contribution = pre[..., [4, 9]].relu() @ sae.W_dec[[4, 9]]
        expected = h + 2.0 * contribution * std  # scale 3 adds (3 - 1) times the latents' part
        torch.testing.assert_close(amplify_latents(sae, [4, 9], 3.0)(h), expected)


def test_teacher_steering_scale_one_is_plain_and_a_large_scale_changes_it(teacher_and_sae):
    from pipelines.model.steering import teacher_sweep

    teacher, sae = teacher_and_sae
    s = settings(temperature=0, max_new_tokens=8)
    ids = torch.tensor([teacher.tokenizer.backend.encode(PROMPT).ids])
    with torch.no_grad():
        hidden = teacher.hidden_states(ids).float()
        x = sae.prepare_input(hidden)[0]
        latent = int(((x - sae.b_dec) @ sae.W_enc + sae.b_enc)[0, -1].argmax())  # active at the last token
    result = teacher_sweep(teacher, sae, PROMPT, s, [latent], [1.0, 50.0])
    plain, same, amplified = (r["text"] for r in result["runs"])
    assert same == plain and amplified != plain
    assert teacher_sweep(teacher, sae, PROMPT, s, [latent], [50.0])["runs"][1]["text"] == amplified


def test_teacher_rows_from_the_command_line(cocomix_model, tmp_path, cocomix):
    from pipelines.sae.formats import save_saelens
    from tests.conftest import tiny_sae, tiny_teacher

    folder, _ = cocomix_model
    tiny_teacher(tmp_path / "teacher")
    save_saelens(tiny_sae(), tmp_path / "sae")
    result = cocomix(
        "--set", f"teacher.model={tmp_path / 'teacher'}", "--set", "teacher.layer=1",
        "--set", f"sae.path={tmp_path / 'sae'}", "--set", "steer.max_new_tokens=4",
        "steer", "--model", str(folder), "--prompt", PROMPT, "--concept", "3", "--scale", "5",
        "--teacher", "--json",
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    (entry,) = json.loads(result.stdout)
    settings_shown = [r["setting"] for r in entry["runs"]]
    assert settings_shown == ["unsteered", "scale 5", "teacher unsteered", "teacher scale 5"]
