"""Objectives declared once: `declaration` (what an objective is: its name, model, store arrays, keys,
needs and FLOPs; the registry every layer reads), `builtin` (the registration line of each built-in),
`plugins` (objectives from the user's own files, `pretrain.plugins`). None of these imports torch: the config
checks and the planner read them. Each loss lives in the module its declaration names (`module:Class`),
imported by the trainer alone: `pipelines.training.objectives` for the paper's, `pipelines.training.mtp` for
multi-token prediction. A layer of the config's height: it reads `config.schema` and nothing above."""
