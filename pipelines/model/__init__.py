"""The student: `gpt` (the CoCoMix/NTP/pause transformer), `generation` (sampling), `checkpoint` (model
folders), `hf_export` (transformers folders and the hub), `flops` (parameter and FLOP counts), `steering`
(reading and amplifying predicted concepts); `configuration_cocomix` and `modeling_cocomix` are the
student as a transformers model.

Importing this package registers `CocomixConfig` / `CocomixForCausalLM` with transformers' Auto classes,
so that `AutoModelForCausalLM.from_pretrained(exported_folder)` needs no `trust_remote_code` where cocomix
is installed. That import costs transformers' model machinery (seconds); the package is imported only by
the commands that load a model.
"""


def _register_with_transformers() -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    from pipelines.model.configuration_cocomix import CocomixConfig
    from pipelines.model.modeling_cocomix import CocomixForCausalLM

    AutoConfig.register(CocomixConfig.model_type, CocomixConfig, exist_ok=True)
    AutoModelForCausalLM.register(CocomixConfig, CocomixForCausalLM, exist_ok=True)


_register_with_transformers()
