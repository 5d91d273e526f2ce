"""Writing a config: the resolved config as TOML (`cocomix config show`) and the README's reference tables,
both from the field docs in `pipelines.config.schema`.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any

from pipelines.config.schema import SECTIONS, Config, CustomTaskConfig, field_choices, spell_choices


def to_toml(cfg: Config, with_docs: bool = True) -> str:
    """The resolved config as TOML that `load_config` reads back to the same `Config`."""
    lines: list[str] = []
    for section_name in SECTIONS:
        section = getattr(cfg, section_name)
        if lines:
            lines.append("")
        lines.append(f"[{section_name}]")
        if with_docs and type(section).__doc__:
            lines.append(f"# {type(section).__doc__.strip()}")
        tables = []
        for f in dataclasses.fields(section):
            value = getattr(section, f.name)
            if isinstance(value, dict):  # sub-tables (custom eval tasks) go after the plain keys
                tables += [(f"{section_name}.{f.name}.{name}", sub) for name, sub in value.items()]
                continue
            if with_docs and f.metadata.get("doc"):
                lines.append(f"# {field_doc(type(section), f)}")
            lines.append(f"{f.name} = {_toml_value(value)}")
        for name, sub in tables:
            lines += ["", f"[{name}]"]
            if isinstance(sub, dict):  # a variant: `objective` and quoted `"pretrain.key"` overrides
                lines += [f"{_toml_key(key)} = {_toml_value(value)}" for key, value in sub.items()]
                continue
            lines += [f"{f.name} = {_toml_value(getattr(sub, f.name))}" for f in dataclasses.fields(sub)]
    return "\n".join(lines) + "\n"


def reference_markdown() -> str:
    """The README's config reference, generated from the field docs: a table of keys per section."""
    lines: list[str] = []
    tables = [(f"[{name}]", cls) for name, cls in SECTIONS.items()] + [("[eval.task.NAME]", CustomTaskConfig)]
    for title, cls in tables:
        lines += [
            f"#### `{title}`",
            "",
            cls.__doc__.strip(),
            "",
            "| key | default | meaning |",
            "|---|---|---|",
        ]
        defaults = cls()
        for f in dataclasses.fields(cls):
            default = getattr(defaults, f.name)
            shown = "" if default in ("", [], {}) else f"`{_toml_value(default)}`"
            doc = field_doc(cls, f).replace("|", "\\|")  # a pipe would end the table cell
            if not f.metadata.get("affects_output", True):
                doc += " *(run-time only)*"
            lines.append(f"| `{f.name}` | {shown} | {doc} |")
        lines.append("")
    return "\n".join(lines)


def field_doc(cls: type, f: dataclasses.Field) -> str:
    """A field's doc, ending with its choices when it is a `Literal` whose doc does not name them all."""
    doc = f.metadata["doc"]
    choices = field_choices(typing.get_type_hints(cls)[f.name])
    if choices and not all(f"`{choice}`" in doc for choice in choices):
        doc += f" Choices: {spell_choices(choices)}."
    return doc


def _toml_key(key: str) -> str:
    return key if key.replace("_", "").isalnum() else f'"{key}"'


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\t", "\\t")
        return f'"{escaped}"'
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(item) for item in value) + "]"
    raise TypeError(f"no TOML form for {type(value).__name__}")
