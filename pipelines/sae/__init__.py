"""Sparse autoencoders: `topk` (the TopK SAE and its file formats), `attribution` (concept targets from
activation x gradient), `dictionary` (what each latent means, from the tokens that fire it)."""
