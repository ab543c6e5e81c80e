"""An SAE's sparsity and fidelity (sae_quality) against sae-lens' own metric functions and numpy.

sae-lens: `get_sparsity_and_variance_metrics`, run on the ingestion's transformer-lens model over
the same documents as one eval batch (BOS first, padded; BOS and pad ignored, as run_evals'
exclude_special_tokens does), and `ExplainedVarianceCalculator`. numpy: conftest's reference path
(Hugging Face GPT2Model, the SAE as sae-lens loads it), every figure recomputed in float64.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from catalog import Catalog
from catalog.errors import SaecatError
from ingest import IngestOptions, ingest, resolve_source
from ingest.accumulate import FeatureAccumulator
from conftest import HOOK

MAX_DOC = 120
FIGURES = ("l0", "l1", "mse", "explained_variance", "cossim", "l2_norm_in", "l2_norm_out", "l2_ratio",
           "relative_reconstruction_bias")


@pytest.fixture(scope="module", params=["jumprelu", "topk", "standard"])
def measured(request, tmp_path_factory, sae_dirs, corpus) -> tuple[str, dict]:
    architecture = request.param
    db = tmp_path_factory.mktemp(f"quality-{architecture}") / "catalog.duckdb"
    ingest(resolve_source(None, None, str(sae_dirs[architecture])),
           IngestOptions(dataset=str(corpus), max_doc_tokens=MAX_DOC, block_size=32, logit_k=0, batch_tokens=500,
                         progress=False), db=db)
    with Catalog.open(db) as cat:
        rel = cat.con.sql("SELECT q.*, s.n_tokens AS run_tokens FROM sae_quality q JOIN saes s USING (sae)")
        [row] = [dict(zip(rel.columns, r)) for r in rel.fetchall()]
        row["fire_count"] = np.array([c for (c,) in cat.con.sql("SELECT fire_count FROM features ORDER BY feature")
                                      .fetchall()])
    row["db"] = db
    return architecture, row


def test_figures_equal_sae_lens_metric_functions(measured, sae_dirs, model_dir, raw_ids, tokenizer):
    from sae_lens import SAE
    from sae_lens.evals import get_sparsity_and_variance_metrics
    from sae_lens.training.activation_scaler import ActivationScaler

    from ingest.model import load_model

    architecture, row = measured
    sae = SAE.load_from_disk(str(sae_dirs[architecture]), device="cpu").eval()
    model = load_model(str(model_dir), HOOK, 1)
    docs = [[tokenizer.bos_token_id] + list(ids)[: MAX_DOC - 1] for ids in raw_ids]
    pad = tokenizer.eos_token_id
    assert all(t not in (pad, tokenizer.bos_token_id) for d in docs for t in d[1:])  # only BOS and padding ignored
    tokens = torch.full((len(docs), max(map(len, docs))), pad)
    for n, d in enumerate(docs):
        tokens[n, : len(d)] = torch.tensor(d)

    class OneBatch:  # the store interface the metric function reads: one batch of token rows
        def get_batch_tokens(self, n: int) -> torch.Tensor:
            assert n == len(tokens)
            return tokens

    with torch.no_grad():
        metrics, features = get_sparsity_and_variance_metrics(
            sae, model, OneBatch(), ActivationScaler(), n_batches=1, compute_l2_norms=True,
            compute_sparsity_metrics=True, compute_variance_metrics=True, compute_featurewise_density_statistics=True,
            eval_batch_size_prompts=len(tokens), model_kwargs={}, ignore_tokens=[tokenizer.bos_token_id, pad])
    assert row["n_tokens"] == row["run_tokens"] == sum(len(d) - 1 for d in docs)
    for name in FIGURES:
        assert row[name] == pytest.approx(metrics[name], rel=2e-4, abs=1e-6), name
    assert row["fvu"] == pytest.approx(1 - row["explained_variance"], abs=1e-12)
    density = np.asarray(features["feature_density"])
    assert row["dead_latents"] == int(np.sum(density == 0))
    assert (row["dense_1pct"], row["dense_10pct"]) == (int(np.sum(density > 0.01)), int(np.sum(density > 0.1)))
    assert 0 < row["dead_latents"] + row["dense_10pct"] < len(density) or architecture == "topk"


def test_figures_equal_a_numpy_recomputation(measured, sae_dirs, resid):
    from sae_lens import SAE
    from sae_lens.evals import ExplainedVarianceCalculator

    architecture, row = measured
    sae = SAE.load_from_disk(str(sae_dirs[architecture]), device="cpu").eval()
    x = torch.cat([r[1:] for r in resid(True, MAX_DOC)])  # the counted tokens: BOS position dropped
    with torch.no_grad():
        f = sae.encode(x)
    f64 = f.double().numpy()
    dec, b_dec = sae.W_dec.detach().double().numpy(), sae.b_dec.detach().double().numpy()
    x, x_hat = x.double().numpy(), f64 @ dec + b_dec
    norm_in, norm_out = np.linalg.norm(x, axis=1), np.linalg.norm(x_hat, axis=1)
    err = ((x - x_hat) ** 2).sum(1)
    l0 = (f64 != 0).sum(1)
    want = {"l0": l0.mean(), "l1": np.abs(f64).sum(1).mean(), "mse": err.mean(),
            "explained_variance": 1 - err.mean() / ((x ** 2).sum(1).mean() - (x.mean(0) ** 2).sum()),
            "cossim": ((x * x_hat).sum(1) / (norm_in * norm_out)).mean(), "l2_norm_in": norm_in.mean(),
            "l2_norm_out": norm_out.mean(), "l2_ratio": (norm_out / np.where(norm_in < 1e-4, 1, norm_in)).mean(),
            "relative_reconstruction_bias": (norm_out ** 2).mean() / (x * x_hat).sum(1).mean()}
    for name in FIGURES:
        assert row[name] == pytest.approx(want[name], rel=2e-4, abs=1e-6), name
    calculator = ExplainedVarianceCalculator()
    calculator.add_batch(torch.from_numpy(x_hat), torch.from_numpy(x))
    assert row["explained_variance"] == pytest.approx(calculator.compute(), rel=2e-4)
    values, counts = np.unique(l0, return_counts=True)
    assert (row["l0_values"], row["l0_counts"]) == (values.tolist(), counts.tolist())
    fired = (f64 > 0).sum(0)
    np.testing.assert_array_equal(row["fire_count"], fired)
    assert row["dead_latents"] == int(np.sum(fired == 0))
    assert row["dense_10pct"] == int(np.sum(fired / len(x) > 0.1))
    if architecture == "topk":
        assert max(row["l0_values"]) == 8  # k at most: the top k pass a ReLU


def test_sums_are_the_same_bits_whatever_the_batching_and_resume():
    """The float sums fold in shard order: one pass, a resumed pass and two merged workers agree."""
    gen = torch.Generator().manual_seed(1)
    batches = [(torch.rand(3, 9, 5, generator=gen), torch.rand(3, 9, 9, generator=gen, dtype=torch.float64))
               for _ in range(6)]

    def counted(parts: list[int], resume_at: int | None = None) -> dict:
        from ingest.accumulate import Firings

        acc = FeatureAccumulator(5, block_size=4, d_in=None, shard_batches=2, top_k=1, context=0)
        for n in parts:
            acts, terms = batches[n]
            terms = terms.clone()
            terms[..., 0] = (acts > 0.5).sum(-1)  # an L0 per token
            firings = Firings.of(acts, 0.5)
            firings.quality = terms
            acc.update(firings, torch.full((3,), 9))
            if n == resume_at:
                state = acc.state_dict()
                acc = FeatureAccumulator(5, block_size=4, d_in=None, shard_batches=2, top_k=1, context=0)
                acc.load_state_dict(state)
        return acc.quality()

    whole = counted(list(range(6)))
    assert whole is not None and whole["explained_variance"] is None  # no moments kept: no variance to explain
    assert counted(list(range(6)), resume_at=2) == whole


def test_the_cli_and_http_list_each_sae_with_its_figures(measured):
    import json

    from fastapi.testclient import TestClient
    from typer.testing import CliRunner

    from queries.front.cli import app
    from queries.front.server import create_app

    _, row = measured
    result = CliRunner().invoke(app, ["saes", "--db", str(row["db"]), "--json"])
    assert result.exit_code == 0, result.output
    [listed] = json.loads(result.stdout)
    [served] = TestClient(create_app(row["db"])).get("/saes").json()
    for got in (listed, served):
        assert (got["l0"], got["explained_variance"], got["dead_latents"]) == (
            row["l0"], row["explained_variance"], row["dead_latents"])
        assert got["registry_l0"] is None and got["delta_lm_loss"] is None  # a local folder; not --evaluate'd


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory, sae_dirs, corpus) -> dict:
    db = tmp_path_factory.mktemp("evaluated") / "catalog.duckdb"
    ingest(resolve_source(None, None, str(sae_dirs["jumprelu"])),
           IngestOptions(dataset=str(corpus), max_doc_tokens=MAX_DOC, block_size=32, logit_k=0, batch_tokens=500,
                         progress=False, evaluate_tokens=10**6), db=db)
    with Catalog.open(db) as cat:
        rel = cat.con.sql("SELECT q.*, s.n_tokens AS run_tokens FROM sae_quality q JOIN saes s USING (sae)")
        [row] = [dict(zip(rel.columns, r)) for r in rel.fetchall()]
    return row


def test_losses_equal_a_hand_written_splice_into_the_model(evaluated, sae_dirs, model_dir, raw_ids, tokenizer):
    """The Hugging Face model, one document at a time, its block 1's input replaced by the SAE's
    reconstruction (BOS kept) or by zeros: CE of each next token and KL to the clean distribution."""
    from sae_lens import SAE
    from transformers import GPT2LMHeadModel

    sae = SAE.load_from_disk(str(sae_dirs["jumprelu"]), device="cpu").eval()
    hf = GPT2LMHeadModel.from_pretrained(str(model_dir)).eval()
    replace = {}

    def block_input(module, args, kwargs):
        if "new" not in replace:
            return None
        x = args[0] if args else kwargs["hidden_states"]
        new = replace["new"](x)
        return ((new, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": new})

    hf.transformer.h[1].register_forward_pre_hook(block_input, with_kwargs=True)

    def spliced(x: torch.Tensor) -> torch.Tensor:
        out = sae.decode(sae.encode(x[0]))[None]
        out[:, 0] = x[:, 0]  # BOS keeps its own activation
        return out

    sums = dict.fromkeys(("clean", "sae", "ablated", "kl_sae", "kl_ablated"), 0.0)
    predictions = positions = 0
    with torch.no_grad():
        for ids in raw_ids:
            tokens = torch.tensor([[tokenizer.bos_token_id] + list(ids)[: MAX_DOC - 1]])
            logp = {}
            for name, new in (("clean", None), ("sae", spliced), ("ablated", torch.zeros_like)):
                replace.pop("new", None)
                if new is not None:
                    replace["new"] = new
                logp[name] = hf(tokens).logits[0].double().log_softmax(-1)
            target = tokens[0, 2:]  # predictions from positions 1 .. n-2: BOS's is not counted
            for name in ("clean", "sae", "ablated"):
                sums[name] += float(-logp[name][1:-1].gather(1, target[:, None]).sum())
            for name in ("sae", "ablated"):
                sums[f"kl_{name}"] += float((logp["clean"][1:].exp() * (logp["clean"][1:] - logp[name][1:])).sum())
            predictions += len(target)
            positions += tokens.shape[1] - 1
    ce = {k: sums[k] / predictions for k in ("clean", "sae", "ablated")}
    kl = {k: sums[f"kl_{k}"] / positions for k in ("sae", "ablated")}
    row = evaluated
    assert row["eval_tokens"] == row["n_tokens"] == positions
    want = {"ce_loss_clean": ce["clean"], "ce_loss_sae": ce["sae"], "ce_loss_ablated": ce["ablated"],
            "ce_loss_score": (ce["ablated"] - ce["sae"]) / (ce["ablated"] - ce["clean"]),
            "delta_lm_loss": ce["sae"] - ce["clean"], "kl_div_sae": kl["sae"], "kl_div_ablated": kl["ablated"],
            "kl_div_score": 1 - kl["sae"] / kl["ablated"]}
    for name, value in want.items():
        assert row[name] == pytest.approx(value, rel=1e-4, abs=1e-6), name
    # not vacuous: both splices change the loss (the random model and SAE make no ordering of them certain)
    assert min(abs(ce["sae"] - ce["clean"]), abs(ce["ablated"] - ce["clean"])) > 1e-4 and kl["sae"] > 1e-4


def test_evaluate_takes_whole_batches_from_the_start_and_refuses_ray(tmp_path, sae_dirs, corpus):
    db = tmp_path / "catalog.duckdb"
    opts = dict(dataset=str(corpus), max_doc_tokens=MAX_DOC, block_size=32, logit_k=0, batch_tokens=500, progress=False)
    ingest(resolve_source(None, None, str(sae_dirs["jumprelu"])), IngestOptions(**opts, evaluate_tokens=600), db=db)
    with Catalog.open(db) as cat:
        eval_tokens, n_tokens = cat.con.execute(
            "SELECT q.eval_tokens, s.n_tokens FROM sae_quality q JOIN saes s USING (sae)").fetchone()
    assert 600 <= eval_tokens < 600 + 500 and eval_tokens < n_tokens
    with pytest.raises(SaecatError, match="--evaluate runs on one machine"):
        IngestOptions(**opts, evaluate_tokens=600, ray="local")
