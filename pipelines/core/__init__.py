"""What every stage shares and no stage owns: the `stage_registry` (every step of `cocomix run`, declared
once), the run folder's `layout` (every stage and file name), the stage `session` (manifest, decisions,
`StageResult`) and its `locks`, `files` (atomic writes, JSON lines), `fingerprints`, output `integrity`,
`assets` (pypi: specs), the `hub`, `devices`, `distributed` ranks, `failpoints` for the kill tests, `plot`,
and `stage_inputs` (which config values each stage reads)."""
