"""The concept dictionary: what each SAE latent means, from the run's own data, without an external service.

Built from a concept store written with `store_sae_topk` (`extract-concepts --store-sae-topk`): for every
latent, how often it is active (among the SAE activations stored for a token), how often it is a CoCoMix
target, the tokens it activates on most (by summed activation), its strongest contexts with the token marked,
and the histogram of its activations (bins an eighth of an octave wide: SAE activations span orders of
magnitude, and fixed log bins let one pass over the store count them). The label is its top tokens. Stored
as `<run.dir>/concepts/dictionary.json`; `cocomix concepts` reads it and `cocomix steer` shows the labels.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import numpy as np

from pipelines.core.files import atomic_write_json, read_json
from pipelines.core.layout import CONCEPTS_STORE, DICTIONARY_STAGE, EXTRACT_STAGE
from pipelines.core.session import Upstream, ensure_run_dir, finished_upstream
from pipelines.errors import StageError

DICTIONARY = "dictionary.json"
MARK = ("[[", "]]")  # around the token in a context's text
BINS_PER_OCTAVE = 8  # histogram bin b holds activations in [2 ** (b / 8), 2 ** ((b + 1) / 8))
LOWEST_BIN, HIGHEST_BIN = -96, 95  # 2 ** -12 to 2 ** 12: smaller or larger activations land in the end bins


def split_context(text: str) -> tuple[str, str, str]:
    """A context's text as (before, the marked token, after)."""
    before, _, rest = text.partition(MARK[0])
    token, _, after = rest.partition(MARK[1])
    return before, token, after


def dictionary_path(run_dir: Path) -> Path:
    return Path(run_dir) / DICTIONARY_STAGE / DICTIONARY


def build(
    run_dir: Path,
    top_tokens: int = 8,
    top_contexts: int = 4,
    window: int = 8,
    splits=("train", "val"),
    concepts: Upstream | None = None,
) -> dict[str, Any]:
    """Scan the stored SAE top-k over the token store and write the dictionary; returns it.

    `concepts` is the concept store when the caller already holds it (and so has verified it); else it
    is opened here.
    """
    from pipelines.data.concept_store import ConceptStore
    from pipelines.data.token_store import open_prepared_tokens

    run_dir = Path(run_dir)
    with contextlib.ExitStack() as reading:
        finished = concepts or reading.enter_context(
            finished_upstream(
                run_dir,
                EXTRACT_STAGE,
                CONCEPTS_STORE,
                missing=f"{run_dir} has no finished concept store. Run `cocomix extract-concepts "
                "--store-sae-topk`.",
            )
        )
        store = ConceptStore.open(finished.path)
        if "sae_ids" not in store.arrays:
            raise StageError(
                f"{finished.path} has no SAE activations; run `cocomix extract-concepts --store-sae-topk "
                "--force`."
            )
        tokens, _ = open_prepared_tokens(reading, run_dir)
        return _build(run_dir, store, tokens, top_tokens, top_contexts, window, splits)


