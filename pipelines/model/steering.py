"""Reading and steering the concepts a CoCoMix student predicts (`cocomix steer`).

Steering, as in the paper: before the top-k that selects the concepts to compress, the logits of the chosen
concepts are multiplied by a scale (the paper used -10..10) or pinned to a value. Every continuation of a
prompt uses the same seed and sampling settings, so the unsteered text and the steered ones differ only by
the intervention, and a scale of 1.0 reproduces the unsteered text exactly. Inspection lists, per prompt
token, the concepts with the largest logits, i.e. the concepts the model mixes in after that token.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pipelines.config.schema import SteerConfig
from pipelines.errors import InputError
from pipelines.model.generation import generate


@dataclass
class SteeringModel:
    model: Any  # pipelines.model.gpt.GPT
    encode: Any
    decode: Any

    @classmethod
    def load(cls, spec: str, device: str | torch.device = "cpu") -> SteeringModel:
        from pipelines.data.tokenizer import load_tokenizer
        from pipelines.model.checkpoint import load_model, model_folder

        folder = model_folder(Path(spec))
        model = load_model(folder, device).eval()
        if model.config.variant != "cocomix":
            raise InputError(
                f"{folder} is a `{model.config.variant}` model; steering needs a CoCoMix student "
                "(`cocomix pretrain --objective cocomix`)."
            )
        if not (folder / "tokenizer.json").exists():
            raise InputError(f"{folder} has no tokenizer.json (`pretrain` writes one beside the weights).")
        tokenizer = load_tokenizer(str(folder / "tokenizer.json")).backend
        return cls(model, lambda text: tokenizer.encode(text, add_special_tokens=False).ids, tokenizer.decode)

    def check_concepts(self, concept_ids: list[int]) -> None:
        n = self.model.config.n_concepts
        bad = [c for c in concept_ids if not 0 <= c < n]
        if bad:
            raise InputError(f"Concept id(s) {bad} are out of range: this model predicts concepts 0-{n - 1}.")

    def generate(
        self, prompt: str, s: SteerConfig, concept_ids: list[int] = (), scale=None, value=None
    ) -> str:
        from pipelines.model.gpt import ConceptIntervention

        ids = self.encode(prompt)
        if not ids:
            raise InputError("The prompt is empty after tokenization; pass some text with --prompt.")
        room = self.model.config.context_length - s.max_new_tokens
        if room < 1:
            raise InputError(
                f"`steer.max_new_tokens` ({s.max_new_tokens}) leaves no room for a prompt in the model's "
                f"context of {self.model.config.context_length} tokens."
            )
        ids = ids[-room:]
        intervention = None
        if concept_ids and (scale is not None or value is not None):
            intervention = ConceptIntervention(tuple(concept_ids), scale=scale, value=value)
        device = next(self.model.parameters()).device
        out = generate(
            self.model,
            torch.tensor(ids, device=device),
            s.max_new_tokens,
            temperature=s.temperature,
            top_k=s.top_k or None,
            top_p=s.top_p or None,
            seed=s.seed,
            intervention=intervention,
        )
        return self.decode(out[len(ids) :].tolist())

    @torch.no_grad()
    def inspect(self, prompt: str, top: int) -> list[dict[str, Any]]:
        """Per prompt token: the token and its `top` concepts (id, logit), largest first."""
        ids = self.encode(prompt)[-self.model.config.context_length :]
        if not ids:
            raise InputError("The prompt is empty after tokenization; pass some text with --prompt.")
        device = next(self.model.parameters()).device
        logits = self.model(torch.tensor([ids], device=device)).concept_logits[0].float()
        best = logits.topk(min(top, logits.size(-1)), dim=-1)
        return [
            {
                "position": t,
                "token": self.decode([ids[t]]),
                "concepts": [
                    {"id": int(i), "logit": round(float(v), 4)}
                    for i, v in zip(best.indices[t], best.values[t], strict=True)
                ],
            }
            for t in range(len(ids))
        ]


def sweep(
    model: SteeringModel, prompt: str, s: SteerConfig, concept_ids: list[int], scales=(), value=None
) -> dict[str, Any]:
    """The unsteered continuation, then one per scale (or the pinned value), same seed and settings."""
    model.check_concepts(concept_ids)
    runs = [{"setting": "unsteered", "scale": None, "value": None, "text": model.generate(prompt, s)}]
    for scale in scales:
        text = model.generate(prompt, s, concept_ids, scale=scale)
        runs.append({"setting": f"scale {scale:g}", "scale": scale, "value": None, "text": text})
    if value is not None:
        text = model.generate(prompt, s, concept_ids, value=value)
        runs.append({"setting": f"value {value:g}", "scale": None, "value": value, "text": text})
    return {"prompt": prompt, "concepts": list(concept_ids), "runs": runs}


# --- teacher-side steering (the paper's comparison) -----------------------------------------------------


def amplify_latents(sae, latent_ids: list[int], scale: float):
    """`h -> h'` that multiplies the latents' activations (their ReLU or JumpReLU gate) by `scale`.

    In the SAE's normalised space the latents add `a_j W_dec[j]`; the edit adds `(scale - 1) a_j W_dec[j]`
    and maps the change back through the input normalisation, leaving everything else in h as it was.
    """
    ids = torch.as_tensor(latent_ids, dtype=torch.long)

    def edit(hidden: torch.Tensor) -> torch.Tensor:
        h = hidden.float()
        x, _, std = sae.prepare_input(h)
        acts = sae.latent_activations(x, ids)  # (..., n) only the steered latents, by the SAE's own gate
        delta = (scale - 1.0) * acts @ sae.W_dec[ids]
        return h + (delta * std if std is not None else delta)

    return edit


@torch.no_grad()
def teacher_generate(teacher, sae, prompt: str, s: SteerConfig, latent_ids=(), scale=None) -> str:
    """Sample from the teacher with the latents amplified at its hook (every position, every step)."""
    from pipelines.model.generation import sample_next_token

    ids = teacher.tokenizer.backend.encode(prompt, add_special_tokens=False).ids
    if not ids:
        raise InputError("The prompt is empty after tokenization; pass some text with --prompt.")
    device = teacher.device
    tokens = torch.tensor([ids], device=device)
    generator = torch.Generator(device=device).manual_seed(s.seed)
    edit = amplify_latents(sae, list(latent_ids), scale) if latent_ids and scale is not None else None
    for _ in range(s.max_new_tokens):  # no KV cache: the edit must see every position the same way
        logits = teacher.logits(tokens, replace=edit)[:, -1].float()
        next_id = sample_next_token(logits, s.temperature, s.top_k or None, s.top_p or None, generator)
        tokens = torch.cat([tokens, next_id], dim=1)
    return teacher.tokenizer.backend.decode(tokens[0, len(ids) :].tolist())


def teacher_sweep(teacher, sae, prompt: str, s: SteerConfig, latent_ids: list[int], scales) -> dict[str, Any]:
    bad = [c for c in latent_ids if not 0 <= c < sae.d_sae]
    if bad:
        raise InputError(f"Latent id(s) {bad} are out of range: the SAE has latents 0-{sae.d_sae - 1}.")
    runs = [
        {"setting": "teacher unsteered", "scale": None, "text": teacher_generate(teacher, sae, prompt, s)}
    ]
    for scale in scales:
        text = teacher_generate(teacher, sae, prompt, s, latent_ids, scale)
        runs.append({"setting": f"teacher scale {scale:g}", "scale": scale, "text": text})
    return {"prompt": prompt, "concepts": list(latent_ids), "runs": runs}
