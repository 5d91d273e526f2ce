"""cocomix library: the stages of CoCoMix pretraining and the pieces they share.

Nothing here imports the CLI; every stage is `pipelines.<stage>.run(cfg, ...) -> summary`.
"""

__version__ = "0.1.0"
