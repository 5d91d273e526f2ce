"""Sparse autoencoders: `base` (what every family shares and how the rest of cocomix uses one), `families`
(the families by name: the one declaration loading, saving, attribution and `train-sae` read), one module
per family (`topk_sae`, `relu_sae`, `jumprelu_sae`, ...), `formats` (the published file layouts each is read
from), `sources` (local, `hf:` and `saelens:` specs), `trainer` and `auxk` (what `train-sae` runs),
`attribution` (concept targets from activation x gradient), `dictionary` (what each latent means, from the
tokens that fire it). `topk` keeps the older import path working."""
