"""Every model family that sae-lens registry SAEs use and transformer-lens runs, as a user's
local folder: a tiny randomly initialised model saved by transformers with `save_pretrained`
and the library's current defaults (only sizes and the tokenizer's vocabulary are chosen, as
a user chooses them), a tokenizer beside it.

For each: the activations saecat reads at a residual-stream hook equal the hidden states
transformers computes for that layer on the same tokens, and `saecat ingest --model FOLDER`
runs end to end through the real CLI.

Folder names carry the family's name ("my-llama3-finetune"), as users name them:
transformer-lens picks config branches by substrings of the path, which must not decide how a
folder is read.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from catalog import Catalog
from catalog.errors import SaecatError
from conftest import D_MODEL, _train_tokenizer, make_sae
from ingest.model import hook_activations, load_model
from test_robustness import _env, assert_error

VOCAB = 1000  # the fixture tokenizer's
SEQ = 40  # tokens per sequence: longer than the sliding windows below, so they are exercised
SMALL = dict(vocab_size=VOCAB, hidden_size=D_MODEL, intermediate_size=128, num_hidden_layers=3,
             num_attention_heads=4)

# family -> (config class, model class, what the user sets, SAE metadata.model_name).
# Sliding windows are set below SEQ (as Gemma 3 270M sets 512 below its context) so that the
# local-attention layers differ from global ones within the test's tokens.
FAMILIES: dict[str, tuple[str, str, dict, str]] = {
    "gpt2": ("GPT2Config", "GPT2LMHeadModel",
             dict(vocab_size=VOCAB, n_positions=256, n_embd=D_MODEL, n_layer=3, n_head=4), "gpt2"),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM",
               dict(SMALL, num_key_value_heads=2, head_dim=16, sliding_window=16), "gemma-2-2b"),
    # 7 layers: Gemma 3 makes every 6th layer global, so layer 5 is a global one under test
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM",
               dict(SMALL, num_hidden_layers=7, num_key_value_heads=2, head_dim=16, sliding_window=16),
               "google/gemma-3-270m"),
    "llama3": ("LlamaConfig", "LlamaForCausalLM",
               dict(SMALL, num_key_value_heads=2, max_position_embeddings=131072, rope_theta=500000.0,
                    rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                  "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
               "meta-llama/Llama-3.1-8B"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(SMALL, num_key_value_heads=2), "Qwen/Qwen2.5-7B-Instruct"),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(SMALL, num_key_value_heads=2, head_dim=16),
              "Qwen/Qwen3-1.7B-Base"),
    "pythia": ("GPTNeoXConfig", "GPTNeoXForCausalLM", dict(SMALL), "pythia-70m-deduped"),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", dict(SMALL, num_key_value_heads=1, head_dim=16), "gemma-2b"),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(SMALL, num_key_value_heads=2), "mistral-7b"),
}

# Tolerance of the value test, relative to the largest hidden-state magnitude of the layer.
# Both sides compute in float32 (machine epsilon 1.2e-7) the same function in a different order:
# transformer-lens runs attention as explicit einsums and a softmax over a masked score matrix,
# transformers through scaled_dot_product_attention (or its eager path with soft-capping); the
# rotary angles come from a precomputed table in one and from inv_freq on the fly in the other;
# norms and the gated MLPs group their products differently. Over a few layers of width 64 these
# rounding differences stay within a few ulps: measured at most 7.4e-7 relative (Gemma 3, layer
# 5), 1e-7 to 5e-7 for the others. 1e-5 leaves a 13x margin over that and is below what a real
# difference in the computation gives, measured on these models: a wrong sliding window 0.85, a
# wrong local or global rotary base 5e-4 to 0.17, a wrong attention scale 3e-2, Llama 3's rope
# scaling left out 4e-5. (Gemma 2's attention soft cap of 50 cannot show: random weights keep the
# scores far below it.)
RTOL = 1e-5


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tokenizer")
    _train_tokenizer(folder)
    return folder


@pytest.fixture(scope="module")
def family_dir(tmp_path_factory, tokenizer_dir):
    """family -> its folder, built on first use: save_pretrained with library defaults."""
    import transformers

    root = tmp_path_factory.mktemp("families")
    built: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in built:
            config_class, model_class, sizes, _ = FAMILIES[family]
            folder = root / f"my-{family}-finetune"
            torch.manual_seed(0)
            config = getattr(transformers, config_class)(**sizes)
            getattr(transformers, model_class)(config).save_pretrained(folder)
            for f in tokenizer_dir.iterdir():
                shutil.copy(f, folder / f.name)
            built[family] = folder
        return built[family]

    return get


def _tokens(n: int, seed: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n, SEQ), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", list(FAMILIES))
def test_activations_equal_transformers_hidden_states(family, family_dir):
    from transformers import AutoModelForCausalLM

    folder = family_dir(family)
    hf = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    n_layers = hf.config.num_hidden_layers
    last = n_layers - 2  # transformers' last hidden state has the final norm applied: compare before it
    model = load_model(str(folder), f"blocks.{last}.hook_resid_post", last)
    assert model.cfg.n_layers == last + 1  # only the blocks up to the hook
    tokens = _tokens(2, seed=1)
    with torch.no_grad():
        hidden = hf(tokens, output_hidden_states=True).hidden_states
    for layer in range(last + 1):
        ours = hook_activations(model, tokens, f"blocks.{layer}.hook_resid_post", layer)
        theirs = hidden[layer + 1]
        scale = theirs.abs().max().item()
        diff = (ours - theirs).abs().max().item()
        print(f"{family} layer {layer}: max abs diff {diff:.2e}, relative {diff / scale:.2e}")
        assert diff <= RTOL * scale, f"{family} layer {layer}: max |diff| {diff:.3g} vs scale {scale:.3g}"
    resid_pre = hook_activations(model, tokens, "blocks.0.hook_resid_pre", 0)
    assert (resid_pre - hidden[0]).abs().max().item() <= RTOL * hidden[0].abs().max().item()


@pytest.fixture(scope="module")
def docs(tmp_path_factory, corpus) -> Path:
    """A few documents of the shared corpus: enough to fill blocks, cheap to run ten times."""
    out = tmp_path_factory.mktemp("docs") / "docs.jsonl"
    out.write_text("".join(corpus.read_text().splitlines(keepends=True)[:6]))
    return out


# The real CLI entry point, run once per argv in ONE subprocess: importing torch, transformer-lens
# and sae-lens takes most of a CLI run (7 s of CPU here), and ten of them would dominate the file.
_RUN_MANY = """
import contextlib, io, json, sys
from queries.front.cli import main
results = []
for argv in json.loads(sys.argv[1]):
    sys.argv = ["saecat", *argv]
    out, err = io.StringIO(), io.StringIO()
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main()
        except SystemExit as done:
            code = done.code if isinstance(done.code, int) else int(done.code is not None)
    results.append({"code": code, "stdout": out.getvalue(), "stderr": err.getvalue()})
