"""The built-in objectives, one declaration each in `BUILTIN`, registered in this order: the paper's four
(their losses in `pipelines.training.objectives`) and the controls added since, each loss in a module of its
own. Adding a built-in objective is its module and one entry here (docs/DEVELOPMENT.md, "Adding an
objective")."""

from __future__ import annotations

from pipelines.config.schema import NON_NEGATIVE
from pipelines.objectives.spec import Need, ObjectiveSpec, Setting

PAPER = "pipelines.training.objectives"

SAE_TOPK = Need(
    "extract.store_sae_topk",
    "true",
    "the SAE top-k of the extraction",
    ("sae_ids", "sae_acts"),
    when=lambda p: p.concept_targets == "activation",
)
TEACHER_TOPK = Need(
    "extract.store_teacher_topk",
    "32",
    "the teacher's top-N log-probs",
    ("teacher_ids", "teacher_logprobs"),
    flag="--store-teacher-topk 32",
)


def _cocomix_reads(p) -> tuple[str, ...]:
    return ("sae_ids", "sae_acts", "valid") if p.concept_targets == "activation" else ("concept_ids", "valid")


BUILTIN: tuple[ObjectiveSpec, ...] = (
    ObjectiveSpec("ntp", f"{PAPER}:Objective", "next-token prediction"),
    ObjectiveSpec(
        "cocomix",
        f"{PAPER}:CoCoMix",
        "NTP + lam_concept x the concept loss, concepts mixed into the hidden states",
        model="cocomix",
        reads=_cocomix_reads,
        owns=("insert_layer", "n_concepts", "concept_k", "mixing", "concept_targets", "lam_concept"),
        needs=(SAE_TOPK,),
    ),
    ObjectiveSpec(
        "kd",
        f"{PAPER}:KnowledgeDistillation",
        "NTP + kd_coef x KL to the cached teacher top-N",
        reads=("teacher_ids", "teacher_logprobs", "valid"),
        owns=("kd_coef",),
        needs=(TEACHER_TOPK,),
    ),
    ObjectiveSpec(
        "pause", f"{PAPER}:Pause", "NTP with learned pause slots", model="pause", owns=("insert_layer",)
    ),
    ObjectiveSpec(
        "mtp",
        "pipelines.training.mtp:MultiTokenPrediction",
        "NTP + mtp_coef x the loss of a head that predicts token t+2 (Gloeckle et al., 2024)",
        settings={
            "mtp_coef": Setting(0.1, "MTP: weight of the loss of token t+2 (as `lam_concept`).", NON_NEGATIVE)
        },
        # One block on T tokens, then the shared unembedding (`pipelines.model.flops`' terms).
        extra_flops=lambda c, seq_len: (
            24 * c.n_embd**2 + 4 * c.n_embd * seq_len + 2 * c.n_embd * c.vocab_size
        ),
    ),
)
