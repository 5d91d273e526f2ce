"""Evaluation: `tasks` (each task's requests, metrics and data files), `scoring` (log-likelihoods of a
model folder or a transformers LM), `lmeval` (the lm-evaluation-harness adapter)."""
