"""Model sources beyond names and local folders (those: test_model_families): GGUF files and
folders transformer-lens configures by name only. The real Gemma 3 GGUF is the demo's (too big
for unit tests); here, that bad files fail with one clear line and leave no half-converted
folder behind."""

from __future__ import annotations

import dataclasses
import json

import pytest

from catalog.errors import SaecatError
from conftest import HOOK
from ingest import resolve_source
from ingest.model import load_model, model_for_sae
from ingest.sources import load_sae


def test_corrupt_gguf_is_one_line_and_leaves_no_partial_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("SAECAT_CACHE", str(tmp_path / "cache"))
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"GGUF" + bytes(range(256)) * 8)
    with pytest.raises(SaecatError, match="model.gguf") as info:
        load_model(str(bad), HOOK, 1, official="gpt2")
    assert "\n" not in str(info.value)
    assert list((tmp_path / "cache" / "models").iterdir()) == []


def test_folder_of_an_architecture_configured_by_name_needs_the_saes_model(tmp_path):
    """Multimodal Gemma 3 is known to transformer-lens by model name only, and saecat does not
    configure it from config.json (the text-only Gemma families it does: test_model_families)."""
    folder = tmp_path / "gemma"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"architectures": ["Gemma3ForConditionalGeneration"],
                                                    "model_type": "gemma3"}))
    with pytest.raises(SaecatError, match="names no model to configure it by"):
        load_model(str(folder), HOOK, 1)
    # named, the weights are read from the folder: none there is a clear error about the folder
    with pytest.raises(SaecatError, match=f"cannot load model from {folder}"):
        load_model(str(folder), HOOK, 1, official="google/gemma-3-4b-pt")


def test_folder_without_weights_is_a_clear_error_about_the_folder(tmp_path):
    folder = tmp_path / "gemma"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"architectures": ["Gemma3ForCausalLM"],
                                                    "model_type": "gemma3_text"}))
    with pytest.raises(SaecatError, match=f"cannot load model from {folder}"):
        load_model(str(folder), HOOK, 1)


def test_an_sae_naming_no_model_needs_one(sae_dirs, model_dir):
    loaded = dataclasses.replace(load_sae(resolve_source(None, None, str(sae_dirs["standard"]))), model_name=None)
    with pytest.raises(SaecatError, match="names no model in its config; pass --model"):
        model_for_sae(loaded)
    assert model_for_sae(loaded, str(model_dir)).cfg.n_layers == 2
