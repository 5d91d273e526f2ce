"""Sparse autoencoders: one module per architecture (`topk_sae`, `relu_sae`, `jumprelu_sae`), `formats` (the
published file layouts each is read from), `sources` (local, `hf:` and `saelens:` specs), `attribution`
(concept targets from activation x gradient), `dictionary` (what each latent means, from the tokens that fire
it). `topk` keeps the older import path working."""
