"""Where concept targets come from: the SAE to use, the teacher (or a store of its hidden states), and the
targets computed from them in the training loop (`online_concept_targets`).

`extract-concepts` computes targets from these once; `pretrain --online-teacher` computes them at every step
and `cocomix steer --teacher` steers the teacher through the same SAE. Each resolves them here, so the rules
(which SAE an empty `sae.path` means, what must match between SAE, teacher and token store) are written once.
"""

from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path

import numpy as np

from pipelines.config.schema import Config
from pipelines.core import stage_inputs
from pipelines.core.fingerprints import fingerprint
from pipelines.core.layout import TRAIN_SAE_STAGE, TRAINED_SAE
from pipelines.core.session import finished_upstream
from pipelines.data.token_store import TOKEN_SPLITS, TokenStore
from pipelines.errors import InputError


def resolve_sae_path(cfg: Config, reading: contextlib.ExitStack) -> tuple[Config, dict[str, str]]:
    """`cfg` with `sae.path` pointing at the SAE to use, and the `train-sae` fingerprint when it is ours.

    This run's trained SAE stays held against `train-sae --force` until `reading` closes.
    """
    if cfg.sae.path:
        return cfg, {}
    trained = reading.enter_context(
        finished_upstream(
            Path(cfg.run.dir),
            TRAIN_SAE_STAGE,
            TRAINED_SAE,
            expected=stage_inputs.train_sae(cfg),
            missing="`sae.path` is not set and this run has no trained SAE. Run `cocomix train-sae`, or set "
            "`sae.path` to an SAE (OpenAI .pt, SAELens or sparsify folder, Gemma Scope params.npz, "
            "`saelens:RELEASE/SAE_ID`).",
        )
    )
    cfg = dataclasses.replace(cfg, sae=dataclasses.replace(cfg.sae, path=str(trained.path)))
    return cfg, {TRAIN_SAE_STAGE: trained.fingerprint}


def load_teacher_and_sae(cfg: Config, token_store: TokenStore, prepare_fingerprint: str, device):
    """The SAE and the source of hidden states and gradients: the teacher, or a store of them."""
    from pipelines.concepts.teacher import load_teacher_for
    from pipelines.sae.formats import load_sae

    sae = load_sae(cfg.sae.path).sae.to(device).eval().requires_grad_(False)
    if cfg.extract.hidden_from:
        stored = StoredHidden(Path(cfg.extract.hidden_from), token_store, prepare_fingerprint)
        _check_sae(cfg, sae, stored.d_model, stored.spec)
        return stored, sae
    teacher = load_teacher_for(cfg.teacher, device, token_store.attrs)
    _check_sae(cfg, sae, teacher.d_model, cfg.teacher.model)
    return teacher, sae


def _check_sae(cfg: Config, sae, d_model: int, teacher_spec: str) -> None:
    if sae.d_in != d_model:
        raise InputError(
            f"SAE `{cfg.sae.path}` reads vectors of size {sae.d_in}, but teacher `{teacher_spec}` has "
            f"hidden size {d_model}. Use an SAE trained on this teacher's layer {cfg.teacher.layer}."
        )
    k = sae.k_per_token  # TopK SAEs only: their targets come from the k active latents
    if k is not None and cfg.extract.concepts_per_token > k:
        raise InputError(
            f"`extract.concepts_per_token` ({cfg.extract.concepts_per_token}) exceeds the SAE's k ({k})."
        )
    if cfg.extract.concepts_per_token > sae.d_sae:
        raise InputError(
            f"`extract.concepts_per_token` ({cfg.extract.concepts_per_token}) exceeds the width of SAE "
            f"`{cfg.sae.path}` ({sae.d_sae} latents)."
        )


class StoredHidden:
    """Hidden states and gradients read back from a concept store written with `store_hidden`.

    It stands in for the teacher: the same `hidden_and_grad` answer for the same blocks, from float16 copies.
    """

    def __init__(self, path: Path, token_store: TokenStore, prepare_fingerprint: str):
        from pipelines.data.concept_store import ConceptStore

        if not (path / "zarr.json").exists():
            raise InputError(f"`extract.hidden_from` {path} is not a concept store (no zarr.json).")
        store = ConceptStore.open(path)
        self.group, attrs = store.group, store.attrs
        if not attrs.get("complete") or "hidden" not in attrs.get("arrays", []):
            raise InputError(
                f"`extract.hidden_from` {path} holds no complete hidden states; write one with "
                "`cocomix extract-concepts --store-hidden`."
            )
        if attrs["token_store_fingerprint"] != prepare_fingerprint:
            raise InputError(
                f"`extract.hidden_from` {path} was computed on another token store "
                f"({attrs['token_store_fingerprint']}; this run's is {prepare_fingerprint})."
            )
        for split in TOKEN_SPLITS:
            if self.group[split]["hidden"].shape[:2] != token_store.split(split).shape:
                raise InputError(
                    f"`extract.hidden_from` {path}: its `{split}` blocks differ from the token store's."
                )
        self.path = path
        teacher = attrs["teacher"]
        self.spec, self.layer, self.hook = teacher["spec"], teacher["layer"], teacher["hook"]
        self.d_model = self.group["train"]["hidden"].shape[-1]
        self._rows: tuple[str, int] = ("train", 0)

    @staticmethod
    def fingerprint(path: Path) -> str:
        from pipelines.data.concept_store import ConceptStore

        try:
            attrs = ConceptStore.open(path).attrs
        except Exception:
            raise InputError(f"`extract.hidden_from` {path} cannot be opened as a concept store.") from None
        return fingerprint(attrs)

    def at(self, split: str, first_row: int) -> None:
        """Point at the rows that the next `hidden_and_grad` call reads."""
        self._rows = (split, first_row)

    def hidden_and_grad(self, ids, top_tokens: int = 0):
        import torch

        from pipelines.concepts.teacher import TeacherOutput

        split, first = self._rows
        rows = slice(first, first + ids.shape[0])
        hidden = torch.from_numpy(self.group[split]["hidden"][rows].astype(np.float32)).to(ids.device)
        grad = torch.from_numpy(self.group[split]["grad"][rows].astype(np.float32)).to(ids.device)
        return TeacherOutput(hidden=hidden, grad=grad)


def online_concept_targets(teacher, sae, tokens, top_k: int, attribution: str):
    """CoCoMix targets computed now by the teacher and SAE, as `extract-concepts` caches them.

    Returns ids (B, T, K) and valid (B, T): the last position of a block has no next token, and a token
    without an active SAE latent has no concept (`pipelines.sae.attribution`).
    """
    import torch

    from pipelines.sae.attribution import concept_targets

    out = teacher.hidden_and_grad(tokens)
    B, T, D = out.hidden.shape
    with torch.no_grad():
        targets = concept_targets(
            sae, out.hidden.float().reshape(B * T, D), out.grad.float().reshape(B * T, D), top_k, attribution
        )
    valid = torch.ones(B, T, dtype=torch.bool, device=tokens.device)
    valid[:, -1] = False
    return targets.ids.reshape(B, T, -1), valid & targets.has_active.reshape(B, T)
