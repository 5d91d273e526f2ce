"""The pipeline's stages, one module each: `prepare`, `train_sae`, `extract`, `pretrain`, `evaluate`, `steer`,
`report`, and `workflow`, which chains them for `cocomix run`. A stage is a `run(cfg, ...) -> StageResult`
built from the building blocks; it never imports another stage."""
