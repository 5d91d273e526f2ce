"""`cocomix steer` and the steering demo of `cocomix run`: what a CoCoMix student predicts, and what
amplifying it does.

`inspect` and `steer` are the command's two modes: the top predicted concepts at each prompt token, and
continuations with and without amplified concepts (also in the teacher, at its SAE hook, with `--teacher`).

For each prompt of `steer.demo_prompts`: the top concepts at every prompt token (`cocomix steer --inspect`),
then a sweep over `steer.demo_scales` of the concept the model predicts most strongly at the last token
(`cocomix steer --concept ID --sweep ...`), with the concept's label from the run's dictionary. The
dictionary is built first when the concept store has the SAE's activations (`extract.store_sae_topk`).
The demo is written as the `steer` stage (`steer/demo.json` and its manifest), so a finished demo is not
redone.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Any

from pipelines.config.schema import Config
from pipelines.config.students import first_student
from pipelines.core.files import atomic_write_json
from pipelines.core.fingerprints import fingerprint_fields
from pipelines.core.layout import (
    CONCEPTS_STORE,
    EXTRACT_STAGE,
    FINAL_MODEL,
    STEER_DEMO,
    STEER_STAGE,
    stage_command,
    student_stage,
)
from pipelines.core.session import StageResult, StageSession, Upstream, finished_output, finished_upstream
from pipelines.errors import ConfigError

log = logging.getLogger(__name__)

STAGE = STEER_STAGE


def demo_student_stage(cfg: Config) -> str:
    """The run's CoCoMix student: the first `cocomix` of `run.objectives`, at its first seed."""
    student = first_student(cfg, "cocomix")
    return student_stage(student.cfg if student else cfg)


def run(cfg: Config) -> StageResult:
    run_dir = Path(cfg.run.dir)
    stage = demo_student_stage(cfg)
    with contextlib.ExitStack() as reading:
        student = reading.enter_context(
            finished_upstream(
                run_dir,
                stage,
                FINAL_MODEL,
                missing=f"{run_dir} has no finished `{stage}`. Run `{stage_command(stage)}`.",
            )
        )
        concepts = None
        if finished_output(run_dir, EXTRACT_STAGE, CONCEPTS_STORE):  # optional: labels
            concepts = reading.enter_context(finished_upstream(run_dir, EXTRACT_STAGE, CONCEPTS_STORE))
        input_artifacts = {
            stage: student.fingerprint,
            **({EXTRACT_STAGE: concepts.fingerprint} if concepts else {}),
        }
        inputs = {k: v for k, v in fingerprint_fields(cfg.steer, "steer").items() if k != "steer.model"}
        # The demo is cheap and derived, like eval: another student or setting redoes it, without --force.
        with StageSession(
            run_dir, STAGE, inputs, input_artifacts=input_artifacts, rerun_on_change=True
        ) as session:
            if not session.up_to_date:
                demo = _demo(cfg, student.path, run_dir, concepts)
                atomic_write_json(session.dir / STEER_DEMO, demo)
                session.complete({"demo": str(session.dir / STEER_DEMO), "prompts": demo["prompts"]})
            return StageResult(STAGE, session.dir, session.up_to_date, session.summary, session.fingerprint)


def _demo(cfg: Config, model_dir: Path, run_dir: Path, concepts: Upstream | None) -> dict[str, Any]:
    from pipelines.core.devices import resolve_device
    from pipelines.data.concept_store import ConceptStore
    from pipelines.model.steering import SteeringModel, sweep
    from pipelines.sae import dictionary

    if concepts and "sae_ids" in ConceptStore.open(concepts.path).arrays:
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


def inspect(cfg: Config, prompts: list[str], device: str) -> list[dict[str, Any]]:
    """The top `steer.top_concepts` predicted concepts after each token of each prompt, with their labels."""
    model, labels = _student(cfg, device)
    results = [{"prompt": p, "tokens": model.inspect(p, cfg.steer.top_concepts)} for p in prompts]
    for result in results:
        for row in result["tokens"]:
            for concept in row["concepts"]:
                concept["label"] = labels.get(concept["id"], "")
    return results


def steer(
    cfg: Config,
    prompts: list[str],
    concept_ids: list[int],
    scales: list[float],
    set_value: float | None,
    device: str,
    with_teacher: bool = False,
) -> list[dict[str, Any]]:
    """One unsteered and one steered continuation per scale (or the pinned `set_value`) for each prompt,
    the teacher's too with `with_teacher`; each result carries the concepts' labels."""
    from pipelines.model.steering import sweep

    model, labels = _student(cfg, device)
    results = [sweep(model, p, cfg.steer, concept_ids, scales, set_value) for p in prompts]
    if with_teacher:
        if not scales:
            raise ConfigError("--teacher steering takes --scale or --sweep (not --set-value).")
        _steer_teacher(cfg, results, prompts, concept_ids, scales, device)
    for result in results:
        result["labels"] = {str(c): labels.get(c, "") for c in concept_ids}
    return results


def _student(cfg: Config, device: str):
    """The CoCoMix student to steer (`steer.model`, else this run's) and the run's concept labels."""
    from pipelines.model.steering import SteeringModel
    from pipelines.sae import dictionary

    spec = cfg.steer.model or str(Path(cfg.run.dir) / demo_student_stage(cfg) / FINAL_MODEL)
    # The labels are empty until `cocomix concepts build`.
    return SteeringModel.load(spec, device), dictionary.labels(Path(cfg.run.dir))


def _steer_teacher(cfg: Config, results, prompts, concept_ids, scales, device: str) -> None:
    from pipelines.concepts.targets import resolve_sae_path
    from pipelines.concepts.teacher import load_teacher
    from pipelines.core.assets import resolve_assets
    from pipelines.model.steering import teacher_sweep
    from pipelines.sae.formats import load_sae

    with contextlib.ExitStack() as reading:  # this run's trained SAE, held while it loads
        sae_cfg, _ = resolve_sae_path(resolve_assets(cfg), reading)
        t = sae_cfg.teacher
        hooked = load_teacher(t.model, t.layer, t.hook, device, t.dtype, t.tokenizer)
        sae = load_sae(sae_cfg.sae.path).sae.to(device).eval()
    for result, prompt in zip(results, prompts, strict=True):
        result["runs"] += teacher_sweep(hooked, sae, prompt, cfg.steer, concept_ids, scales)["runs"]
