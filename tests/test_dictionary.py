"""The concept dictionary holds the tokens that really activate each latent (checked by a direct pass)."""

import json
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from pipelines.concepts.teacher import load_teacher
from pipelines.sae import dictionary
from pipelines.sae.formats import load_sae, save_saelens
from pipelines.stages import extract
from tests.conftest import prepared_run, run_in, tiny_sae, tiny_teacher


@pytest.fixture
def run(tmp_path):
    tiny_teacher(tmp_path / "teacher")
    save_saelens(tiny_sae(k=4), tmp_path / "sae")
    prepared_run(tmp_path, documents=20)
    settings = {
        "teacher.model": str(tmp_path / "teacher"),
        "teacher.layer": 1,
        "sae.path": str(tmp_path / "sae"),
        "extract.store_sae_topk": "true",
        "extract.blocks_per_chunk": 8,
    }
    run_in(tmp_path, extract.run, [f"{k}={v}" for k, v in settings.items()])
    return tmp_path


def direct_activations(run: Path) -> tuple[dict, dict, int, dict]:
    """latent -> {token id: summed activation}, latent -> count, the tokens read and latent -> its
    activations, from the teacher and SAE directly."""
    teacher = load_teacher(str(run / "teacher"), layer=1, hook="resid_post")
    sae = load_sae(str(run / "sae")).sae
    tokens = zarr.open_group(str(run / "run/prepare/tokens.zarr"), mode="r")
    sums, counts, total = defaultdict(lambda: defaultdict(float)), defaultdict(int), 0
    values_of = defaultdict(list)
    for split in ("train", "val"):
        blocks = torch.from_numpy(tokens[split][:].astype(np.int64))
        with torch.no_grad():
            hidden = teacher.hidden_states(blocks).float()
            encoding = sae.encode_topk(hidden.flatten(0, 1))
        flat = blocks.flatten().tolist()
        total += len(flat)
        for position, (ids, values) in enumerate(
            zip(encoding.ids.tolist(), encoding.values.tolist(), strict=True)
        ):
            for latent, value in zip(ids, values, strict=True):
                if value > 0:
                    sums[latent][flat[position]] += value
                    counts[latent] += 1
                    values_of[latent].append(value)
    return sums, counts, total, values_of


def test_entries_hold_the_tokens_that_activate_each_latent(run):
    built = dictionary.build(run / "run")
    sums, counts, total, _ = direct_activations(run)
    assert built["tokens"] == total
    assert set(built["latents"]) == {str(latent) for latent in counts}
    for latent, per_token in sums.items():
        entry = built["latents"][str(latent)]
        assert entry["frequency"] == pytest.approx(counts[latent] / total, abs=1e-6)
        expected = sorted(per_token.items(), key=lambda kv: -kv[1])[: len(entry["top_tokens"])]
        got = [(t["id"], t["activation"]) for t in entry["top_tokens"]]
        # float16 storage: equal sums to 1%, and the same ranking wherever it is not a near-tie
        assert [g[1] for g in got] == pytest.approx([e[1] for e in expected], rel=1e-2, abs=1e-2)
        assert got[0][0] == expected[0][0] or abs(expected[0][1] - expected[1][1]) < 0.02 * expected[0][1]
        for context in entry["contexts"]:
            assert "[[" in context["text"] and "]]" in context["text"]
    assert dictionary.load(run / "run") == json.loads((run / "run/concepts/dictionary.json").read_text())


def test_each_latent_has_the_histogram_of_its_activations(run):
    built = dictionary.build(run / "run")
    _, counts, _, values_of = direct_activations(run)
    mismatched = 0
    for latent, values in values_of.items():
        histogram = built["latents"][str(latent)]["histogram"]
        assert histogram["bins_per_octave"] == dictionary.BINS_PER_OCTAVE == 8
        assert sum(histogram["counts"]) == counts[latent]  # every activation counted once
        assert histogram["counts"][0] > 0 and histogram["counts"][-1] > 0  # trimmed to the filled bins
        # The store keeps float16 activations: binned as the direct pass's values rounded the same way.
        bins = np.floor(np.log2(np.array(values, np.float16).astype(np.float64)) * 8).astype(int)
        expected = np.bincount(bins - histogram["first_bin"], minlength=len(histogram["counts"]))
        mismatched += int(np.abs(expected[: len(histogram["counts"])] - histogram["counts"]).sum())
        mismatched += int(expected[len(histogram["counts"]) :].sum())
    # Batched and direct passes may round a few float16 activations across a bin's edge, no more.
    assert mismatched <= 0.005 * sum(counts.values()), mismatched
    # Bin b holds [2 ** (b / 8), 2 ** ((b + 1) / 8)): the strongest context lies in the last bin.
    entry = next(e for e in built["latents"].values() if e["contexts"])
    last = entry["histogram"]["first_bin"] + len(entry["histogram"]["counts"]) - 1
    assert 2 ** (last / 8) <= entry["contexts"][0]["activation"] * 1.001
    assert entry["contexts"][0]["activation"] < 2 ** ((last + 1) / 8) * 1.001


def test_commands_show_search_top(run, cocomix):
    assert cocomix("--set", f"run.dir={run / 'run'}", "concepts", "build").exit_code == 0
    data = dictionary.load(run / "run")
    latent, entry = next(iter(data["latents"].items()))
    shown = cocomix("--set", f"run.dir={run / 'run'}", "concepts", "show", latent, "--json")
    assert shown.exit_code == 0 and json.loads(shown.stdout) == entry
    needle = entry["top_tokens"][0]["token"].strip() or entry["top_tokens"][0]["token"]
    found = json.loads(
        cocomix(
            "--set", f"run.dir={run / 'run'}", "concepts", "search", needle, "--json", "--limit", "1000"
        ).stdout
    )
    assert int(latent) in [e["id"] for e in found]
    top = json.loads(
        cocomix("--set", f"run.dir={run / 'run'}", "concepts", "top", "--n", "3", "--json").stdout
    )
    assert [e["target_frequency"] for e in top] == sorted(
        (e["target_frequency"] for e in data["latents"].values()), reverse=True
    )[:3]
    missing = cocomix("--set", f"run.dir={run / 'run'}", "concepts", "show", "99999")
    assert missing.exit_code == 2 and "never activated" in missing.stderr
