"""An lm-evaluation-harness `LM` for cocomix models, so that any lm-eval task can score our students.

Used by `cocomix eval --backend lm-eval` (needs the `lmeval` extra). Log-likelihoods go through
`pipelines.lm_scoring` (lm-eval's own semantics, so the native tasks and this path agree); generation is
greedy or sampled through `pipelines.generation` with the KV cache, stopping at any `until` string.
"""

from __future__ import annotations

from typing import Any

from pipelines.errors import ConfigError


def cocomix_lm(spec: str, device, batch_size: int):
    """An instance of lm-eval's `LM` wrapping the model at `spec` (a folder or `hf:...`)."""
    try:
        from lm_eval.api.model import LM
    except ImportError:
        raise ConfigError(
            '`--backend lm-eval` needs lm-evaluation-harness: pip install -e ".[lmeval]".'
        ) from None

    from pipelines.lm_scoring import ScoringModel

    class CocomixLM(LM):
        def __init__(self) -> None:
            super().__init__()
            self.scorer = ScoringModel(spec, device, batch_size)

        def loglikelihood(self, requests) -> list[tuple[float, bool]]:
            scored = self.scorer.loglikelihood([tuple(r.args) for r in requests])
            return [(s.loglikelihood, s.is_greedy) for s in scored]

        def loglikelihood_rolling(self, requests) -> list[float]:
            return self.scorer.loglikelihood_rolling([r.args[0] for r in requests])

        def generate_until(self, requests) -> list[str]:
            return [self._generate(*r.args) for r in requests]

        def _generate(self, context: str, options: dict[str, Any]) -> str:
            import torch

            until = options.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(options.get("max_gen_toks", 256))
            ids = self.scorer.encode(context)[-(self.scorer.max_length - max_new) :]
            prompt = torch.tensor([ids], device=self.scorer.device)
            if spec.startswith("hf:"):
                out = self.scorer.model.generate(prompt, max_new_tokens=max_new, do_sample=False)
            else:  # ours: greedy unless the task asks for a temperature
                temperature = float(options.get("temperature", 0.0))
                out = self.scorer.model.generate(prompt, max_new, temperature=temperature, seed=0)
            text = self.scorer.decode(out[0, len(ids) :].tolist())
            for stop in until:
                text = text.split(stop)[0]
            return text

    return CocomixLM()
