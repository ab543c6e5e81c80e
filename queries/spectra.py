"""The large-scale shape of an SAE's feature cloud: its eigenvalue spectrum and its clumpiness.

The point cloud is the SAE's decoder rows (F features in d dimensions). Two questions, each
answered beside the value a structureless cloud of the same shape would give, because neither
number means anything without its null:

- Spectrum. The eigenvalues of the cloud's covariance, sorted descending, and the exponent alpha
  of a power law lambda_r ~ r^-alpha fitted over ranks `rank_min..rank_max` (log-log linear
  regression, 95% interval from its standard error). Null: an isotropic Gaussian cloud of the
  same F and d, whose sample spectrum is not flat (Marchenko-Pastur spreading gives alpha ~ 0.27
  at 2048 x 256). Its covariance is a scaled Wishart(d, F - 1) matrix, so each null draw is
  the Dumitriu-Edelman bidiagonal model of that Wishart (Bartlett's decomposition reduced to
  bidiagonal form): O(d) random numbers and a tridiagonal eigensolve instead of an F x d cloud.
  Also fitted: the Marchenko-Pastur expectation (theory, for d <= F - 1) and the model's own
  activation spectrum when ingestion recorded one.
- Clumpiness. Subsample `entropy_rows` rows without replacement, z-score each dimension, PCA to
  `entropy_dims`; negentropy = H_gauss - H_kNN, the entropy of a Gaussian with the same
  covariance minus the Kozachenko-Leonenko nearest-neighbour estimate. The estimator is biased
  in high dimension (about -16 nats for a Gaussian at d = 100, n = 5000), so the same estimator
  runs on Gaussian samples with the same covariance, n and d: the null. The excess over it is
  the clumpiness. (The paper's code resampled with replacement, so twins at distance zero drove
  its estimate; here no row enters the kNN twice.)

>>> from queries import spectra                                  # doctest: +SKIP
>>> result = spectra.run("saecat.duckdb", "gemma-scope-2b-pt-res-canonical", "layer_12/width_16k/canonical")
>>> result.summary["alpha"], result.summary["null_alpha"]
>>> spectra.plot(result, "spectrum.png")
"""

from __future__ import annotations

import os
import pathlib
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import scipy.linalg
import scipy.stats
from scipy.special import digamma, gammaln

from catalog import Catalog
from catalog.errors import SaecatError
from catalog.store import SaeRecord, first_row
from queries import analyses
from queries.analyses import Analysis

KIND = "spectra"
NullMethod = Literal["bidiagonal", "wishart", "cloud"]


@dataclass(frozen=True)
class SpectraParams:
    """What `run` computes; every field is recorded with the stored result."""

    rank_min: int = 11          # fit ranks rank_min..rank_max inclusive, 1-based (the paper's indices 10:150)
    rank_max: int = 150
    null_draws: int = 3         # isotropic-null spectra averaged (and negentropy null samples)
    entropy_rows: int = 5000    # rows subsampled WITHOUT replacement
    entropy_dims: int = 100     # PCA dimensions
    k: int = 1                  # k-th nearest neighbour in the Kozachenko-Leonenko estimator
    normalize: bool = False     # unit-normalise decoder rows first
    seed: int = 0

    def __post_init__(self) -> None:
        if self.rank_min < 1 or self.rank_max < self.rank_min + 2:
            raise SaecatError(f"fit ranks {self.rank_min}..{self.rank_max}: need 1 <= rank_min and at least 3 ranks")
        if self.null_draws < 1:
            raise SaecatError("null_draws must be at least 1")
        if self.entropy_rows < 3 or self.entropy_dims < 1 or self.k < 1:
            raise SaecatError("entropy_rows >= 3, entropy_dims >= 1 and k >= 1 are required")


@dataclass
class SpectraInputs:
    """What `load` reads from the catalog."""

    decoders: np.ndarray            # [F, d] float32
    activation: np.ndarray          # model activation eigenvalues by rank (1 first); empty if not recorded
    layer: int | None = None


# --------------------------------------------------------------------------- spectrum


def covariance(x: np.ndarray, chunk: int = 8192) -> np.ndarray:
    """The centred covariance (ddof 1) of the rows of x, as float64, accumulated in row chunks
    with a symmetric rank-k update (half the flops of a general product; no float64 copy of x)."""
    n, d = x.shape
    mean = x.mean(axis=0, dtype=np.float64)
    out = np.zeros((d, d), dtype=np.float64, order="F")
    for start in range(0, n, chunk):
        out = _add_gram(out, x[start:start + chunk].astype(np.float64) - mean)
    return _symmetric(out) / max(n - 1, 1)


