"""The pipeline's stages, one module each: `prepare`, `train_sae`, `extract`, `pretrain`, `evaluate`, `steer`,
`report`, `export`, and `workflow`, which chains them for `cocomix run`. A stage is a `run(cfg, ...) ->
StageResult` built from the building blocks (`export`, run on one model folder rather than a config, returns
its summary); it never imports another stage."""
