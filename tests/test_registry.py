"""The sae-lens registry read from its YAML: complete on the packaged file, exact diffs between
two real versions, malformed entries reported and skipped, and what ids and paths say about
hook, layer and width.

Data: tests/data/registry/sae-lens-5.5.0.yaml.gz and sae-lens-6.54.12.yaml.gz are
sae_lens/pretrained_saes.yaml from the PyPI wheels of sae-lens 5.5.0 and 6.54.12 (gzip -9 -n).
"""

from __future__ import annotations

import gzip
import hashlib
from collections import Counter
from functools import cache
from importlib import metadata
from pathlib import Path

import pytest
import yaml

from catalog.errors import SaecatError
from ingest.registry import diff, parse_registry, read_registry

DATA = Path(__file__).parent / "data" / "registry"
OLD, NEW = "sae-lens-5.5.0.yaml.gz", "sae-lens-6.54.12.yaml.gz"
NESTED = ("release 'gpt2-small-res_scefr-ajt', SAE 'blocks.10.hook_resid_pre': a release block is nested inside "
          "this entry (conversion_func, links, model, repo_id, saes); the entry is kept, its 3 nested SAE(s) are "
          "not registered")


@cache
def raw(name: str) -> bytes:
    return gzip.decompress((DATA / name).read_bytes())


@cache
def stored_new():
    return parse_registry(raw(NEW), NEW, "6.54.12")


def test_packaged_registry_is_complete():
    from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory

    registry = read_registry()
    directory = get_pretrained_saes_directory()
    assert registry.version == metadata.version("sae-lens") and registry.source == f"sae-lens {registry.version}"
    if registry.version == "6.54.12":  # the version this was written against, and the stored copy of its file
        assert registry.sha256 == stored_new().sha256 == hashlib.sha256(raw(NEW)).hexdigest()
        assert (len(registry.releases), registry.n_saes) == (170, 13857)
        # the one malformed entry this version ships is reported, not fatal
        assert registry.problems == [NESTED]
    assert set(registry.releases) == set(directory)
    assert registry.n_saes == sum(len(r.saes_map) for r in directory.values())
    for name, release in registry.releases.items():
        expected = directory[name]
        assert (release.repo_id, release.model, release.conversion_func) == \
            (expected.repo_id, expected.model, expected.conversion_func), name
        assert {s.sae_id: s.path for s in release.saes} == expected.saes_map, name
        assert {s.sae_id: s.neuronpedia_id for s in release.saes} == expected.neuronpedia_id, name
        # sae-lens says 0.0 for a missing l0 and 1.0 for a missing variance_explained; saecat says None
        assert {s.sae_id: s.l0 or 0.0 for s in release.saes} == \
            {k: float(v or 0.0) for k, v in expected.expected_l0.items()}, name
        assert {s.sae_id: 1.0 if s.variance_explained is None else s.variance_explained for s in release.saes} == \
            {k: float(v) for k, v in expected.expected_var_explained.items()}, name


def reference_diff(old: dict, new: dict) -> set[tuple]:
    """The changes between two parsed YAML files, straight from the dicts."""
    out = set()
    for name in old.keys() - new.keys():
        out.add(("release", "removed", name, None, ()))
    for name in new.keys() - old.keys():
        out.add(("release", "added", name, None, ()))
    for name in old.keys() & new.keys():
        fields = tuple(sorted(k for k in ("repo_id", "model", "conversion_func", "links")
                              if old[name].get(k) != new[name].get(k)))
        if fields:
            out.add(("release", "changed", name, None, fields))
    pairs = [{(r, s["id"]): s for r, block in d.items() for s in block["saes"]} for d in (old, new)]
    for release, sae_id in pairs[0].keys() - pairs[1].keys():
        out.add(("sae", "removed", release, sae_id, ()))
    for release, sae_id in pairs[1].keys() - pairs[0].keys():
        out.add(("sae", "added", release, sae_id, ()))
    names = {"path": "path", "l0": "l0", "variance_explained": "variance_explained", "neuronpedia": "neuronpedia_id"}
    for key in pairs[0].keys() & pairs[1].keys():
        a, b = pairs[0][key], pairs[1][key]
        fields = tuple(sorted(ours for theirs, ours in names.items() if a.get(theirs) != b.get(theirs)))
        if fields:
            out.add(("sae", "changed", *key, fields))
    return out


