"""The direction of imports: cli -> stages -> building blocks -> core -> config -> errors, never the other way
round; stages never import stages; no module of `pipelines` reaches itself through others.

Read from the source with `ast`, imports inside functions included (the lazy imports that keep `cocomix
--help` fast are imports all the same). A stage that needs something of another stage means that thing is a
building block: move it to one (as `pipelines/concepts/targets.py` was moved out of `extract`).
"""

from __future__ import annotations

import ast
import shutil
from pathlib import Path

from tests.conftest import REPO

# The layers, lowest first: a module may import its own layer and those below it.
LAYERS = {
    "errors": 0,
    "": 0,  # `pipelines` itself: the version
    "config": 1,
    "objectives": 1,  # the objectives' declarations, which the config checks read
    "core": 2,
    **dict.fromkeys(("data", "model", "sae", "concepts", "training", "eval", "report"), 3),
    "stages": 4,
}
# `workflow` chains the stages for `cocomix run`: the one stage module that may import the others.
CHAIN = "stages.workflow"
# What the CLI may import: stages, config (and the objectives' declarations) and errors (and the version);
# never a building block.
CLI_MAY_IMPORT = {"stages", "config", "objectives", "errors", ""}


def modules(root: Path) -> dict[str, Path]:
    """Every module under `root` (a `pipelines` folder) by dotted name below it: `core.session`, `errors`."""
    found = {}
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def imported_modules(path: Path, known: set[str]) -> set[str]:
    """The `pipelines` modules a file imports (dotted names below `pipelines`), and `cocomix_cli` if so."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from pipelines.stages import prepare` imports the module `pipelines.stages.prepare`
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        for name in names:
            parts = name.split(".")
            if parts[0] == "cocomix_cli":
                found.add("cocomix_cli")
            elif parts[0] == "pipelines":
                dotted = ".".join(parts[1:])
                if dotted in known and (dotted == "" or dotted not in LAYERS):
                    found.add(dotted)  # a module (a package's `__init__` says nothing of its modules)
    return found


def layer(module: str) -> str:
    return module.split(".")[0] if module.split(".")[0] in LAYERS else ""


def violations(pipelines_root: Path, cli_root: Path) -> list[str]:
    problems = []
    known = modules(pipelines_root)
    for module, path in known.items():
        imports = imported_modules(path, set(known))
        if "cocomix_cli" in imports:
            problems.append(f"`{module}` imports the CLI")
        for other in sorted(imports - {"cocomix_cli", module}):
            if (
                layer(other) == "stages"
                and layer(module) == "stages"
                and module != CHAIN
                and other != "stages"
            ):
                problems.append(f"stage `{module}` imports stage `{other}`")
            elif LAYERS[layer(other)] > LAYERS[layer(module)]:
                problems.append(f"`{module}` ({layer(module) or 'pipelines'}) imports `{other}` from above")
    for path in sorted(cli_root.rglob("*.py")):
        for other in sorted(imported_modules(path, set(known)) - {"cocomix_cli"}):
            if layer(other) not in CLI_MAY_IMPORT:
                problems.append(f"the CLI ({path.relative_to(cli_root.parent)}) imports block `{other}`")
    return problems


def test_imports_point_down_the_layers_and_stages_never_import_stages():
    assert violations(REPO / "pipelines", REPO / "cocomix_cli") == []


def import_cycles(pipelines_root: Path) -> list[list[str]]:
    """Every cycle of imports between `pipelines` modules, each from its alphabetically first module."""
    known = modules(pipelines_root)
    graph = {m: imported_modules(p, set(known)) - {m, "cocomix_cli"} for m, p in known.items()}
    cycles: set[tuple[str, ...]] = set()

    def walk(path: list[str]) -> None:
        for module in sorted(graph.get(path[-1], ())):
            if module in path:
                cycle = path[path.index(module) :]
                first = cycle.index(min(cycle))
                cycles.add(tuple(cycle[first:] + cycle[:first]))
            elif module > path[0]:  # each cycle is found from its first module only
                walk([*path, module])

    for module in sorted(graph):
        walk([module])
    return [list(c) for c in sorted(cycles)]


def test_no_module_of_pipelines_imports_itself_through_others():
    assert import_cycles(REPO / "pipelines") == []


def test_the_checks_see_each_kind_of_leak_inside_functions(tmp_path):
    fake = tmp_path / "pipelines"
    cli = tmp_path / "cocomix_cli"
    shutil.copytree(REPO / "pipelines", fake, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(REPO / "cocomix_cli", cli, ignore=shutil.ignore_patterns("__pycache__"))

    def append(path: Path, code: str) -> None:
        path.write_text(path.read_text() + "\n\n" + code + "\n")

    append(fake / "stages" / "report.py", "def _leak():\n    from pipelines.stages import prepare")
    append(fake / "data" / "corpus.py", "from pipelines.stages.extract import run")
    append(fake / "core" / "layout.py", "def _leak():\n    from pipelines.model.gpt import GPT")
    append(cli / "commands" / "status_cmd.py", "def _leak():\n    from pipelines.sae import dictionary")
    assert violations(fake, cli) == [
        "`core.layout` (core) imports `model.gpt` from above",
        "`data.corpus` (data) imports `stages.extract` from above",
        "stage `stages.report` imports stage `stages.prepare`",
        "the CLI (cocomix_cli/commands/status_cmd.py) imports block `sae.dictionary`",
    ]
    # two leaves, made a cycle
    append(fake / "core" / "hub.py", "def _back():\n    from pipelines.core import devices")
    append(fake / "core" / "devices.py", "def _back():\n    from pipelines.core import hub")
    assert ["core.devices", "core.hub"] in import_cycles(fake)
