"""The import path that callers from before the SAE families used; it re-exports, it defines nothing.

The TopK module now lives in `pipelines.sae.topk_sae`, the file formats in `pipelines.sae.formats`; new code
imports from those.
"""

from pipelines.sae.formats import (
    SAELENS_CONFIG,
    SAELENS_WEIGHTS,
    LoadedSAE,
    load_sae,
    openai_state_dict,
    save_saelens,
)
from pipelines.sae.normalization import NORMALIZATIONS, normalize_input
from pipelines.sae.sources import HUB_PREFIX
from pipelines.sae.topk_sae import TopKEncoding, TopKSAE

__all__ = [
    "HUB_PREFIX",
    "NORMALIZATIONS",
    "SAELENS_CONFIG",
    "SAELENS_WEIGHTS",
    "LoadedSAE",
    "TopKEncoding",
    "TopKSAE",
    "load_sae",
    "normalize_input",
    "openai_state_dict",
    "save_saelens",
]
