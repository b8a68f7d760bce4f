"""requirements.lock pins every dependency of pyproject.toml (runtime and dev) to one
exact version, and the virtualenv the tests run in holds exactly those versions."""

from __future__ import annotations

import re
import tomllib
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def locked() -> dict[str, str]:
    pins: dict[str, str] = {}
    for line in (ROOT / "requirements.lock").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, version = line.partition("==")
        assert sep and version, f"requirements.lock: {line!r} is not NAME==VERSION"
        pins[canonical(name)] = version
    return pins


def declared() -> list[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    specs = [*project["dependencies"], *project["optional-dependencies"]["dev"]]
    return [canonical(re.split(r"[\s<>=!~;\[]", spec, maxsplit=1)[0]) for spec in specs]


def test_every_declared_dependency_is_pinned() -> None:
    pins = locked()
    assert [name for name in declared() if name not in pins] == []


def test_the_virtualenv_matches_the_lock() -> None:
    wrong = {}
    for name, version in locked().items():
        try:
            have = metadata.version(name)
        except metadata.PackageNotFoundError:
            have = "missing"
        if have != version:
            wrong[name] = (have, version)
    assert wrong == {}, "run scripts/bootstrap.sh (installed, locked): " + repr(wrong)
