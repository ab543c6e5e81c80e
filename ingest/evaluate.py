"""`--evaluate`: the model's next-token loss with the SAE spliced in, against the model as it is and
with the hook zero-ablated (sae-lens 6.54's `get_recons_loss`; ../shared/docs/sae-quality-metrics.md).

Three forward passes of the whole model over each evaluated batch: clean; with x_hat (the SAE's
reconstruction, computed by the encoder anyway) in place of x at every counted position, the BOS
position and padding keeping their own activation as sae-lens keeps masked tokens'; and with the
hook's output zeroed at every position. Per counted position p, as sae-lens masks its inputs:
- the cross-entropy of predicting token p + 1 (where p + 1 is still in the document: a padded
  batch has no next token after a document's last; sae-lens' packed windows always have one);
- KL(P_clean || P_new) of the next-token distributions.
Their token means give ce_loss_score = (CE_ablated - CE_sae) / (CE_ablated - CE_clean), delta LM loss
= CE_sae - CE_clean (Gemma Scope's fidelity) and kl_div_score = 1 - KL_sae / KL_ablated.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

# Per-position terms, summed over the run like the quality sums: the three losses, the two
# divergences, and the positions each mean divides by.
EVAL_SUMS = ("ce_clean", "ce_sae", "ce_ablated", "kl_sae", "kl_ablated", "predictions", "positions")
LOGITS_BYTES = 2**28  # one pass's logits at once: rows of the batch at a time (a 262k vocabulary: one row)


def eval_bytes(width: int, vocab: int) -> int:
    """What the passes hold at once: logits, clean and new log-probs, clean probabilities and a
    product, each LOGITS_BYTES, or one row of `width` positions where that is more."""
    return 5 * max(LOGITS_BYTES, 4 * width * vocab)


@torch.inference_mode()
def evaluate_batch(model, hook_name: str, tokens: torch.Tensor, counted: torch.Tensor, acts: torch.Tensor,
                   x_hat: torch.Tensor) -> torch.Tensor:
    """[docs, positions, len(EVAL_SUMS)] float64 terms of a batch: tokens [docs, positions]; counted,
    the positions counted (no BOS, no padding); acts and x_hat, the hook's activations and the SAE's
    reconstruction of them, [docs, positions, ...]."""
    n_docs, width = tokens.shape
    terms = torch.zeros(n_docs, width, len(EVAL_SUMS), dtype=torch.float64, device=tokens.device)
    has_next = torch.zeros_like(counted)  # a counted position whose next token is counted too: in the document
    has_next[:, :-1] = counted[:, :-1] & counted[:, 1:]
    splice = torch.where(counted.reshape(*counted.shape, *[1] * (acts.dim() - 2)), x_hat.to(acts.dtype), acts)
    rows = max(1, LOGITS_BYTES // (width * model.cfg.d_vocab * 4))
    for lo in range(0, n_docs, rows):
        part = slice(lo, lo + rows)
        clean = _log_probs(model, tokens[part])
        p_clean = clean.exp()
        for at, hook in ((1, _replace(splice[part])), (2, lambda act, hook: torch.zeros_like(act))):
            new = _log_probs(model, tokens[part], (hook_name, hook))
            terms[part, :-1, at] = _next_token_loss(new, tokens[part])
            terms[part, :, 2 + at] = (p_clean * (clean - new)).sum(-1)
            del new  # the next pass's logits take its place
        terms[part, :-1, 0] = _next_token_loss(clean, tokens[part])
    terms[..., :3] *= has_next[..., None]
    terms[..., 3:5] *= counted[..., None]
    terms[..., 5], terms[..., 6] = has_next, counted
    return terms


def _replace(value: torch.Tensor):
    return lambda act, hook: value.to(act.dtype)


def _log_probs(model, tokens: torch.Tensor, hook: tuple | None = None) -> torch.Tensor:
    logits = model.run_with_hooks(tokens, fwd_hooks=[hook] if hook else [], return_type="logits")
    return logits.float().log_softmax(-1)


def _next_token_loss(log_probs: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """-log p(token p + 1) at each position p but the last."""
    return -log_probs[:, :-1].gather(-1, tokens[:, 1:, None]).squeeze(-1).to(torch.float64)


def evaluation_row(sums: np.ndarray) -> dict[str, Any]:
    """The `sae_quality` loss columns from the run's EVAL_SUMS."""
    total = dict(zip(EVAL_SUMS, np.asarray(sums, dtype=np.float64)))
    ce = {k: total[k] / total["predictions"] for k in ("ce_clean", "ce_sae", "ce_ablated")}
    kl = {k: total[k] / total["positions"] for k in ("kl_sae", "kl_ablated")}
    recovered = ce["ce_ablated"] - ce["ce_clean"]
    return {"eval_tokens": int(total["positions"]), "ce_loss_clean": ce["ce_clean"], "ce_loss_sae": ce["ce_sae"],
            "ce_loss_ablated": ce["ce_ablated"],
            "ce_loss_score": (ce["ce_ablated"] - ce["ce_sae"]) / recovered if recovered else None,
            "delta_lm_loss": ce["ce_sae"] - ce["ce_clean"], "kl_div_sae": kl["kl_sae"],
            "kl_div_ablated": kl["kl_ablated"],
            "kl_div_score": 1 - kl["kl_sae"] / kl["kl_ablated"] if kl["kl_ablated"] else None}
