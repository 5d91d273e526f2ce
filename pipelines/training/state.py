"""Training checkpoints of `pretrain` and `train-sae`: what a resumed run needs to continue bit for bit.

`checkpoints/step-000200/` holds the model folder (`config.json` + `model.safetensors`; pretrain's loads like
any saved model, train-sae's holds the SAE's state), `trainer.pt` (optimizer state, step, RNG states, the
stage fingerprint) and `digests.json` (the sha256 of those files). A checkpoint is written into a hidden
temporary folder and renamed into place, then `checkpoints/latest` is rewritten atomically to name it, for
people and tools. Resuming does not trust that pointer: it takes the newest `step-*` folder whose files match
their digests, and falls back to the one before when a file is damaged, so a garbage pointer or a truncated
checkpoint costs at most the steps since the previous one. Only the newest `keep_last` are kept. The data
position needs no saving: the batch of step s is a function of (seed, s).
"""

from __future__ import annotations

import io
import logging
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pipelines.core.failpoints import kill_point
from pipelines.core.files import atomic_write_bytes, atomic_write_json, read_json, save_safetensors
from pipelines.core.integrity import sha256_file
from pipelines.errors import StageError, first_line

log = logging.getLogger(__name__)

CHECKPOINTS_DIR = "checkpoints"
LATEST = "latest"
TRAINER_STATE = "trainer.pt"
DIGESTS = "digests.json"
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
        """The newest checkpoint on disk (a `step-*` folder exists only once complete), unverified."""
        found = self._all()
        return found[0] if found else None

    def _all(self) -> list[Checkpoint]:
        """Every complete checkpoint, newest first."""
        if not self.dir.is_dir():
            return []
        found = [
            Checkpoint(p, int(m.group(1)))
            for p in self.dir.iterdir()
            if (m := _NAME.match(p.name)) and (p / TRAINER_STATE).exists()
        ]
        return sorted(found, key=lambda c: c.step, reverse=True)

    def load_newest_intact(self) -> tuple[Checkpoint, dict[str, torch.Tensor], dict[str, Any]]:
        """The newest checkpoint whose files match their digests and load, with its states; a damaged one is
        named in a warning and passed over for the one before it."""
        for checkpoint in self._all():
            problem = _damage(checkpoint.path)
            if problem is None:
                try:
                    return checkpoint, *self.load(checkpoint)
                except Exception as exc:  # torn files that predate digests fail to decode
                    problem = f"it cannot be read ({first_line(exc)[:200]})"
            log.warning(
                "checkpoint %s is damaged: %s; falling back to the one before it", checkpoint.path, problem
            )
        raise StageError(f"No intact checkpoint in {self.dir} to resume from. Start over with --force.")

    def save(
        self,
        step: int,
        model_state: dict[str, torch.Tensor],
        model_config: dict,
        trainer_state: dict,
        model_format: str | None = None,
    ) -> Checkpoint:
        """`model_format` names what `config.json` describes when it is not a cocomix model (an SAE)."""
        from pipelines.model.checkpoint import CONFIG_FILE, MODEL_FORMAT, WEIGHTS_FILE

        model_format = model_format or MODEL_FORMAT

        name = f"step-{step:06d}"
        final, tmp = self.dir / name, self.dir / f".tmp-{name}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        try:
            save_safetensors(
                {k: v.detach().contiguous().cpu() for k, v in model_state.items()},
                tmp / WEIGHTS_FILE,
                metadata={"format": model_format},
            )
            atomic_write_json(tmp / CONFIG_FILE, {"format": model_format, "model": model_config})
            buffer = io.BytesIO()
            torch.save(trainer_state, buffer)
            atomic_write_bytes(tmp / TRAINER_STATE, buffer.getvalue())
            atomic_write_json(
                tmp / DIGESTS,
                {f: sha256_file(tmp / f) for f in (WEIGHTS_FILE, CONFIG_FILE, TRAINER_STATE)},
            )
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)  # a full disk: free what the half-written copy holds
            raise
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        kill_point(f"checkpoint:{name}:renamed")
        atomic_write_bytes(self.dir / LATEST, (name + "\n").encode())
        kill_point(f"checkpoint:{name}:latest")
        self._prune(keep=name)
        return Checkpoint(final, step)

    def load(self, checkpoint: Checkpoint) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        from safetensors.torch import load_file

        from pipelines.model.checkpoint import WEIGHTS_FILE

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


def _damage(folder: Path) -> str | None:
    """What is wrong with a checkpoint's files, or None when each matches its recorded digest."""
    try:
        digests = read_json(folder / DIGESTS)
    except ValueError:  # torn or overwritten: JSON and UTF-8 decoding errors alike
        return f"{DIGESTS} cannot be read"
    if digests is None:
        return None  # written before digests existed: loading it is the only check
    for name, expected in digests.items():
        if not (folder / name).exists():
            return f"{name} is missing"
        if sha256_file(folder / name) != expected:
            return f"{name} does not match its digest"
    return None


def rng_state(device: torch.device) -> dict[str, Any]:
    """This process's generators: the CPU's, and its own GPU's only (every visible GPU's would make each
    rank open a context on all of them)."""
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type != "cuda" or "cuda" not in state:
        return
    cuda = state["cuda"]
    if isinstance(cuda, list):  # written before states were per rank: one per visible GPU
        if device.index is None or device.index >= len(cuda):
            return
        cuda = cuda[device.index]
    torch.cuda.set_rng_state(cuda, device)
