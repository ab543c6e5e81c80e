"""Loading the language model through transformer-lens, only as deep as the hook needs.

The model is the SAE's own (its sae-lens metadata names it), loaded the way sae-lens loads it
for training (no weight processing beyond what the SAE's metadata asks for), or a user's
`--model`: a transformer-lens name, a local Hugging Face folder such as a fine-tuned GPT-2, or a
GGUF file (converted once into a cached fp32 folder). A folder whose architecture
transformer-lens cannot configure from config.json alone (Gemma 3) is loaded as the SAE's model
by name, with the folder's weights and tokenizer.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from transformer_lens import HookedTransformer
from transformer_lens import loading_from_pretrained as tl_loading

from catalog.errors import SaecatError, one_line

if TYPE_CHECKING:
    from ingest.sources import LoadedSae

# Weight-processing flags transformer-lens' from_pretrained takes; the rest of an SAE's
# model_from_pretrained_kwargs go to the config.
_PROCESSING_FLAGS = ("fold_ln", "center_writing_weights", "center_unembed", "fold_value_biases",
                     "refactor_factored_attn_matrices")


def _first_n_layers(n_layers: int, layer: int | None) -> int:
    return n_layers if layer is None else min(n_layers, layer + 1)


def _load_local(folder: Path, layer: int | None, device: str, kwargs: dict[str, Any]) -> HookedTransformer:
    from transformers import AutoTokenizer

    processing = {flag: bool(kwargs.pop(flag, False)) for flag in _PROCESSING_FLAGS}
    full = tl_loading.get_pretrained_model_config(str(folder), device=device, **kwargs)
    cfg = tl_loading.get_pretrained_model_config(
        str(folder), device=device, first_n_layers=_first_n_layers(full.n_layers, layer), **kwargs
    )
    state_dict = tl_loading.get_pretrained_state_dict(str(folder), cfg, None, dtype=cfg.dtype)
    model = HookedTransformer(cfg, AutoTokenizer.from_pretrained(str(folder)), move_to_device=False)
    model.load_and_process_state_dict(state_dict, **processing)
    return model.to(device)


def _load_named(name: str, layer: int | None, device: str, kwargs: dict[str, Any], **weights: Any) -> HookedTransformer:
    full = tl_loading.get_pretrained_model_config(name, device=device)
    return HookedTransformer.from_pretrained_no_processing(
        name, device=device, first_n_layers=_first_n_layers(full.n_layers, layer), **weights, **kwargs
    )


def _load_as(official: str | None, folder: Path, layer: int | None, device: str,
             kwargs: dict[str, Any]) -> HookedTransformer:
    """The SAE's model by its transformer-lens name, with weights and tokenizer from `folder`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if official is None:
        raise SaecatError(f"transformer-lens cannot read the architecture in {folder}/config.json, "
                          "and the SAE names no model to configure it by")
    hf_model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    return _load_named(official, layer, device, kwargs, hf_model=hf_model,
                       tokenizer=AutoTokenizer.from_pretrained(str(folder)))


def _cache_dir() -> Path:
    return Path(os.environ.get("SAECAT_CACHE") or Path.home() / ".cache" / "saecat")


