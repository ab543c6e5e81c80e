"""Shared fixtures: a real (tiny, random-weight) GPT-2, real SAEs saved by sae-lens, real text,
and a Hugging Face cache laid out exactly as the hub lays it out, so the registry and
default-model code paths run as they do for users, offline.

HF_HOME must point at the fixture cache before huggingface_hub is imported, hence at the top.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

_HF_HOME = Path(tempfile.mkdtemp(prefix="saecat-hf-"))
os.environ["HF_HOME"] = str(_HF_HOME)
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_VERBOSITY"] = "error"
os.environ.pop("SAECAT_DB", None)
# Under pytest-xdist (make test) each worker, and the processes its tests start, gets its share of
# the cores: more threads than cores slow every test and the timing-sensitive ones most.
if "PYTEST_XDIST_WORKER_COUNT" in os.environ:
    os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

STDLIB = Path(os.__file__).parent
D_MODEL = 64
HOOK = "blocks.1.hook_resid_pre"
ARCHITECTURES = ("standard", "gated", "topk", "jumprelu")
# A real sae-lens registry entry; our fixture SAE stands in for its weights in the hub cache.
REGISTRY_RELEASE = "gpt2-small-res-jb"
REGISTRY_REPO = "jbloom/GPT2-Small-SAEs-Reformatted"


def hub_cache_put(repo_id: str, files: dict[str, Path], kind: str = "models") -> Path:
    """Place files in $HF_HOME/hub as huggingface_hub does: blobs named by hash, snapshot symlinks."""
    repo_dir = _HF_HOME / "hub" / f"{kind}--{repo_id.replace('/', '--')}"
    revision = hashlib.sha1(repo_id.encode()).hexdigest()
    (repo_dir / "refs").mkdir(parents=True, exist_ok=True)
    (repo_dir / "refs" / "main").write_text(revision)
    for rel, src in files.items():
        data = Path(src).read_bytes()
        blob = repo_dir / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = repo_dir / "snapshots" / revision / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        if link.exists() or link.is_symlink():
            link.unlink()
        link.symlink_to(os.path.relpath(blob, link.parent))
    return repo_dir


def _train_tokenizer(folder: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=1000, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train([str(p) for p in sorted((STDLIB / "json").glob("*.py"))], trainer)
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                            unk_token="<|endoftext|>").save_pretrained(folder)


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory) -> Path:
    """A 2-layer GPT-2 with random weights and a BPE tokenizer trained on stdlib source, as a
    local Hugging Face folder (what a user's fine-tuned model looks like), and the same files in
    the hub cache as 'gpt2', the model the fixture SAEs name."""
    from transformers import GPT2Config, GPT2LMHeadModel

    folder = tmp_path_factory.mktemp("tiny-gpt2")
    _train_tokenizer(folder)
    torch.manual_seed(0)
    # what a user sets: sizes and the tokenizer's special ids; every other key keeps the library's
    # current default, so the folder is what today's transformers saves
    config = GPT2Config(vocab_size=1000, n_positions=256, n_embd=D_MODEL, n_layer=2, n_head=4,
                        bos_token_id=0, eos_token_id=0)
    GPT2LMHeadModel(config).save_pretrained(folder)
    hub_cache_put("gpt2", {p.name: p for p in folder.iterdir() if p.is_file()})
    return folder


def make_sae(folder: Path, architecture: str, *, d_sae: int = 96, seed: int = 0, hook: str = HOOK,
             model_name: str = "gpt2", prepend_bos: bool = True, sparsity_from: torch.Tensor | None = None) -> Path:
    """Save a random SAE of the given architecture with sae-lens. With `sparsity_from` (sample
    activations), biases are set so each feature fires on roughly 10% of them: realistic sparsity."""
    from sae_lens import SAE, GatedSAEConfig, JumpReLUSAEConfig, StandardSAEConfig, TopKSAEConfig

    config_class = {"standard": StandardSAEConfig, "gated": GatedSAEConfig, "topk": TopKSAEConfig,
                    "jumprelu": JumpReLUSAEConfig}[architecture]
    extra = {"k": 8} if architecture == "topk" else {}
    cfg = config_class(d_in=D_MODEL, d_sae=d_sae, **extra)
    cfg.metadata.hook_name = hook
    cfg.metadata.model_name = model_name
    cfg.metadata.prepend_bos = prepend_bos
    sae = SAE.from_dict(cfg.to_dict())
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn(D_MODEL, d_sae, generator=gen) / D_MODEL**0.5)
        sae.W_dec.copy_(torch.randn(d_sae, D_MODEL, generator=gen) / D_MODEL**0.5)
        if sparsity_from is not None:
            pre = (sparsity_from - sae.b_dec) @ sae.W_enc
            cut = torch.quantile(pre, 0.9, dim=0)
            if architecture == "gated":
                sae.b_gate.copy_(-cut)
            else:
                sae.b_enc.copy_(-cut)
            if architecture == "jumprelu":
                sae.threshold.copy_(torch.full((d_sae,), 1e-3))
    sae.save_model(folder)
    return folder


def make_wide_sae(folder: Path, d_sae: int, sample: torch.Tensor, *, l0: int = 64, seed: int = 0, hook: str = HOOK,
                  model_name: str = "gpt2", clear_of: torch.Tensor | None = None, clearance: float = 1e-5) -> Path:
    """Save a wide standard SAE with sae-lens, firing as trained SAEs do: about `l0` latents per
    token, their popularity Zipf-like. Each encoder column is random / sqrt(d_in), scaled by
    (1 + rank) ** -0.25 for a random rank per latent (so a few latents fire often and most rarely);
    b_enc = -t, with t the (1 - l0 / d_sae) quantile of all pre-activations on `sample`
    (activations at `hook`). Not make_sae's 10%-of-tokens calibration, which at 131k latents would
    fire ~13k per token.

    With `clear_of` (activations a test will count), the few latents with a pre-activation there
    within `clearance` of their cut get their cut moved, by well under 1e-3, to the middle of the
    widest gap between their nearby pre-activations: whether a latent fires on those tokens is
    then decided far above float noise, so counts can be compared exactly with threshold 0."""
    from sae_lens import SAE, StandardSAEConfig

    cfg = StandardSAEConfig(d_in=D_MODEL, d_sae=d_sae)
    cfg.metadata.hook_name = hook
    cfg.metadata.model_name = model_name
    cfg.metadata.prepend_bos = True
    sae = SAE.from_dict(cfg.to_dict())
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        scale = (1.0 + torch.randperm(d_sae, generator=gen).float()) ** -0.25
        sae.W_enc.copy_(torch.randn(D_MODEL, d_sae, generator=gen) / D_MODEL**0.5 * scale)
        sae.W_dec.copy_(torch.randn(d_sae, D_MODEL, generator=gen) / D_MODEL**0.5)
        pre = ((sample - sae.b_dec) @ sae.W_enc).numpy().ravel()  # [tokens x d_sae]: torch.quantile's limit is 16M
        at = int((1 - l0 / d_sae) * (len(pre) - 1))
        cut = torch.full((d_sae,), float(np.partition(pre, at)[at]))
        del pre
        if clear_of is not None:
            x, window = clear_of - sae.b_dec, 1e-3
            for lo in range(0, d_sae, 8192):
                pre = x @ sae.W_enc[:, lo:lo + 8192]
                for f in ((pre - cut[lo:lo + 8192]).abs_().amin(0) < clearance).nonzero().flatten().tolist():
                    near = pre[:, f][(pre[:, f] - cut[lo + f]).abs() < window].sort().values
                    edges = torch.cat([cut[lo + f:lo + f + 1] - window, near, cut[lo + f:lo + f + 1] + window])
                    k = int(edges.diff().argmax())
                    cut[lo + f] = (edges[k] + edges[k + 1]) / 2
                    assert (pre[:, f] - cut[lo + f]).abs().min() > clearance
        sae.b_enc.copy_(-cut)
    sae.save_model(folder)
    return folder


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    """Real text: stdlib module sources (code) and their docstrings (prose), one JSON line each."""
    import ast

    rows = []
    for path in sorted((STDLIB / "json").glob("*.py")) + sorted((STDLIB / "email").glob("*.py"))[:8]:
        source = path.read_text()
        rows.append({"text": source[:3000], "kind": "code"})
        doc = ast.get_docstring(ast.parse(source))
        if doc:
            rows.append({"text": doc, "kind": "prose"})
    out = tmp_path_factory.mktemp("corpus") / "docs.jsonl"
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return out


@pytest.fixture(scope="session")
def sample_acts(model_dir) -> torch.Tensor:
    """Activations of the fixture model at HOOK on real text, to calibrate SAE sparsity."""
    from ingest.model import hook_activations, load_model

    model = load_model(str(model_dir), HOOK, 1)
    tokens = model.tokenizer((STDLIB / "json" / "decoder.py").read_text()[:4000])["input_ids"][:200]
    acts = hook_activations(model, torch.tensor([tokens]), HOOK, 1)
    return acts[0]


@pytest.fixture(scope="session")
def sae_dirs(tmp_path_factory, sample_acts) -> dict[str, Path]:
    """One sae-lens folder per architecture."""
    root = tmp_path_factory.mktemp("saes")
    return {arch: make_sae(root / arch, arch, seed=i, sparsity_from=sample_acts)
            for i, arch in enumerate(ARCHITECTURES)}


@pytest.fixture(scope="session")
def registry_sae(sae_dirs) -> tuple[str, str]:
    """The standard fixture SAE placed in the hub cache under a real registry release."""
    sae_id = HOOK
    folder = sae_dirs["standard"]
    hub_cache_put(REGISTRY_REPO, {f"{sae_id}/{p.name}": p for p in folder.iterdir()})
    return REGISTRY_RELEASE, sae_id


# ---- a brute-force reference path that shares no code with ingestion (HF GPT2Model, one document at a time)

@pytest.fixture(scope="session")
def texts(corpus) -> list[str]:
    return [json.loads(line)["text"] for line in corpus.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="session")
def tokenizer(model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_dir))


@pytest.fixture(scope="session")
def raw_ids(texts, tokenizer) -> list[list[int]]:
    """Each document's tokens on its own, no special tokens."""
    return [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]


@pytest.fixture(scope="session")
def resid(model_dir, raw_ids, tokenizer):
    """resid(bos, max_doc, centered) -> per document, the residual entering block 1 [tokens, 64].

    `centered` gives what transformer-lens' center_writing_weights produces: every writing weight
    is mean-centred over d_model, and since the model's LayerNorms are unfolded (their inputs are
    centred anyway) the blocks compute the same thing, so the residual is the plain one minus its
    mean over d_model."""
    from transformers import GPT2Model

    hf = GPT2Model.from_pretrained(str(model_dir)).eval()
    assert hf.config.n_layer == 2 and HOOK == "blocks.1.hook_resid_pre"
    bos_id = tokenizer.bos_token_id
    assert bos_id is not None
    cache: dict[tuple[bool, int, bool], list[torch.Tensor]] = {}

    def get(bos: bool, max_doc: int, centered: bool = False) -> list[torch.Tensor]:
        key = (bos, max_doc, centered)
        if key not in cache:
            if centered:
                cache[key] = [r - r.mean(-1, keepdim=True) for r in get(bos, max_doc)]
            else:
                out = []
                for ids in raw_ids:
                    ids = ([bos_id] if bos else []) + list(ids)
                    ids = ids[:max_doc]
                    with torch.no_grad():
                        out.append(hf(torch.tensor([ids]), output_hidden_states=True).hidden_states[1][0])
                cache[key] = out
        return cache[key]

    return get


@pytest.fixture(scope="session")
def sae_acts(resid):
    """sae_acts(sae_dir, bos, max_doc, centered) -> per document, SAE activations of the counted
    tokens (BOS position dropped) as float32 numpy [tokens, F]."""
    from sae_lens import SAE

    cache: dict = {}

    def get(folder: Path, bos: bool, max_doc: int, centered: bool = False) -> list[np.ndarray]:
        key = (str(folder), bos, max_doc, centered)
        if key not in cache:
            sae = SAE.load_from_disk(str(folder), device="cpu").eval()
            assert sae.cfg.metadata.hook_name == HOOK and bool(sae.cfg.metadata.prepend_bos) == bos
            start = 1 if bos else 0
            with torch.no_grad():
                cache[key] = [sae.encode(r).float().numpy()[start:] for r in resid(bos, max_doc, centered)]
        return cache[key]

    return get


@pytest.fixture
def db(tmp_path) -> Path:
    return tmp_path / "catalog.duckdb"


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(_HF_HOME, ignore_errors=True)


sys.path.insert(0, str(Path(__file__).parent))