def _add_gram(out: np.ndarray, block: np.ndarray) -> np.ndarray:
    """out += block.T @ block in out's upper triangle (dsyrk on block.T, Fortran-ordered d x c)."""
    return scipy.linalg.blas.dsyrk(1.0, block.T, beta=1.0, c=out, trans=0, lower=0, overwrite_c=1)


def _symmetric(upper: np.ndarray) -> np.ndarray:
    out = np.triu(upper)
    return out + np.triu(out, 1).T


def eigenvalues(cov: np.ndarray) -> np.ndarray:
    """Eigenvalues of a symmetric matrix, largest first."""
    return np.linalg.eigvalsh(cov)[::-1].copy()


def null_spectra(n_rows: int, d: int, draws: int, rng: np.random.Generator,
                 method: NullMethod = "bidiagonal") -> np.ndarray:
    """[draws, d] sample-covariance eigenvalues (ddof 1, largest first) of `draws` clouds of
    n_rows x d iid N(0, 1) points.

    The covariance is W / (n_rows - 1) with W ~ Wishart(d, n_rows - 1, I). `bidiagonal` draws W's
    eigenvalues from the Dumitriu-Edelman model (B B^T, B bidiagonal with chi entries: O(d) draws
    and a tridiagonal eigensolve), `wishart` draws the d x d matrix with scipy.stats.wishart
    (Bartlett), `cloud` draws the points themselves (the naive baseline, O(F d^2)). All three give
    the same distribution. With fewer points than dimensions the extra eigenvalues are 0.
    """
    dof = n_rows - 1
    if dof < 1:
        raise SaecatError(f"an isotropic null needs at least 2 points, not {n_rows}")
    out = np.zeros((draws, d))
    for i in range(draws):
        if method == "cloud":
            cloud = np.empty((n_rows, d))
            for start in range(0, n_rows, 8192):
                rows = min(8192, n_rows - start)
                cloud[start:start + rows] = rng.standard_normal((rows, d))
            out[i] = eigenvalues(covariance(cloud))
            continue
        # W's nonzero eigenvalues are those of a size x size Wishart with `other` degrees of freedom.
        size, other = min(d, dof), max(d, dof)
        if method == "wishart":
            w = scipy.stats.wishart(df=other, scale=np.eye(size)).rvs(random_state=rng)
            values = eigenvalues(np.atleast_2d(w))
        elif method == "bidiagonal":
            diag = np.sqrt(rng.chisquare(other - np.arange(size)))        # chi_{other}, ..., chi_{other-size+1}
            sub = np.sqrt(rng.chisquare(size - 1 - np.arange(size - 1)))  # chi_{size-1}, ..., chi_1
            t_diag = diag ** 2
            t_diag[1:] += sub ** 2
            values = scipy.linalg.eigvalsh_tridiagonal(t_diag, sub * diag[:-1])[::-1] if size > 1 else t_diag
        else:
            raise ValueError(f"unknown null method {method!r}")
        out[i, :size] = values / dof
    return out


def marchenko_pastur_quantiles(ratio: float, d: int, grid: int = 20001) -> np.ndarray:
    """Expected eigenvalues (largest first) of the sample covariance of iid unit-variance points
    with d / dof = ratio <= 1: the Marchenko-Pastur quantiles at levels 1 - (r - 1/2) / d."""
    if not 0 < ratio <= 1:
        raise ValueError("the Marchenko-Pastur quantiles here need 0 < d / dof <= 1")
    lo, hi = (1 - np.sqrt(ratio)) ** 2, (1 + np.sqrt(ratio)) ** 2
    theta = np.linspace(0.0, np.pi, grid)
    x = lo + (hi - lo) * (1 - np.cos(theta)) / 2
    # density * dx/dtheta: sqrt((hi-x)(x-lo)) dx = ((hi-lo)/2)^2 sin^2(theta) dtheta, smooth at both edges.
    weight = ((hi - lo) / 2) ** 2 * np.sin(theta) ** 2 / (2 * np.pi * ratio * np.maximum(x, 1e-300))
    cdf = np.concatenate([[0.0], np.cumsum((weight[1:] + weight[:-1]) / 2 * np.diff(theta))])
    cdf /= cdf[-1]
    levels = 1 - (np.arange(1, d + 1) - 0.5) / d
    return np.interp(levels, cdf, x)


