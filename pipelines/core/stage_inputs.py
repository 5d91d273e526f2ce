"""The config values each stage's output depends on.

A stage records them in its manifest; `cocomix run` compares them with the config before it runs anything,
and every stage compares the values of the stages it reads from, so `cocomix pretrain --set
data.block_size=32` on a finished run is refused as `cocomix run` would refuse it, instead of training on
blocks of the old size. One place owns the lists, so the three checks never disagree.
"""

from __future__ import annotations

from typing import Any

from pipelines.config.schema import Config
from pipelines.core.fingerprints import fingerprint_fields


def prepare(cfg: Config) -> dict[str, Any]:
    return fingerprint_fields(cfg.data, "data")


# Keys added after runs were recorded without them, left out at the value those runs had, so that adding a
# key changes no finished run's fingerprint.
LEFT_OUT_AT_DEFAULT = {"sae.architecture": "topk"}


def train_sae(cfg: Config) -> dict[str, Any]:
    return {
        **fingerprint_fields(cfg.teacher, "teacher"),
        **{
            k: v
            for k, v in fingerprint_fields(cfg.sae, "sae").items()
            if k != "sae.path" and not (k in LEFT_OUT_AT_DEFAULT and LEFT_OUT_AT_DEFAULT[k] == v)
        },
        "run.seed": cfg.run.seed,
    }


def extract_concepts(cfg: Config) -> dict[str, Any]:
    return {**fingerprint_fields(cfg.teacher, "teacher"), **fingerprint_fields(cfg.extract, "extract")}


def pretrain(cfg: Config) -> dict[str, Any]:
    """A student's: its `[pretrain]` fields, the keys its objective declares, and a plugin objective's file
    content (so that editing the file makes its students out of date, and no other)."""
    from pipelines.objectives.declaration import objective_spec
    from pipelines.objectives.plugins import plugin_digest

    p = cfg.pretrain
    spec = objective_spec(p.objective)
    inputs = {k: v for k, v in fingerprint_fields(p, "pretrain").items() if "batch_blocks" not in k}
    inputs.update({f"pretrain.{k}": p.objective_settings.get(k, s.default) for k, s in spec.settings.items()})
    if spec.source:
        inputs["pretrain.plugin_sha256"] = plugin_digest(spec.source)
    return inputs
