"""queries.word_pairs: the scoring on synthetic differences with a planted length distractor,
the word vectors against a brute-force per-word forward pass of the tiny GPT-2 (Hugging Face
GPT2Model, one word at a time, nothing shared with the module), and the pair files.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.discriminant_analysis import LinearDiscriminantAnalysis
from sklearn.metrics import silhouette_samples, silhouette_score
from sklearn.model_selection import StratifiedKFold

from catalog import SaecatError, writer
from conftest import HOOK
from queries import word_pairs
from queries.word_pairs import WordPair, WordPairParams, evaluate, read_pairs
from test_catalog import features_table, pairs_table, sae_row

# --------------------------------------------------------------------------- synthetic differences


def synthetic(seed: int = 0, tasks: int = 5, per_task: int = 30, dim: int = 40, length_norm: float = 3.0,
              noise: float = 0.4):
    """Per task a planted offset; every pair also moves length_norm * (len b - len a) along one
    length direction, plus noise. Returns (differences, task labels, length deltas, the length
    direction)."""
    rng = np.random.default_rng(seed)
    direction = rng.standard_normal(dim)
    direction /= np.linalg.norm(direction)
    offsets = rng.standard_normal((tasks, dim)) * 0.6
    x, labels, delta = [], [], []
    for t in range(tasks):
        for _ in range(per_task):
            la, lb = rng.integers(3, 10, 2)
            x.append(offsets[t] + length_norm * direction * (lb - la) + noise * rng.standard_normal(dim))
            labels.append(f"task{t}")
            delta.append(float(lb - la))
    return np.array(x), labels, np.array(delta), direction


def within_task_length_fit(x, labels, delta, ridge):
    """The length direction by hand: each task's mean removed, then ridge on the length delta."""
    labels = np.asarray(labels)
    xc, lc = x.copy(), delta.copy()
    for t in set(labels):
        xc[labels == t] -= xc[labels == t].mean(axis=0)
        lc[labels == t] -= lc[labels == t].mean()
    w = lc @ xc / (lc @ lc + ridge)
    r2 = 1 - ((xc - np.outer(lc, w)) ** 2).sum() / (xc**2).sum()
    return w, r2


def rows(table, **where):
    return [r for r in table.to_pylist() if all(r[k] == v for k, v in where.items())]


