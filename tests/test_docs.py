"""The README and docs/ as a reader meets them: a short front page with a picture, every link going somewhere,
and a configuration reference that is the schema's own words."""

import re
import subprocess
from pathlib import Path

from tests.conftest import REPO

PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
FENCED_BLOCK = re.compile(r"^[ \t]*```.*?^[ \t]*```", flags=re.S | re.M)  # also indented in a list item


def prose(markdown: str) -> str:
    """The text outside fenced code blocks and code spans, where a bracket is a link."""
    return re.sub(r"``.+?``|`[^`\n]+`", "", FENCED_BLOCK.sub("", markdown))


def github_anchor(heading: str) -> str:
    """The id GitHub gives a heading: its text as rendered, lower-cased, punctuation but `-` and `_` dropped,
    spaces as hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).replace("`", "").replace("**", "")
    return re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    found: set[str] = set()
    for heading in re.findall(r"^#{1,6} (.+)$", FENCED_BLOCK.sub("", page.read_text()), flags=re.M):
        anchor, n = github_anchor(heading), 1
        while anchor in found:  # GitHub numbers repeated headings: -1, -2, ...
            anchor, n = f"{github_anchor(heading)}-{n}", n + 1
        found.add(anchor)
    return found


def broken_links(page: Path) -> list[str]:
    broken = []
    for target in LINK.findall(prose(page.read_text())):
        if re.match(r"[a-z]+:", target):  # https:, mailto: - not reachable from here, and not ours
            continue
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            broken.append(f"{target}: no file {file}")
        elif anchor and file.suffix == ".md" and anchor not in anchors(file):
            broken.append(f"{target}: no heading #{anchor} in {file.name}")
    return broken


def test_every_link_in_the_readme_and_docs_resolves():
    broken = {page.relative_to(REPO).as_posix(): broken_links(page) for page in PAGES}
    assert not {page: links for page, links in broken.items() if links}
    # a link whose text is code is still a link
    assert "docs/COMMANDS.md#cocomix-run" in LINK.findall(prose((REPO / "README.md").read_text()))


def test_a_missing_file_or_heading_is_a_broken_link(tmp_path):
    (tmp_path / "other.md").write_text("# Other page\n\n## `cocomix run`: the chain (issue 3)\n")
    page = tmp_path / "page.md"
    page.write_text(
        "[ok](other.md#cocomix-run-the-chain-issue-3) [gone](missing.md) [no heading](other.md#nowhere)\n"
        "`[in code](missing.md)` [web](https://example.org/x)\n```\n[fenced](missing.md)\n```\n"
    )
    assert broken_links(page) == [
        f"missing.md: no file {tmp_path / 'missing.md'}",
        "other.md#nowhere: no heading #nowhere in other.md",
    ]


def test_the_readme_is_a_front_page_with_a_committed_picture():
    readme = (REPO / "README.md").read_text()
    assert len(readme.splitlines()) <= 200
    pictures = re.findall(r"!\[[^\]]+\]\((docs/[^)]+\.png)\)", readme)
    assert pictures, "the README shows no picture from docs/"
    for picture in pictures:
        assert (REPO / picture).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        if (REPO / ".git").exists():  # committed, so that the repository page can show it
            subprocess.run(
                ["git", "ls-files", "--error-unmatch", picture], cwd=REPO, check=True, capture_output=True
            )


def test_every_docs_page_is_reachable_from_the_readme():
    readme_links = set(LINK.findall(prose((REPO / "README.md").read_text())))
    index_links = set(LINK.findall(prose((REPO / "docs" / "README.md").read_text())))
    assert "docs/README.md" in readme_links
    reachable = {target.partition("#")[0] for target in index_links}
    assert {page.name for page in (REPO / "docs").glob("*.md")} - {"README.md"} <= reachable


def test_the_configuration_page_is_what_cocomix_config_reference_prints(cocomix):
    printed = cocomix("config", "reference")
    assert printed.exit_code == 0, printed.stderr
    assert (REPO / "docs" / "CONFIG.md").read_text() == printed.stdout, (
        "docs/CONFIG.md is stale: regenerate it with `cocomix config reference > docs/CONFIG.md`."
    )
    assert "| `lam_concept` | `0.1` | >= 0 | CoCoMix: weight of the concept loss. |" in printed.stdout
