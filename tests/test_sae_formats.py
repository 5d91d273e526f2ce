"""SAE families in their published layouts: each written here as its library writes it, read back by
`load_sae` and checked against the paper's formula; `extract-concepts` on each against a naive dense
attribution; `saelens:` specs against a directory in SAELens' own format; bad input as one clear error."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import zarr

from pipelines.errors import InputError
from pipelines.sae import attribution, dictionary, sources
from pipelines.sae.attribution import concept_targets
from pipelines.sae.formats import load_sae
from pipelines.stages import extract
from tests.conftest import prepared_run, run_in, tiny_teacher
from tests.test_extract import naive_hidden_and_grad, store_arrays

D_IN, D_SAE, K_TOPK = 32, 128, 8


def random_weights(seed: int, bias_shift: float = 0.0, d_in: int = D_IN) -> dict[str, np.ndarray]:
    """SAELens-named float32 weights, every entry non-zero; `bias_shift` lowers b_enc to thin the actives."""
    rng = np.random.default_rng(seed)
    weights = {
        "W_enc": rng.normal(0, 0.3, (d_in, D_SAE)),
        "b_enc": rng.normal(0, 0.3, D_SAE) + bias_shift,
        "W_dec": rng.normal(0, 0.3, (D_SAE, d_in)),
        "b_dec": rng.normal(0, 0.3, d_in),
        "threshold": rng.uniform(0.05, 0.6, D_SAE),
    }
    return {name: value.astype(np.float32) for name, value in weights.items()}


# --- the layouts, written as their libraries write them -----------------------------------------------------


def write_saelens(folder: Path, weights: dict, architecture: str, apply_b_dec_to_input: bool = True) -> Path:
    """SAELens 6's `save_model`: `cfg.json` from `SAEConfig.to_dict()` and `save_file(state_dict)`."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    names = ["W_enc", "b_enc", "W_dec", "b_dec"] + (["threshold"] if architecture == "jumprelu" else [])
    save_file({n: torch.from_numpy(weights[n]) for n in names}, folder / "sae_weights.safetensors")
    config = {
        "d_in": D_IN,
        "d_sae": D_SAE,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": apply_b_dec_to_input,
        "normalize_activations": "none",
        "reshape_activations": "none",
        "metadata": {
            "model_name": "tiny",
            "hook_name": "blocks.1.hook_resid_post",
            "sae_lens_version": "6.5.1",
        },
        "architecture": architecture,
    }
    (folder / "cfg.json").write_text(json.dumps(config))
    return folder


def write_gemma_scope(folder: Path, weights: dict) -> Path:
    """A Gemma Scope SAE folder: `params.npz` with W_enc, W_dec, b_enc, b_dec, threshold."""
    folder.mkdir(parents=True)
    np.savez(folder / "params.npz", **weights)
    return folder


class _SparseCoder(torch.nn.Module):
    """The parameters of sparsify's `SparseCoder` (an SAE, no skip connection), by its attribute names."""

    def __init__(self, weights: dict):
        super().__init__()
        self.encoder = torch.nn.Linear(D_IN, D_SAE)
        with torch.no_grad():
            self.encoder.weight.copy_(torch.from_numpy(weights["W_enc"].T))
            self.encoder.bias.copy_(torch.from_numpy(weights["b_enc"]))
        self.W_dec = torch.nn.Parameter(torch.from_numpy(weights["W_dec"]))
        self.b_dec = torch.nn.Parameter(torch.from_numpy(weights["b_dec"]))


def write_sparsify(folder: Path, weights: dict, **cfg) -> Path:
    """sparsify's `save_to_disk`: `save_model(self, "sae.safetensors")`, `{**cfg.to_dict(), "d_in": d_in}`."""
    from safetensors.torch import save_model

    folder.mkdir(parents=True)
    save_model(_SparseCoder(weights), str(folder / "sae.safetensors"))
    config = {
        "activation": "topk",
        "expansion_factor": 32,
        "normalize_decoder": True,
        "num_latents": D_SAE,
        "k": K_TOPK,
        "multi_topk": False,
        "skip_connection": False,
        "transcode": False,
        **cfg,
        "d_in": D_IN,
    }
    (folder / "cfg.json").write_text(json.dumps(config))
    return folder


