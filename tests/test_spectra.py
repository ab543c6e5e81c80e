"""queries.spectra on synthetic SAEs with planted structure: a power-law spectrum is recovered, an
isotropic cloud matches its own same-shape null, a Gaussian cloud's negentropy matches its null
while a clumpy one's does not, the k-NN estimator matches exact Gaussian entropies, and results
are stored, read back through SQL and reused.

Decoders are committed through `Catalog.commit_sae` with the helpers of test_catalog.
"""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest
from threadpoolctl import threadpool_limits

from catalog import Catalog, SaecatError, writer
from queries import spectra
from queries.spectra import SpectraInputs, SpectraParams
from test_catalog import features_table, pairs_table, sae_row

# Small entropy settings keep each run well under a second; the spectrum tests do not look at them.
FAST = dict(entropy_rows=800, entropy_dims=10)


@pytest.fixture(autouse=True)
def one_blas_thread():
    """On a shared 2-core machine, multi-threaded OpenBLAS under contention runs small eigensolves
    ~100x slower (spinning threads); one thread keeps these tests at seconds. Values are unchanged."""
    with threadpool_limits(1):
        yield


def commit(db, dec: np.ndarray, sae_id: str = "a", *, release: str = "local", layer: int | None = 1,
           activation: np.ndarray | None = None) -> int:
    """Commit a decoder matrix as a ready SAE, with an activation spectrum when given."""
    extra = {}
    if activation is not None:
        extra["activation_spectrum"] = pa.table({
            "rank": pa.array(np.arange(1, len(activation) + 1, dtype=np.int32)),
            "eigenvalue": pa.array(np.asarray(activation, dtype=np.float64))})
    with writer(db) as cat:
        hook = f"blocks.{layer}.hook_resid_pre" if layer is not None else "embed"
        return cat.commit_sae(sae_row(release, sae_id, dec, hook_name=hook, layer=layer), features_table(dec),
                              pairs_table([0], [1], [1]),
                              {"release": release, "repo_id": None, "model": "gpt2", "conversion_func": None,
                               "links": None}, extra=extra)


def power_law_cloud(n: int, d: int, alpha: float, seed: int, *, exact: bool = False,
                    jitter: float = 0.0) -> np.ndarray:
    """X = Z diag(sqrt(lambda)) Q with lambda_r = r^-alpha (times exp(N(0, jitter^2)) noise), Q a
    random rotation. With `exact`, Z's columns are whitened so the sample covariance is exactly
    Q^T diag(lambda) Q."""
    rng = np.random.default_rng(seed)
    lam = np.arange(1, d + 1, dtype=np.float64) ** -alpha * np.exp(jitter * rng.standard_normal(d))
    z = rng.standard_normal((n, d))
    if exact:
        z -= z.mean(axis=0)
        w, v = np.linalg.eigh(np.cov(z.T))
        z = z @ v @ np.diag(w ** -0.5) @ v.T
    q = np.linalg.qr(rng.standard_normal((d, d)))[0]
    return ((z * np.sqrt(lam)) @ q).astype(np.float32)


def compute(x: np.ndarray, activation=(), **params) -> dict:
    return spectra.compute(SpectraInputs(x, np.asarray(activation, dtype=np.float64)), SpectraParams(**params))[0]


# --------------------------------------------------------------------------- 1. planted power law


@pytest.mark.parametrize("alpha", [0.5, 1.0])
def test_planted_power_law_is_recovered(db, alpha):
    x = power_law_cloud(16_000, 160, alpha, seed=int(alpha * 10))
    commit(db, x)
    s = spectra.run(db, "local", "a", params=SpectraParams(**FAST)).summary
    # F/d = 100: Marchenko-Pastur spreading biases the estimate by < 0.01 here (measured 0.003-0.006).
    assert abs(s["alpha"] - alpha) < 0.03
    assert s["alpha_low"] < s["alpha"] < s["alpha_high"]
    assert (s["rank_min_used"], s["rank_max_used"]) == (11, 150)
    assert s["null_alpha"] < 0.2  # F/d = 100: the isotropic null is nearly flat
    assert s["fit_r2"] > 0.99


