"""Any width: SAEs of 131k and 262k latents ingest on one machine, under an 8 GiB address space.

The SAEs are made as users make them (sae-lens StandardSAEConfig + save_model) and fire as
trained SAEs do: ~64 latents per token, Zipf-like popularity (conftest.make_wide_sae). Each run
is the real `saecat` command in a child process whose address space is capped with
RLIMIT_AS (what `ulimit -v 8388608` does), and its tables are checked against a brute-force
reference computed here, which shares no code with ingestion: Hugging Face's GPT2Model one
document at a time (conftest.resid), the SAE as sae-lens loads it from disk, and numpy.

- 131,072 latents, `saecat ingest --sae-path`: the run takes the out-of-core pair path, and every
  feature's fire_count / block_count, the token and block totals and the stored pairs (those the
  pair policy keeps, with exact n11) equal the reference's.
- 262,144 latents in the hub cache under a sae-lens registry release, selected by a watch on its
  width: `saecat sync --ingest` runs to the end; the SAE is ready with 262,144 features, the stored
  pairs are exactly the reference's policy pairs, and its FAISS index is on disk.

Floats: the SAE's cuts are kept clear of every pre-activation on the counted tokens (by more than
1e-6, thirty times the ~3e-8 by which the two forward paths differ), so float noise cannot flip a
firing at the default threshold 0, and every integer is compared exactly.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from test_robustness import _env

from catalog import Catalog
from catalog.index import VectorIndex
from conftest import hub_cache_put, make_sae, make_wide_sae
from ingest.pair_policy import PairPolicy, select

SAECAT = Path(sys.executable).with_name("saecat")  # the console script users run, from this venv
AS_LIMIT = 8 * 2**30  # ulimit -v 8388608
MAX_DOC = 256  # the fixture model's context: BOS + 255 counted tokens per document
# (block size, max tokens) per test: full blocks within 255-token documents, and max_tokens cuts a
# document mid-way (it is exact); the 262k test counts fewer tokens to stay within a minute
INGEST_RUN, SYNC_RUN = (64, 3000), (32, 2000)
POLICY = PairPolicy(min_blocks=2, top_partners=8)
POLICY_FLAGS = ["--min-pair-blocks", "2", "--top-partners", "8"]
L0 = 64

# A real sae-lens registry release whose SAEs are in sae-lens' own format (cfg.json +
# safetensors) and whose entries state no width: the watch learns it from the cached cfg.json.
RELEASE = "pythia-70m-deduped-res-sm"
WIDE_ID = "blocks.0.hook_resid_post"  # the fixture model's residual entering block 1, like HOOK
NARROW_ID = "blocks.0.hook_resid_pre"  # a 96-wide SAE in the same release, outside the watch


def _cap_address_space() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (AS_LIMIT, AS_LIMIT))


def saecat(*args: str, cwd: Path, timeout: float = 300) -> tuple[subprocess.CompletedProcess, str]:
    """Run `saecat ARGS` under the address-space cap; (the process, its wall and CPU seconds)."""
    started, cpu = time.monotonic(), resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.run([str(SAECAT), *args], cwd=cwd, env=_env(), capture_output=True, text=True,
                          timeout=timeout, preexec_fn=_cap_address_space)
    used = resource.getrusage(resource.RUSAGE_CHILDREN)
    seconds = used.ru_utime + used.ru_stime - cpu.ru_utime - cpu.ru_stime
    return proc, f"{time.monotonic() - started:.1f}s wall, {seconds:.1f}s CPU"


# ----------------------------------------------------------------------------- the reference


def counted(docs: list[torch.Tensor], max_tokens: int) -> list[torch.Tensor]:
    """The residuals of the tokens an ingestion counts: per document in stream order, BOS dropped,
    until max_tokens counted tokens (the last document consumed is cut to fit exactly)."""
    out, n = [], 0
    for resid in docs:
        if n >= max_tokens:
            break
        out.append(resid[1:][: max_tokens - n])
        n += len(out[-1])
    return out


@dataclass
class Reference:
    n_tokens: int
    n_blocks: int
    n_documents: int
    fire_count: np.ndarray  # int64 [F]
    block_count: np.ndarray  # int64 [F]
    max_activation: np.ndarray  # float64 [F], nan where never fired
    block_sets: list[np.ndarray]  # per full block, the features that fired in it (sorted)
    margin: float  # the smallest |pre-activation|: how far any firing decision is from flipping


def reference(folder: Path, docs: list[torch.Tensor], block_size: int) -> Reference:
    """Count the obvious way, over `docs` (counted tokens only): the SAE as sae-lens loads it from
    disk, a feature fires where its activation is > 0 (the default threshold), and only full blocks
    of a document's tokens count. Dense per document only, never [all tokens, F]."""
    from sae_lens import SAE

    sae = SAE.load_from_disk(str(folder), device="cpu").eval()
    d_sae = sae.cfg.d_sae
    pre: list[torch.Tensor] = []
    sae.hook_sae_acts_pre.register_forward_hook(lambda module, args, out: pre.append(out))
    fire = np.zeros(d_sae, dtype=np.int64)
    top = np.full(d_sae, -np.inf)
    block_sets: list[np.ndarray] = []
    margin = np.inf
    with torch.no_grad():
        for resid in docs:
            acts = sae.encode(resid)
            margin = min(margin, float(pre.pop().abs_().min()))  # what the ReLU cut at 0 (acts are a copy)
            token, feature = (t.numpy() for t in torch.nonzero(acts > 0, as_tuple=True))
            np.add.at(fire, feature, 1)
            np.maximum.at(top, feature, acts[token, feature].double().numpy())
            for b in range(len(resid) // block_size):
                inside = (token >= b * block_size) & (token < (b + 1) * block_size)
                block_sets.append(np.unique(feature[inside]))
    block_count = np.bincount(np.concatenate(block_sets), minlength=d_sae).astype(np.int64)
    top[fire == 0] = np.nan
    return Reference(sum(map(len, docs)), len(block_sets), len(docs), fire, block_count, top, block_sets, margin)


def pairs_at_least(ref: Reference, min_blocks: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every pair (i < j) that shares at least `min_blocks` blocks, with its exact n11: a Gram
    matrix of the block indicators over the features in at least that many blocks (any such pair's
    two features are among them)."""
    candidates = np.flatnonzero(ref.block_count >= min_blocks)
    x = np.zeros((ref.n_blocks, len(candidates)), dtype=np.float32)
    for b, s in enumerate(ref.block_sets):
        x[b, np.searchsorted(candidates, s[np.isin(s, candidates)])] = 1.0
    gram = x.T @ x  # exact: float32 holds integers to 2^24, far above n_blocks
    a, b = np.nonzero(np.triu(gram >= min_blocks, 1))  # row-major: sorted by (i, j)
    return candidates[a], candidates[b], np.rint(gram[a, b]).astype(np.int64)


def expected_pairs(ref: Reference, policy: PairPolicy) -> list[tuple[int, int, int]]:
    """The pairs the policy keeps, sorted by (i, j). select() ranks partners only among the pairs
    that pass min_blocks, so the pairs below it need not be listed; and it finds some there to drop
    (top partners) and some below (pairs sharing one block), or the check would not tell."""
    assert policy.min_blocks == 2 and policy.rank_by == "n11"
    i, j, n11 = pairs_at_least(ref, policy.min_blocks)
    keep = select(policy, i, j, n11, ref.block_count, ref.n_blocks)
    assert 0 < keep.sum() < len(keep)
    assert sum(len(s) * (len(s) - 1) // 2 for s in ref.block_sets) > n11.sum()  # sum of every pair's n11 > theirs
    return sorted(zip(i[keep].tolist(), j[keep].tolist(), n11[keep].tolist()))


def assert_realistic(ref: Reference, d_sae: int, block_size: int) -> None:
    """The reference is what a wide SAE gives, and exercises what it should."""
    l0 = ref.fire_count.sum() / ref.n_tokens
    assert 30 < l0 < 150, l0  # ~64 latents per token, not make_sae's 10% of all of them
    fired = np.flatnonzero(ref.fire_count)
    assert 1000 < len(fired) < d_sae // 4, len(fired)  # thousands of latents fire, most never do
    assert ref.fire_count.max() > 50 * np.median(ref.fire_count[fired])  # Zipf-like: a few fire far more often
    assert (ref.block_count < ref.fire_count).any()  # several firings in one block count once
    assert ref.n_blocks > 20 and ref.n_tokens > ref.n_blocks * block_size  # partial blocks left over, uncounted
    # the two forward paths differ by ~3e-8 in an activation (measured): no firing is that close to flipping
    assert ref.margin > 1e-6, ref.margin


# ----------------------------------------------------------------------------- the catalog


def catalog_rows(db: Path, release: str, sae_id: str) -> dict:
    with Catalog.open(db) as cat:
        cols = ["sae", "status", "d_sae", "n_tokens", "n_blocks", "n_documents", "threshold", "block_size",
                "pair_min_blocks", "pair_top_partners", "pairs_complete"]
        [row] = cat.con.execute(f"SELECT {', '.join(cols)} FROM saes WHERE release = ? AND sae_id = ?",
                                [release, sae_id]).fetchall()
        sae = dict(zip(cols, row))
        features = cat.con.execute("SELECT feature, fire_count, block_count, max_activation FROM features "
                                   "WHERE sae = ? ORDER BY feature", [sae["sae"]]).fetchnumpy()
        pairs = cat.con.execute("SELECT i, j, n11 FROM cooccurrence WHERE sae = ? ORDER BY i, j",
                                [sae["sae"]]).fetchall()
        runs = cat.con.execute("SELECT status, json_extract_string(params, '$.plan.pair_path') FROM ingest_runs "
                               "WHERE release = ? AND sae_id = ? ORDER BY run", [release, sae_id]).fetchall()
        index_path, _ = VectorIndex.paths(cat, sae["sae"])
    return {"sae": sae, "features": features, "pairs": [tuple(p) for p in pairs], "runs": runs,
            "index_path": index_path}


def assert_counts_match(got: dict, ref: Reference, d_sae: int, block_size: int) -> None:
    sae, features = got["sae"], got["features"]
    assert sae["status"] == "ready" and sae["d_sae"] == d_sae
    assert (sae["threshold"], sae["block_size"]) == (0.0, block_size)
    assert (sae["n_tokens"], sae["n_blocks"], sae["n_documents"]) == (ref.n_tokens, ref.n_blocks, ref.n_documents)
    np.testing.assert_array_equal(features["feature"], np.arange(d_sae))
    np.testing.assert_array_equal(features["fire_count"], ref.fire_count)
    np.testing.assert_array_equal(features["block_count"], ref.block_count)
    max_activation = np.ma.filled(np.ma.asarray(features["max_activation"], dtype=np.float64), np.nan)  # NULL: nan
    np.testing.assert_allclose(max_activation, ref.max_activation, rtol=1e-4, atol=1e-5, equal_nan=True)


def assert_policy_pairs(got: dict, ref: Reference) -> None:
    assert (got["sae"]["pair_min_blocks"], got["sae"]["pair_top_partners"], got["sae"]["pairs_complete"]) == (
        POLICY.min_blocks, POLICY.top_partners, False)
    assert got["pairs"] == expected_pairs(ref, POLICY)  # exactly the kept pairs, each with its exact n11


# ----------------------------------------------------------------------------- 131,072 latents


def test_a_131072_wide_sae_ingests_under_an_8_gib_address_space(tmp_path_factory, tmp_path, sample_acts, resid,
                                                                 corpus, model_dir):
    d_sae, (block_size, max_tokens) = 131_072, INGEST_RUN
    docs = counted(resid(True, MAX_DOC), max_tokens)
    assert len(docs[-1]) < len(resid(True, MAX_DOC)[len(docs) - 1]) - 1  # max_tokens cuts a document
    folder = make_wide_sae(tmp_path_factory.mktemp("wide") / "sae-131k", d_sae, sample_acts, l0=L0, seed=1,
                           clear_of=torch.cat(docs))
    ref = reference(folder, docs, block_size)
    assert_realistic(ref, d_sae, block_size)

    db = tmp_path / "catalog.duckdb"
    proc, seconds = saecat("ingest", "--dataset", str(corpus), "--sae-path", str(folder), "--model", str(model_dir),
                           "--db", str(db), "--block-size", str(block_size), "--max-doc-tokens", str(MAX_DOC),
                           "--max-tokens", str(max_tokens), *POLICY_FLAGS, "--no-progress", "--json", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["status"] == "ingested" and result["n_tokens"] == ref.n_tokens
    print(f"131k ingest: {seconds} under RLIMIT_AS {AS_LIMIT // 2**30} GiB")

    got = catalog_rows(db, result["release"], result["sae_id"])
    assert got["runs"] == [("done", "blocks")]  # the out-of-core pair path: dense tiles would be 32 GiB
    assert_counts_match(got, ref, d_sae, block_size)
    assert_policy_pairs(got, ref)
    assert result["n_pairs"] == len(got["pairs"])


# ----------------------------------------------------------------------------- 262,144 latents, by sync


def registry_block(release: str) -> str:
    """The release's entry exactly as the installed sae-lens ships it in pretrained_saes.yaml."""
    import sae_lens

    lines = (Path(sae_lens.__file__).parent / "pretrained_saes.yaml").read_text().splitlines()
    start = lines.index(f"{release}:")
    end = next(n for n in range(start + 1, len(lines)) if lines[n] and not lines[n][0].isspace())
    return "\n".join(lines[start:end]) + "\n"


def test_sync_ingests_a_262144_wide_sae_its_watch_selects_by_width(tmp_path_factory, tmp_path, sample_acts, resid,
                                                                   corpus, model_dir):
    from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory

    d_sae, (block_size, max_tokens) = 262_144, SYNC_RUN
    root = tmp_path_factory.mktemp("wider")
    docs = counted(resid(True, MAX_DOC), max_tokens)  # blocks.0.hook_resid_post is hidden_states[1], as HOOK is
    wide = make_wide_sae(root / "sae-262k", d_sae, sample_acts, l0=L0, seed=2, hook=WIDE_ID,
                         model_name="pythia-70m-deduped", clear_of=torch.cat(docs))
    narrow = make_sae(root / "sae-96", "standard", seed=3, hook=NARROW_ID, model_name="pythia-70m-deduped")
    lookup = get_pretrained_saes_directory()[RELEASE]
    hub_cache_put(lookup.repo_id, {f"{lookup.saes_map[sae_id]}/{p.name}": p
                                   for sae_id, folder in ((WIDE_ID, wide), (NARROW_ID, narrow))
                                   for p in folder.iterdir()})
    registry = tmp_path / "registry.yaml"
    registry.write_text(registry_block(RELEASE))

    ref = reference(wide, docs, block_size)
    assert_realistic(ref, d_sae, block_size)

    db = tmp_path / "catalog.duckdb"
    options = {"model": str(model_dir), "block_size": block_size, "max_doc_tokens": MAX_DOC,
               "min_pair_blocks": POLICY.min_blocks, "top_partners": POLICY.top_partners}
    add, _ = saecat("watch", "add", "--dataset", str(corpus), "--release", RELEASE, "--min-width", str(d_sae),
                    "--max-tokens", str(max_tokens), *[f"--option={k}={json.dumps(v)}" for k, v in options.items()],
                    "--db", str(db), cwd=tmp_path)
    assert add.returncode == 0, add.stderr
    proc, seconds = saecat("sync", "--registry", str(registry), "--ingest", "--db", str(db), "--json", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    counts = {r["what"]: r["count"] for r in json.loads(proc.stdout)}
    assert (counts["ingested"], counts["failed"]) == (1, 0), proc.stdout
    print(f"262k sync --ingest: {seconds} under RLIMIT_AS {AS_LIMIT // 2**30} GiB")

    with Catalog.open(db) as cat:
        saes = cat.con.execute("SELECT sae_id, status, d_sae FROM saes WHERE release = ? ORDER BY sae_id",
                               [RELEASE]).fetchall()
    # the width came from the cached cfg.json: the 96-wide one is known now, and left alone
    assert (NARROW_ID, "registered", 96) in saes and (WIDE_ID, "ready", d_sae) in saes
    assert [s for s in saes if s[1] == "ready"] == [(WIDE_ID, "ready", d_sae)]

    got = catalog_rows(db, RELEASE, WIDE_ID)
    assert got["runs"] == [("done", "blocks")]
    assert len(got["features"]["feature"]) == d_sae
    assert_counts_match(got, ref, d_sae, block_size)
    assert_policy_pairs(got, ref)
    import faiss

    assert got["index_path"].is_file()
    assert faiss.read_index(str(got["index_path"])).ntotal == d_sae
