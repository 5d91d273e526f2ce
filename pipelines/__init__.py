"""cocomix library: the stages of CoCoMix pretraining and the building blocks they share.

Layers, each importing only those below it: `errors` and `config`; `core` (the run folder, sessions, files);
the building blocks `data`, `model`, `sae`, `concepts`, `training`, `eval`; and `stages`, one module per
stage, each `pipelines.stages.<stage>.run(cfg, ...) -> StageResult`. Nothing here imports the CLI.
"""

__version__ = "0.1.0"
