"""The direction of imports: the CLI uses stages, stages use building blocks, never the other way round, and
no module of `pipelines` reaches itself through others.

Read from the source with `ast`, imports inside functions included (the lazy imports that keep `cocomix
--help` fast are imports all the same). A stage that needs something of another stage means that thing is a
building block: move it to one (as `pipelines/concept_sources.py` was moved out of `extract`).
"""

from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import REPO

PIPELINES = REPO / "pipelines"
# Each stage is one `run(cfg, ...)`; `workflow` chains them and is the one module that may import them all.
STAGES = {"prepare", "train_sae", "extract", "pretrain", "evaluate", "steer_demo", "report"}
CHAIN = "workflow"


def imported_modules(path: Path) -> set[str]:
    """The `pipelines.*` and `cocomix_cli.*` modules a file imports, by their short name under `pipelines`."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from pipelines import prepare` imports the module `pipelines.prepare`
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        for name in names:
            parts = name.split(".")
            if parts[0] == "cocomix_cli":
                found.add("cocomix_cli")
            elif parts[0] == "pipelines" and len(parts) > 1 and (PIPELINES / f"{parts[1]}.py").exists():
                found.add(parts[1])
    return found


def violations() -> list[str]:
    problems = []
    for path in sorted(PIPELINES.glob("*.py")):
        module, imports = path.stem, imported_modules(path)
        if "cocomix_cli" in imports:
            problems.append(f"pipelines/{path.name} imports the CLI")
        if module in STAGES:
            problems += [f"stage `{module}` imports stage `{other}`" for other in sorted(imports & STAGES)]
        elif module != CHAIN:
            reached = imports & (STAGES | {CHAIN})
            problems += [f"building block `{module}` imports stage `{other}`" for other in sorted(reached)]
    return problems


def test_stages_never_import_stages_and_building_blocks_never_import_either():
    assert violations() == []


def import_cycles() -> list[list[str]]:
    """Every cycle of imports between `pipelines` modules, each from its alphabetically first module."""
    graph = {p.stem: imported_modules(p) - {p.stem, "cocomix_cli"} for p in PIPELINES.glob("*.py")}
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
    assert import_cycles() == []


def test_the_check_sees_a_stage_importing_another_inside_a_function(tmp_path, monkeypatch):
    fake = tmp_path / "pipelines"
    fake.mkdir()
    for path in PIPELINES.glob("*.py"):
        (fake / path.name).write_text(path.read_text())
    report = fake / "report.py"
    report.write_text(report.read_text() + "\n\ndef _leak():\n    from pipelines import prepare\n")
    (fake / "corpus.py").write_text(
        (fake / "corpus.py").read_text() + "\nfrom pipelines.extract import Shard\n"
    )
    monkeypatch.setattr(__import__(__name__, fromlist=["PIPELINES"]), "PIPELINES", fake)
    assert violations() == [
        "building block `corpus` imports stage `extract`",
        "stage `report` imports stage `prepare`",
    ]
    for module, other in (("errors", "failpoints"), ("failpoints", "errors")):  # two leaves, made a cycle
        path = fake / f"{module}.py"
        path.write_text(path.read_text() + f"\n\ndef _back():\n    from pipelines import {other}\n")
    assert ["errors", "failpoints"] in import_cycles()
