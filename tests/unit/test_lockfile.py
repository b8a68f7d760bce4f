"""The lock files (scripts/lock.sh) agree with pyproject.toml, and the virtualenv the
tests run in holds exactly what they lock.

- requirements.lock: the runtime dependencies and everything they need, no more;
- requirements-dev.lock: the same plus the dev tools, every shared package at the
  same version with the same hashes;
- requirements-build.lock: scripts/build-requirements.in (building cdp and pyfuse3);
- every entry is NAME==VERSION with at least one sha256, so pip installs it in
  --require-hashes mode, and every declared specifier admits the locked version.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Pin:
    version: str
    hashes: frozenset[str]


def parse_lock(name: str) -> dict[str, Pin]:
    """NAME==VERSION entries of a hashed lock file, continuation lines joined."""
    text = (ROOT / name).read_text()
    entries = re.sub(r"\\\n\s*", " ", text).splitlines()
    pins: dict[str, Pin] = {}
    for entry in entries:
        entry = entry.split("#", 1)[0].strip()
        if not entry:
            continue
        words = entry.split()
        project, sep, version = words[0].partition("==")
        assert sep and version, f"{name}: {words[0]!r} is not NAME==VERSION"
        hashes = frozenset(w.removeprefix("--hash=sha256:") for w in words[1:]
                           if w.startswith("--hash=sha256:"))
        assert hashes, f"{name}: {project} has no --hash=sha256: pip --require-hashes refuses it"
        assert len(hashes) == len(words) - 1, f"{name}: {entry[:80]!r} has other options"
        pins[canonicalize_name(project)] = Pin(version, hashes)
    return pins


def declared(group: str) -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    specs = project["dependencies"] if group == "runtime" else \
        project["optional-dependencies"][group]
    return [Requirement(s) for s in specs]


def build_inputs() -> list[Requirement]:
    lines = (ROOT / "scripts" / "build-requirements.in").read_text().splitlines()
    return [Requirement(s) for line in lines if (s := line.split("#", 1)[0].strip())]


def requires(project: str) -> list[str]:
    """What an installed project needs on this platform (markers evaluated, no extras)."""
    out = []
    for spec in metadata.requires(project) or []:
        req = Requirement(spec)
        if req.marker is None or req.marker.evaluate({"extra": ""}):
            out.append(canonicalize_name(req.name))
    return out


def closure(roots: list[Requirement]) -> set[str]:
    seen: set[str] = set()
    todo = [canonicalize_name(r.name) for r in roots]
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo += requires(name)
    return seen


def unsatisfied(reqs: list[Requirement], pins: dict[str, Pin]) -> list[str]:
    wrong = []
    for req in reqs:
        pin = pins.get(canonicalize_name(req.name))
        if pin is None:
            wrong.append(f"{req}: not locked")
        elif not req.specifier.contains(pin.version, prereleases=True):
            wrong.append(f"{req}: locked {pin.version}")
    return wrong


def test_every_entry_is_pinned_with_hashes() -> None:
    for name in ("requirements.lock", "requirements-dev.lock", "requirements-build.lock"):
        assert parse_lock(name), f"{name} is empty"


def test_the_locks_admit_what_pyproject_declares() -> None:
    runtime, dev = parse_lock("requirements.lock"), parse_lock("requirements-dev.lock")
    build = parse_lock("requirements-build.lock")
    assert unsatisfied(declared("runtime"), runtime) == []
    assert unsatisfied(declared("runtime") + declared("dev"), dev) == []
    assert unsatisfied(build_inputs(), build) == []


def test_the_runtime_lock_is_exactly_what_the_runtime_needs() -> None:
    # A package left in after a dependency went is as wrong as one missing.
    assert set(parse_lock("requirements.lock")) == closure(declared("runtime"))


def test_the_dev_lock_is_exactly_what_runtime_and_dev_need() -> None:
    assert set(parse_lock("requirements-dev.lock")) == \
        closure(declared("runtime") + declared("dev"))


def test_the_build_lock_is_exactly_what_building_needs() -> None:
    assert set(parse_lock("requirements-build.lock")) == closure(build_inputs())


def test_shared_packages_are_locked_alike() -> None:
    dev = parse_lock("requirements-dev.lock")
    for name in ("requirements.lock", "requirements-build.lock"):
        other = parse_lock(name)
        differ = {p: (other[p].version, dev[p].version) for p in other.keys() & dev.keys()
                  if other[p] != dev[p]}
        assert differ == {}, f"{name} and requirements-dev.lock differ: {differ}"
    assert parse_lock("requirements.lock").keys() <= dev.keys()


def test_the_virtualenv_matches_the_locks() -> None:
    wrong = {}
    pins = {**parse_lock("requirements-build.lock"), **parse_lock("requirements-dev.lock")}
    for name, pin in pins.items():
        try:
            have = metadata.version(name)
        except metadata.PackageNotFoundError:
            have = "missing"
        if have != pin.version:
            wrong[name] = (have, pin.version)
    assert wrong == {}, "run scripts/bootstrap.sh (installed, locked): " + repr(wrong)
