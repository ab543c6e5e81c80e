"""An SAE's sparsity and fidelity, measured in the ingestion's own pass over its counted tokens.

The figures are sae-lens 6.54's (`sae_lens.evals.get_sparsity_and_variance_metrics`;
../shared/docs/sae-quality-metrics.md), over every counted token of the run: the BOS position and
padding are left out, as sae-lens' `exclude_special_tokens` leaves out BOS and pad (the stream's
documents hold no other special tokens). x is the activation at the hook (hook_z flattened over
heads), x_hat = sae.decode(sae.encode(x)):

- l0, l1: token means of #{i: f_i != 0} and of sum |f_i| (the L0 distribution kept as a count per value);
- mse: token mean of ||x - x_hat||^2, summed over dimensions;
- explained_variance: 1 - E||x - x_hat||^2 / (E||x||^2 - ||E x||^2), pooled over all tokens
  (fvu = 1 - it); E x and E||x||^2 come from the hook activations' moments the run keeps anyway;
- cossim, l2_norm_in, l2_norm_out, l2_ratio: token means of cos(x, x_hat), ||x||, ||x_hat|| and
  ||x_hat|| / ||x|| (the divisor 1 where ||x|| < 1e-4);
- relative_reconstruction_bias: E||x_hat||^2 / E(x . x_hat), pooled (sae-lens averages the ratio
  over its eval batches; with one batch the two agree);
- dead latents (no firing over the run's tokens), dense latents (firing on more than 1% and 10%).

Per token, each chunk's reconstruction is reduced to the QUALITY_SUMS columns at once; the run
keeps only their float64 sums (in ingest.accumulate's ordered shards, so a resumed or distributed
run gives the same bits) and the L0 counts.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

QUALITY_SUMS = ("l0", "l1", "sq_err", "norm_in", "norm_out", "cossim", "l2_ratio", "sq_out", "dot")
DENSE_DENSITIES = (0.01, 0.1)  # the dense tiers: SAEBench's freq_over_1_percent and freq_over_10_percent


def token_quality(x: torch.Tensor, latents: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    """[tokens, len(QUALITY_SUMS)] float64: each token's terms of the figures above. x and x_hat
    [tokens, ...] (trailing dimensions flattened), latents [tokens, d_sae] as a sparse COO tensor."""
    x, x_hat = x.flatten(1).to(torch.float64), x_hat.flatten(1).to(torch.float64)
    # L0 and L1 from the stored entries (to_sparse keeps the nonzero ones): a reduction over the
    # dense latents makes a mask or an abs() copy, 0.25-1x the chunk's activations (0.5 GiB at 1M)
    latents = latents.coalesce()
    token, values = latents.indices()[0], latents.values().abs().to(torch.float64)
    l0 = torch.bincount(token, minlength=len(x)).to(torch.float64)
    l1 = torch.zeros(len(x), dtype=torch.float64, device=x.device).index_add_(0, token, values)
    norm_in, norm_out = x.norm(dim=1), x_hat.norm(dim=1)
    dot = (x * x_hat).sum(1)
    return torch.stack([l0, l1, (x - x_hat).pow(2).sum(1), norm_in, norm_out, dot / (norm_in * norm_out),
                        norm_out / torch.where(norm_in < 1e-4, 1.0, norm_in), norm_out.pow(2), dot], dim=1)


def quality_row(sums: np.ndarray, l0_counts: np.ndarray, n_tokens: int, x: tuple[np.ndarray, float] | None,
                fire_count: np.ndarray) -> dict[str, Any]:
    """The `sae_quality` figures from the run's sums over `n_tokens` (> 0) tokens (QUALITY_SUMS
    order), its L0 counts (tokens by L0), x: the hook activations' sum and summed squared norm
    (without them, no explained variance), and each latent's fire count."""
    mean = dict(zip(QUALITY_SUMS, np.asarray(sums, dtype=np.float64) / n_tokens))
    explained = None
    if x is not None:
        variance = x[1] / n_tokens - float(np.sum((np.asarray(x[0], dtype=np.float64) / n_tokens) ** 2))
        if variance < 1e-10:  # sae-lens' rule for a constant input
            explained = 1.0 if mean["sq_err"] < 1e-10 else 0.0
        else:
            explained = 1.0 - mean["sq_err"] / variance
    density = np.asarray(fire_count) / n_tokens
    l0_values = np.flatnonzero(l0_counts)
    return {
        "n_tokens": n_tokens, "l0": mean["l0"], "l0_values": l0_values.tolist(),
        "l0_counts": np.asarray(l0_counts)[l0_values].tolist(), "l1": mean["l1"], "mse": mean["sq_err"],
        "explained_variance": explained, "fvu": None if explained is None else 1.0 - explained,
        "cossim": mean["cossim"],
        "l2_norm_in": mean["norm_in"], "l2_norm_out": mean["norm_out"], "l2_ratio": mean["l2_ratio"],
        "relative_reconstruction_bias": mean["sq_out"] / mean["dot"] if mean["dot"] else None,
        "dead_latents": int(np.sum(density == 0)),
        "dense_1pct": int(np.sum(density > DENSE_DENSITIES[0])),
        "dense_10pct": int(np.sum(density > DENSE_DENSITIES[1])),
    }
