"""Anonymous reads of a public S3 bucket over HTTPS: list a prefix and mirror it into a folder.

Neuronpedia's exports are the public bucket `neuronpedia-datasets` (us-east-1), readable without
credentials: `GET /?list-type=2&prefix=...` lists keys (ListObjectsV2, 1,000 a page, continued
with NextContinuationToken) and `GET /<key>` reads one. `mirror` copies every key under a prefix
to the same relative path in a folder, skipping files already there with the listed size, so an
interrupted download resumes; each file is written to a temporary name first.
"""

from __future__ import annotations

import shutil
import urllib.error
import urllib.parse
import urllib.request
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path

from catalog.errors import SaecatError

NEURONPEDIA_BUCKET = "https://neuronpedia-datasets.s3.us-east-1.amazonaws.com"
_NS = "{http://s3.amazonaws.com/doc/2006-03-01/}"
TIMEOUT_S = 60


def split_url(url: str) -> tuple[str, str]:
    """(endpoint, prefix) of s3://bucket/prefix, of https://host/prefix, or of the bucket's browse
    page https://host/index.html?prefix=..."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme == "s3":
        if parts.netloc == "neuronpedia-datasets":
            return NEURONPEDIA_BUCKET, parts.path.lstrip("/")
        return f"https://{parts.netloc}.s3.amazonaws.com", parts.path.lstrip("/")
    if parts.scheme not in ("http", "https"):
        raise SaecatError(f"{url!r} is not an s3:// or https:// address")
    prefix = urllib.parse.parse_qs(parts.query).get("prefix", [""])[0] if parts.path.endswith("index.html") \
        else urllib.parse.unquote(parts.path.lstrip("/"))
    return f"{parts.scheme}://{parts.netloc}", prefix


def _get(url: str, what: str):
    try:
        return urllib.request.urlopen(url, timeout=TIMEOUT_S)  # noqa: S310 - http(s) only, checked by split_url
    except urllib.error.HTTPError as exc:
        raise SaecatError(f"{what}: HTTP {exc.code} {exc.reason} from {url}") from None
    except (urllib.error.URLError, TimeoutError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise SaecatError(f"cannot reach {urllib.parse.urlsplit(url).netloc} ({reason}): reading the bucket needs the "
                          "network; copy the folder elsewhere (aws s3 sync s3://neuronpedia-datasets/<prefix> DIR "
                          "--no-sign-request) and import DIR") from None


def list_keys(endpoint: str, prefix: str) -> list[tuple[str, int]]:
    """Every (key, size) under prefix, all pages."""
    keys: list[tuple[str, int]] = []
    token = None
    while True:
        query = {"list-type": "2", "prefix": prefix, **({"continuation-token": token} if token else {})}
        with _get(f"{endpoint}/?{urllib.parse.urlencode(query)}", f"listing {prefix!r}") as response:
            root = ET.fromstring(response.read())
        keys += [(item.findtext(f"{_NS}Key"), int(item.findtext(f"{_NS}Size") or 0))
                 for item in root.iter(f"{_NS}Contents")]
        token = root.findtext(f"{_NS}NextContinuationToken")
        if root.findtext(f"{_NS}IsTruncated") != "true" or not token:
            return keys


def mirror(url: str, into: Path, advance: Callable[[int], None] | None = None) -> Path:
    """Copy every key under the URL's prefix into `into` (same relative paths); returns the
    folder the prefix became. advance(bytes) is called as files arrive."""
    endpoint, prefix = split_url(url)
    keys = [(key, size) for key, size in list_keys(endpoint, prefix) if not key.endswith("/")]
    if not keys:
        raise SaecatError(f"nothing in the bucket under {prefix!r} ({endpoint})")
    for key, size in keys:
        target = into / key
        if target.is_file() and target.stat().st_size == size:
            continue  # fetched by an earlier, interrupted run
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(target.name + ".part")
        with _get(f"{endpoint}/{urllib.parse.quote(key)}", f"reading {key!r}") as response, open(tmp, "wb") as out:
            shutil.copyfileobj(response, out)
        tmp.replace(target)
        if advance:
            advance(size)
    return into / prefix.rstrip("/")