def _build(run_dir, store, tokens, top_tokens, top_contexts, window, splits) -> dict[str, Any]:
    from pipelines.data.tokenizer import load_tokenizer

    n_latents = store.n_concepts
    active = np.zeros(n_latents, np.int64)
    targeted = np.zeros(n_latents, np.int64)
    token_sums: dict[int, float] = {}  # latent * vocab + token -> summed activation
    vocab = int(tokens.attrs["tokenizer"]["vocab_size"])
    best_act = np.full((n_latents, top_contexts), -np.inf, np.float32)
    best_loc = np.zeros((n_latents, top_contexts, 3), np.int64)  # split index, row, position
    histograms = np.zeros((n_latents, HIGHEST_BIN - LOWEST_BIN + 1), np.int64)
    for split_index, split in enumerate(splits):
        group = store.split(split)
        rows = group["sae_ids"].shape[0]
        step = 64  # blocks per read
        for start in range(0, rows, step):
            ids = group["sae_ids"][start : start + step].astype(np.int64)  # (b, T, k)
            acts = group["sae_acts"][start : start + step].astype(np.float32)
            toks = tokens.split(split)[start : start + step].astype(np.int64)  # (b, T)
            mask = acts > 0
            np.add.at(active, ids[mask], 1)
            valid = group["valid"][start : start + step]
            np.add.at(targeted, _once_per_token(group["concept_ids"][start : start + step][valid]), 1)
            latent = ids[mask]
            np.add.at(histograms, (latent, activation_bins(acts[mask]) - LOWEST_BIN), 1)
            token = np.broadcast_to(toks[..., None], ids.shape)[mask]
            keys, sums = _sum_by_key(latent * vocab + token, acts[mask])
            for key, value in zip(keys.tolist(), sums.tolist(), strict=True):
                token_sums[key] = token_sums.get(key, 0.0) + value
            b, t, _ = np.nonzero(mask)
            _merge_best(
                best_act,
                best_loc,
                latent,
                acts[mask],
                np.stack([np.full_like(b, split_index), b + start, t], 1),
            )
    tokenizer = load_tokenizer(tokens.attrs["tokenizer"]["spec"]).backend
    per_latent: dict[int, list[tuple[float, int]]] = {}
    for key, value in token_sums.items():
        per_latent.setdefault(key // vocab, []).append((value, key % vocab))
    entries = {}
    total_tokens = sum(tokens.split(s).shape[0] for s in splits) * tokens.block_size
    for latent in np.nonzero(active)[0].tolist():
        top = sorted(per_latent.get(latent, []), reverse=True)[:top_tokens]
        top_list = [
            {"token": tokenizer.decode([tok]), "id": tok, "activation": round(v, 3)} for v, tok in top
        ]
        contexts = []
        for act, (split_index, row, pos) in zip(best_act[latent], best_loc[latent], strict=True):
            if np.isfinite(act):
                block = tokens.split(splits[split_index])[row].astype(np.int64).tolist()
                before = tokenizer.decode(block[max(0, pos - window) : pos])
                after = tokenizer.decode(block[pos + 1 : pos + 1 + window])
                contexts.append(
                    {
                        "text": f"{before}{MARK[0]}{tokenizer.decode([block[pos]])}{MARK[1]}{after}",
                        "activation": round(float(act), 3),
                    }
                )
        entries[str(latent)] = {
            "id": latent,
            "label": " | ".join(t["token"].strip() or repr(t["token"]) for t in top_list[:3]),
            "frequency": round(active[latent] / total_tokens, 6),
            "target_frequency": round(targeted[latent] / total_tokens, 6),
            "top_tokens": top_list,
            "contexts": contexts,
            "histogram": _histogram(histograms[latent]),
        }
    dictionary = {
        "sae": store.attrs["sae"],
        "tokens": total_tokens,
        "latents_seen": len(entries),
        "latents": entries,
    }
    ensure_run_dir(run_dir)
    dictionary_path(run_dir).parent.mkdir(exist_ok=True)
    atomic_write_json(dictionary_path(run_dir), dictionary)
    return dictionary


def activation_bins(acts: np.ndarray) -> np.ndarray:
    """Each (positive) activation's histogram bin: floor(log2(a) * BINS_PER_OCTAVE), clipped to the range."""
    bins = np.floor(np.log2(acts.astype(np.float64)) * BINS_PER_OCTAVE).astype(np.int64)
    return np.clip(bins, LOWEST_BIN, HIGHEST_BIN)


def _histogram(counts: np.ndarray) -> dict[str, Any]:
    """A latent's counts from its first to its last non-empty bin, and that first bin's number."""
    filled = np.nonzero(counts)[0]
    first, last = int(filled[0]), int(filled[-1])
    return {
        "bins_per_octave": BINS_PER_OCTAVE,
        "first_bin": first + LOWEST_BIN,
        "counts": counts[first : last + 1].tolist(),
    }


def load(run_dir: Path) -> dict[str, Any]:
    path = dictionary_path(run_dir)
    data = read_json(path)
    if data is None:
        raise StageError(f"No concept dictionary at {path}. Build it with `cocomix concepts build`.")
    return data


def labels(run_dir: Path) -> dict[int, str]:
    """Latent id -> label, or {} when the run has no dictionary."""
    data = read_json(dictionary_path(run_dir)) or {"latents": {}}
    return {int(k): v["label"] for k, v in data["latents"].items()}


def search(dictionary: dict[str, Any], text: str) -> list[dict[str, Any]]:
    """Latents whose top tokens or contexts contain `text` (case-insensitive), most frequent first."""
    needle = text.lower()
    hits = [
        entry
        for entry in dictionary["latents"].values()
        if any(needle in t["token"].lower() for t in entry["top_tokens"])
        or any(needle in c["text"].lower() for c in entry["contexts"])
    ]
    return sorted(hits, key=lambda e: -e["frequency"])


def most_targeted(dictionary: dict[str, Any], n: int) -> list[dict[str, Any]]:
    return sorted(dictionary["latents"].values(), key=lambda e: -e["target_frequency"])[:n]


def _once_per_token(ids: np.ndarray) -> np.ndarray:
    """The distinct ids of each row of (n, K) `ids`, flattened: a token with fewer than K active latents
    repeats them in its targets (`pipelines.sae.attribution`), and is still one token per latent."""
    ordered = np.sort(ids.astype(np.int64), axis=-1)
    first = np.ones(ordered.shape, dtype=bool)
    first[:, 1:] = ordered[:, 1:] != ordered[:, :-1]
    return ordered[first]


def _sum_by_key(keys: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    unique, inverse = np.unique(keys, return_inverse=True)
    sums = np.zeros(len(unique), np.float64)
    np.add.at(sums, inverse, values)
    return unique, sums


def _merge_best(best_act, best_loc, latent, acts, locs) -> None:
    """Keep, per latent, the `best_act.shape[1]` strongest activations seen so far and where they were."""
    keep = best_act.shape[1]
    order = np.lexsort((-acts, latent))
    latent, acts, locs = latent[order], acts[order], locs[order]
    starts = np.searchsorted(latent, np.unique(latent))
    for s, lat in zip(starts.tolist(), np.unique(latent).tolist(), strict=True):
        end = min(s + keep, len(latent))
        end = s + int(np.sum(latent[s:end] == lat))
        merged_act = np.concatenate([best_act[lat], acts[s:end]])
        merged_loc = np.concatenate([best_loc[lat], locs[s:end]])
        top = np.argsort(-merged_act, kind="stable")[:keep]
        best_act[lat], best_loc[lat] = merged_act[top], merged_loc[top]