# --- the formulas, written from the papers and libraries ----------------------------------------------------


def reference_activations(family: str, weights: dict, x: torch.Tensor) -> torch.Tensor:
    """(N, d_sae) dense activations by each family's own formula."""
    w = {name: torch.from_numpy(value) for name, value in weights.items()}
    if family == "sparsify":  # sparsify: topk(relu(encoder(x - b_dec)))
        pre_relu = F.relu(F.linear(x - w["b_dec"], w["W_enc"].T, w["b_enc"]))
        top = pre_relu.topk(K_TOPK, dim=-1, sorted=False)
        return torch.zeros_like(pre_relu).scatter(-1, top.indices, top.values)
    sae_in = x if family == "gemmascope" else x - w["b_dec"]  # Gemma Scope does not subtract b_dec
    pre = sae_in @ w["W_enc"] + w["b_enc"]
    if family == "saelens-standard":
        return F.relu(pre)
    return F.relu(pre) * (pre > w["threshold"])  # JumpReLU


def dense_activations(sae, x: torch.Tensor) -> torch.Tensor:
    """Our SAE's activations as a dense (N, d_sae) tensor, whatever its architecture."""
    if hasattr(sae, "encode_topk"):
        encoding = sae.encode_topk(x)
        return torch.zeros(x.shape[0], sae.d_sae).scatter(-1, encoding.ids, encoding.values)
    return sae.encode(x)


FAMILIES = {
    "saelens-jumprelu": lambda folder, w: write_saelens(folder, w, "jumprelu"),
    "saelens-standard": lambda folder, w: write_saelens(folder, w, "standard"),
    "gemmascope": write_gemma_scope,
    "sparsify": write_sparsify,
}
LAYOUT_OF = {"saelens-jumprelu": "saelens", "saelens-standard": "saelens"}
# b_enc shifts that give the tiny teacher's tokens every count of active latents: none, fewer than 4, more.
BIAS_SHIFT = {"saelens-jumprelu": -2.0, "saelens-standard": -2.3, "gemmascope": -1.8, "sparsify": 0.0}


def weights_for_tiny_teacher(seed: int, bias_shift: float) -> dict[str, np.ndarray]:
    """`random_weights` scaled to the tiny teacher's small hidden states (std ~0.03), so that which latents
    are active depends on the token rather than on the biases alone."""
    weights = random_weights(seed, bias_shift)
    return {**weights, "W_enc": weights["W_enc"] * 20, "b_dec": weights["b_dec"] * 0.05}


@pytest.mark.parametrize("family", FAMILIES)
def test_each_family_round_trips_to_its_formula(tmp_path, family):
    weights = random_weights(1)
    loaded = load_sae(str(FAMILIES[family](tmp_path / family, weights)))
    assert loaded.format == LAYOUT_OF.get(family, family)
    assert (loaded.sae.d_in, loaded.sae.d_sae) == (D_IN, D_SAE)
    x = torch.randn(64, D_IN, generator=torch.Generator().manual_seed(0)) * 2
    with torch.no_grad():
        ours = dense_activations(loaded.sae, x)
    expected = reference_activations(family, weights, x)
    torch.testing.assert_close(ours, expected, atol=1e-6, rtol=1e-5)
    assert 0 < (expected > 0).float().mean() < 1  # some latents on, some off: the gate is exercised
    if family != "sparsify":  # steering reads a few latents' activations by the same gate
        some = torch.tensor([3, 17, 64])
        with torch.no_grad():
            picked = loaded.sae.latent_activations(loaded.sae.prepare_input(x)[0], some)
        torch.testing.assert_close(picked, expected[:, some], atol=1e-6, rtol=1e-5)