def test_interval_contains_truth_when_the_spectrum_is_exactly_a_noisy_power_law(db):
    """With Z whitened, the stored eigenvalues are exactly r^-alpha exp(noise): the regression's
    model holds, so its 95% interval must contain alpha. (On an unwhitened finite cloud the
    interval, ~±0.002 wide, does not cover the ~0.005 finite-F bias: it measures the fit's
    scatter, not the sampling of the cloud.)"""
    commit(db, power_law_cloud(2_000, 160, 0.7, seed=3, exact=True, jitter=0.05))
    s = spectra.run(db, "local", "a", params=SpectraParams(**FAST)).summary
    assert s["alpha_low"] <= 0.7 <= s["alpha_high"]
    assert s["alpha_high"] - s["alpha_low"] < 0.1


def test_interval_coverage_is_about_95_percent():
    rng = np.random.default_rng(0)
    ranks = np.arange(1, 201)
    hits = 0
    for _ in range(400):
        fit = spectra.fit_power_law(ranks ** -0.4 * np.exp(0.1 * rng.standard_normal(200)), 11, 150)
        hits += fit.low <= 0.4 <= fit.high
    assert 0.91 <= hits / 400 <= 0.98


# --------------------------------------------------------------------------- 2. isotropic cloud and its null


def test_isotropic_cloud_matches_its_same_shape_null(db):
    x = np.random.default_rng(7).standard_normal((2048, 256)).astype(np.float32)
    commit(db, x)
    s = spectra.run(db, "local", "a", params=SpectraParams(null_draws=10, **FAST)).summary
    # Sampling spread alone makes the null steep: ~0.27 at 2048 x 256 over ranks 11..150.
    assert 0.25 < s["null_alpha"] < 0.29
    assert 0.0005 < s["null_alpha_std"] < 0.005
    assert abs(s["alpha"] - s["null_alpha"]) < 5 * s["null_alpha_std"]
    assert abs(s["marchenko_pastur_alpha"] - s["null_alpha"]) < 0.01  # theory agrees with the draws
    assert len(s["null_alpha_draws"]) == 10
    # No direction stands out: the widest is at the Marchenko-Pastur edge, sqrt(lambda_max) = 1 + sqrt(d / (F - 1)).
    assert s["widths_relative"][0] == pytest.approx(1 + np.sqrt(256 / 2047), rel=0.03)


def test_null_draw_methods_agree_in_distribution():
    """The bidiagonal (Dumitriu-Edelman) model, scipy's Wishart and a drawn F x d cloud give the
    same mean spectrum and spread, with more points than dimensions and with fewer."""
    for n_rows, d in [(300, 40), (30, 40)]:
        means, spreads = {}, {}
        for i, method in enumerate(["bidiagonal", "wishart", "cloud"]):
            draws = spectra.null_spectra(n_rows, d, 300, np.random.default_rng(i), method)
            means[method], spreads[method] = draws.mean(axis=0), draws.std(axis=0)
        for method in ["wishart", "cloud"]:
            np.testing.assert_allclose(means[method][:25], means["bidiagonal"][:25], rtol=0.03)
            np.testing.assert_allclose(spreads[method][:10], spreads["bidiagonal"][:10], rtol=0.25)
        assert np.all(means["bidiagonal"][n_rows - 1:] == 0)  # a cloud of F points spans F - 1 dims
        # Each draw is a covariance of unit-variance points: its trace is d on average.
        assert abs(means["bidiagonal"].sum() / d - 1) < 0.02


# --------------------------------------------------------------------------- 3. negentropy against its null


