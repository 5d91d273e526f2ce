"""The run folder's layout: every stage folder and every file other stages read, named once.

A run folder holds `run.json` and one subfolder per stage; each stage folder has a `manifest.json`. Code that
needs a stage or file name takes it from here, so that renaming one is a one-line change (a stage's folder is
declared with the stage, in `stage_registry`).
"""

from __future__ import annotations

import re
from pathlib import Path

from pipelines.core.stage_registry import spec_of_folder, stage_folder
from pipelines.objectives.declaration import objective_names

RUN_MARKER = "run.json"


MANIFEST = "manifest.json"


# Stage folders (declared with their stages in `stage_registry`) and the outputs other stages read from them.
PREPARE_STAGE = stage_folder("prepare")
TRAIN_SAE_STAGE = stage_folder("train-sae")
EXTRACT_STAGE = stage_folder("extract-concepts")


TOKENS_STORE = "tokens.zarr"  # in prepare/


TRAINED_SAE = "sae"  # the SAELens folder in train-sae/


CONCEPTS_STORE = "concepts.zarr"  # in extract-concepts/


FINAL_MODEL = "model"  # in each pretrain-OBJECTIVE/
HF_MODEL = "hf"  # beside it: the same student as a transformers folder (`pipelines.model.hf_export`)


EVAL_STAGE = stage_folder("eval")
STEER_STAGE = stage_folder("steer")
STEER_DEMO = "demo.json"  # in steer/: the demo's inspection and sweeps, which the report reads
DICTIONARY_STAGE = "concepts"  # `cocomix concepts build` writes its dictionary here


EVAL_RESULTS = {"cocomix": "results.json", "lm-eval": "results-lm-eval.json"}  # in eval/, per backend


CHUNKS_DIR = "chunks"


# Stages in pipeline order, always listed by `cocomix status`; per-objective stages (`pretrain-ntp`,
# ...) are listed once they exist.
STAGES = (PREPARE_STAGE, TRAIN_SAE_STAGE, EXTRACT_STAGE)


def eval_results_path(run_dir: Path | str, backend: str) -> Path:
    """Where an eval backend writes its results (each backend keeps its own file)."""
    return Path(run_dir) / EVAL_STAGE / EVAL_RESULTS[backend]


def pretrain_stage(name: str, online_teacher: bool = False, seed: int | None = None) -> str:
    """The folder of one student: `pretrain-cocomix`, `pretrain-cocomix-online`, `pretrain-ntp-seed1`, ...

    `name` is an objective or a variant (`[run.variants.NAME]`, no `-` in it); `seed` is the student's own
    seed when it has one (`run.seeds`, `pretrain.seed`), None when it takes `run.seed`."""
    return (
        f"pretrain-{name}"
        + ("-online" if online_teacher else "")
        + (f"-seed{seed}" if seed is not None else "")
    )


def student_stage(cfg, online_teacher: bool = False) -> str:
    """The folder of the student a config trains (`pipelines.config.students`): its variant or objective,
    and its own seed when `pretrain.seed` gives one."""
    from pipelines.config.students import student_name

    seed = cfg.pretrain.seed
    return pretrain_stage(student_name(cfg), online_teacher, seed if seed >= 0 else None)


def stage_command(stage: str) -> str:
    """The command that (re)makes a stage folder: `pretrain-kd` is `cocomix pretrain --objective kd`, a
    variant's `pretrain-cocomix_add-seed1` is `cocomix pretrain --variant cocomix_add --seed 1`, a stage that
    has no command of its own is `cocomix run --from STEP --until STEP`."""
    if stage.startswith("pretrain-"):
        name, *suffixes = stage.removeprefix("pretrain-").split("-")
        flag = "--objective" if name in objective_names() else "--variant"
        command = f"cocomix pretrain {flag} {name}"
        for suffix in suffixes:
            if suffix == "online":
                command += " --online-teacher"
            elif suffix.startswith("seed"):
                command += f" --seed {suffix.removeprefix('seed')}"
        return command
    spec = spec_of_folder(stage)
    if spec is not None and spec.command is None:
        return f"cocomix run --from {spec.step} --until {spec.step}"
    return f"cocomix {spec.command if spec else stage}"


_SEEDED_STAGE = re.compile(r"^pretrain-.+-seed(\d+)$")


def seeded_student(path: Path, seeds: list[int] | None = None) -> Path:
    """`RUN/pretrain-NAME` (or its `model/`) of a run that trains NAME per seed: the first seed's folder, as
    every command that names no seed reads it. `seeds` is the run's `run.seeds` when known (its first that
    exists wins), else the lowest seed on disk. Any other path, or one that exists, is returned as given."""
    stage_dir = path.parent if path.name == "model" else path
    if path.exists() or not stage_dir.name.startswith("pretrain-") or _SEEDED_STAGE.match(stage_dir.name):
        return path
    on_disk = sorted(
        int(m.group(1))
        for p in stage_dir.parent.glob(f"{stage_dir.name}-seed*")
        if (m := _SEEDED_STAGE.match(p.name)) and p.name == f"{stage_dir.name}-seed{m.group(1)}"
    )
    order = [s for s in seeds or [] if s in on_disk] or on_disk
    if not order:
        return path
    seeded = stage_dir.parent / f"{stage_dir.name}-seed{order[0]}"
    return seeded / "model" if path.name == "model" else seeded