print(json.dumps(results))
"""
CLI_LAYER = 1
CLI_HOOK = f"blocks.{CLI_LAYER}.hook_resid_post"
CLI_D_SAE = 48


@pytest.fixture(scope="module")
def unsupported_dir(tmp_path_factory, tokenizer_dir) -> Path:
    """A real transformers architecture transformer-lens has no HookedTransformer support for."""
    from transformers import FalconConfig, FalconForCausalLM

    folder = tmp_path_factory.mktemp("unsupported") / "my-falcon"
    FalconForCausalLM(FalconConfig(vocab_size=VOCAB, hidden_size=D_MODEL, num_hidden_layers=2,
                                   num_attention_heads=4)).save_pretrained(folder)
    for f in tokenizer_dir.iterdir():
        shutil.copy(f, folder / f.name)
    return folder


@pytest.fixture(scope="module")
def cli_runs(tmp_path_factory, family_dir, unsupported_dir, docs) -> dict[str, tuple[dict, Path]]:
    """name -> (exit code and output of `saecat ingest --sae-path SAE --model FOLDER`, catalog):
    one per family, with a TopK SAE saved by sae-lens at CLI_HOOK, and one for the unsupported
    architecture."""
    root = tmp_path_factory.mktemp("cli")
    folders = {family: family_dir(family) for family in FAMILIES} | {"unsupported": unsupported_dir}
    model_names = {family: spec[3] for family, spec in FAMILIES.items()} | {"unsupported": "tiiuae/falcon-7b"}
    argvs, dbs = [], {}
    for name, folder in folders.items():
        sae = make_sae(root / name / "sae", "topk", d_sae=CLI_D_SAE, hook=CLI_HOOK, model_name=model_names[name])
        dbs[name] = root / name / "catalog.duckdb"
        argvs.append(["ingest", "--dataset", str(docs), "--sae-path", str(sae), "--model", str(folder),
                      "--max-tokens", "600", "--max-doc-tokens", "128", "--block-size", "32",
                      "--db", str(dbs[name])])
    proc = subprocess.run([sys.executable, "-c", _RUN_MANY, json.dumps(argvs)], cwd=root, env=_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    results = json.loads(proc.stdout.splitlines()[-1])
    return {name: (result, dbs[name]) for name, result in zip(folders, results)}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_cli_ingests_each_family_from_its_folder(family, cli_runs):
    result, db = cli_runs[family]
    assert result["code"] == 0, result["stderr"]
    with Catalog.open(db) as cat:
        saes = cat.con.execute("SELECT sae, hook_name, d_sae, d_in FROM saes").fetchall()
        assert [s[1:] for s in saes] == [(CLI_HOOK, CLI_D_SAE, D_MODEL)]
        n, fired = cat.con.execute("SELECT count(*), count(*) FILTER (fire_count > 0) FROM features "
                                   "WHERE sae = ?", [saes[0][0]]).fetchone()
    assert n == CLI_D_SAE and fired > 0


def test_an_architecture_transformer_lens_does_not_run_is_one_line(unsupported_dir, cli_runs):
    """A folder transformer-lens cannot run at all fails with one line naming its architecture,
    model_type and folder, whether or not the SAE names a model."""
    for official in (None, "tiiuae/falcon-7b"):
        with pytest.raises(SaecatError) as info:
            load_model(str(unsupported_dir), "blocks.0.hook_resid_post", 0, official=official)
        message = str(info.value)
        assert "FalconForCausalLM" in message and "'falcon'" in message and str(unsupported_dir) in message
        assert "\n" not in message
    result, _ = cli_runs["unsupported"]
    assert_error(result["code"], result["stderr"], "transformer-lens does not support FalconForCausalLM")


# Published configurations (config.json of the hub repos), made as users' folders have them.
REAL_CONFIGS = {
    "google/gemma-3-270m": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(
        vocab_size=262144, hidden_size=640, intermediate_size=2048, num_hidden_layers=18, num_attention_heads=4,
        num_key_value_heads=1, head_dim=256, max_position_embeddings=32768, sliding_window=512,
        rope_theta=1000000.0, rope_local_base_freq=10000.0, query_pre_attn_scalar=256)),
    "google/gemma-2-2b": ("Gemma2Config", "Gemma2ForCausalLM", dict(
        vocab_size=256000, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26, num_attention_heads=8,
        num_key_value_heads=4, head_dim=256, max_position_embeddings=8192, sliding_window=4096,
        query_pre_attn_scalar=256)),
}


@pytest.mark.parametrize("official", list(REAL_CONFIGS))
def test_a_real_gemma_folder_is_configured_as_transformer_lens_configures_it_by_name(official, tmp_path):
    """The Gemma families are configured from the folder's config.json over the named model's
    architecture: for the real model's config that is exactly transformer-lens' own configuration
    (which the SAEs trained on it saw)."""
    import transformers
    from transformer_lens.loading_from_pretrained import get_pretrained_model_config

    from ingest.model import _local_config

    config_class, architecture, values = REAL_CONFIGS[official]
    config = getattr(transformers, config_class)(**values)
    config.architectures = [architecture]
    config.save_pretrained(tmp_path)
    ours = _local_config(tmp_path, None, "cpu", {}).to_dict()
    theirs = get_pretrained_model_config(official, device="cpu").to_dict()
    names = {"model_name", "tokenizer_name"}
    assert {k: v for k, v in ours.items() if k not in names} == {k: v for k, v in theirs.items() if k not in names}


def test_the_users_folder_is_left_as_it_was(family_dir):
    folder = family_dir("gpt2")
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    load_model(str(folder), "blocks.0.hook_resid_post", 0)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    assert "n_ctx" not in json.loads((folder / "config.json").read_text())  # saved with defaults
