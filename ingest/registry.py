"""The sae-lens registry of pretrained SAEs, read from any version's YAML, and diffed.

sae-lens parses its own packaged YAML; saecat reads the YAML itself so that any version (a
file, a URL, the packaged one) can be registered and compared, and so that a malformed entry
(some versions nest a release block inside an SAE entry) is reported and skipped instead of
failing the whole registry. Hook, layer and width are read from an SAE's id or path where they
say them ('blocks.8.hook_resid_pre', 'layer_12_width_16k'); the rest needs the SAE's config.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
import urllib.error
import urllib.request
from dataclasses import dataclass
from importlib import metadata, resources
from pathlib import Path
from typing import Any, Iterator

import yaml

from catalog.errors import SaecatError, one_line

HOOK = re.compile(r"^blocks\.(\d+)\.hook_[a-z_]+$")
LAYER = re.compile(r"(?:^|[^a-z])(?:layer|blocks?)[._]?(\d+)(?:[^\d]|$)", re.IGNORECASE)
WIDTH = re.compile(r"width[_-]?(\d+)([km]?)(?:[^\da-z]|$)", re.IGNORECASE)
SCALE = {"": 1, "k": 1024, "m": 1024 * 1024}
# libyaml's safe loader where PyYAML was built with it: 10x faster on the 1.5 MB registry
SAFE_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
NESTED_RELEASE_KEYS = {"saes", "repo_id", "model", "conversion_func", "links"}


@dataclass(frozen=True)
class RegistrySae:
    release: str
    sae_id: str
    path: str | None
    l0: float | None
    variance_explained: float | None
    neuronpedia_id: str | None
    hook_name: str | None  # only when the id or path is a transformer-lens hook name
    layer: int | None
    width: int | None


@dataclass(frozen=True)
class RegistryRelease:
    release: str
    repo_id: str | None
    model: str | None
    conversion_func: str | None
    links: dict | None
    saes: tuple[RegistrySae, ...]


@dataclass
class Registry:
    releases: dict[str, RegistryRelease]
    source: str  # 'sae-lens <version>' for the packaged file, else its path or URL
    version: str | None
    sha256: str
    problems: list[str]

    @property
    def n_saes(self) -> int:
        return sum(len(r.saes) for r in self.releases.values())


@dataclass(frozen=True)
class Change:
    kind: str  # 'release' or 'sae'
    action: str  # 'added', 'removed' or 'changed'
    release: str
    sae_id: str | None
    fields: tuple[str, ...] = ()


RELEASE_FIELDS = ("repo_id", "model", "conversion_func", "links")
SAE_FIELDS = ("path", "l0", "variance_explained", "neuronpedia_id")


def derived(sae_id: str, path: str | None) -> tuple[str | None, int | None, int | None]:
    """(hook, layer, width) as far as the id and path say them."""
    texts = [t for t in (sae_id, path) if t]
    hook = next((t for t in texts if HOOK.match(t)), None)
    layer = next((int(m.group(1)) for t in texts if (m := LAYER.search(t))), None)
    width = next((_width(int(m.group(1)), m.group(2).lower()) for t in texts if (m := WIDTH.search(t))), None)
    return hook, layer, width


def _width(number: int, unit: str) -> int:
    """'16k' is 16384 and '65k' 65536 (a power of two within 5% of the rounded figure); '24k' is 24576."""
    if not unit:
        return number
    approx = number * (1000 if unit == "k" else 1_000_000)
    power = 1 << round(math.log2(approx))
    return power if abs(power - approx) <= 0.05 * approx else number * SCALE[unit]


def _number(value: Any, where: str, name: str, problems: list[str]) -> float | None:
    if value is None:
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    problems.append(f"{where}: {name} {value!r} is not a number")
    return None


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _sae(release: str, index: int, entry: Any, problems: list[str]) -> RegistrySae | None:
    where = f"release {release!r}, SAE #{index}"
    if not isinstance(entry, dict) or not isinstance(entry.get("id"), str):
        problems.append(f"{where}: not an SAE entry with a string id (keys: "
                        f"{sorted(entry)[:6] if isinstance(entry, dict) else type(entry).__name__}); skipped")
        return None
    sae_id = entry["id"]
    where = f"release {release!r}, SAE {sae_id!r}"
    nested = sorted(set(entry) & NESTED_RELEASE_KEYS)
    if nested:  # a YAML indentation slip upstream: the next release's block landed inside this entry
        count = len(entry["saes"]) if isinstance(entry.get("saes"), list) else 0
        problems.append(f"{where}: a release block is nested inside this entry ({', '.join(nested)}); "
                        f"the entry is kept, its {count} nested SAE(s) are not registered")
    path = _text(entry.get("path"))
    hook, layer, width = derived(sae_id, path)
    return RegistrySae(release, sae_id, path, _number(entry.get("l0"), where, "l0", problems),
                       _number(entry.get("variance_explained"), where, "variance_explained", problems),
                       _text(entry.get("neuronpedia")), hook, layer, width)


def _release(name: str, block: Any, problems: list[str]) -> RegistryRelease | None:
    if not isinstance(block, dict) or not isinstance(block.get("saes"), list):
        problems.append(f"release {name!r}: no list of SAEs; skipped")
        return None
    saes: dict[str, RegistrySae] = {}
    for index, entry in enumerate(block["saes"]):
        sae = _sae(name, index, entry, problems)
        if sae is None:
            continue
        if sae.sae_id in saes:
            problems.append(f"release {name!r}: SAE {sae.sae_id!r} listed again; the first kept")
            continue
        saes[sae.sae_id] = sae
    links = block.get("links")
    return RegistryRelease(name, _text(block.get("repo_id")), _text(block.get("model")),
                           _text(block.get("conversion_func")), links if isinstance(links, dict) else None,
                           tuple(saes.values()))


def parse_registry(raw: bytes, source: str, version: str | None = None) -> Registry:
    """A registry from the YAML's bytes; malformed entries are listed in `problems`, not raised."""
    try:
        data = yaml.load(raw, Loader=SAFE_LOADER)
    except yaml.YAMLError as err:
        raise SaecatError(f"registry {source} is not readable YAML: {one_line(err)}") from err
    if not isinstance(data, dict):
        raise SaecatError(f"registry {source} is not a mapping of release names to releases")
    problems: list[str] = []
    releases = {}
    for name, block in data.items():
        release = _release(str(name), block, problems)
        if release is not None:
            releases[release.release] = release
    return Registry(releases, source, version, hashlib.sha256(raw).hexdigest(), problems)