def test_gemma_scope_npz_file_and_saelens_flags(tmp_path):
    weights = random_weights(2)
    folder = write_gemma_scope(tmp_path / "gs", weights)
    x = torch.randn(16, D_IN)
    from_file, from_folder = load_sae(str(folder / "params.npz")), load_sae(str(folder))
    assert from_file.format == from_folder.format == "gemmascope"
    with torch.no_grad():
        assert torch.equal(from_file.sae.encode(x), from_folder.sae.encode(x))
    # SAELens `jumprelu` without b_dec on the input is Gemma Scope's formula.
    no_b_dec = load_sae(str(write_saelens(tmp_path / "sl", weights, "jumprelu", apply_b_dec_to_input=False)))
    with torch.no_grad():
        torch.testing.assert_close(no_b_dec.sae.encode(x), reference_activations("gemmascope", weights, x))
    # SAELens before 6: `standard` with `activation_fn_str`, and TopK as `standard` + `topk`.
    old = write_saelens(tmp_path / "old", weights, "standard")
    config = json.loads((old / "cfg.json").read_text())
    (old / "cfg.json").write_text(
        json.dumps({**config, "activation_fn_str": "relu", "activation_fn_kwargs": {}})
    )
    assert load_sae(str(old)).sae.architecture == "relu"
    topk = {**config, "activation_fn_str": "topk", "activation_fn_kwargs": {"k": 5}}
    (old / "cfg.json").write_text(json.dumps(topk))
    assert (load_sae(str(old)).sae.architecture, load_sae(str(old)).sae.k) == ("topk", 5)


# --- extract-concepts on each family ------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_extract_concepts_equals_a_naive_dense_attribution(tmp_path, family):
    """Targets: activation x (g . W_dec[latent]) over every latent, restricted to the active ones, top-K;
    fewer than K active repeat in order, none active is an invalid token; the stored activations are the
    largest ones, zero-padded."""
    K = 4
    weights = weights_for_tiny_teacher(3, BIAS_SHIFT[family])
    sae_dir = FAMILIES[family](tmp_path / family, weights)
    teacher = tiny_teacher(tmp_path / "teacher")
    prepared_run(tmp_path, documents=10)
    settings = {
        "teacher.model": teacher,
        "teacher.layer": 1,
        "sae.path": sae_dir,
        "extract.blocks_per_chunk": 4,
        "extract.tokens_per_batch": 64,
        "extract.store_sae_topk": "true",
    }
    run_in(tmp_path, extract.run, [f"{k}={v}" for k, v in settings.items()])
    arrays = store_arrays(tmp_path / "run")
    tokens = zarr.open_group(str(tmp_path / "run/prepare/tokens.zarr"), mode="r")
    regimes, checked, with_actives, targeted = set(), 0, 0, []
    for split in ("train", "val"):
        blocks = torch.from_numpy(tokens[split][:].astype(np.int64))
        hidden, grad = naive_hidden_and_grad(teacher, blocks, 1, "resid_post")
        h, g = hidden.flatten(0, 1), grad.flatten(0, 1)
        acts = reference_activations(family, weights, h)
        scores = acts * (g @ torch.from_numpy(weights["W_dec"]).T)
        active = acts != 0
        ids = arrays[f"{split}/concept_ids"].reshape(-1, K).astype(np.int64)
        stored_scores = arrays[f"{split}/concept_scores"].reshape(-1, K).astype(np.float32)
        valid = arrays[f"{split}/valid"].reshape(-1)
        last = (torch.arange(len(h)) % blocks.shape[1] == blocks.shape[1] - 1).numpy()
        for token in range(len(h)):
            on = torch.nonzero(active[token]).flatten()
            regimes.add(min(len(on), K) if family != "sparsify" else K)
            assert valid[token] == (len(on) > 0 and not last[token]), token
            if len(on) == 0:
                continue
            with_actives += 1
            ranked = on[scores[token, on].argsort(descending=True, stable=True)]
            ranked_scores = scores[token, ranked]
            if (ranked_scores[: K + 1].diff().abs() < 1e-4).any():
                continue  # a near-tie: either order is right
            expected = [int(ranked[j % len(ranked)]) for j in range(K)]
            assert ids[token].tolist() == expected, (token, len(on))
            checked += 1
            np.testing.assert_allclose(
                stored_scores[token], ranked_scores[[j % len(ranked) for j in range(K)]], rtol=2e-3, atol=2e-3
            )
        width = K_TOPK if family == "sparsify" else 64
        sae_acts = arrays[f"{split}/sae_acts"].reshape(-1, width).astype(np.float32)
        top = acts.topk(width, dim=-1).values
        np.testing.assert_allclose(np.sort(sae_acts, axis=-1)[:, ::-1], top.numpy(), rtol=2e-3, atol=2e-3)
        if family != "sparsify":  # zero-padded slots repeat the active ids, as targets do
            sae_ids = arrays[f"{split}/sae_ids"].reshape(-1, width).astype(np.int64)
            for token, n in enumerate(active.sum(-1).tolist()):
                if 0 < n < width:
                    assert set(sae_ids[token, :n]) == set(torch.nonzero(active[token]).flatten().tolist())
                    assert (sae_ids[token] == sae_ids[token, np.arange(width) % n]).all()
                    assert (sae_acts[token, n:] == 0).all()
        targeted += [set(row) for row, ok in zip(ids.tolist(), valid, strict=True) if ok]
    assert checked > 0.9 * with_actives
    if family != "sparsify":
        assert regimes == {0, 1, 2, 3, 4}, regimes  # no active, each fewer-than-K count, and K or more
    # The dictionary counts a repeated target once per token.
    built = dictionary.build(tmp_path / "run")
    for latent, entry in built["latents"].items():
        count = sum(int(latent) in row for row in targeted)
        assert entry["target_frequency"] == pytest.approx(count / built["tokens"], abs=1e-6), latent