def test_planted_length_distractor_hides_the_tasks_until_projected_and_lda_separates_them():
    x, labels, delta, direction = synthetic()
    params = WordPairParams(folds=5, seed=3)
    summary, tables = evaluate({"residual": x}, labels, delta, params)
    sweep, per_task = tables["crystal_sweep"], tables["crystal_tasks"]
    y = np.asarray(labels)

    raw = rows(sweep, method="raw")[0]["silhouette"]
    assert raw == pytest.approx(silhouette_score(x, y), abs=1e-12)
    w, r2 = within_task_length_fit(x, labels, delta, params.ridge)
    u = w / np.linalg.norm(w)
    assert abs(u @ direction) > 0.99  # the fitted length direction is the planted one
    space = summary["spaces"]["residual"]
    assert space["distractors"][0]["r2"] == pytest.approx(r2, rel=1e-9)
    projected = x - np.outer(x @ u, u)
    project = rows(sweep, method="project")[0]["silhouette"]
    assert project == pytest.approx(silhouette_score(projected, y), abs=1e-9)

    lda = sorted(rows(sweep, method="lda"), key=lambda r: r["n_components"])
    assert [r["n_components"] for r in lda] == [1, 2, 3, 4]  # 5 tasks: up to 4 directions
    folds = StratifiedKFold(n_splits=5, shuffle=True, random_state=3)
    for r in lda:
        n = r["n_components"]
        z = LinearDiscriminantAnalysis(n_components=n).fit(x, y).transform(x)
        assert r["silhouette"] == pytest.approx(silhouette_score(z, y), abs=1e-9)
        held = []
        for train, test in folds.split(x, y):
            z_test = LinearDiscriminantAnalysis(n_components=n).fit(x[train], y[train]).transform(x[test])
            held.append(silhouette_samples(z_test, y[test]))
        assert r["silhouette_held_out"] == pytest.approx(np.concatenate(held).mean(), abs=1e-9)
    best = space["silhouette"]["lda"]
    assert best["held_out"] == max(r["silhouette_held_out"] for r in lda)
    assert best["held_out"] <= best["in_sample"]
    assert all(r["silhouette_held_out"] <= r["silhouette"] for r in lda if r["n_components"] >= 2)

    # the planted story: length hides the tasks; removing it helps; LDA helps most
    assert raw < 0.15 < project - 0.15
    assert best["in_sample"] > best["held_out"] > project
    assert space["silhouette"]["raw"] == raw and space["silhouette"]["project"] == project
    assert abs(space["pc1_length_corr"]) > 0.9

    for task in sorted(set(labels)):
        d = x[y == task]
        n = np.linalg.norm(d, axis=1)
        i, j = np.triu_indices(len(d), 1)
        cos = ((d[i] * d[j]).sum(1) / (n[i] * n[j])).mean()
        err = (np.linalg.norm(d[i] - d[j], axis=1) / (n[i] + n[j])).mean()
        got = rows(per_task, method="raw", task=task)[0]
        assert got["n_pairs"] == 30
        assert got["mean_cosine"] == pytest.approx(cos, abs=1e-12)
        assert got["mean_error"] == pytest.approx(err, abs=1e-12)
        gain = space["tasks"][task]["improvement"]
        assert gain["cosine"] > 0.2 and gain["error"] > 0.1  # every task's crystal gets tighter


def test_tasks_with_one_pair_are_skipped_and_two_tasks_are_needed():
    x, labels, delta, _ = synthetic(tasks=3, per_task=6)
    labels = labels[:-5] + ["lonely"] + labels[-4:]
    summary, tables = evaluate({"sae": x}, labels, delta, WordPairParams(lda_components=(1,)))
    assert {"task": "lonely", "reason": "1 pair (need 2)"} in summary["skipped_tasks"]
    assert "lonely" not in set(tables["crystal_tasks"].column("task").to_pylist())
    assert summary["n_tasks"] == 3 and summary["n_pairs"] == 17
    with pytest.raises(SaecatError, match="at least two tasks"):
        evaluate({"sae": x[:7]}, ["a"] * 6 + ["b"], delta[:7], WordPairParams())
    with pytest.raises(SaecatError, match="too large"):
        evaluate({"sae": x}, labels, delta, WordPairParams(lda_components=(3,)))


# --------------------------------------------------------------------------- pair files


def test_google_analogy_format_gives_its_pairs_once_each(tmp_path):
    path = tmp_path / "questions.txt"
    path.write_text(": capital-common-countries\nAthens Greece Baghdad Iraq\nAthens Greece Bangkok Thailand\n"
                    ": empty-section\n: family\nboy girl brother sister\n\n")
    pairs, empty = read_pairs(str(path))
    assert pairs == [WordPair("capital-common-countries", "Athens", "Greece"),
                     WordPair("capital-common-countries", "Baghdad", "Iraq"),
                     WordPair("capital-common-countries", "Bangkok", "Thailand"),
                     WordPair("family", "boy", "girl"), WordPair("family", "brother", "sister")]
    assert empty == ["empty-section"]
    path.write_text(": family\nboy girl brother\n")
    with pytest.raises(SaecatError, match=r"questions.txt:2: expected 4 words"):
        read_pairs(str(path))


