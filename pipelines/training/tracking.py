"""Optional experiment trackers for `pretrain`: TensorBoard and Weights & Biases, when configured.

`metrics.jsonl` is always written; these only mirror its rows, under the row's `kind` (`train/loss`,
`val/val_ppl`) at the row's step. Both write inside the stage folder, so `--force` clears them with the
rest: TensorBoard event files in `tensorboard/`, the W&B run in `wandb/` (offline by default, for
`wandb sync` later). A resumed run continues both: TensorBoard hides what the interrupted run logged after
the checkpoint it resumes from (`purge_step`), and W&B reopens the same run, whose id `wandb/run_id` keeps.
A tracker that is configured but not installed is a config error at start, not a crash hours later.
"""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import Any

from pipelines.config.schema import PretrainConfig
from pipelines.core.files import atomic_write_bytes
from pipelines.errors import ConfigError

TENSORBOARD_DIR = "tensorboard"
WANDB_DIR = "wandb"  # wandb.init(dir=stage folder) writes here
WANDB_RUN_ID = "run_id"  # in WANDB_DIR
INSTALL = 'pip install -e ".[tracking]"'


class Trackers:
    def __init__(
        self, p: PretrainConfig, stage_dir: Path, start_step: int, run_name: str, config: dict[str, Any]
    ):
        self._tensorboard = self._wandb = None
        if p.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise ConfigError(
                    f"`pretrain.tensorboard = true` needs the `tensorboard` package: `{INSTALL}` "
                    "(or `pip install tensorboard`), or set it to false."
                ) from None
            # Hide what an interrupted attempt logged past the checkpoint this run resumes from (the rows of
            # the checkpoint's own step were logged before it was saved, and stay); a fresh run hides all,
            # which matters when an attempt stopped before its first checkpoint left events behind.
            purge_step = start_step + 1 if start_step > 0 else 0
            self._tensorboard = SummaryWriter(str(stage_dir / TENSORBOARD_DIR), purge_step=purge_step)
        if p.wandb_project and p.wandb_mode != "disabled":
            try:
                import wandb
            except ImportError:
                raise ConfigError(
                    f'`pretrain.wandb_project = "{p.wandb_project}"` needs the `wandb` package: `{INSTALL}` '
                    '(or `pip install wandb`), or set it to "".'
                ) from None
            self._wandb = wandb.init(
                project=p.wandb_project,
                name=run_name,
                config=config,
                dir=str(stage_dir),
                mode=p.wandb_mode,
                id=_wandb_run_id(stage_dir / WANDB_DIR, start_step),
                resume="allow",
            )

    def log(self, row: dict[str, Any]) -> None:
        values = {
            f"{row['kind']}/{k}": v
            for k, v in row.items()
            if k not in ("kind", "step") and isinstance(v, (int, float))
        }
        if self._tensorboard is not None:
            for key, value in values.items():
                self._tensorboard.add_scalar(key, value, row["step"])
        if self._wandb is not None:
            self._wandb.log(values, step=row["step"])

    def close(self) -> None:
        if self._tensorboard is not None:
            self._tensorboard.close()
        if self._wandb is not None:
            self._wandb.finish()


def _wandb_run_id(folder: Path, start_step: int) -> str:
    """The W&B run to log to: the stage's own when it resumes, a new one when it starts from step 0 (W&B
    drops steps below those a run has, so an attempt that restarts from 0 cannot reuse it)."""
    path = folder / WANDB_RUN_ID
    if start_step > 0 and path.is_file() and path.read_text().strip():
        return path.read_text().strip()
    folder.mkdir(parents=True, exist_ok=True)
    run_id = secrets.token_hex(4)  # W&B's own ids: 8 characters of [a-z0-9]
    atomic_write_bytes(path, f"{run_id}\n".encode())
    return run_id
