"""`cocomix concepts`: build the run's concept dictionary and look concepts up in it.

`pipelines.sae.dictionary` owns the dictionary (how it is built from the concept store, its file); this
stage runs it on the run folder of a config and answers the command's questions.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipelines.config.schema import Config
from pipelines.errors import InputError
from pipelines.sae import dictionary


def build(cfg: Config) -> tuple[dict[str, Any], Path]:
    """Build `<run.dir>/concepts/dictionary.json` from the concept store; the dictionary and its path."""
    run_dir = Path(cfg.run.dir)
    return dictionary.build(run_dir), dictionary.dictionary_path(run_dir)


def entry(cfg: Config, concept_id: int) -> dict[str, Any]:
    """One concept's entry: label, frequencies, top tokens and contexts."""
    found = dictionary.load(Path(cfg.run.dir))["latents"].get(str(concept_id))
    if found is None:
        raise InputError(
            f"Concept {concept_id} never activated in this run's data; it has no dictionary entry."
        )
    return found


def search(cfg: Config, text: str, limit: int) -> list[dict[str, Any]]:
    """Concepts whose top tokens or contexts contain `text`, most frequent first."""
    return dictionary.search(dictionary.load(Path(cfg.run.dir)), text)[:limit]


def top(cfg: Config, n: int) -> list[dict[str, Any]]:
    """The `n` concepts most often chosen as CoCoMix targets."""
    return dictionary.most_targeted(dictionary.load(Path(cfg.run.dir)), n)
