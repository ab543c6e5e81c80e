"""The sae-lens registry of pretrained SAEs, read from any version's YAML, and diffed.

sae-lens parses its own packaged YAML and fails on the first bad entry; saecat reads the YAML
itself so that any version (the packaged file, a local file, a URL) can be registered and
compared, with malformed entries reported in `problems` instead of failing the whole registry
(some versions nest a release block inside an SAE entry). Hook, layer and width are read from an
SAE's id or path only where they state them ('blocks.8.hook_resid_pre', 'layer_12_width_16k');
anything else needs the SAE's config from the hub.
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
from typing import Any

import yaml

from catalog.errors import SaecatError, one_line

# Hook points that transformer-lens puts directly on a block; 'blocks.0.hook_z' (an id some
# releases use) is not one: the real hook is 'blocks.0.attn.hook_z', so it gives no hook name.
HOOK = re.compile(
    r"^blocks\.(\d+)\.hook_(?:resid_pre|resid_mid|resid_post|attn_out|mlp_out|attn_in|mlp_in|[qkv]_input)$"
)
LAYER = re.compile(r"(?<![a-z])(?:layer|blocks?)[._]?(\d+)", re.IGNORECASE)
WIDTH = re.compile(r"width[_-]?(?:2pow(\d+)|(\d+)([km]?))(?![\da-z])", re.IGNORECASE)
# libyaml's safe loader where PyYAML was built with it: same rules as yaml.safe_load, 7x faster
SAFE_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
NESTED_RELEASE_KEYS = {"saes", "repo_id", "model", "conversion_func", "links"}
RELEASE_FIELDS = ("repo_id", "model", "conversion_func", "links")
SAE_FIELDS = ("path", "l0", "variance_explained", "neuronpedia_id")


@dataclass(frozen=True)
class RegistrySae:
    release: str
    sae_id: str
    path: str | None
    l0: float | None
    variance_explained: float | None
    neuronpedia_id: str | None
    hook_name: str | None  # only when the id or path is a transformer-lens block hook name
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
    version: str | None  # the sae-lens version, for the packaged file
    sha256: str  # of the raw YAML bytes
    problems: list[str]  # one line per malformed entry

    @property
    def n_saes(self) -> int:
        return sum(len(r.saes) for r in self.releases.values())


@dataclass(frozen=True)
class Change:
    kind: str  # 'release' or 'sae'
    action: str  # 'added', 'removed' or 'changed'
    release: str
    sae_id: str | None  # None for a release
    fields: tuple[str, ...] = ()  # for 'changed': the fields that differ, sorted


def _width(match: re.Match) -> int:
    """'16k' is 16384, '65k' 65536 and '1m' 2**20 (names round powers of two to 2-3 figures);
    a figure not within 5% of a power of two is taken as binary thousands ('24k' -> 24576)."""
    power, number, unit = match.groups()
    if power:
        return 1 << int(power)
    if not unit:
        return int(number)
    approx = int(number) * (1000 if unit.lower() == "k" else 1_000_000)
    nearest = 1 << round(math.log2(approx))
    if abs(nearest - approx) <= 0.05 * approx:
        return nearest
    return int(number) * (1024 if unit.lower() == "k" else 1 << 20)


def _derived(sae_id: str, path: str | None) -> tuple[str | None, int | None, int | None]:
    """(hook name, layer, width) as far as the id, then the path, state them."""
    texts = [t for t in (sae_id, path) if t]
    hook = next((t for t in texts if HOOK.match(t)), None)
    layer = next((int(m.group(1)) for t in texts if (m := LAYER.search(t))), None)
    width = next((_width(m) for t in texts if (m := WIDTH.search(t))), None)
    return hook, layer, width


def _number(value: Any, where: str, name: str, problems: list[str]) -> float | None:
    if value is None:
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    problems.append(f"{where}: {name} {value!r} is not a number; taken as unknown")
    return None


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _sae(release: str, index: int, entry: Any, problems: list[str]) -> RegistrySae | None:
    if not isinstance(entry, dict) or not isinstance(entry.get("id"), str):
        shape = f"keys {sorted(map(str, entry))[:6]}" if isinstance(entry, dict) else type(entry).__name__
        problems.append(f"release {release!r}, SAE #{index}: not an SAE entry with a string id ({shape}); skipped")
        return None
    sae_id = entry["id"]
    where = f"release {release!r}, SAE {sae_id!r}"
    nested = sorted(set(entry) & NESTED_RELEASE_KEYS)
    if nested:  # an indentation slip upstream: a copy of a release block landed inside this entry
        count = len(entry["saes"]) if isinstance(entry.get("saes"), list) else 0
        problems.append(f"{where}: a release block is nested inside this entry ({', '.join(nested)}); "
                        f"the entry is kept, its {count} nested SAE(s) are not registered")
    path = entry.get("path")
    # 'path: 0' is read as a number; sae-lens takes it as the string, and so does saecat
    path = str(path) if isinstance(path, int) and not isinstance(path, bool) else _text(path)
    if path is None:
        problems.append(f"{where}: no path in the repo; kept without one")
    hook, layer, width = _derived(sae_id, path)
    return RegistrySae(release, sae_id, path, _number(entry.get("l0"), where, "l0", problems),
                       _number(entry.get("variance_explained"), where, "variance_explained", problems),
                       _text(entry.get("neuronpedia")), hook, layer, width)


def _release(name: str, block: Any, problems: list[str]) -> RegistryRelease | None:
    if not isinstance(block, dict) or not isinstance(block.get("saes"), list):
        problems.append(f"release {name!r}: no list of SAEs; skipped")
        return None
    if not isinstance(block.get("repo_id"), str) or not isinstance(block.get("model"), str):
        problems.append(f"release {name!r}: repo_id or model missing or not a string; skipped")
        return None
    saes: dict[str, RegistrySae] = {}
    for index, entry in enumerate(block["saes"]):
        sae = _sae(name, index, entry, problems)
        if sae is None:
            continue
        if sae.sae_id in saes:
            problems.append(f"release {name!r}, SAE #{index}: id {sae.sae_id!r} listed again; the first kept")
            continue
        saes[sae.sae_id] = sae
    links = block.get("links")
    if links is not None and not isinstance(links, dict):
        problems.append(f"release {name!r}: links is not a mapping; dropped")
    return RegistryRelease(name, block["repo_id"], block["model"], _text(block.get("conversion_func")),
                           links if isinstance(links, dict) else None, tuple(saes.values()))


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
        except (urllib.error.URLError, OSError, ValueError) as err:
            raise SaecatError(f"cannot fetch registry {text}: {one_line(err)}; pass a local YAML file instead") from err
        return parse_registry(raw, text)
    path = Path(text).expanduser()
    if not path.is_file():
        raise SaecatError(f"registry file {path} does not exist")
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise SaecatError(f"cannot read registry file {path}: {one_line(err)}") from err
    return parse_registry(raw, text)


def _compare(kind: str, before: dict, after: dict, names: tuple[str, ...], release: str | None = None) -> list[Change]:
    """Changes between two {key: release or SAE} maps; keys are release names, or SAE ids of `release`."""
    changes = []
    for key in before.keys() | after.keys():
        a, b = before.get(key), after.get(key)
        where = (key, None) if release is None else (release, key)
        if a is None or b is None:
            changes.append(Change(kind, "added" if a is None else "removed", *where))
        elif differ := tuple(sorted(n for n in names if getattr(a, n) != getattr(b, n))):
            changes.append(Change(kind, "changed", *where, differ))
    return changes


def diff(old: Registry | None, new: Registry) -> list[Change]:
    """What changed from `old` to `new` (everything is added when there is no `old`). The SAEs of
    an added or removed release are listed as added or removed too, so SAEs can be counted."""
    before = old.releases if old is not None else {}
    after = new.releases
    changes = _compare("release", before, after, RELEASE_FIELDS)
    for name in before.keys() | after.keys():
        saes = [{s.sae_id: s for s in r.saes} if r else {} for r in (before.get(name), after.get(name))]
        changes += _compare("sae", *saes, SAE_FIELDS, release=name)
    return sorted(changes, key=lambda c: (c.kind, c.release, c.sae_id or "", c.action))
