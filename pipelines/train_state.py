"""Training checkpoints of `pretrain`: everything a resumed run needs to continue bit for bit.

`checkpoints/step-000200/` holds the model folder (`config.json` + `model.safetensors`, loadable like any
saved model) and `trainer.pt` (optimizer state, step, RNG states, the stage fingerprint). A checkpoint is
written into a hidden temporary folder and renamed into place, then `checkpoints/latest` is rewritten
atomically to name it: a crash at any moment leaves the previous checkpoint as `latest`. Only the newest
`keep_last` are kept. The data position needs no saving: the batch of step s is a function of (seed, s).
"""

from __future__ import annotations

import io
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pipelines import artifacts

CHECKPOINTS_DIR = "checkpoints"
LATEST = "latest"
TRAINER_STATE = "trainer.pt"
_NAME = re.compile(r"^step-(\d{6,})$")


@dataclass(frozen=True)
class Checkpoint:
    path: Path
    step: int


class Checkpoints:
    def __init__(self, stage_dir: Path, keep_last: int):
        self.dir = Path(stage_dir) / CHECKPOINTS_DIR
        self.keep_last = keep_last

    def latest(self) -> Checkpoint | None:
        pointer = self.dir / LATEST
        if not pointer.exists():
            return None
        name = pointer.read_text().strip()
        match = _NAME.match(name)
        if match is None or not (self.dir / name / TRAINER_STATE).exists():
            return None
        return Checkpoint(self.dir / name, int(match.group(1)))

    def save(
        self, step: int, model_state: dict[str, torch.Tensor], model_config: dict, trainer_state: dict
    ) -> Checkpoint:
        from safetensors.torch import save_file

        from pipelines.checkpoint import CONFIG_FILE, MODEL_FORMAT, WEIGHTS_FILE

        name = f"step-{step:06d}"
        final, tmp = self.dir / name, self.dir / f".tmp-{name}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_file(
            {k: v.detach().contiguous().cpu() for k, v in model_state.items()},
            str(tmp / WEIGHTS_FILE),
            metadata={"format": MODEL_FORMAT},
        )
        artifacts.atomic_write_json(tmp / CONFIG_FILE, {"format": MODEL_FORMAT, "model": model_config})
        buffer = io.BytesIO()
        torch.save(trainer_state, buffer)
        artifacts.atomic_write_bytes(tmp / TRAINER_STATE, buffer.getvalue())
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        artifacts.atomic_write_bytes(self.dir / LATEST, (name + "\n").encode())
        self._prune(keep=name)
        return Checkpoint(final, step)

    def load(self, checkpoint: Checkpoint) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        from safetensors.torch import load_file

        from pipelines.checkpoint import WEIGHTS_FILE

        model_state = load_file(str(checkpoint.path / WEIGHTS_FILE), device="cpu")
        trainer_state = torch.load(checkpoint.path / TRAINER_STATE, map_location="cpu", weights_only=False)
        return model_state, trainer_state

    def _prune(self, keep: str) -> None:
        found = sorted(
            (int(m.group(1)), p) for p in self.dir.iterdir() if (m := _NAME.match(p.name)) and p.is_dir()
        )
        for _, path in found[: max(0, len(found) - self.keep_last)]:
            if path.name != keep:
                shutil.rmtree(path, ignore_errors=True)
        for stale in self.dir.glob(".tmp-step-*"):
            shutil.rmtree(stale, ignore_errors=True)


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