def test_two_real_registry_versions_diff_exactly():
    old, new = parse_registry(raw(OLD), OLD), stored_new()
    assert old.problems == new.problems == [NESTED]
    assert (len(old.releases), old.n_saes) == (59, 4111)
    got = diff(old, new)
    # libyaml's safe loader: yaml.safe_load's rules, 7x faster on these 2 MB of YAML
    load = [yaml.load(raw(name), Loader=yaml.CSafeLoader) for name in (OLD, NEW)]
    assert {(c.kind, c.action, c.release, c.sae_id, c.fields) for c in got} == reference_diff(*load)
    assert got == sorted(got, key=lambda c: (c.kind, c.release, c.sae_id or "", c.action))
    assert len(got) == len({(c.kind, c.release, c.sae_id) for c in got})  # one change per thing
    # what happened between the two sae-lens versions: one SAE dropped, 96 neuronpedia ids filled in
    assert Counter((c.kind, c.action) for c in got) == {
        ("release", "added"): 111, ("sae", "added"): 9747, ("sae", "removed"): 1, ("sae", "changed"): 96}
    assert [(c.release, c.sae_id) for c in got if c.action == "removed"] == [
        ("gemma-scope-9b-pt-res-canonical", "layer_20/width_262k/canonical")]
    assert {c.fields for c in got if c.action == "changed"} == {("neuronpedia_id",)}
    assert diff(new, new) == []
    assert Counter((c.kind, c.action) for c in diff(new, old)) == {
        ("release", "removed"): 111, ("sae", "removed"): 9747, ("sae", "added"): 1, ("sae", "changed"): 96}


def test_without_a_previous_registry_everything_is_added():
    new = parse_registry(raw(OLD), OLD)
    got = diff(None, new)
    assert {c.action for c in got} == {"added"} and {c.fields for c in got} == {()}
    assert {c.release for c in got if c.kind == "release"} == set(new.releases)
    assert {(c.release, c.sae_id) for c in got if c.kind == "sae"} == \
        {(r.release, s.sae_id) for r in new.releases.values() for s in r.saes}
    assert sum(c.kind == "sae" for c in got) == new.n_saes == 4111


MALFORMED = """
good:
  repo_id: me/good
  model: gpt2-small
  links: {model: https://huggingface.co/gpt2}
  saes:
  - {id: a, path: a, l0: 12, neuronpedia: gpt2-small/0-a}
  - {path: no-id-here, l0: 3}
  - {id: b, path: b, l0: lots, variance_explained: 0.9}
  - {id: a, path: again}
  - id: c
    path: c
    repo_id: nested/release
    model: gpt2-small
    saes:
    - {id: lost, path: lost}
no-saes:
  repo_id: me/none
  model: gpt2-small
no-model:
  repo_id: me/nomodel
  saes: [{id: x, path: x}]
not-a-block: just a string
"""


def test_malformed_entries_are_reported_and_skipped():
    registry = parse_registry(MALFORMED.encode(), "test")
    assert set(registry.releases) == {"good"}
    good = registry.releases["good"]
    assert (good.repo_id, good.model, good.links) == ("me/good", "gpt2-small", {"model": "https://huggingface.co/gpt2"})
    saes = {s.sae_id: s for s in good.saes}
    assert list(saes) == ["a", "b", "c"]
    assert (saes["a"].path, saes["a"].l0, saes["a"].neuronpedia_id) == ("a", 12.0, "gpt2-small/0-a")
    assert (saes["b"].l0, saes["b"].variance_explained) == (None, 0.9)
    assert (saes["c"].path, saes["c"].l0) == ("c", None)
    assert registry.problems == [
        "release 'good', SAE #1: not an SAE entry with a string id (keys ['l0', 'path']); skipped",
        "release 'good', SAE 'b': l0 'lots' is not a number; taken as unknown",
        "release 'good', SAE #3: id 'a' listed again; the first kept",
        "release 'good', SAE 'c': a release block is nested inside this entry (model, repo_id, saes); "
        "the entry is kept, its 1 nested SAE(s) are not registered",
        "release 'no-saes': no list of SAEs; skipped",
        "release 'no-model': repo_id or model missing or not a string; skipped",
        "release 'not-a-block': no list of SAEs; skipped",
    ]
    with pytest.raises(SaecatError, match="not readable YAML"):
        parse_registry(b"a: [b", "broken")
    with pytest.raises(SaecatError, match="not a mapping"):
        parse_registry(b"- a\n- b\n", "a list")


