"""The README's two commands are the ones CI runs, so the README cannot drift from what is tested."""

import re

from tests.conftest import REPO


def readme_commands() -> list[str]:
    first_block = re.search(r"```bash\n(.*?)```", (REPO / "README.md").read_text(), re.S)
    return first_block.group(1).strip().splitlines()


def test_readme_opens_with_install_and_test_commands():
    install, test = readme_commands()
    assert 'pip install torch==2.13.0 -e ".[dev]"' in install and install.endswith("cocomix run")
    assert test == "python -m pytest -q -n auto --dist loadfile"


def test_ci_runs_the_readme_install_and_test_commands():
    ci = (REPO / ".ci" / "run").read_text()
    install, test = readme_commands()
    assert 'pip install -q torch==2.13.0 -e ".[dev]"' in ci
    assert 'pip install torch==2.13.0 -e ".[dev]"' in install
    assert "set -euo pipefail" in ci and "export COCOMIX_TEST_NO_SKIP=1" in ci
    # The README's test command in two passes that partition the suite: unmarked tests with the shared
    # folder hidden, then the real-data tests.
    passes = [line for line in ci.splitlines() if test in line]
    assert len(passes) == 2 and ci.rstrip().splitlines()[-1] == passes[1]
    assert passes[0].startswith("COCOMIX_TEST_SHARED=") and passes[0].endswith(f'{test} -m "not real_data"')
    assert passes[1] == f"{test} -m real_data"