def test_online_targets_skip_tokens_without_an_active_latent(tmp_path):
    from pipelines.concepts.targets import online_concept_targets
    from pipelines.concepts.teacher import load_teacher

    teacher = load_teacher(str(tiny_teacher(tmp_path / "teacher")), layer=1, hook="resid_post")
    sae = _jumprelu(weights_for_tiny_teacher(3, BIAS_SHIFT["saelens-jumprelu"]))
    tokens = torch.randint(0, 200, (2, 32), generator=torch.Generator().manual_seed(1))
    ids, valid = online_concept_targets(teacher, sae, tokens, 4, "official")
    with torch.no_grad():
        has_active = (sae.encode(teacher.hidden_states(tokens).float()) != 0).any(-1)
    expected = has_active.clone()
    expected[:, -1] = False
    assert ids.shape == (2, 32, 4) and torch.equal(valid, expected) and not has_active.all()


def test_dense_targets_do_not_depend_on_the_slice_size(monkeypatch):
    """The (tokens x d_sae) work is cut in slices; any cut gives the same targets, paper ones too (the
    same ids; scores to rounding, since with several threads a product over other rows may round
    differently)."""
    weights = random_weights(4, -1.2)
    h, g = torch.randn(300, D_IN), torch.randn(300, D_IN)
    sae = _jumprelu(weights)
    whole = {a: concept_targets(sae, h, g, 4, a) for a in ("official", "paper")}
    monkeypatch.setattr(attribution, "_DENSE_BUDGET", 7 * D_SAE)
    for name, targets in whole.items():
        sliced = concept_targets(sae, h, g, 4, name)
        for field in ("ids", "sae_ids", "has_active"):
            assert torch.equal(getattr(sliced, field), getattr(targets, field)), (name, field)
        for field in ("scores", "sae_values"):
            torch.testing.assert_close(getattr(sliced, field), getattr(targets, field), rtol=1e-5, atol=1e-6)
    pre = (h - torch.from_numpy(weights["b_dec"])) @ sae.W_enc + sae.b_enc
    paper = (pre * (g @ sae.W_dec.T)).topk(4, dim=-1)
    has = whole["paper"].has_active
    assert torch.equal(whole["paper"].ids[has], paper.indices[has])


