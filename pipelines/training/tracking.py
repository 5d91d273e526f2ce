"""Optional experiment trackers for `pretrain`: TensorBoard and Weights & Biases, when configured.

`metrics.jsonl` is always written; these only mirror its rows. A tracker that is configured but not
installed is a config error at start, not a crash hours later.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipelines.errors import ConfigError


class Trackers:
    def __init__(
        self, tensorboard_dir: Path | None, wandb_project: str, run_name: str, config: dict[str, Any]
    ):
        self._tensorboard = self._wandb = None
        if tensorboard_dir is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise ConfigError(
                    "`pretrain.tensorboard = true` needs the `tensorboard` package: "
                    "`pip install tensorboard`, or set it to false."
                ) from None
            self._tensorboard = SummaryWriter(str(tensorboard_dir))
        if wandb_project:
            try:
                import wandb
            except ImportError:
                raise ConfigError(
                    f'`pretrain.wandb_project = "{wandb_project}"` needs the `wandb` package: `pip install '
                    'wandb`, or set it to "".'
                ) from None
            self._wandb = wandb.init(project=wandb_project, name=run_name, config=config)

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
