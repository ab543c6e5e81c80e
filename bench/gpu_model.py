"""A model of Gemma 3 270M's exact shape with random weights, made offline, for bench/gpu.sh.

The demo's model (google/gemma-3-270m as a 250 MB GGUF, converted to a 1 GB fp32 folder) cannot
travel to the GPU machine (64 MiB per call, no network there), so the GPU benchmarks run a model
made there: `Gemma3ForCausalLM` with Gemma 3 270M's published configuration (read off the demo's
GGUF: 18 layers, hidden 640, 4 heads, 1 key-value head, head_dim 256, MLP 2,048, vocabulary
262,144, sliding window 512 on 5 of every 6 layers, rotary bases 10,000 local and 1,000,000
global, context 32,768), initialised by transformers with a fixed seed and saved in fp32 with
save_pretrained: the folder saecat loads for `--model` exactly as it loads the converted demo
model (configured from its config.json over google/gemma-3-270m's architecture).

The cost of a forward pass and of saecat's counting does not depend on the weights' values, nor
on which tokenizer made the ids; firing statistics do, which is why the benchmarks use a random
JumpReLU SAE with thresholds set on the model's own activations (bench/ingestion.py --width
--l0) or a TopK SAE (fixed L0). The tokenizer:

- `--tokenizer FILE` (a folder, or a .tar.xz of one, holding tokenizer.json and
  tokenizer_config.json): the real Gemma 3 tokenizer that bench/gpu_wheels.sh exports from the
  demo's GGUF (3.5 MB compressed), so documents are cut into the same tokens as the demo's;
- otherwise a byte-level BPE of `--bpe-vocab` tokens trained here on the first documents of
  `--corpus`, with Gemma's special tokens at Gemma's ids (<pad> 0, <eos> 1, <bos> 2, <unk> 3).

`--tiny` keeps the hidden size (so the demo SAE's 640-wide hook fits) and the first 6 layers
(the demo SAE reads layer 5) but shrinks the heads, the MLP and the vocabulary: a few MB that
`bench/gpu.sh --smoke` builds and ingests on a CPU in seconds, through the same loading code.

    python bench/gpu_model.py /tmp/random-270m --tokenizer .whl/gemma3-270m-tokenizer.tar.xz
    python bench/gpu_model.py /tmp/tiny --tiny --corpus demo/build/stdlib.jsonl

Prints one JSON line: the folder, its parameters, the tokenizer used, seconds.
"""

from __future__ import annotations

import argparse
import itertools
import json
import shutil
import sys
import tarfile
import tempfile
import time
from pathlib import Path

# Gemma 3 270M as published (config.json of google/gemma-3-270m; the demo GGUF's metadata agrees).
GEMMA3_270M = dict(
    vocab_size=262_144, hidden_size=640, intermediate_size=2048, num_hidden_layers=18, num_attention_heads=4,
    num_key_value_heads=1, head_dim=256, max_position_embeddings=32_768, sliding_window=512,
    rope_theta=1_000_000.0, rope_local_base_freq=10_000.0, query_pre_attn_scalar=256, rms_norm_eps=1e-6,
    hidden_activation="gelu_pytorch_tanh", pad_token_id=0, eos_token_id=1, bos_token_id=2,
    tie_word_embeddings=True)
# Same hidden size and layer pattern up to the demo SAE's layer 5; small everywhere else.
TINY = dict(GEMMA3_270M, num_hidden_layers=6, intermediate_size=256, head_dim=32, vocab_size=2048,
            max_position_embeddings=1024)
SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>"]  # at Gemma's ids 0-3


def tokenizer_from(path: Path, folder: Path) -> str:
    """Copies a tokenizer folder (or unpacks a .tar.xz of one) into `folder`."""
    if path.is_dir():
        for f in path.iterdir():
            if f.is_file():
                shutil.copy(f, folder / f.name)
    else:
        with tarfile.open(path) as tar:
            for member in tar.getmembers():
                if member.isfile():
                    source = tar.extractfile(member)
                    assert source is not None
                    (folder / Path(member.name).name).write_bytes(source.read())
    if not (folder / "tokenizer.json").is_file():
        raise SystemExit(f"{path} holds no tokenizer.json")
    return f"carried: {path.name}"


def tokenizer_trained(corpus: Path, vocab: int, docs: int, folder: Path) -> str:
    """A byte-level BPE trained on the corpus's first `docs` documents, Gemma's specials first."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    with corpus.open(encoding="utf-8") as lines:
        texts = [json.loads(line)["text"] for line in itertools.islice(lines, docs)]
    tok.train_from_iterator(texts, trainer)
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>",
                            unk_token="<unk>").save_pretrained(folder)
    return f"byte-level BPE, {tok.get_vocab_size()} tokens, trained on {len(texts)} documents of {corpus.name}"


def build(out: Path, sizes: dict, tokenizer: Path | None, corpus: Path | None, bpe_vocab: int, docs: int,
          seed: int) -> dict:
    import torch
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    started = time.perf_counter()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=".partial-"))
    try:
        if tokenizer is not None:
            used = tokenizer_from(tokenizer, tmp)
        elif corpus is not None:
            used = tokenizer_trained(corpus, min(bpe_vocab, sizes["vocab_size"]), docs, tmp)
        else:
            raise SystemExit("give --tokenizer or --corpus (to train one)")
        config = Gemma3TextConfig(**sizes)
        config.architectures = ["Gemma3ForCausalLM"]
        torch.manual_seed(seed)
        model = Gemma3ForCausalLM(config)
        model.save_pretrained(tmp)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    saved = json.loads((out / "config.json").read_text())
    return {"step": "model", "folder": str(out), "parameters": sum(p.numel() for p in model.parameters()),
            "config": {k: saved.get(k) for k in ("num_hidden_layers", "hidden_size", "num_attention_heads",
                                                 "num_key_value_heads", "head_dim", "intermediate_size",
                                                 "vocab_size", "sliding_window", "rope_parameters")},
            "tokenizer": used, "seed": seed, "transformers": __import__("transformers").__version__,
            "seconds": round(time.perf_counter() - started, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, help="the model folder to write (replaced if there)")
    parser.add_argument("--tokenizer", type=Path, help="a tokenizer folder or a .tar.xz of one")
    parser.add_argument("--corpus", type=Path, help="JSON lines with a 'text' field, to train a BPE on")
    parser.add_argument("--bpe-vocab", type=int, default=32_768)
    parser.add_argument("--bpe-docs", type=int, default=2000, help="documents the BPE is trained on")
    parser.add_argument("--tiny", action="store_true", help="6 layers, small heads, MLP and vocabulary")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.tokenizer is not None and args.tiny:
        sys.exit("--tiny has a 2,048-token vocabulary: train its tokenizer (--corpus), don't carry one")
    sizes = TINY if args.tiny else GEMMA3_270M
    print(json.dumps(build(args.out, sizes, args.tokenizer, args.corpus, args.bpe_vocab, args.bpe_docs, args.seed)),
          flush=True)


if __name__ == "__main__":
    main()
