"""Where an SAE spec points: a local file or folder, `hf:REPO[/PATH]` on the HuggingFace hub, or
`saelens:RELEASE/SAE_ID` from SAELens' directory of pretrained SAEs.

The directory is `pretrained_saes.yaml` inside the installed `sae_lens` package, read as a file: importing
`sae_lens` would pull in transformer_lens and friends for one YAML lookup. A release lists its hub repo and,
per SAE id, the path inside it; its `conversion_func` says the layout of those files, and only the layouts
`pipelines.sae.formats` reads are accepted. Its `config_overrides` travel with the path, since SAELens applies
them to the SAE's `cfg.json`.
"""

from __future__ import annotations

import difflib
import importlib.util
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipelines.errors import InputError

HUB_PREFIX = "hf:"
SAELENS_PREFIX = "saelens:"
SAELENS_PACKAGE = "sae_lens"
SAELENS_DIRECTORY = "pretrained_saes.yaml"
# SAELens converters whose files are in a layout cocomix reads, by the name of that layout.
SAELENS_CONVERSIONS = {None: "saelens", "gemma_2": "gemmascope", "sparsify": "sparsify"}
_INSTALL = 'pip install -e ".[saelens]"'


@dataclass(frozen=True)
class SAESource:
    path: Path
    """The local file or folder (downloaded first for a hub spec)."""
    cfg_overrides: dict[str, Any] = field(default_factory=dict)
    """SAELens' `config_overrides` of the release, applied over a SAELens `cfg.json`."""


@dataclass(frozen=True)
class SAELensEntry:
    repo_id: str
    path: str
    """The SAE's file or folder inside `repo_id`."""
    conversion: str | None
    cfg_overrides: dict[str, Any]


def resolve_sae_source(spec: str) -> SAESource:
    if spec.startswith(SAELENS_PREFIX):
        entry = saelens_entry(spec)
        return SAESource(_download(entry.repo_id, entry.path, spec), entry.cfg_overrides)
    if spec.startswith(HUB_PREFIX):
        parts = spec.removeprefix(HUB_PREFIX).split("/")
        return SAESource(_download("/".join(parts[:2]), "/".join(parts[2:]), spec))
    return SAESource(Path(spec).expanduser())


def saelens_entry(spec: str) -> SAELensEntry:
    """The hub location of `saelens:RELEASE/SAE_ID`, from the installed SAELens directory."""
    release, _, sae_id = spec.removeprefix(SAELENS_PREFIX).partition("/")
    if not release or not sae_id:
        raise InputError(f"SAE `{spec}`: write `saelens:RELEASE/SAE_ID`, e.g. {_EXAMPLE}.")
    directory = saelens_directory()
    if release not in directory:
        raise InputError(f"SAELens lists no release `{release}` (in `{spec}`).{_near(release, directory)}")
    entry = directory[release]
    paths = {sae["id"]: sae["path"] for sae in entry["saes"] if "id" in sae and "path" in sae}
    if sae_id not in paths:
        raise InputError(
            f"SAELens release `{release}` lists no SAE id `{sae_id}` (in `{spec}`).{_near(sae_id, paths)}"
        )
    conversion = entry.get("conversion_func")
    if conversion not in SAELENS_CONVERSIONS:
        raise InputError(
            f"SAELens release `{release}` is stored in the layout of its converter `{conversion}`, which "
            "cocomix does not read; it reads releases whose `conversion_func` is null (SAELens folders), "
            "`gemma_2` (Gemma Scope) or `sparsify`."
        )
    return SAELensEntry(
        entry["repo_id"], paths[sae_id], conversion, dict(entry.get("config_overrides") or {})
    )


def saelens_directory() -> dict[str, Any]:
    """SAELens' `pretrained_saes.yaml`, release -> entry, without importing `sae_lens`."""
    # find_spec locates a top-level package without running its __init__.
    package = importlib.util.find_spec(SAELENS_PACKAGE)
    locations = list(package.submodule_search_locations or []) if package else []
    files = [Path(folder) / SAELENS_DIRECTORY for folder in locations]
    found = next((f for f in files if f.is_file()), None)
    if found is None:
        raise InputError(f"`{SAELENS_PREFIX}` SAE specs need SAELens' directory of SAEs: {_INSTALL}.")
    import yaml

    return yaml.safe_load(found.read_text())


def _download(repo_id: str, inner: str, spec: str) -> Path:
    from huggingface_hub import snapshot_download

    try:
        # `inner` is a folder (SAELens, sparsify, Gemma Scope) or a file (an OpenAI `.pt`); fetch only that.
        root = snapshot_download(repo_id, allow_patterns=[inner, f"{inner}/*"] if inner else ["*"])
    except Exception as exc:
        raise InputError(f"Cannot download SAE `{spec}` from the HuggingFace hub ({exc}).") from None
    return Path(root) / inner


def _near(name: str, known) -> str:
    near = difflib.get_close_matches(name, list(known), n=5, cutoff=0.6)
    if near:
        return " Did you mean " + ", ".join(f"`{n}`" for n in near) + "?"
    return f" It lists {len(known)}, e.g. " + ", ".join(f"`{n}`" for n in list(known)[:3]) + "."


_EXAMPLE = "`saelens:gemma-scope-2b-pt-res-canonical/layer_12/width_16k/canonical`"
