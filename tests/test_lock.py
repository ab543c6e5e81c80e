"""constraints.txt: the tested set of packages that every install takes, kept within pyproject.toml.

A new machine used to resolve whatever was newest that day and fail where CI had passed; now
`make` installs with `-c constraints.txt`, so the environment the suite runs in is the lock's.
"""

from __future__ import annotations

import tomllib
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]


def _lock() -> dict[str, Version]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, version = line.partition("==")
            assert version, f"constraints.txt pins exact versions only: {line!r}"
            pins[canonicalize_name(name)] = Version(version)
    return pins


def test_the_lock_satisfies_every_requirement_of_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = [*project["dependencies"], *(r for extra in ("test", "ray", "demo")
                                                 for r in project["optional-dependencies"][extra])]
    pins = _lock()
    for text in requirements:
        req = Requirement(text)
        name = canonicalize_name(req.name)
        assert name in pins, f"{req.name} is required but not locked"
        assert req.specifier.contains(pins[name], prereleases=True), f"locked {name}=={pins[name]} is outside {req}"


def test_this_environment_is_the_locked_one():
    """Every locked package that is installed has the locked version (torch's +cpu tag aside)."""
    installed = {canonicalize_name(d.metadata["Name"]): Version(d.version) for d in metadata.distributions()}
    differ = {name: (str(installed[name]), str(pin)) for name, pin in _lock().items()
              if name in installed and Version(installed[name].public) != pin}
    assert differ == {}, "installed (left) differs from constraints.txt (right); run make test, or make lock"
    assert {"torch", "numpy", "duckdb", "sae-lens"} <= installed.keys() & _lock().keys()
