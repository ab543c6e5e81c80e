"""The sae-lens registry read from its YAML: complete on the packaged file, exact diffs between
two real versions (the YAML files of sae-lens 6.30.0 and 6.54.12, gzipped in tests/data/registry),
malformed entries reported and skipped, and what ids and paths say about hook, layer and width."""

from __future__ import annotations

import gzip
from pathlib import Path

import pytest
import yaml

from catalog.errors import SaecatError
from ingest.registry import derived, diff, parse_registry, read_registry

DATA = Path(__file__).parent / "data" / "registry"
OLD, NEW = "sae-lens-6.30.0.yaml.gz", "sae-lens-6.54.12.yaml.gz"


def raw(name: str) -> bytes:
    return gzip.decompress((DATA / name).read_bytes())


def test_packaged_registry_is_complete():
    from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory

    registry = read_registry()
    directory = get_pretrained_saes_directory()
    assert registry.source.startswith("sae-lens ") and registry.version
    assert set(registry.releases) == set(directory)
    for name, release in registry.releases.items():
        expected = directory[name]
        assert [s.sae_id for s in release.saes] == list(expected.saes_map), name
        assert release.repo_id == expected.repo_id and release.model == expected.model
        assert {s.sae_id: s.neuronpedia_id for s in release.saes if s.neuronpedia_id} == \
            {k: v for k, v in expected.neuronpedia_id.items() if v}
        ours = {s.sae_id: s.l0 for s in release.saes if s.l0 is not None}
        theirs = {k: float(v) for k, v in (expected.expected_l0 or {}).items() if v is not None}
        # sae-lens says 0.0 where the YAML gives no l0; saecat says NULL
        assert ours == {k: v for k, v in theirs.items() if k in ours} and set(theirs) - set(ours) <= {
            k for k, v in theirs.items() if v == 0.0}
    assert registry.n_saes == sum(len(r.saes_map) for r in directory.values())
    # the one malformed entry this version ships is reported, not fatal
    assert registry.problems == [
        "release 'gpt2-small-res_scefr-ajt', SAE 'blocks.10.hook_resid_pre': a release block is nested inside "
        "this entry (conversion_func, links, model, repo_id, saes); the entry is kept, its 3 nested SAE(s) are "
        "not registered"]


def reference_diff(old: dict, new: dict) -> set[tuple]:
    """The changes between two parsed YAML files, from the dicts themselves."""
    out = set()
    for name in old.keys() | new.keys():
        a, b = old.get(name), new.get(name)
        if a is None or b is None:
            out.add(("release", "added" if a is None else "removed", name, None, ()))
        else:
            fields = tuple(sorted(k for k, mine in (("repo_id", "repo_id"), ("model", "model"),
                                                    ("conversion_func", "conversion_func"), ("links", "links"))
                                  if a.get(mine) != b.get(mine)))
            if fields:
                out.add(("release", "changed", name, None, fields))
        saes_a = {s["id"]: s for s in (a or {}).get("saes", []) if isinstance(s, dict) and "id" in s}
        saes_b = {s["id"]: s for s in (b or {}).get("saes", []) if isinstance(s, dict) and "id" in s}
        for sae_id in saes_a.keys() | saes_b.keys():
            sa, sb = saes_a.get(sae_id), saes_b.get(sae_id)
            if sa is None or sb is None:
                out.add(("sae", "added" if sa is None else "removed", name, sae_id, ()))
                continue
            keys = {"path": "path", "l0": "l0", "variance_explained": "variance_explained",
                    "neuronpedia": "neuronpedia_id"}
            fields = tuple(sorted(ours for theirs, ours in keys.items() if sa.get(theirs) != sb.get(theirs)))
            if fields:
                out.add(("sae", "changed", name, sae_id, fields))
    return out