# Real entries of sae-lens 6.54.12 (the stored copy): (release, sae_id) -> (hook_name, layer, width).
# What stays None: the hook unless the id or path is exactly a block hook ('__trainer_0' suffixes,
# 'blocks.0.hook_z' whose real hook is blocks.0.attn.hook_z); the layer in Llama Scope's 'l0r'
# (L0 also means sparsity elsewhere); widths not written as 'width_...' ('v5_128k', '_768',
# expansion factors like '32x', or 'w32k' in a release name).
@pytest.mark.parametrize("release, sae_id, expected", [
    ("gpt2-small-res-jb", "blocks.8.hook_resid_pre", ("blocks.8.hook_resid_pre", 8, None)),
    ("gemma-scope-2-270m-pt-res", "layer_12_width_16k_l0_small", (None, 12, 16384)),
    ("gemma-scope-2-4b-pt-res", "layer_17_width_262k_l0_medium_seed_1", (None, 17, 262144)),
    ("gemma-scope-2-4b-pt-res", "layer_17_width_1m_l0_big", (None, 17, 1048576)),
    ("gemma-scope-27b-pt-res", "layer_10/width_131k/average_l0_106", (None, 10, 131072)),
    ("gemma-scope-2b-pt-res-canonical", "layer_5/width_1m/canonical", (None, 5, 1048576)),
    ("gemma-scope-2b-pt-res", "embedding/width_4k/average_l0_6", (None, None, 4096)),
    ("sae_bench_gemma-2-2b_topk_width-2pow12_date-1109", "blocks.12.hook_resid_post__trainer_0", (None, 12, 4096)),
    ("saebench_gemma-2-2b_width-2pow14_date-0107", "blocks.12.hook_resid_post__trainer_0", (None, 12, 16384)),
    ("gpt2-small-attn-out-v5-128k", "blocks.0.hook_attn_out", ("blocks.0.hook_attn_out", 0, None)),
    ("gpt2-small-resid-mid-v5-128k", "blocks.3.hook_resid_mid", ("blocks.3.hook_resid_mid", 3, None)),
    ("gpt2-small-hook-z-kk", "blocks.0.hook_z", (None, 0, None)),
    ("gpt2-small-res-jb-feature-splitting", "blocks.8.hook_resid_pre_768", (None, 8, None)),
    ("qwen-scope-3-1.7b-base-w32k-l50", "layer0", (None, 0, None)),
    ("mwhanna-qwen3-4b-transcoders", "layer_7", (None, 7, None)),
    ("mntss-gemma-2-2b-2.5m-clt-as-per-layer", "layer_0", (None, 0, None)),
    ("llama-3.1-8b-instruct-andyrdt", "resid_post_layer_3_trainer_1", (None, 3, None)),
    ("llama_scope_lxr_32x", "l0r_32x", (None, None, None)),
])
def test_what_real_ids_and_paths_say(release, sae_id, expected):
    sae = {s.sae_id: s for s in stored_new().releases[release].saes}[sae_id]
    assert (sae.hook_name, sae.layer, sae.width) == expected


def test_derived_fields_across_the_packaged_registry():
    saes = [s for r in stored_new().releases.values() for s in r.saes]
    hooked = [s for s in saes if s.hook_name]
    assert len(hooked) == 288 and all(s.layer == int(s.hook_name.split(".")[1]) for s in hooked)
    assert sum(s.layer is None for s in saes) == 296  # Llama Scope's 288 and gemma-scope's 8 embedding SAEs
    assert Counter(s.width for s in saes) == {16384: 5696, 262144: 4091, 65536: 1047, 131072: 929, 4096: 296,
                                              1048576: 186, 32768: 11, 524288: 11, None: 1590}
    # an integer path in the YAML ('path: 0') is kept as the string sae-lens uses
    assert {s.path for s in stored_new().releases["mntss-gemma-2-2b-2.5m-clt-as-per-layer"].saes} == \
        {str(i) for i in range(26)}


def test_unreachable_url_and_missing_file_are_one_line_errors(tmp_path):
    with pytest.raises(SaecatError, match=r"cannot fetch registry http://127\.0\.0\.1:9/.*pass a local YAML") as info:
        read_registry("http://127.0.0.1:9/registry.yaml")
    assert "\n" not in str(info.value)
    with pytest.raises(SaecatError, match="does not exist") as info:
        read_registry(tmp_path / "nope.yaml")
    assert "\n" not in str(info.value)
    (tmp_path / "old.yaml").write_bytes(raw(OLD))
    from_file = read_registry(tmp_path / "old.yaml")
    assert (from_file.source, from_file.version, from_file.n_saes) == (str(tmp_path / "old.yaml"), None, 4111)
    assert from_file.sha256 == "8b5618a6aea0576a4bf5313221b9051563a2f09cf5c56ffdf7715da485e0d269"