def _jumprelu(weights: dict):
    from pipelines.sae.jumprelu_sae import JumpReLUSAE

    sae = JumpReLUSAE(D_IN, D_SAE)
    sae.load_state_dict({name: torch.from_numpy(value) for name, value in weights.items()})
    return sae.requires_grad_(False)


# --- saelens: specs -----------------------------------------------------------------------------------------

# Entries copied from SAELens' sae_lens/pretrained_saes.yaml (trimmed to a few SAEs each).
PRETRAINED_SAES_YAML = """\
gemma-scope-2b-pt-res-canonical:
  conversion_func: gemma_2
  links:
    dashboards: https://www.neuronpedia.org/gemma-2-2b/gemmascope-res-16k
    model: https://huggingface.co/google/gemma-2-2b
    publication: https://huggingface.co/google/gemma-scope
  model: gemma-2-2b
  repo_id: google/gemma-scope-2b-pt-res
  saes:
  - id: layer_12/width_16k/canonical
    neuronpedia: gemma-2-2b/12-gemmascope-res-16k
    path: layer_12/width_16k/average_l0_82
  - id: layer_12/width_1m/canonical
    neuronpedia: gemma-2-2b/12-gemmascope-res-1m
    path: layer_12/width_1m/average_l0_107
gpt2-small-res-jb:
  config_overrides:
    model_from_pretrained_kwargs:
      center_writing_weights: true
  conversion_func: null
  links:
    dashboards: https://www.neuronpedia.org/gpt2sm-res-jb
    model: https://huggingface.co/gpt2
  model: gpt2-small
  repo_id: jbloom/GPT2-Small-SAEs-Reformatted
  saes:
  - id: blocks.8.hook_resid_pre
    l0: 60.0
    neuronpedia: gpt2-small/8-res-jb
    path: blocks.8.hook_resid_pre
    variance_explained: 0.9
  - id: blocks.9.hook_resid_pre
    l0: 70.0
    neuronpedia: gpt2-small/9-res-jb
    path: blocks.9.hook_resid_pre
    variance_explained: 0.77
llama_scope_lxa_32x:
  conversion_func: llama_scope
  model: meta-llama/Llama-3.1-8B
  repo_id: fnlp/Llama3_1-8B-Base-LXA-32x
  saes:
  - id: l0a_32x
    l0: 50.0
    neuronpedia: llama3.1-8b/0-llamascope-att-131k
    norm_scaling_factor: 112.21917808219177
    path: Llama3_1-8B-Base-L0A-32x
"""


@pytest.fixture
def fake_sae_lens(tmp_path, monkeypatch):
    """An installed-looking `sae_lens` package holding only its directory (importing it would fail)."""
    package = tmp_path / "site" / "sae_lens"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("raise ImportError('cocomix must not import sae_lens')\n")
    (package / "pretrained_saes.yaml").write_text(PRETRAINED_SAES_YAML)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    return package


def test_saelens_specs_resolve_to_a_hub_repo_and_path(fake_sae_lens):
    gemma = sources.saelens_entry("saelens:gemma-scope-2b-pt-res-canonical/layer_12/width_16k/canonical")
    assert (gemma.repo_id, gemma.path, gemma.conversion) == (
        "google/gemma-scope-2b-pt-res",
        "layer_12/width_16k/average_l0_82",
        "gemma_2",
    )
    gpt2 = sources.saelens_entry("saelens:gpt2-small-res-jb/blocks.9.hook_resid_pre")
    assert (gpt2.repo_id, gpt2.path, gpt2.conversion) == (
        "jbloom/GPT2-Small-SAEs-Reformatted",
        "blocks.9.hook_resid_pre",
        None,
    )
    assert gpt2.cfg_overrides == {"model_from_pretrained_kwargs": {"center_writing_weights": True}}


def test_saelens_spec_loads_what_it_downloads(fake_sae_lens, tmp_path, monkeypatch):
    weights = random_weights(5)
    hub = tmp_path / "hub"
    write_gemma_scope(hub / "layer_12/width_16k/average_l0_82", weights)
    fetched = []

    def download(repo_id, inner, spec):
        fetched.append((repo_id, inner))
        return hub / inner

    monkeypatch.setattr(sources, "_download", download)
    loaded = load_sae("saelens:gemma-scope-2b-pt-res-canonical/layer_12/width_16k/canonical")
    assert fetched == [("google/gemma-scope-2b-pt-res", "layer_12/width_16k/average_l0_82")]
    assert loaded.format == "gemmascope" and loaded.sae.architecture == "jumprelu"


