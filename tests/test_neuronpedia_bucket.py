"""`saecat import neuronpedia` over HTTPS: the bucket's API served locally (ListObjectsV2 pages and
object reads, as S3 answers them), and a clear error where the network is missing."""

from __future__ import annotations

import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from xml.sax.saxutils import escape

import pytest

from catalog import Catalog
from catalog.errors import SaecatError
from ingest.neuronpedia import import_neuronpedia
from ingest.s3 import split_url
from tests.neuronpedia_fixture import make_source, write_export

PAGE = 3  # keys a listing page: small, so that every listing is continued


def _bucket(root: Path) -> type[BaseHTTPRequestHandler]:
    class Bucket(BaseHTTPRequestHandler):
        """S3's anonymous read API over `root`: ListObjectsV2 and GET of one key."""

        requests: list[str] = []

        def log_message(self, *args) -> None:
            pass

        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            parts = urllib.parse.urlsplit(self.path)
            Bucket.requests.append(self.path)
            if parts.path == "/":
                return self._list(urllib.parse.parse_qs(parts.query))
            path = root / urllib.parse.unquote(parts.path.lstrip("/"))
            if not path.is_file():
                return self._send(404, b"<Error><Code>NoSuchKey</Code></Error>")
            self._send(200, path.read_bytes())

        def _list(self, query: dict) -> None:
            prefix = query.get("prefix", [""])[0]
            keys = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
            keys = [k for k in keys if k.startswith(prefix)]
            start = int(query.get("continuation-token", ["0"])[0])
            page = keys[start:start + PAGE]
            more = start + PAGE < len(keys)
            body = "".join(f"<Contents><Key>{escape(k)}</Key><Size>{(root / k).stat().st_size}</Size></Contents>"
                           for k in page)
            token = f"<NextContinuationToken>{start + PAGE}</NextContinuationToken>" if more else ""
            xml = ('<?xml version="1.0" encoding="UTF-8"?><ListBucketResult '
                   'xmlns="http://s3.amazonaws.com/doc/2006-03-01/"><Name>neuronpedia-datasets</Name>'
                   f"<Prefix>{escape(prefix)}</Prefix><KeyCount>{len(page)}</KeyCount><MaxKeys>{PAGE}</MaxKeys>"
                   f"<IsTruncated>{'true' if more else 'false'}</IsTruncated>{body}{token}</ListBucketResult>")
            self._send(200, xml.encode())

        def _send(self, status: int, body: bytes) -> None:
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    return Bucket


@pytest.fixture
def bucket(tmp_path):
    root = tmp_path / "bucket"
    write_export(root / "v1", make_source(seed=21), "B+D")
    write_export(root / "v1", make_source(source_id="9-res-jb", seed=22), "A")
    handler = _bucket(root)
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", root, handler
    server.shutdown()


def test_a_source_imports_from_the_bucket_as_from_a_local_copy(bucket, tmp_path):
    endpoint, root, handler = bucket
    over_http = import_neuronpedia(f"{endpoint}/v1/gpt2-small/8-res-jb/", tmp_path / "remote.duckdb")
    local = import_neuronpedia(root / "v1" / "gpt2-small" / "8-res-jb", tmp_path / "local.duckdb")
    assert [d.ref for d in over_http] == ["gpt2-small/8-res-jb"]
    for table in ("neuronpedia_features", "neuronpedia_activations", "neuronpedia_explanations"):
        with Catalog.open(tmp_path / "remote.duckdb") as remote, Catalog.open(tmp_path / "local.duckdb") as here:
            query = f"SELECT * EXCLUDE (sae) FROM {table} ORDER BY ALL"
            assert remote.con.sql(query).fetchall() == here.con.sql(query).fetchall(), table
    assert over_http[0].n_activations == local[0].n_activations > 0
    assert sum("continuation-token" in r for r in handler.requests) >= 2  # listings were paged


def test_a_model_prefix_imports_every_source_and_a_rerun_downloads_nothing_again(bucket, tmp_path):
    endpoint, _, handler = bucket
    db = tmp_path / "catalog.duckdb"
    first = import_neuronpedia(f"{endpoint}/v1/gpt2-small", db)
    assert sorted(d.ref for d in first) == ["gpt2-small/8-res-jb", "gpt2-small/9-res-jb"]
    handler.requests.clear()
    again = import_neuronpedia(f"{endpoint}/v1/gpt2-small", db)
    assert again == first and all(r.startswith("/?") for r in handler.requests)  # listings only


def test_unreachable_bucket_and_missing_prefix_are_one_line_errors(bucket, tmp_path):
    endpoint, _, _ = bucket
    with pytest.raises(SaecatError, match=r"^cannot reach 127\.0\.0\.1:1 .*reading the bucket needs the network"):
        import_neuronpedia("http://127.0.0.1:1/v1/gpt2-small/8-res-jb", tmp_path / "catalog.duckdb")
    with pytest.raises(SaecatError, match="nothing in the bucket under 'v1/no-such-model'"):
        import_neuronpedia(f"{endpoint}/v1/no-such-model", tmp_path / "catalog.duckdb")


@pytest.mark.parametrize("url,expected", [
    ("s3://neuronpedia-datasets/v1/gemma-2-2b/20-gemmascope-res-16k",
     ("https://neuronpedia-datasets.s3.us-east-1.amazonaws.com", "v1/gemma-2-2b/20-gemmascope-res-16k")),
    ("https://neuronpedia-datasets.s3.us-east-1.amazonaws.com/index.html?prefix=v1/gpt2-small/",
     ("https://neuronpedia-datasets.s3.us-east-1.amazonaws.com", "v1/gpt2-small/")),
    ("https://neuronpedia-datasets.s3.us-east-1.amazonaws.com/v1/gpt2-small/8-res-jb/",
     ("https://neuronpedia-datasets.s3.us-east-1.amazonaws.com", "v1/gpt2-small/8-res-jb/")),
])
def test_bucket_addresses_split_into_endpoint_and_prefix(url, expected):
    assert split_url(url) == expected