def anisotropic_gaussian(n: int, d: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    mix = rng.standard_normal((d, d)) * np.exp(-np.arange(d) / 10)[:, None]
    return (rng.standard_normal((n, d)) @ mix).astype(np.float32)


@pytest.mark.parametrize("n_rows, rows", [(3000, 2000), (400, 5000)])
def test_gaussian_cloud_negentropy_matches_its_null_and_the_null_is_not_zero(n_rows, rows):
    """A subsample of a large cloud, and (400 rows) the whole cloud: the null is drawn from a
    Gaussian population of the same F rows, so both match."""
    s = compute(anisotropic_gaussian(n_rows, 48, seed=1), entropy_rows=rows, entropy_dims=20, null_draws=5)
    assert s["widths_relative"][0] > 2  # anisotropic indeed
    # The estimator's own bias (~ -1 nat at n = 2000, d = 20): a bare number would mislead.
    assert s["null_negentropy"] < -0.5
    assert abs(s["negentropy"] - s["null_negentropy"]) < 0.3
    assert abs(s["negentropy_z"]) < 3
    assert s["negentropy_excess"] == pytest.approx(s["negentropy"] - s["null_negentropy"])
    assert (s["entropy_rows_used"], s["entropy_dims_used"], s["entropy_duplicates_dropped"]) == \
        (min(rows, n_rows), 20, 0)


def test_gaussian_population_rows_have_the_population_covariance():
    """All F rows of the null population have exactly the asked covariance; a subsample of it
    scatters around it like a subsample of real rows would."""
    rng = np.random.default_rng(0)
    mix = rng.standard_normal((6, 6))
    cov = mix @ mix.T
    root = np.linalg.cholesky(cov).T
    whole = spectra.gaussian_population_rows(50, 50, root, rng)
    np.testing.assert_allclose(whole.T @ whole / 49, cov, atol=1e-10)  # uncentred: the mean is 0 in law
    part = np.mean([np.cov(spectra.gaussian_population_rows(40, 2000, root, rng).T) for _ in range(400)], axis=0)
    np.testing.assert_allclose(part, cov, atol=0.1 * np.abs(cov).max())


def test_clumpy_cloud_negentropy_is_far_above_its_null():
    rng = np.random.default_rng(2)
    centres = 3 * rng.standard_normal((50, 48))
    x = (centres[rng.integers(0, 50, 3000)] + 0.3 * rng.standard_normal((3000, 48))).astype(np.float32)
    s = compute(x, entropy_rows=2000, entropy_dims=20)
    assert s["negentropy_excess"] > 10
    assert s["negentropy_excess"] > 50 * s["null_negentropy_std"]


# --------------------------------------------------------------------------- 4. the estimator itself


@pytest.mark.parametrize("d", [1, 2, 3, 5])
def test_kl_entropy_matches_exact_gaussian_entropy(d):
    rng = np.random.default_rng(d)
    mix = rng.standard_normal((d, d)) + np.eye(d)
    cov = mix @ mix.T
    points = rng.standard_normal((20_000, d)) @ mix.T
    exact = d / 2 * (1 + np.log(2 * np.pi)) + 0.5 * np.linalg.slogdet(cov)[1]
    assert spectra.kl_entropy(points, k=1) == pytest.approx(exact, abs=0.08)
    assert spectra.kl_entropy(points, k=3) == pytest.approx(exact, abs=0.08)
    assert spectra.gaussian_entropy(np.linalg.eigvalsh(cov)) == pytest.approx(exact, abs=1e-9)


def test_kl_entropy_is_the_standard_formula_with_exact_distances():
    """The constant is psi(n) - psi(k) + log V_d + (d/n) sum log rho_k, checked against scipy's
    exact distances; a near-twin 1e-9 away (which brute force's |a|^2 + |b|^2 - 2ab shortcut
    rounds to distance 0, log 0 = -inf) keeps its true distance."""
    from scipy.spatial.distance import cdist
    from scipy.special import digamma, gammaln

    points = np.random.default_rng(0).standard_normal((1500, 30))
    points[1] = points[0] + 1e-9 / np.sqrt(30)
    dist = cdist(points, points)
    np.fill_diagonal(dist, np.inf)
    for k in (1, 2):
        rho = np.sort(dist, axis=1)[:, k - 1]
        want = digamma(1500) - digamma(k) + 15 * np.log(np.pi) - gammaln(16) + 30 * np.mean(np.log(rho))
        assert spectra.kl_entropy(points, k) == pytest.approx(want, rel=1e-9)


def test_entropy_subsample_is_without_replacement(monkeypatch):
    assert len(set(spectra.entropy_sample(1000, 999, np.random.default_rng(0)))) == 999
    assert len(spectra.entropy_sample(50, 5000, np.random.default_rng(0))) == 50
    # A decoder with 100 exact twin rows: no point may enter the k-NN twice.
    x = anisotropic_gaussian(1000, 16, seed=3)
    x[900:] = x[:100]
    seen = []
    estimator = spectra.kl_entropy
    monkeypatch.setattr(spectra, "kl_entropy", lambda points, k=1: seen.append(points) or estimator(points, k))
    s = compute(x, entropy_rows=1000, entropy_dims=8, null_draws=2)
    data = seen[0]
    assert len(np.unique(data, axis=0)) == len(data) == 900
    assert s["entropy_duplicates_dropped"] == 100 and s["entropy_rows_used"] == 900
    assert np.isfinite(s["negentropy"])
    assert len(seen) == 3  # the data, then one per null draw, each the same size
    assert all(p.shape == data.shape for p in seen)


# --------------------------------------------------------------------------- 5. activation spectrum


def test_activation_spectrum_is_stored_and_fitted_when_recorded(db):
    x = power_law_cloud(3000, 160, 0.3, seed=5)
    activation = np.arange(1, 161, dtype=np.float64) ** -1.2 * 7.0
    commit(db, x, "with", activation=activation)
    commit(db, x, "without")
    with_ = spectra.run(db, "local", "with", params=SpectraParams(**FAST))
    without = spectra.run(db, "local", "without", params=SpectraParams(**FAST))
    np.testing.assert_allclose(with_.tables["spectra"]["activation_eigenvalue"].to_numpy(), activation, rtol=1e-12)
    assert with_.summary["activation_alpha"] == pytest.approx(1.2, abs=1e-9)
    assert with_.summary["activation_ranks"] == 160
    assert without.tables["spectra"]["activation_eigenvalue"].null_count == 160
    assert without.summary["activation_alpha"] is None
    # The decoder side does not depend on it.
    assert with_.summary["alpha"] == without.summary["alpha"]
    with Catalog.open(db) as cat:
        rows = cat.con.execute(
            "SELECT sae_id, activation_alpha FROM spectrum_layers ORDER BY sae_id").fetchall()
        nulls = cat.con.execute(
            "SELECT count(*) FROM spectra WHERE activation_eigenvalue IS NULL").fetchall()[0][0]
    assert rows[0][0] == "with" and rows[0][1] == pytest.approx(1.2)
    assert rows[1] == ("without", None)
    assert nulls == 160


# --------------------------------------------------------------------------- 6. layers, SQL, cache, figures


def test_layers_in_order_through_sql_cached_and_plotted(db, tmp_path, monkeypatch):
    planted = {0: 0.3, 1: 0.8, 2: 0.5}
    for layer in (2, 0, 1):  # committed out of order; exact spectra (a flat alpha = 0.3 on a finite
        # unwhitened cloud reads ~0.05 steeper at F/d = 50: the null's job, not this test's)
        commit(db, power_law_cloud(2000, 160, planted[layer], seed=layer, exact=True), f"layer_{layer}",
               release="rel", layer=layer)
    commit(db, power_law_cloud(500, 40, 0.5, seed=9), "other", release="elsewhere", layer=0)
    params = SpectraParams(null_draws=2, **FAST)
    first = spectra.layers(db, release="rel", params=params)
    assert [a.sae_id for a in first] == ["layer_0", "layer_1", "layer_2"]
    assert [a.summary["layer"] for a in first] == [0, 1, 2]
    for a in first:
        assert a.summary["alpha"] == pytest.approx(planted[a.summary["layer"]], abs=1e-6)
        assert not a.cached

    with Catalog.open(db) as cat:
        rows = cat.con.execute(
            "SELECT layer, alpha, alpha_low, alpha_high, null_alpha, activation_alpha, negentropy, null_negentropy "
            "FROM spectrum_layers WHERE release = 'rel' ORDER BY layer").fetchall()
        stored = cat.con.execute("SELECT count(*) FROM spectra").fetchall()[0][0]
    assert [r[0] for r in rows] == [0, 1, 2]
    for row, a in zip(rows, first):
        s = a.summary
        assert row[5] is None  # no activation spectrum recorded
        assert row[1:5] + row[6:] == pytest.approx((s["alpha"], s["alpha_low"], s["alpha_high"], s["null_alpha"],
                                                    s["negentropy"], s["null_negentropy"]), rel=1e-12)
    assert stored == 3 * 160

    def no_recompute(*args, **kwargs):
        raise AssertionError("recomputed a stored result")

    monkeypatch.setattr(spectra, "compute", no_recompute)
    again = spectra.layers(db, release="rel", params=params)
    assert all(a.cached for a in again)
    assert [a.analysis for a in again] == [a.analysis for a in first]
    assert [a.summary for a in again] == [json.loads(json.dumps(a.summary)) for a in first]
    for a, b in zip(again, first):
        assert a.tables["spectra"].equals(b.tables["spectra"])
    # By model and hook glob (served from the catalog too).
    by_hook = spectra.layers(db, model="gpt2", hook="blocks.[12].*", params=params)
    assert [a.sae_id for a in by_hook] == ["layer_1", "layer_2"]
    with pytest.raises(SaecatError, match="no ready SAE"):
        spectra.layers(db, release="missing", params=params)

    png = spectra.plot(first[1], tmp_path / "spectrum.png")
    svg = spectra.plot_layers(again, tmp_path / "layers.svg")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert b"<svg" in svg.read_bytes()[:1000] and svg.stat().st_size > 10_000


# --------------------------------------------------------------------------- 7. the numbers stored


@pytest.mark.parametrize("normalize", [False, True])
def test_stored_eigenvalues_are_those_of_the_decoder_covariance(db, normalize):
    rng = np.random.default_rng(11)
    x = power_law_cloud(1500, 64, 0.6, seed=11) * rng.uniform(0.2, 3.0, (1500, 1)).astype(np.float32)
    x[17] = 0  # a dead feature's zero row must not break normalisation
    commit(db, x)
    result = spectra.run(db, "local", "a", params=SpectraParams(rank_max=60, normalize=normalize, **FAST))
    rows = x.astype(np.float64)
    if normalize:
        norms = np.linalg.norm(rows, axis=1, keepdims=True)
        rows = rows / np.where(norms > 0, norms, 1)
    want = np.sort(np.linalg.eigvalsh(np.cov(rows.T)))[::-1]
    table = result.tables["spectra"]
    assert table["rank"].to_pylist() == list(range(1, 65))
    np.testing.assert_allclose(table["eigenvalue"].to_numpy(), want, rtol=1e-5, atol=1e-6 * want[0])
    with Catalog.open(db) as cat:
        stored = np.array(cat.con.execute("SELECT eigenvalue FROM spectra ORDER BY rank").fetchall())[:, 0]
    np.testing.assert_allclose(stored, want, rtol=1e-5, atol=1e-6 * want[0])
    s = result.summary
    assert s["widths"] == pytest.approx(np.sqrt(want[:3]).tolist(), rel=1e-5)
    assert s["mean_eigenvalue"] == pytest.approx(want.mean(), rel=1e-6)
    # The null has the data's total variance, so the two overlay in a plot.
    assert table["null_eigenvalue"].to_numpy().mean() == pytest.approx(want.mean(), rel=0.02)


def test_small_sae_clips_ranges_and_says_so(db):
    commit(db, anisotropic_gaussian(100, 32, seed=4))
    s = spectra.run(db, "local", "a").summary  # default params: ranks to 150, 5000 rows, 100 dims
    assert (s["rank_min_used"], s["rank_max_used"]) == (11, 32)
    assert (s["entropy_rows_used"], s["entropy_dims_used"]) == (100, 32)
    assert np.isfinite(s["alpha"]) and np.isfinite(s["negentropy"])
    commit(db, anisotropic_gaussian(12, 8, seed=4), "tiny")
    with pytest.raises(SaecatError, match="usable ranks.*lower rank_min"):
        spectra.run(db, "local", "tiny")
    with pytest.raises(SaecatError, match="at least 3 ranks"):
        SpectraParams(rank_min=10, rank_max=11)