@dataclass(frozen=True)
class PowerLaw:
    """log10 lambda = intercept - alpha log10 rank, over ranks first..last."""

    alpha: float
    low: float
    high: float
    stderr: float
    intercept: float
    r2: float
    first: int
    last: int


def fit_power_law(values: np.ndarray, rank_min: int, rank_max: int) -> PowerLaw | None:
    """Least-squares fit of log10 value against log10 rank over ranks rank_min..rank_max (1-based,
    clipped to the positive values present); alpha = -slope with a 95% t interval. None if fewer
    than 3 ranks remain."""
    values = np.asarray(values, dtype=np.float64)
    nonpositive = np.flatnonzero(~(values > 0))  # 0-based: the count of positive values before it
    last = min(rank_max, len(values), nonpositive[0] if len(nonpositive) else len(values))
    if last - rank_min + 1 < 3:
        return None
    ranks = np.arange(rank_min, last + 1)
    fit = scipy.stats.linregress(np.log10(ranks), np.log10(values[rank_min - 1:last]))
    half = scipy.stats.t.ppf(0.975, len(ranks) - 2) * fit.stderr
    alpha = -fit.slope
    return PowerLaw(alpha=float(alpha), low=float(alpha - half), high=float(alpha + half), stderr=float(fit.stderr),
                    intercept=float(fit.intercept), r2=float(fit.rvalue ** 2), first=rank_min, last=int(last))


# --------------------------------------------------------------------------- clumpiness


def gaussian_entropy(variances: np.ndarray) -> float:
    """Differential entropy (nats) of a Gaussian whose covariance has these eigenvalues."""
    variances = np.asarray(variances, dtype=np.float64)
    return float(len(variances) / 2 * (1 + np.log(2 * np.pi)) + 0.5 * np.sum(np.log(variances)))


def kl_entropy(points: np.ndarray, k: int = 1) -> float:
    """Kozachenko-Leonenko entropy estimate (nats) of points [n, d]:
    psi(n) - psi(k) + log V_d + (d / n) sum_i log rho_k(i), rho_k(i) the Euclidean distance from
    point i to its k-th nearest other point, V_d the volume of the unit d-ball. Neighbours come
    from scikit-learn (a k-d tree in low dimension, brute force above 15); their distances are
    then recomputed by subtraction, because brute force's |a|^2 + |b|^2 - 2ab shortcut loses
    close pairs to rounding."""
    from sklearn.neighbors import NearestNeighbors

    points = np.asarray(points, dtype=np.float64)
    n, d = points.shape
    if n <= k:
        raise SaecatError(f"the k-NN entropy needs more than k = {k} points, not {n}")
    index = NearestNeighbors(n_neighbors=k).fit(points).kneighbors(return_distance=False)
    dist = np.linalg.norm(points[index] - points[:, None, :], axis=2)
    rho = np.sort(dist, axis=1)[:, k - 1]
    log_ball = d / 2 * np.log(np.pi) - gammaln(d / 2 + 1)
    return float(digamma(n) - digamma(k) + log_ball + d * np.mean(np.log(rho)))


def entropy_sample(n_rows: int, rows: int, rng: np.random.Generator) -> np.ndarray:
    """Indices of min(rows, n_rows) distinct rows, ascending (a subsample without replacement)."""
    return np.sort(rng.choice(n_rows, size=min(rows, n_rows), replace=False))


def principal_components(sample: np.ndarray, dims: int) -> np.ndarray:
    """z-score each column of sample [n, d] (constant columns stay 0) and project it on its top
    `dims` principal axes: [n, <= dims], fewer when the sample spans fewer directions.

    Exact PCA, as scikit-learn's `covariance_eigh` solver computes it, but with only the top
    eigenpairs solved for (3-4x faster at d = 2304, where this runs once per null draw)."""
    scale = sample.std(axis=0)
    z = (sample - sample.mean(axis=0)) / np.where(scale > 0, scale, 1.0)
    d = z.shape[1]
    dims = min(dims, d, len(z) - 1)
    variances, axes = scipy.linalg.eigh(covariance(z), subset_by_index=[d - dims, d - 1], driver="evr")
    keep = variances > 1e-10 * max(variances.max(), 1e-300)
    return z @ axes[:, keep][:, ::-1]


