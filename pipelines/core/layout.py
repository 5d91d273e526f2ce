"""The run folder's layout: every stage folder and every file other stages read, named once.

A run folder holds `run.json` and one subfolder per stage; each stage folder has a `manifest.json`. Code that
needs a stage or file name takes it from here, so that renaming one is a one-line change.
"""

from __future__ import annotations

from pathlib import Path

RUN_MARKER = "run.json"


MANIFEST = "manifest.json"


# Stage folders and the outputs other stages read from them: named here once.
PREPARE_STAGE, TRAIN_SAE_STAGE, EXTRACT_STAGE = "prepare", "train-sae", "extract-concepts"


TOKENS_STORE = "tokens.zarr"  # in prepare/


TRAINED_SAE = "sae"  # the SAELens folder in train-sae/


CONCEPTS_STORE = "concepts.zarr"  # in extract-concepts/


FINAL_MODEL = "model"  # in each pretrain-OBJECTIVE/


EVAL_STAGE = "eval"
DICTIONARY_STAGE = "concepts"  # `cocomix concepts build` writes its dictionary here


EVAL_RESULTS = {"cocomix": "results.json", "lm-eval": "results-lm-eval.json"}  # in eval/, per backend


CHUNKS_DIR = "chunks"


# Stages in pipeline order, always listed by `cocomix status`; per-objective stages (`pretrain-ntp`,
# ...) are listed once they exist.
STAGES = (PREPARE_STAGE, TRAIN_SAE_STAGE, EXTRACT_STAGE)


def eval_results_path(run_dir: Path | str, backend: str) -> Path:
    """Where an eval backend writes its results (each backend keeps its own file)."""
    return Path(run_dir) / EVAL_STAGE / EVAL_RESULTS[backend]


def pretrain_stage(objective: str, online_teacher: bool = False) -> str:
    """The folder of one student: `pretrain-cocomix`, `pretrain-cocomix-online`, ..."""
    return f"pretrain-{objective}" + ("-online" if online_teacher else "")


def stage_command(stage: str) -> str:
    """The command that (re)makes a stage folder: `pretrain-kd` is `cocomix pretrain --objective kd`."""
    if stage.startswith("pretrain-"):
        objective, _, online = stage.removeprefix("pretrain-").partition("-")
        return f"cocomix pretrain --objective {objective}" + (" --online-teacher" if online else "")
    return f"cocomix {stage}"