def test_two_real_registry_versions_diff_exactly():
    old, new = parse_registry(raw(OLD), OLD), parse_registry(raw(NEW), NEW)
    got = diff(old, new)
    assert {(c.kind, c.action, c.release, c.sae_id, c.fields) for c in got} == \
        reference_diff(yaml.safe_load(raw(OLD)), yaml.safe_load(raw(NEW)))
    assert len(got) == len({(c.kind, c.release, c.sae_id) for c in got})  # one change per thing
    counts = {}
    for c in got:
        counts[(c.kind, c.action)] = counts.get((c.kind, c.action), 0) + 1
    # what happened between the two releases of sae-lens, as a sanity figure
    assert counts == {("release", "added"): 14, ("sae", "added"): 544, ("sae", "changed"): 122}
    assert diff(new, new) == []
    backwards = diff(new, old)
    assert {(c.kind, c.action) for c in backwards} == {("release", "removed"), ("sae", "removed"), ("sae", "changed")}


def test_without_a_previous_registry_everything_is_added():
    new = parse_registry(raw(NEW), NEW)
    got = diff(None, new)
    assert {c.action for c in got} == {"added"}
    assert sum(c.kind == "sae" for c in got) == new.n_saes
    assert sum(c.kind == "release" for c in got) == len(new.releases)


MALFORMED = """
good:
  repo_id: me/good
  model: gpt2-small
  saes:
  - {id: a, path: a, l0: 12}
  - {path: no-id-here}
  - {id: b, path: b, l0: lots}
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
not-a-block: just a string
"""


def test_malformed_entries_are_reported_and_skipped():
    registry = parse_registry(MALFORMED.encode(), "test")
    assert set(registry.releases) == {"good"}
    saes = {s.sae_id: s for s in registry.releases["good"].saes}
    assert list(saes) == ["a", "b", "c"]
    assert saes["a"].path == "a" and saes["a"].l0 == 12.0 and saes["b"].l0 is None
    assert len(registry.problems) == 6
    for fragment in ("SAE #1: not an SAE entry", "SAE 'b': l0 'lots' is not a number",
                     "SAE 'a' listed again", "SAE 'c': a release block is nested", "release 'no-saes': no list",
                     "release 'not-a-block': no list"):
        assert sum(fragment in p for p in registry.problems) == 1, fragment
    with pytest.raises(SaecatError, match="not readable YAML"):
        parse_registry(b"a: [b", "broken")
    with pytest.raises(SaecatError, match="not a mapping"):
        parse_registry(b"- a\n- b\n", "a list")


@pytest.mark.parametrize("sae_id, path, expected", [
    ("blocks.8.hook_resid_pre", "blocks.8.hook_resid_pre", ("blocks.8.hook_resid_pre", 8, None)),
    ("layer_12_width_16k_l0_small", "resid_post/layer_12_width_16k_l0_small", (None, 12, 16384)),
    ("layer_20/width_1m/average_l0_101", "layer_20/width_1m/average_l0_101", (None, 20, 1048576)),
    ("layer_9/width_65k/canonical", "layer_9/width_65k/canonical", (None, 9, 65536)),
    ("blocks.3.hook_resid_post__trainer_0", "width_24k/trainer_0", (None, 3, 24576)),
    ("blocks.0.hook_mlp_out", "sae_group_gpt2_blocks.0.hook_mlp_out_24576:v1", ("blocks.0.hook_mlp_out", 0, None)),
    ("0-res-sm", "0-res-sm", (None, None, None)),  # neither hook nor width stated: read from its config
])
def test_what_ids_and_paths_say(sae_id, path, expected):
    assert derived(sae_id, path) == expected


def test_ids_in_the_packaged_registry_give_hooks_that_parse():
    registry = read_registry()
    hooks = [s for r in registry.releases.values() for s in r.saes if s.hook_name]
    assert len(hooks) >= 250
    assert all(s.layer == int(s.hook_name.split(".")[1]) for s in hooks)
    widths = [s.width for r in registry.releases.values() for s in r.saes if s.width]
    assert set(widths) >= {16384, 65536, 131072, 1048576}


def test_unreachable_url_and_missing_file_are_one_line_errors(tmp_path):
    with pytest.raises(SaecatError, match="cannot fetch registry http://127.0.0.1:9/") as info:
        read_registry("http://127.0.0.1:9/registry.yaml")
    assert "\n" not in str(info.value)
    with pytest.raises(SaecatError, match="does not exist"):
        read_registry(tmp_path / "nope.yaml")