def _negentropy(y: np.ndarray, k: int) -> tuple[float, float]:
    """(H_gauss, H_kNN) of PCA'd points y."""
    return gaussian_entropy(np.linalg.eigvalsh(np.atleast_2d(np.cov(y.T)))), kl_entropy(y, k)


def _covariance_root(cov: np.ndarray) -> np.ndarray:
    """R [r, d] with R^T R = cov, r its rank (Cholesky when cov is positive definite)."""
    try:
        return np.linalg.cholesky(cov).T
    except np.linalg.LinAlgError:  # singular (fewer rows than dimensions, constant columns)
        w, v = np.linalg.eigh(cov)
        keep = w > 1e-12 * max(w.max(), 1e-300)
        return np.sqrt(w[keep])[:, None] * v[:, keep].T


def gaussian_population_rows(n: int, population: int, root: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """n rows drawn without replacement from a Gaussian population of `population` rows whose
    covariance (ddof 1) is exactly root^T root.

    For iid Gaussian rows, the cloud is U S V^T with U Haar-distributed and independent of the
    covariance V S^2 V^T / (F - 1): so the Gaussian cloud with the same covariance as the data is
    sqrt(F - 1) Q root with Q Haar [F, r], and a subsample is some rows of it. Those rows are
    g L^-T with g [n, r] standard normal and L L^T = g^T g + W, W ~ Wishart(r, F - n) standing in
    for the other F - n rows (the Q of a QR), so the F x d cloud is never drawn."""
    r = root.shape[0]
    g = rng.standard_normal((n, r))
    gram = _add_gram(np.zeros((r, r), order="F"), g)
    rest = population - n
    if rest >= r:
        gram += np.atleast_2d(scipy.stats.wishart(df=rest, scale=np.eye(r)).rvs(random_state=rng))
    elif rest > 0:
        gram = _add_gram(gram, rng.standard_normal((rest, r)))
    lower = np.linalg.cholesky(_symmetric(gram))
    q = scipy.linalg.solve_triangular(lower, g.T, lower=True).T  # g L^-T: rows of a Haar Q
    return np.sqrt(population - 1) * q @ root


def negentropy(x: np.ndarray, params: SpectraParams, rng: np.random.Generator,
               null_rng: np.random.Generator, cov: np.ndarray | None = None) -> dict[str, Any]:
    """H_gauss - H_kNN on a z-scored, PCA'd subsample of the rows of x, and the same pipeline
    (z-score, PCA, estimator) on `params.null_draws` Gaussian nulls: n rows drawn without
    replacement from a Gaussian cloud of F rows with exactly the covariance `cov` of x's rows
    (computed when not given).

    For a Gaussian x this null has exactly the data's distribution, at any F. Simpler nulls do
    not: iid draws from N(0, cov) are spread once more by sampling (3-5 null standard deviations
    off when F is near n or d), and the subsample's own covariance is worse. The null goes
    through the PCA too: picking the top directions of a finite sample is part of the bias."""
    sample = np.asarray(x[entropy_sample(len(x), params.entropy_rows, rng)], dtype=np.float64)
    # Rows that are exact copies of each other (a catalog can hold twin features) would sit at
    # distance 0 and send the estimate to -inf: keep one of each.
    _, first = np.unique(sample, axis=0, return_index=True)
    duplicates = len(sample) - len(first)
    sample = sample[np.sort(first)]
    n = len(sample)
    out: dict[str, Any] = {"entropy_rows_used": n, "entropy_duplicates_dropped": int(duplicates)}
    if n <= max(params.k, 2):
        return {**out, "entropy_dims_used": 0, "negentropy": None, "null_negentropy": None,
                "null_negentropy_std": None, "negentropy_excess": None, "negentropy_z": None, "h_gauss": None,
                "h_knn": None}
    y = principal_components(sample, params.entropy_dims)
    h_gauss, h_knn = _negentropy(y, params.k)
    root = _covariance_root(covariance(x) if cov is None else cov)
    nulls = []
    for _ in range(params.null_draws):
        gaussian = gaussian_population_rows(n, len(x), root, null_rng)
        g_gauss, g_knn = _negentropy(principal_components(gaussian, y.shape[1]), params.k)
        nulls.append(g_gauss - g_knn)
    value = h_gauss - h_knn
    null = float(np.mean(nulls))
    spread = float(np.std(nulls, ddof=1)) if len(nulls) > 1 else None
    # The data's value is one draw (variance ~ spread^2), the null a mean of several.
    z = (value - null) / (spread * np.sqrt(1 + 1 / len(nulls))) if spread else None
    return {**out, "entropy_dims_used": int(y.shape[1]), "negentropy": value, "null_negentropy": null,
            "null_negentropy_std": spread, "negentropy_excess": value - null, "negentropy_z": z,
            "h_gauss": h_gauss, "h_knn": h_knn}


# --------------------------------------------------------------------------- the analysis


def load(cat: Catalog, record: SaeRecord, params: SpectraParams) -> SpectraInputs:
    """The decoder matrix, the recorded activation spectrum (possibly none) and the layer."""
    activation = cat.con.execute(
        "SELECT eigenvalue FROM activation_spectrum WHERE sae = ? ORDER BY rank", [record.sae]).fetchall()
    layer = first_row(cat.con, "SELECT layer FROM saes WHERE sae = ?", [record.sae])[0]
    return SpectraInputs(decoders=cat.decoders(record.sae),
                         activation=np.array([v for (v,) in activation], dtype=np.float64), layer=layer)


def compute(inputs: SpectraInputs, params: SpectraParams, *,
            null_method: NullMethod = "bidiagonal") -> tuple[dict[str, Any], dict[str, pa.Table]]:
    """(summary, {"spectra": rows}) for one decoder matrix; `null_method` is for the benchmark."""
    x = inputs.decoders
    if x.ndim != 2 or len(x) < 2 or x.shape[1] < 1:
        raise SaecatError(f"a spectrum needs at least 2 decoder rows, not an array of shape {x.shape}")
    n_rows, d = x.shape
    if params.normalize:
        norms = np.linalg.norm(x, axis=1, keepdims=True)
        x = (x / np.where(norms > 0, norms, 1)).astype(np.float32, copy=False)
    rank_max = min(params.rank_max, d, n_rows - 1)  # a centred cloud of F points spans <= F - 1 dims
    if rank_max - params.rank_min + 1 < 3:
        raise SaecatError(
            f"an SAE with {n_rows} features in {d} dimensions has {max(rank_max, 0)} usable ranks; "
            f"fitting ranks {params.rank_min}..{params.rank_max} needs at least 3 of them: lower rank_min")
    null_rng, entropy_rng, entropy_null_rng = (np.random.default_rng(s)
                                               for s in np.random.SeedSequence(params.seed).spawn(3))

    cov = covariance(x)
    values = eigenvalues(cov)
    fit = fit_power_law(values, params.rank_min, rank_max)
    if fit is None:
        raise SaecatError(f"the spectrum has fewer than 3 positive eigenvalues in ranks {params.rank_min}..{rank_max}")
    mean = float(values.mean())
    # The null cloud has the data's total variance, so the two spectra overlay in a plot.
    draws = null_spectra(n_rows, d, params.null_draws, null_rng, null_method) * mean
    null = draws.mean(axis=0)
    null_fit = fit_power_law(null, params.rank_min, rank_max)
    draw_alphas = [f.alpha for f in (fit_power_law(v, params.rank_min, rank_max) for v in draws) if f]
    ratio = d / (n_rows - 1)
    mp_fit = (fit_power_law(marchenko_pastur_quantiles(ratio, d), params.rank_min, rank_max)
              if ratio <= 1 else None)
    activation = np.asarray(inputs.activation, dtype=np.float64)
    act_fit = fit_power_law(activation, params.rank_min, params.rank_max) if len(activation) else None

    top = values[:3]
    summary: dict[str, Any] = {
        "layer": inputs.layer, "n_features": n_rows, "d_in": d, "normalize": params.normalize,
        "rank_min_used": params.rank_min, "rank_max_used": fit.last,
        "alpha": fit.alpha, "alpha_low": fit.low, "alpha_high": fit.high, "alpha_stderr": fit.stderr,
        "fit_intercept": fit.intercept, "fit_r2": fit.r2,
        "null_alpha": null_fit.alpha if null_fit else None,
        "null_alpha_std": float(np.std(draw_alphas, ddof=1)) if len(draw_alphas) > 1 else None,
        "null_alpha_draws": draw_alphas, "null_draws": params.null_draws,
        "marchenko_pastur_alpha": mp_fit.alpha if mp_fit else None,
        "activation_alpha": act_fit.alpha if act_fit else None,
        "activation_alpha_low": act_fit.low if act_fit else None,
        "activation_alpha_high": act_fit.high if act_fit else None,
        "activation_ranks": int(len(activation)),
        "mean_eigenvalue": mean, "total_variance": float(values.sum()),
        "participation_ratio": float(values.sum() ** 2 / np.sum(values ** 2)) if np.any(values) else None,
        "widths": [float(np.sqrt(max(v, 0.0))) for v in top],
        "widths_relative": [float(np.sqrt(max(v, 0.0) / mean)) if mean > 0 else None for v in top],
    }
    summary.update(negentropy(x, params, entropy_rng, entropy_null_rng, cov))
    summary["entropy_k"] = params.k

    ranks = min(n_rows, d)
    act_column = np.full(ranks, np.nan)
    act_column[:min(ranks, len(activation))] = activation[:ranks]
    table = pa.table({
        "rank": pa.array(np.arange(1, ranks + 1, dtype=np.int32)),
        "eigenvalue": pa.array(values[:ranks]),
        "null_eigenvalue": pa.array(null[:ranks]),
        "activation_eigenvalue": pa.array(act_column, from_pandas=True),  # NaN -> NULL
    })
    return summary, {"spectra": table}


def run(db: str | os.PathLike | None = None, release: str | None = None, sae_id: str | None = None, *,
        sae: int | None = None, params: SpectraParams = SpectraParams(), force: bool = False) -> Analysis:
    """The spectrum and clumpiness of one SAE's decoder cloud, computed or read back from the catalog.

    >>> result = run("saecat.duckdb", "gpt2-small-res-jb", "blocks.8.hook_resid_pre")   # doctest: +SKIP
    >>> result.summary["alpha"], result.tables["spectra"].num_rows
    """
    return analyses.run(KIND, params, load, compute, db=db, release=release, sae_id=sae_id, sae=sae, force=force)


def layer_saes(cat: Catalog, *, release: str | None = None, model: str | None = None,
               hook: str | None = None) -> list[int]:
    """Keys of the ready SAEs of a release or of a model (hook_name matching the glob `hook`),
    ordered by layer (then hook name and sae_id)."""
    if release is None and model is None:
        raise SaecatError("name a release or a model")
    rows = cat.con.execute(
        "SELECT sae FROM saes WHERE status = 'ready' AND (?::VARCHAR IS NULL OR release = ?) "
        "AND (?::VARCHAR IS NULL OR model = ?) AND (?::VARCHAR IS NULL OR hook_name GLOB ?) "
        "ORDER BY layer NULLS LAST, hook_name, sae_id, sae",
        [release, release, model, model, hook, hook],
    ).fetchall()
    return [r[0] for r in rows]


def layers(db: str | os.PathLike | None = None, *, release: str | None = None, model: str | None = None,
           hook: str | None = None, params: SpectraParams = SpectraParams(), force: bool = False) -> list[Analysis]:
    """`run` for every ready SAE of a release (or of a model, optionally only hooks matching the glob
    `hook`), in layer order; stored results with the same parameters are reused.

    >>> rows = layers("saecat.duckdb", release="gpt2-small-res-jb")          # doctest: +SKIP
    >>> [(r.summary["layer"], r.summary["alpha"], r.summary["null_alpha"]) for r in rows]
    """
    with Catalog.open(db) as cat:
        keys = layer_saes(cat, release=release, model=model, hook=hook)
    if not keys:
        what = f"release {release!r}" if release is not None else f"model {model!r}"
        raise SaecatError(f"no ready SAE of {what}" + (f" with a hook matching {hook!r}" if hook else ""))
    return [run(db, sae=key, params=params, force=force) for key in keys]


# --------------------------------------------------------------------------- figures


def _figure(width: float, height: float, panels: int = 1):
    from queries.figures import figure

    fig = figure(width, height, layout="constrained")
    return fig, fig.subplots(1, panels, squeeze=False)[0]


def plot(analysis: Analysis, path: str | os.PathLike) -> pathlib.Path:
    """Log-log spectrum (each curve divided by its mean eigenvalue) with the fit range and line,
    the isotropic null, the Marchenko-Pastur expectation and the activation spectrum when
    recorded. The format follows the suffix (.png, .svg, .pdf)."""
    s = analysis.summary
    rows = analysis.tables["spectra"].to_pydict()
    rank = np.array(rows["rank"], dtype=float)
    eig = np.array(rows["eigenvalue"], dtype=float)
    mean = s["mean_eigenvalue"] or 1.0
    fig, (ax,) = _figure(6.4, 4.6)
    ax.loglog(rank, eig / mean, lw=1.6, label=f"decoder, alpha = {s['alpha']:.3f}")
    ax.loglog(rank, np.array(rows["null_eigenvalue"], dtype=float) / mean, lw=1.2, color="0.5", ls="--",
              label=f"isotropic null, alpha = {s['null_alpha']:.3f}")
    if s.get("marchenko_pastur_alpha") is not None:
        mp = marchenko_pastur_quantiles(s["d_in"] / (s["n_features"] - 1), s["d_in"])[:len(rank)]
        ax.loglog(rank, mp, lw=1.0, color="0.3", ls=":",
                  label=f"Marchenko-Pastur, alpha = {s['marchenko_pastur_alpha']:.3f}")
    act = np.array([np.nan if v is None else v for v in rows["activation_eigenvalue"]], dtype=float)
    if np.isfinite(act).any():
        label = "model activations" + (f", alpha = {s['activation_alpha']:.3f}" if s.get("activation_alpha") else "")
        ax.loglog(rank, act / np.nanmean(act), lw=1.2, color="tab:green", label=label)
    first, last = s["rank_min_used"], s["rank_max_used"]
    ax.axvspan(first, last, color="tab:blue", alpha=0.08, label=f"fit ranks {first}..{last}")
    fit_ranks = np.arange(first, last + 1)
    ax.loglog(fit_ranks, 10 ** s["fit_intercept"] * fit_ranks ** -s["alpha"] / mean, color="tab:red", lw=1.0,
              label=f"fit, 95% CI [{s['alpha_low']:.3f}, {s['alpha_high']:.3f}]")
    ax.set_xlabel("rank")
    ax.set_ylabel("eigenvalue / mean eigenvalue")
    ax.set_title(f"{analysis.release} / {analysis.sae_id}", fontsize=9)
    ax.legend(fontsize=8)
    path = pathlib.Path(path)
    fig.savefig(path)
    return path


def plot_layers(analyses: list[Analysis], path: str | os.PathLike) -> pathlib.Path:
    """alpha (95% CI, isotropic null, activations when recorded) and negentropy (with its Gaussian
    null) against layer; SAEs without a layer are placed by their order in the list."""
    if not analyses:
        raise SaecatError("no analyses to plot")
    layer = np.array([a.summary.get("layer") if a.summary.get("layer") is not None else i
                      for i, a in enumerate(analyses)], dtype=float)

    def column(key: str) -> np.ndarray:
        return np.array([np.nan if a.summary.get(key) is None else a.summary[key] for a in analyses], dtype=float)

    alpha = column("alpha")
    fig, (left, right) = _figure(10, 4, panels=2)
    left.errorbar(layer, alpha, yerr=[alpha - column("alpha_low"), column("alpha_high") - alpha], marker="o",
                  capsize=3, label="decoder alpha (95% CI)")
    left.plot(layer, column("null_alpha"), color="0.5", ls="--", marker=".", label="isotropic null")
    if np.isfinite(column("activation_alpha")).any():
        left.plot(layer, column("activation_alpha"), color="tab:green", marker="s", label="model activations")
    left.set_xlabel("layer")
    left.set_ylabel("power-law exponent alpha")
    left.legend(fontsize=8)
    neg, null, spread = column("negentropy"), column("null_negentropy"), column("null_negentropy_std")
    right.plot(layer, neg, marker="o", label="negentropy H_gauss - H_kNN")
    right.plot(layer, null, color="0.5", ls="--", marker=".", label="Gaussian null (same covariance, n, d)")
    if np.isfinite(spread).any():
        right.fill_between(layer, null - 2 * spread, null + 2 * spread, color="0.5", alpha=0.2)
    right.set_xlabel("layer")
    right.set_ylabel("nats")
    right.legend(fontsize=8)
    from matplotlib.ticker import MaxNLocator

    for ax in (left, right):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.suptitle(analyses[0].release, fontsize=9)
    path = pathlib.Path(path)
    fig.savefig(path)
    return path