def test_saelens_spec_errors(fake_sae_lens, monkeypatch):
    with pytest.raises(
        InputError, match=r"no SAE id `layer_12/width_16k/canonicl`.*`layer_12/width_16k/canonical`"
    ):
        sources.saelens_entry("saelens:gemma-scope-2b-pt-res-canonical/layer_12/width_16k/canonicl")
    with pytest.raises(InputError, match=r"no release `gemma-scope-2b-pt-res-canon`.*Did you mean"):
        sources.saelens_entry("saelens:gemma-scope-2b-pt-res-canon/layer_12/width_16k/canonical")
    with pytest.raises(InputError, match="converter `llama_scope`, which cocomix does not read"):
        sources.saelens_entry("saelens:llama_scope_lxa_32x/l0a_32x")
    with pytest.raises(InputError, match="write `saelens:RELEASE/SAE_ID`"):
        sources.saelens_entry("saelens:gpt2-small-res-jb")
    monkeypatch.setattr(sources, "SAELENS_PACKAGE", "sae_lens_is_not_installed")
    with pytest.raises(InputError, match=r'pip install -e "\.\[saelens\]"'):
        load_sae("saelens:gpt2-small-res-jb/blocks.9.hook_resid_pre")


# --- bad input ----------------------------------------------------------------------------------------------


def test_bad_sae_files_are_one_clear_error(tmp_path):
    weights = random_weights(6)
    no_threshold = {name: value for name, value in weights.items() if name != "threshold"}
    np.savez(tmp_path / "params.npz", **no_threshold)
    with pytest.raises(InputError, match=r"has no `threshold`: a Gemma Scope params.npz holds"):
        load_sae(str(tmp_path / "params.npz"))
    (tmp_path / "unknown").mkdir()
    (tmp_path / "unknown" / "weights.bin.gz").write_bytes(b"\0")
    with pytest.raises(InputError) as unknown:
        load_sae(str(tmp_path / "unknown"))
    for layout in (
        "OpenAI",
        "SAELens folder",
        "topk, standard, jumprelu",
        "Gemma Scope params.npz",
        "sparsify",
    ):
        assert layout in str(unknown.value)
    gated = write_saelens(tmp_path / "gated", weights, "gated")
    with pytest.raises(InputError, match="SAELens architecture 'gated' is not supported"):
        load_sae(str(gated))
    transcoder = write_sparsify(tmp_path / "transcoder", weights, transcode=True)
    with pytest.raises(InputError, match="a sparsify transcoder"):
        load_sae(str(transcoder))
    narrow = write_sparsify(tmp_path / "narrow", weights, num_latents=D_SAE // 2)
    with pytest.raises(InputError, match=r"`W_enc` has shape \(32, 128\), expected \(32, 64\)"):
        load_sae(str(narrow))


def test_extract_rejects_an_sae_that_does_not_fit(tmp_path):
    teacher = tiny_teacher(tmp_path / "teacher")
    prepared_run(tmp_path, documents=5)
    write_gemma_scope(tmp_path / "wide", random_weights(7, d_in=48))
    base = [f"teacher.model={teacher}", "teacher.layer=1"]
    with pytest.raises(InputError, match=r"reads vectors of size 48, but teacher .* has hidden size 32"):
        run_in(tmp_path, extract.run, [*base, f"sae.path={tmp_path / 'wide'}"])
    write_gemma_scope(tmp_path / "fits", random_weights(7))
    with pytest.raises(InputError, match=r"`extract.concepts_per_token` \(200\) exceeds the width of SAE"):
        run_in(
            tmp_path, extract.run, [*base, f"sae.path={tmp_path / 'fits'}", "extract.concepts_per_token=200"]
        )
