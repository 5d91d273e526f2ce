"""The losses of the paper's objectives (next-token prediction, CoCoMix's concept loss, KD on cached top-N
log-probs), one class each with the val metrics it reports, their base class, and the module that trains a
student with one (`ObjectiveLoss`). What each objective is (its model, store arrays, keys) is declared in
`pipelines.objectives.builtin`, which names these classes.

KD approximation: the cache keeps the teacher's N most likely next tokens per position. The teacher's
distribution is taken as those N probabilities plus one "tail" bucket holding the rest of the mass
(1 - sum of the N); the student's distribution is folded the same way (its probabilities of the same N ids,
plus everything else in the tail). KL(teacher || student) over these N + 1 buckets is exact when the
teacher's tail is zero and a lower bound of the full-vocabulary KL otherwise (merging outcomes never
increases a KL divergence).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipelines.config.schema import Config
from pipelines.errors import InputError, StageError
from pipelines.model.gpt import ModelOutput
from pipelines.objectives.declaration import (
    ObjectiveSpec,
    load_loss,
    objective_spec,
    setting_value,
)

__all__ = [
    "Objective",
    "ObjectiveLoss",
    "concept_loss",
    "host_tensors",
    "kd_loss",
    "next_token_loss",
    "objective_for",
]

Batch = Mapping[str, torch.Tensor]
# The student's submodule that holds its objective's training-only heads (`Objective.heads`): trained and
# checkpointed with the student, dropped from the model it exports.
OBJECTIVE_HEADS = "objective_heads"


def next_token_loss(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of each position's logits against the next token; (B, T, V) and (B, T)."""
    # Shift the labels rather than the logits: slicing (B, T, V) would copy it.
    labels = F.pad(tokens[:, 1:], (0, 1), value=-100)
    return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100)


