"""The steering demo of `cocomix run`: what the CoCoMix student predicts, and what amplifying it does.

For each prompt of `steer.demo_prompts`: the top concepts at every prompt token (`cocomix steer --inspect`),
then a sweep over `steer.demo_scales` of the concept the model predicts most strongly at the last token
(`cocomix steer --concept ID --sweep ...`), with the concept's label from the run's dictionary. The
dictionary is built first when the concept store has the SAE's activations (`extract.store_sae_topk`).
Written as the `steer` stage (`steer/demo.json` and its manifest), so a finished demo is not redone.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Any

from pipelines import artifacts
from pipelines.config import Config, fingerprint_fields

log = logging.getLogger(__name__)

STAGE = "steer"
DEMO = "demo.json"
STUDENT_STAGE = artifacts.pretrain_stage("cocomix")


def run(cfg: Config) -> artifacts.StageResult:
    run_dir = Path(cfg.run.dir)
    with contextlib.ExitStack() as reading:
        student = reading.enter_context(
            artifacts.finished_upstream(
                run_dir,
                STUDENT_STAGE,
                artifacts.FINAL_MODEL,
                missing=f"{run_dir} has no finished `{STUDENT_STAGE}`. Run `cocomix pretrain --objective "
                "cocomix`.",
            )
        )
        concepts = None
        if artifacts.finished_output(
            run_dir, artifacts.EXTRACT_STAGE, artifacts.CONCEPTS_STORE
        ):  # optional: labels
            concepts = reading.enter_context(
                artifacts.finished_upstream(run_dir, artifacts.EXTRACT_STAGE, artifacts.CONCEPTS_STORE)
            )
        input_artifacts = {
            STUDENT_STAGE: student.fingerprint,
            **({artifacts.EXTRACT_STAGE: concepts.fingerprint} if concepts else {}),
        }
        inputs = {k: v for k, v in fingerprint_fields(cfg.steer, "steer").items() if k != "steer.model"}
        with artifacts.StageSession(run_dir, STAGE, inputs, input_artifacts=input_artifacts) as session:
            if not session.up_to_date:
                demo = _demo(cfg, student.path, run_dir, concepts)
                artifacts.atomic_write_json(session.dir / DEMO, demo)
                session.complete({"demo": str(session.dir / DEMO), "prompts": demo["prompts"]})
            return artifacts.StageResult(
                STAGE, session.dir, session.up_to_date, session.summary, session.fingerprint
            )


def _demo(cfg: Config, model_dir: Path, run_dir: Path, concepts: artifacts.Upstream | None) -> dict[str, Any]:
    import zarr

    from pipelines import dictionary
    from pipelines.devices import resolve_device
    from pipelines.steering import SteeringModel, sweep

    if concepts and "sae_ids" in zarr.open_group(str(concepts.path), mode="r").attrs.get("arrays", []):
        dictionary.build(run_dir, concepts=concepts)  # held and verified above: not hashed again
    labels = dictionary.labels(run_dir)
    model = SteeringModel.load(str(model_dir), resolve_device("auto"))
    s = cfg.steer
    prompts = []
    for prompt in s.demo_prompts:
        rows = model.inspect(prompt, s.top_concepts)
        for row in rows:
            for concept in row["concepts"]:
                concept["label"] = labels.get(concept["id"], "")
        top = rows[-1]["concepts"][0]["id"]
        result = sweep(model, prompt, s, [top], scales=list(s.demo_scales))
        prompts.append({**result, "label": labels.get(top, ""), "inspect": rows})
        log.info("steer demo %r: concept %d (%s)", prompt, top, labels.get(top, "no label"))
    return {"model": str(model_dir), "prompts": prompts}