def gguf_folder(path: Path) -> Path:
    """A GGUF file as a Hugging Face folder (fp32 safetensors and tokenizer), converted once.

    Dequantizing and converting the tokenizer takes a minute; the folder reloads in seconds.
    It is keyed by the file's content, and written to a temporary folder first so that an
    interrupted conversion leaves nothing behind.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    folder = _cache_dir() / "models" / f"{path.stem}-{digest.hexdigest()[:16]}"
    if (folder / "config.json").is_file():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=".partial-"))
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        hf_model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
        # the weights are dequantized now: saved as plain fp32, not as a GGUF-quantized model
        hf_model.config.__dict__.pop("quantization_config", None)
        hf_model.hf_quantizer, hf_model.is_quantized = None, False
        hf_model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        tmp.rename(folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def _load(path: Path, name_or_path: str, official: str | None, layer: int | None, device: str,
          kwargs: dict[str, Any]) -> HookedTransformer:
    if path.suffix == ".gguf" and path.is_file():
        path = gguf_folder(path)
    if not path.is_dir():
        return _load_named(name_or_path, layer, device, kwargs)
    if not (path / "config.json").is_file():
        raise SaecatError(f"model folder {path} has no config.json")
    try:
        return _load_local(path, layer, device, dict(kwargs))
    except NotImplementedError:  # an architecture transformer-lens configures by name only
        return _load_as(official, path, layer, device, kwargs)


def load_model(name_or_path: str, hook_name: str, layer: int | None, device: str = "cpu",
               kwargs: dict[str, Any] | None = None, official: str | None = None) -> HookedTransformer:
    """Load the model up to the hook's block and check that the hook exists.

    `official` is the transformer-lens name of the SAE's model: it configures a local folder
    or GGUF file whose architecture transformer-lens cannot read from its config.json.
    """
    from safetensors import SafetensorError

    kwargs = dict(kwargs or {})
    kwargs.pop("n_devices", None)
    path = Path(name_or_path).expanduser()
    try:
        # transformer-lens print()s progress notes; keep stdout for results (--json)
        with contextlib.redirect_stdout(io.StringIO()):
            model = _load(path, name_or_path, official, layer, device, kwargs)
    except SaecatError:
        raise
    except SafetensorError as err:  # a truncated or overwritten weights file
        from ingest.sources import check_safetensors

        for weights in sorted(path.glob("*.safetensors")) if path.is_dir() else []:
            check_safetensors(weights, "model weights")  # raises, naming the damaged file
        raise SaecatError(f"cannot load model {name_or_path!r}: a weights file is not readable safetensors "
                          f"(truncated or overwritten?): {one_line(err)}") from err
    except OSError as err:
        if path.exists():
            raise SaecatError(f"cannot load model from {path}: {one_line(err)}") from err
        raise SaecatError(
            f"cannot load model {name_or_path!r}: not reachable on the Hugging Face hub and not in the local "
            "cache (HF_HOME). Connect to the network, or pass --model with a local Hugging Face folder"
        ) from err
    except (ValueError, KeyError, RuntimeError) as err:
        if not path.exists() and name_or_path.startswith(("/", "./", "../", "~")):
            raise SaecatError(f"model folder {path} does not exist") from err
        raise SaecatError(f"cannot load model {name_or_path!r}: {one_line(err)}") from err
    if hook_name not in model.hook_dict:
        raise SaecatError(
            f"model {name_or_path!r} has no hook {hook_name!r} (loaded {model.cfg.n_layers} blocks); "
            "is this the model the SAE was trained on?"
        )
    if model.tokenizer is None or len(model.tokenizer) <= len(model.tokenizer.all_special_ids):
        # transformers builds an empty tokenizer, silently, for a folder without tokenizer files
        raise SaecatError(f"model {name_or_path!r} has no tokenizer (tokenizer.json, or vocab.json and merges.txt)")
    model.eval()
    return model


def model_for_sae(loaded: "LoadedSae", name: str | None = None, device: str = "cpu") -> HookedTransformer:
    """The model to run an SAE's activations through: `name` if given, else the SAE's own."""
    name = name or loaded.model_name
    if not name:
        raise SaecatError(f"SAE {loaded.source.location} names no model in its config; pass --model")
    return load_model(name, loaded.hook_name, loaded.layer, device, loaded.model_kwargs, official=loaded.model_name)


@torch.inference_mode()
def hook_activations(model: HookedTransformer, tokens: torch.Tensor, hook_name: str, layer: int | None) -> torch.Tensor:
    """Activations at the hook for a [batch, pos] token tensor, running only the blocks needed."""
    stop = None if layer is None else layer + 1
    _, cache = model.run_with_cache(tokens, names_filter=hook_name, stop_at_layer=stop)
    return cache[hook_name]