def concept_loss(concept_logits: torch.Tensor, targets: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Mean over the K targets of the cross-entropy of each target id, over valid positions only.

    concept_logits (B, T, C), targets (B, T, K) concept ids, valid (B, T) bool. Equal to the official
    code's `sum_i 1/K * cross_entropy(logits, targets[..., i])` when every position is valid.
    """
    log_probs = F.log_softmax(concept_logits.float(), dim=-1)
    target_log_probs = log_probs.gather(-1, targets.long())  # (B, T, K)
    mask = valid.unsqueeze(-1).to(target_log_probs.dtype)
    count = mask.sum() * targets.size(-1)
    return -(target_log_probs * mask).sum() / count.clamp(min=1)


def kd_loss(
    logits: torch.Tensor, teacher_ids: torch.Tensor, teacher_log_probs: torch.Tensor, valid: torch.Tensor
) -> torch.Tensor:
    """Mean over valid positions of KL(teacher || student) on the top-N ids plus a tail bucket.

    logits (B, T, V); teacher_ids and teacher_log_probs (B, T, N); valid (B, T) bool.
    """
    log_q = F.log_softmax(logits.float(), dim=-1)
    log_q_top = log_q.gather(-1, teacher_ids.long())  # (B, T, N)
    log_p_top = teacher_log_probs.float()
    # Tails as log(1 - sum of the N probabilities); clamped because float16 caches can round past 1.
    lse_p = torch.logsumexp(log_p_top, dim=-1).clamp(max=-1e-6)
    lse_q = torch.logsumexp(log_q_top, dim=-1).clamp(max=-1e-6)
    log_p_tail, log_q_tail = _log1mexp(lse_p), _log1mexp(lse_q)
    kl_top = (log_p_top.exp() * (log_p_top - log_q_top)).sum(-1)
    kl_tail = log_p_tail.exp() * (log_p_tail - log_q_tail)
    mask = valid.to(kl_top.dtype)
    return ((kl_top + kl_tail) * mask).sum() / mask.sum().clamp(min=1)


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, accurate near 0 and far from it."""
    return torch.where(x > -0.6931, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


# --- the objectives ---------------------------------------------------------------------------------------


class Objective:
    """Next-token prediction, and the base of every objective's loss: what the trainer asks of one.

    What the torch-free layers read (the model it trains, the store arrays it reads, its keys) is its
    declaration (`pipelines.objectives.declaration.ObjectiveSpec`), which names this class; the instance
    carries it as `spec`. An objective may own training-only parameters (`heads`): they train, resume and
    sync with the student and are left out of the exported model."""

    name: ClassVar[str] = "ntp"
    val_parts: ClassVar[tuple[str, ...]] = ()  # loss parts averaged over the val blocks as `val_<part>`

    def __init__(self, cfg: Config, spec: ObjectiveSpec | None = None):
        self.p = cfg.pretrain
        self.spec = spec or objective_spec(self.name)
        self.variant = self.spec.model  # the model variant it trains (`pipelines.model.gpt.preset`)
        self.reads = self.spec.arrays(cfg.pretrain)  # per-token arrays of the concept store it reads

    @classmethod
    def for_config(cls, cfg: Config, spec: ObjectiveSpec) -> Objective:
        """The loss for these settings: this class, or a subclass a setting picks."""
        return cls(cfg, spec)

    def setting(self, key: str) -> Any:
        """A `[pretrain]` key the objective declares (`ObjectiveSpec.settings`), or its default."""
        return setting_value(self.p, key)

    def model_overrides(self, n_concepts: int) -> dict[str, Any]:
        """Model settings the objective fixes (the concept head's width, how concepts are mixed)."""
        return {"mixing": "interleave"}

    def heads(self, student: nn.Module) -> dict[str, nn.Module]:
        """Training-only modules the loss uses (e.g. a head on the final hidden state), made after the
        student's own initialisation; the trainer keeps them in `student.objective_heads`. The objective
        may keep `student` to share its parts (its unembedding, `student.head`) in `auxiliary`."""
        return {}

    def check_store(self, store: Any, token_store: Any) -> int:
        """Refuse a concept store (`extract-concepts`) without the arrays this objective reads; returns the
        concept width it trains with (0: none). Called only for an objective that `reads`."""
        lacking = [array for array in self.reads if array not in store.arrays]
        if lacking:
            needs = [n for n in self.spec.needs if n.applies(self.p) and set(lacking) & set(n.arrays)]
            what = needs[0].what if needs else ", ".join(f"`{array}`" for array in lacking)
            declared = f" (declared in {self.spec.source})" if self.spec.source else ""
            rerun = "".join(f" {n.option()}" for n in needs)
            raise StageError(
                f"Objective `{self.spec.name}`{declared} needs {what}, which this concept store lacks. Run "
                f"`cocomix extract-concepts{rerun} --force`."
            )
        return 0

    def inputs(self, tokens: torch.Tensor, batch: Batch) -> dict[str, torch.Tensor]:
        """What the loss reads besides the tokens, from the batch's arrays (on the tokens' device, as
        `host_tensors` typed them); made before the forward pass."""
        return {name: batch[name] for name in self.reads}

    def loss(
        self, out: Any, tokens: torch.Tensor, inputs: Mapping[str, torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The training loss of the model's output `out` and its named parts (`ntp_loss`, ..., `loss`)."""
        ntp = next_token_loss(out.logits, tokens)
        parts = {"ntp_loss": ntp}
        loss = ntp
        for name, (value, weight) in self.auxiliary(out, tokens, inputs).items():
            parts[name] = value
            loss = loss + weight * value
        parts["loss"] = loss
        return loss, parts

    def auxiliary(
        self, out: Any, tokens: torch.Tensor, inputs: Mapping[str, torch.Tensor]
    ) -> dict[str, tuple[torch.Tensor, float]]:
        """Losses added to NTP, each with its weight. `out` has the student's `logits`, `concept_logits`
        (CoCoMix) and `hidden`, its last block's state before the final LayerNorm (`pipelines.model.gpt`)."""
        return {}


class Pause(Objective):
    """NTP with the pause model: learned pause slots where CoCoMix mixes in concepts (a baseline)."""

    name = "pause"


class CoCoMix(Objective):
    """NTP + `lam_concept` x the concept loss against the cached targets of `extract-concepts`."""

    name = "cocomix"
    val_parts = ("concept_loss",)

    @classmethod
    def for_config(cls, cfg, spec):
        by_activation = cls is CoCoMix and cfg.pretrain.concept_targets == "activation"
        return (CoCoMixByActivation if by_activation else cls)(cfg, spec)

    def model_overrides(self, n_concepts: int) -> dict[str, Any]:
        p = self.p
        return {"mixing": p.mixing, "n_concepts": n_concepts, "concept_k": min(p.concept_k, n_concepts)}

    def check_store(self, store, token_store) -> int:
        super().check_store(store, token_store)
        return store.n_concepts

    def auxiliary(self, out, tokens, inputs):
        loss = concept_loss(out.concept_logits, inputs["concept_ids"], inputs["valid"])
        return {"concept_loss": (loss, self.p.lam_concept)}


class CoCoMixByActivation(CoCoMix):
    """CoCoMix whose targets are the K most active SAE latents of each token instead of the K with the
    largest attribution (`pretrain.concept_targets = "activation"`, the paper's ablation of attribution).

    Read from the SAE top-k that `extract.store_sae_topk` stores (sorted here by activation, so the order on
    disk does not matter); K is `extract.concepts_per_token`, as for attribution targets, and the positions
    scored are the same (`valid`), so the two differ only in which latents they pick."""

    def __init__(self, cfg: Config, spec: ObjectiveSpec | None = None):
        super().__init__(cfg, spec)
        self.k = cfg.extract.concepts_per_token

    def inputs(self, tokens, batch):
        arrays = super().inputs(tokens, batch)
        order = arrays["sae_acts"].argsort(dim=-1, descending=True, stable=True)[..., : self.k]
        return {"concept_ids": arrays["sae_ids"].gather(-1, order), "valid": arrays["valid"]}


class OnlineCoCoMix(CoCoMix):
    """CoCoMix with targets computed in the loop by the teacher and SAE (`--online-teacher`, the official
    code's way); its concept loss on val is not reported (the targets are not cached to compare)."""

    val_parts = ()

    def __init__(self, cfg: Config, teacher: Any, sae: Any):
        super().__init__(cfg)
        self.reads = ()
        self.teacher, self.sae, self.extract = teacher, sae, cfg.extract

    def inputs(self, tokens, batch):
        from pipelines.concepts.targets import online_concept_targets

        e = self.extract
        ids, valid = online_concept_targets(
            self.teacher, self.sae, tokens, e.concepts_per_token, e.attribution
        )
        return {"concept_ids": ids, "valid": valid}


class KnowledgeDistillation(Objective):
    """NTP + `kd_coef` x KL(teacher || student) on the cached teacher top-N log-probs."""

    name = "kd"

    def check_store(self, store, token_store) -> int:
        super().check_store(store, token_store)
        teacher_vocab = store.attrs.get("teacher", {}).get("vocab_size")
        student_vocab = int(token_store.attrs["tokenizer"]["vocab_size"])
        if teacher_vocab is not None and teacher_vocab != student_vocab:
            raise InputError(
                "KD needs the teacher and the student to share a vocabulary: the teacher has "
                f"{teacher_vocab} tokens, the student (the token store's tokenizer) {student_vocab}."
            )
        return 0

    def auxiliary(self, out, tokens, inputs):
        kd = kd_loss(out.logits, inputs["teacher_ids"], inputs["teacher_logprobs"], inputs["valid"])
        return {"kd_loss": (kd, self.p.kd_coef)}


def host_tensors(batch: Mapping[str, np.ndarray], pin: bool = False) -> dict[str, torch.Tensor]:
    """A batch's stored arrays as the losses want them, still on the host: ids as int64, float16 values
    as float32, masks as bool; in page-locked memory when `pin`, so that the copy to a GPU is asynchronous."""
    tensors = {}
    for name, array in batch.items():
        if np.issubdtype(array.dtype, np.integer):
            array = array.astype(np.int64)
        elif np.issubdtype(array.dtype, np.floating):
            array = array.astype(np.float32)
        tensor = torch.from_numpy(array)
        tensors[name] = tensor.pin_memory() if pin else tensor
    return tensors


class ObjectiveLoss(nn.Module):
    """The student and its objective's loss as one module: what DDP wraps, FSDP shards at its root and
    `torch.compile` compiles.

    Compiled with the model, the cross-entropies over the (B, T, V) token logits and the (B, T, C) concept
    logits fuse their float32 upcast into the kernels that read the bfloat16 logits, where eagerly each
    `.float()` writes a float32 copy of the logits and the softmax and its backward read and write more.
    The student runs under autocast (`autocast`; None: float32), the loss outside it. The forward is the
    student's trunk, then `head_and_loss`: two calls, so that the head can be compiled with the loss where
    the blocks between cannot be traced (`pipelines.training.parallel`).
    """

    def __init__(self, student: nn.Module, objective: Objective, autocast: torch.dtype | None):
        super().__init__()
        self.student = student
        self.objective = objective  # not a module: it holds no parameters
        self.autocast = autocast

    def forward(
        self, tokens: torch.Tensor, inputs: Mapping[str, torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        with self._autocast(tokens):
            hidden, concept_logits = self.student.trunk(tokens)
        return self.head_and_loss(hidden, concept_logits, tokens, inputs)

    def head_and_loss(
        self,
        hidden: torch.Tensor,
        concept_logits: torch.Tensor | None,
        tokens: torch.Tensor,
        inputs: Mapping[str, torch.Tensor],
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The loss of the trunk's output: the student's head (under autocast), then the objective's loss."""
        with self._autocast(tokens):
            logits = self.student.head(hidden)
        return self.objective.loss(ModelOutput(logits, concept_logits, hidden), tokens, inputs)

    def _autocast(self, tokens: torch.Tensor):
        return torch.autocast(tokens.device.type, dtype=self.autocast, enabled=self.autocast is not None)


def objective_for(cfg: Config, online: tuple[Any, Any] | None = None) -> Objective:
    """The loss of `pretrain.objective`, from its declaration; CoCoMix with targets from `online` (teacher,
    sae) when given."""
    if online is not None:
        return OnlineCoCoMix(cfg, *online)
    spec = objective_spec(cfg.pretrain.objective)
    return load_loss(spec).for_config(cfg, spec)