def read_registry(source: str | os.PathLike | None = None) -> Registry:
    """The registry packaged with the installed sae-lens (None), a YAML file, or an http(s) URL."""
    if source is None:
        version = metadata.version("sae-lens")
        raw = resources.files("sae_lens").joinpath("pretrained_saes.yaml").read_bytes()
        return parse_registry(raw, f"sae-lens {version}", version)
    text = str(source)
    if text.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(text, timeout=30) as response:
                raw = response.read()
        except (urllib.error.URLError, OSError) as err:
            raise SaecatError(f"cannot fetch registry {text}: {one_line(err)}; pass a local YAML file") from err
        return parse_registry(raw, text)
    path = Path(text).expanduser()
    if not path.is_file():
        raise SaecatError(f"registry file {path} does not exist")
    return parse_registry(path.read_bytes(), text)


def _differing(old: Any, new: Any, names: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(sorted(n for n in names if getattr(old, n) != getattr(new, n)))


def _compare(kind: str, before: dict, after: dict, names: tuple[str, ...], release: str | None = None
             ) -> Iterator[Change]:
    """Changes between two {key: release or SAE} maps; keys are release names, or SAE ids of `release`."""
    for key in before.keys() | after.keys():
        a, b = before.get(key), after.get(key)
        where = (key, None) if release is None else (release, key)
        if a is None or b is None:
            yield Change(kind, "added" if a is None else "removed", *where)
        elif differ := _differing(a, b, names):
            yield Change(kind, "changed", *where, differ)


def diff(old: Registry | None, new: Registry) -> list[Change]:
    """What changed from `old` to `new` (everything is added when there is no `old`). The SAEs
    of an added or removed release are listed as added or removed too."""
    before = old.releases if old is not None else {}
    after = new.releases
    changes = list(_compare("release", before, after, RELEASE_FIELDS))
    for name in before.keys() | after.keys():
        saes = [{s.sae_id: s for s in r.saes} if r else {} for r in (before.get(name), after.get(name))]
        changes += _compare("sae", *saes, SAE_FIELDS, release=name)
    return sorted(changes, key=lambda c: (c.kind, c.release, c.sae_id or "", c.action))