def test_tsv_format_and_its_errors(tmp_path):
    path = tmp_path / "pairs.tsv"
    path.write_text("task\tword_a\tword_b\n# a comment\nsize\tbig\tsmall\nsize\tbig\tsmall\ncase\tx\tX\n")
    pairs, empty = read_pairs(str(path))
    assert pairs == [WordPair("size", "big", "small"), WordPair("case", "x", "X")] and empty == []
    path.write_text("size\tbig\tsmall\nsize\tbig\n")
    with pytest.raises(SaecatError, match=r"pairs.tsv:2: expected task<TAB>word_a<TAB>word_b"):
        read_pairs(str(path))
    with pytest.raises(SaecatError, match="cannot read"):
        read_pairs(str(tmp_path / "missing.tsv"))
    with pytest.raises(SaecatError, match="unknown task"):
        word_pairs.select_tasks(pairs, ("size", "colour"))


def test_builtin_pairs_are_many_tasks_of_common_words():
    pairs, empty = read_pairs()
    tasks = {}
    for p in pairs:
        tasks.setdefault(p.task, []).append(p)
    assert empty == [] and 8 <= len(tasks) <= 12
    assert all(20 <= len(v) <= 40 for v in tasks.values()), {k: len(v) for k, v in tasks.items()}
    assert len(set(pairs)) == len(pairs)
    assert all(p.a and p.b and " " not in p.a + p.b and p.a != p.b for p in pairs)
    assert {"country-capital", "singular-plural", "present-past", "male-female", "comparative"} <= set(tasks)


# --------------------------------------------------------------------------- the model, end to end


TASKS = ("plural\tkey\tkeys\nplural\tvalue\tvalues\nplural\tobject\tobjects\nplural\tstring\tstrings\n"
         "case\ttrue\tTrue\ncase\tfalse\tFalse\ncase\tnone\tNone\ncase\tobject\tObject\n"
         "past\tencode\tencoded\npast\tdecode\tdecoded\npast\tload\tloaded\npast\tdump\tdumped\n")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, sae_dirs, model_dir):
    """The fixture SAE in a catalog, recorded as a local folder run on the local tiny GPT-2."""
    from sae_lens import SAE

    folder = sae_dirs["standard"]
    dec = SAE.load_from_disk(str(folder), device="cpu").W_dec.detach().float().numpy()
    root = tmp_path_factory.mktemp("word-pairs")
    db = root / "catalog.duckdb"
    with writer(db) as cat:
        key = cat.commit_sae(sae_row("local", "standard", dec, source=str(folder), activation_model=str(model_dir)),
                             features_table(dec), pairs_table([0], [1], [1]))
    tsv = root / "pairs.tsv"
    tsv.write_text(TASKS)
    return {"db": db, "key": key, "folder": folder, "tsv": tsv}


