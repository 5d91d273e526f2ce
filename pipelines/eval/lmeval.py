"""An lm-evaluation-harness `LM` for cocomix models, so that any lm-eval task can score our students.

Used by `cocomix eval --backend lm-eval` (needs the `lmeval` extra). Log-likelihoods go through
`pipelines.eval.scoring` (lm-eval's own semantics, so the native tasks and this path agree); generation is
greedy or sampled through `pipelines.model.generation` with the KV cache, stopping at any `until` string. The
tasks declared in `[eval.task.NAME]` become lm-eval multiple-choice tasks (`declared_task`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pipelines.errors import ConfigError, InputError, first_line

if TYPE_CHECKING:
    from pipelines.eval.tasks import Example

NEEDS_LM_EVAL = '`--backend lm-eval` needs lm-evaluation-harness: pip install -e ".[lmeval]".'


def task_manager(include: str):
    """lm-eval's task index, with the task configs of `eval.lmeval_include` when set."""
    try:
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise ConfigError(NEEDS_LM_EVAL) from None
    return TaskManager(include_path=include or None)


def declared_task(name: str, examples: list[Example], delimiter: str):
    """A task declared in `[eval.task.NAME]` as an lm-eval multiple-choice task over `examples` (built by
    `pipelines.eval.tasks.custom_task`): lm-eval joins each context and `delimiter + choice`, scores them
    and computes acc and acc_norm itself. The prompt is a Python format string and `gold_base` has no
    template twin, so the config's functions return the examples' fields instead of Jinja templates."""
    import datasets
    from lm_eval.api.task import ConfigurableTask

    class DeclaredTask(ConfigurableTask):
        def download(self, dataset_kwargs=None, **kwargs) -> None:
            # The examples are read already; lm-eval's `custom_dataset` would do the same with a warning.
            self.dataset = {"test": datasets.Dataset.from_dict({"example": list(range(len(examples)))})}

    def example(doc: dict) -> Example:
        return examples[doc["example"]]

    return DeclaredTask(
        config={
            "task": name,
            "output_type": "multiple_choice",
            "test_split": "test",
            "doc_to_text": lambda doc: example(doc).contexts[0],
            "doc_to_choice": lambda doc: list(example(doc).choices_text),
            "doc_to_target": lambda doc: example(doc).gold,
            "target_delimiter": delimiter,
            "metric_list": [
                {"metric": metric, "aggregation": "mean", "higher_is_better": True}
                for metric in ("acc", "acc_norm")
            ],
            "metadata": {"version": 1.0},
        }
    )


def cocomix_lm(spec: str, device, batch_size: int, progress: bool = False):
    """An instance of lm-eval's `LM` wrapping the model at `spec` (a folder or `hf:...`); with `progress`, a
    bar per call labelled with `lm.scorer.progress_label`."""
    try:
        from lm_eval.api.model import LM
    except ImportError:
        raise ConfigError(NEEDS_LM_EVAL) from None

    from pipelines.eval.scoring import ScoringModel

    class CocomixLM(LM):
        def __init__(self) -> None:
            super().__init__()
            self.scorer = ScoringModel(spec, device, batch_size, progress=progress)

        def loglikelihood(self, requests) -> list[tuple[float, bool]]:
            scored = self.scorer.loglikelihood([tuple(r.args) for r in requests])
            return [(s.loglikelihood, s.is_greedy) for s in scored]

        def loglikelihood_rolling(self, requests) -> list[float]:
            return self.scorer.loglikelihood_rolling([r.args[0] for r in requests])

        def generate_until(self, requests) -> list[str]:
            from tqdm.auto import tqdm

            bar = tqdm(
                requests, unit="req", desc=self.scorer.progress_label, disable=not progress, leave=False
            )
            return [self._generate(*r.args) for r in bar]

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
                from pipelines.model.generation import generate

                out = generate(self.scorer.model, prompt, max_new, temperature=temperature, seed=0)
            text = self.scorer.decode(out[0, len(ids) :].tolist())
            for stop in until:
                text = text.split(stop)[0]
            return text

    return CocomixLM()


def run_task(
    lm: Any, task: str, examples: list | None, delimiter: str, limit: int, manager: Any
) -> dict[str, dict[str, Any]]:
    """One task through `lm_eval.simple_evaluate`: the metrics of each task lm-eval reports (a group's
    subtasks too), without lm-eval's `,filter` suffixes, with the number of examples scored."""
    import lm_eval

    if examples is not None:
        spec: Any = declared_task(task, examples, delimiter)
    else:
        spec = task
    try:
        output = lm_eval.simple_evaluate(model=lm, tasks=[spec], limit=limit or None, task_manager=manager)
    except KeyError as exc:  # lm-eval's error for a task it does not know
        raise ConfigError(
            f"lm-eval does not know task {exc}; see `lm_eval --tasks list`, or declare it in "
            "`[eval.task.NAME]`."
        ) from None
    except (ConnectionError, FileNotFoundError) as exc:  # its dataset, offline and not in the cache
        raise InputError(
            f"lm-eval could not load the data of task {task} ({type(exc).__name__}: {first_line(exc)}). "
            "Run where the HuggingFace hub is reachable (HF_HUB_OFFLINE unset) or its dataset is in the "
            "datasets cache, or declare the task with a local file in `[eval.task.NAME]`."
        ) from None
    counts = output.get("n-samples", {})
    reported = {}
    for name, values in output["results"].items():
        metrics = {
            k.split(",")[0]: v for k, v in values.items() if isinstance(v, (int, float)) and k != "alias"
        }
        if name in counts:
            metrics["examples"] = counts[name]["effective"]
        reported[name] = metrics
    return reported
