"""Loading the language model through transformer-lens, only as deep as the hook needs.

The model is the SAE's own (its sae-lens metadata names it), loaded the way sae-lens loads it
for training (no weight processing beyond what the SAE's metadata asks for), or a user's
`--model`: a transformer-lens name or a local Hugging Face folder such as a fine-tuned GPT-2.
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path
from typing import Any

import torch
from transformer_lens import HookedTransformer
from transformer_lens import loading_from_pretrained as tl_loading

from catalog.errors import SaecatError, one_line

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


def _load_named(name: str, layer: int | None, device: str, kwargs: dict[str, Any]) -> HookedTransformer:
    full = tl_loading.get_pretrained_model_config(name, device=device)
    return HookedTransformer.from_pretrained_no_processing(
        name, device=device, first_n_layers=_first_n_layers(full.n_layers, layer), **kwargs
    )


def _load(folder: Path, name_or_path: str, layer: int | None, device: str, kwargs: dict[str, Any]) -> HookedTransformer:
    if folder.is_dir():
        if not (folder / "config.json").is_file():
            raise SaecatError(f"model folder {folder} has no config.json")
        return _load_local(folder, layer, device, kwargs)
    return _load_named(name_or_path, layer, device, kwargs)


def load_model(name_or_path: str, hook_name: str, layer: int | None, device: str = "cpu",
               kwargs: dict[str, Any] | None = None) -> HookedTransformer:
    """Load the model up to the hook's block and check that the hook exists."""
    kwargs = dict(kwargs or {})
    kwargs.pop("n_devices", None)
    folder = Path(name_or_path).expanduser()
    try:
        # transformer-lens print()s progress notes; keep stdout for results (--json)
        with contextlib.redirect_stdout(io.StringIO()):
            model = _load(folder, name_or_path, layer, device, kwargs)
    except SaecatError:
        raise
    except OSError as err:
        raise SaecatError(
            f"cannot load model {name_or_path!r}: not reachable on the Hugging Face hub and not in the local "
            "cache (HF_HOME). Connect to the network, or pass --model with a local Hugging Face folder"
        ) from err
    except (ValueError, KeyError, RuntimeError) as err:
        raise SaecatError(f"cannot load model {name_or_path!r}: {one_line(err)}") from err
    if hook_name not in model.hook_dict:
        raise SaecatError(
            f"model {name_or_path!r} has no hook {hook_name!r} (loaded {model.cfg.n_layers} blocks); "
            "is this the model the SAE was trained on?"
        )
    if model.tokenizer is None:
        raise SaecatError(f"model {name_or_path!r} has no tokenizer")
    model.eval()
    return model


@torch.inference_mode()
def hook_activations(model: HookedTransformer, tokens: torch.Tensor, hook_name: str, layer: int | None) -> torch.Tensor:
    """Activations at the hook for a [batch, pos] token tensor, running only the blocks needed."""
    stop = None if layer is None else layer + 1
    _, cache = model.run_with_cache(tokens, names_filter=hook_name, stop_at_layer=stop)
    return cache[hook_name]