def reference(model_dir: Path, folder: Path, tokenizer, words: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Per word on its own: BOS + ' word', the residual entering block 1 at the last token
    (Hugging Face hidden_states[1]) and the SAE's encoding of it."""
    from sae_lens import SAE
    from transformers import GPT2Model

    assert HOOK == "blocks.1.hook_resid_pre"
    hf = GPT2Model.from_pretrained(str(model_dir)).eval()
    sae = SAE.load_from_disk(str(folder), device="cpu").eval()
    resid = []
    with torch.no_grad():
        for w in words:
            ids = [tokenizer.bos_token_id] + tokenizer(" " + w, add_special_tokens=False)["input_ids"]
            resid.append(hf(torch.tensor([ids]), output_hidden_states=True).hidden_states[1][0, -1])
        resid = torch.stack(resid)
        return resid.numpy(), sae.encode(resid).numpy()


def test_word_vectors_equal_a_per_word_forward_pass(tiny, model_dir, tokenizer):
    from ingest.model import load_model
    from ingest.sources import load_sae, resolve_source

    loaded = load_sae(resolve_source(None, None, str(tiny["folder"])))
    model = load_model(str(model_dir), loaded.hook_name, loaded.layer)
    words = sorted({w for line in TASKS.splitlines() for w in line.split("\t")[1:]})
    lengths = {len(tokenizer(" " + w, add_special_tokens=False)["input_ids"]) for w in words}
    assert len(lengths) > 1  # words of different token lengths share the padded batch
    got = word_pairs.embed_words(model, loaded, words)
    want_resid, want_sae = reference(model_dir, tiny["folder"], tokenizer, words)
    np.testing.assert_allclose(got.residual, want_resid, atol=2e-5, rtol=1e-5)
    np.testing.assert_allclose(got.sae, want_sae, atol=2e-5, rtol=1e-5)
    assert (want_sae > 0).any()
    assert not got.unknown.any()


def test_end_to_end_scores_equal_sklearn_on_brute_force_differences(tiny, model_dir, tokenizer):
    params = WordPairParams(pairs=str(tiny["tsv"]), folds=2)
    result = word_pairs.run(tiny["db"], sae=tiny["key"], params=params)
    assert not result.cached
    pairs, _ = read_pairs(str(tiny["tsv"]))
    words = sorted({w for p in pairs for w in (p.a, p.b)})
    resid, sae = reference(model_dir, tiny["folder"], tokenizer, words)
    at = {w: i for i, w in enumerate(words)}
    ia, ib = [at[p.a] for p in pairs], [at[p.b] for p in pairs]
    y = np.array([p.task for p in pairs])
    sweep = result.tables["crystal_sweep"]
    for space, vectors in (("residual", resid), ("sae", sae)):
        diffs = vectors[ib] - vectors[ia]
        got = rows(sweep, space=space, method="raw")[0]["silhouette"]
        assert got == pytest.approx(silhouette_score(diffs, y), abs=1e-4)
        assert [r["n_components"] for r in rows(sweep, space=space, method="lda")] == [1, 2]
        task = rows(result.tables["crystal_tasks"], space=space, method="raw", task="past")[0]
        d = diffs[y == "past"]
        n = np.linalg.norm(d, axis=1)
        i, j = np.triu_indices(4, 1)
        assert task["mean_cosine"] == pytest.approx(((d[i] * d[j]).sum(1) / (n[i] * n[j])).mean(), abs=1e-4)
    assert result.summary["n_pairs"] == 12 and result.summary["n_tasks"] == 3
    assert result.summary["model"] == str(model_dir) and result.summary["hook_name"] == HOOK
    assert set(result.summary["spaces"]) == {"residual", "sae"}
    again = word_pairs.run(tiny["db"], sae=tiny["key"], params=params)
    assert again.cached and again.analysis == result.analysis
    as_set = lambda table: {tuple(r.values()) for r in table.to_pylist()}  # noqa: E731
    assert as_set(again.tables["crystal_sweep"]) == as_set(sweep)


def test_end_to_end_reports_unusable_words_and_small_tasks(tiny, tmp_path):
    tsv = tmp_path / "odd.tsv"
    # a word that is the tokenizer's unknown (here also its BOS/EOS) token, and a one-pair task
    tsv.write_text(TASKS + "plural\t<|endoftext|>\tends\nsingle\tone\tfirst\n")
    result = word_pairs.run(tiny["db"], sae=tiny["key"], params=WordPairParams(pairs=str(tsv), folds=2))
    skipped = result.summary["skipped_pairs"]
    assert any(p["a"] == "<|endoftext|>" and "no usable tokens" in p["reason"] for p in skipped)
    assert {"task": "single", "reason": "1 pair (need 2)"} in result.summary["skipped_tasks"]
    assert result.summary["n_pairs"] == 12
    with pytest.raises(SaecatError, match="unknown task"):
        word_pairs.run(tiny["db"], sae=tiny["key"], params=WordPairParams(pairs=str(tsv), tasks=("colours",)))
    with pytest.raises(SaecatError, match="at least two tasks"):
        word_pairs.run(tiny["db"], sae=tiny["key"], params=WordPairParams(pairs=str(tsv), tasks=("past",)))


def test_plot_draws_the_sweep(tiny, tmp_path):
    result = word_pairs.run(tiny["db"], sae=tiny["key"], params=WordPairParams(pairs=str(tiny["tsv"]), folds=2))
    out = word_pairs.plot(result, tmp_path / "sweep.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
