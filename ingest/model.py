"""Loading the language model through transformer-lens, only as deep as the hook needs.

The model is the SAE's own (its sae-lens metadata names it), loaded the way sae-lens loads it
for training (no weight processing beyond what the SAE's metadata asks for), or a user's
`--model`: a transformer-lens name, a local Hugging Face folder such as a fine-tuned model, or a
GGUF file (converted once into a cached fp32 folder). A folder is configured from its own
config.json (for the Gemma families, whose configuration transformer-lens knows by model name
only, over the named model's architecture); a folder of an architecture transformer-lens knows
only by name and saecat cannot configure (multimodal Gemma 3) is loaded as the SAE's model by
name, with the folder's weights and tokenizer.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import tempfile
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any
from unittest import mock

import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig
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


# transformer-lens 3.9 converts a Hugging Face config by reading the attribute names of older
# transformers releases; today's configs spell them otherwise (a GPT-2 saved with library
# defaults has n_positions and no n_ctx). Each is filled from the first current name present.
_LEGACY_NAMES = {"n_ctx": ("n_positions", "max_position_embeddings")}

# transformer-lens picks a config branch by substrings of the name or path it is given ("llama",
# "gemma", ...) before it looks at config.json: a folder named my-llama-finetune would be
# configured as no model at all. The folder's config is therefore converted from a copy in a
# folder of a neutral name, never from the user's folder, and nothing is written there.
_SNIFFED_IN_PATHS = ("llama", "gemma", "wav2vec2")

# Architectures transformer-lens configures by official model name only. The named model's
# configuration supplies the architecture's fixed choices (norms placed before and after each
# sublayer, gated MLP, rotary embeddings); _FROM_CONFIG reads the folder's own sizes and
# settings over it.
_CONFIGURED_BY_NAME = {
    "GemmaForCausalLM": "google/gemma-2b",
    "Gemma2ForCausalLM": "google/gemma-2-2b",
    "Gemma3ForCausalLM": "google/gemma-3-270m",
}

# A causal mask of n_ctx² per attention layer is allocated up front: a folder claiming 128k
# positions (Llama 3.1, Gemma 3) would need 16 GB a layer. saecat cuts documents far shorter.
_MAX_CTX = 8192


def _rope(hf_config: Any, layer_type: str) -> dict[str, Any]:
    """RoPE parameters of one attention type: transformers 5 nests them per layer type when
    they differ (Gemma 3), else keeps one flat dict."""
    params = getattr(hf_config, "rope_parameters", None) or {}
    return params.get(layer_type, params) if isinstance(params, dict) else {}


def _linear_rope_factor(rope: dict[str, Any]) -> float:
    kind = rope.get("rope_type", "default")
    if kind not in ("default", "linear"):
        raise ValueError(f"transformer-lens has no {kind!r} RoPE scaling for this architecture")
    return float(rope.get("factor", 1.0)) if kind == "linear" else 1.0


_ATTN_TYPES = {"sliding_attention": "local", "full_attention": "global"}


def _no_cap(value: float | None) -> float:
    return -1.0 if value is None else float(value)  # transformer-lens' "no soft cap"


# transformer-lens config key <- the folder's Hugging Face config, for _CONFIGURED_BY_NAME.
# A getter returning None leaves the named model's value.
_FROM_CONFIG: dict[str, Any] = {
    "d_model": lambda c: c.hidden_size,
    "n_heads": lambda c: c.num_attention_heads,
    "d_head": lambda c: getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads,
    "rotary_dim": lambda c: getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads,
    "n_key_value_heads": lambda c: c.num_key_value_heads,
    "d_mlp": lambda c: c.intermediate_size,
    "n_layers": lambda c: c.num_hidden_layers,
    "n_ctx": lambda c: c.max_position_embeddings,
    "eps": lambda c: c.rms_norm_eps,
    "d_vocab": lambda c: c.vocab_size,
    "act_fn": lambda c: getattr(c, "hidden_activation", None) or getattr(c, "hidden_act", None),
    "attn_scale": lambda c: (float(c.query_pre_attn_scalar) ** 0.5
                             if getattr(c, "query_pre_attn_scalar", None) else None),
    "window_size": lambda c: getattr(c, "sliding_window", None),
    "attn_types": lambda c: ([_ATTN_TYPES[t] for t in c.layer_types]
                             if getattr(c, "layer_types", None) else None),
    "attn_scores_soft_cap": lambda c: _no_cap(getattr(c, "attn_logit_softcapping", None)),
    "output_logits_soft_cap": lambda c: _no_cap(getattr(c, "final_logit_softcapping", None)),
    "rotary_base": lambda c: _rope(c, "full_attention").get("rope_theta"),
    # only where the local layers have a rotary base of their own (Gemma 3)
    "rotary_base_local": lambda c: ((getattr(c, "rope_parameters", None) or {}).get("sliding_attention") or {}
                                    ).get("rope_theta"),
    "rotary_scaling_factor": lambda c: _linear_rope_factor(_rope(c, "full_attention")),
}


def _with_legacy_names(hf_config: Any) -> Any:
    for legacy, current in _LEGACY_NAMES.items():
        if not hasattr(hf_config, legacy):
            value = next((getattr(hf_config, name) for name in current if getattr(hf_config, name, None)), None)
            if value is not None:
                setattr(hf_config, legacy, value)
    return hf_config


def _neutral_folder() -> Path:
    for base in (Path(tempfile.gettempdir()), _cache_dir()):
        if not any(word in str(base).lower() for word in _SNIFFED_IN_PATHS):
            base.mkdir(parents=True, exist_ok=True)
            return Path(tempfile.mkdtemp(dir=base, prefix="saecat-config-"))
    raise SaecatError(f"set TMPDIR to a folder whose path contains none of {', '.join(_SNIFFED_IN_PATHS)}: "
                      "transformer-lens reads model families from path names")


def _converted_config(hf_config: Any, architecture: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    """The folder's config as transformer-lens' config dict, before saecat's own settings."""
    official = _CONFIGURED_BY_NAME.get(architecture)
    if official is not None:
        cfg_dict = dict(tl_loading.convert_hf_model_config(official))
        for key, read in _FROM_CONFIG.items():
            value = read(hf_config)
            if value is not None:
                cfg_dict[key] = value
        cfg_dict["use_local_attn"] = "local" in (cfg_dict.get("attn_types") or ())
        return cfg_dict
    neutral = _neutral_folder()
    try:
        _with_legacy_names(hf_config).save_pretrained(str(neutral))
        return tl_loading.convert_hf_model_config(str(neutral), **kwargs)
    finally:
        shutil.rmtree(neutral, ignore_errors=True)


def _local_config(folder: Path, layer: int | None, device: str, kwargs: dict[str, Any]) -> HookedTransformerConfig:
    """The folder's config.json as a HookedTransformerConfig for its first blocks, as
    get_pretrained_model_config would give for the model by name."""
    from transformers import AutoConfig

    settings = {key: kwargs.pop(key) for key in ("dtype", "default_prepend_bos", "n_ctx") if key in kwargs}
    hf_config = AutoConfig.from_pretrained(str(folder))
    architecture = (getattr(hf_config, "architectures", None) or [None])[0]
    model_type = getattr(hf_config, "model_type", None)
    if architecture is None:
        raise SaecatError(f"{folder}/config.json names no architecture (model_type {model_type!r})")
    try:
        cfg_dict = _converted_config(hf_config, architecture, kwargs)
    except (AttributeError, KeyError, TypeError, ValueError) as err:
        raise SaecatError(f"transformer-lens cannot configure {architecture} (model_type {model_type!r}) "
                          f"from {folder}/config.json: {one_line(err)}") from err
    dtype = settings.get("dtype", torch.float32)
    cfg_dict.update(
        model_name=folder.name, tokenizer_name=str(folder), init_weights=False, from_checkpoint=False,
        device=device, n_devices=1, dtype=getattr(torch, dtype) if isinstance(dtype, str) else dtype,
        n_layers=_first_n_layers(cfg_dict["n_layers"], layer),
        n_ctx=settings.get("n_ctx", min(cfg_dict["n_ctx"], _MAX_CTX)),
    )
    if "default_prepend_bos" in settings:
        cfg_dict["default_prepend_bos"] = settings["default_prepend_bos"]
    cfg_dict.setdefault("default_prepend_bos", True)
    return HookedTransformerConfig.from_dict(cfg_dict)


def _load_local(folder: Path, layer: int | None, device: str, kwargs: dict[str, Any]) -> HookedTransformer:
    """A local Hugging Face folder, configured from its own config.json: its weights are read
    by transformers and converted by transformer-lens' converter for the architecture."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    processing = {flag: bool(kwargs.pop(flag, False)) for flag in _PROCESSING_FLAGS}
    cfg = _local_config(folder, layer, device, kwargs)
    hf_model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    state_dict = tl_loading.get_pretrained_state_dict(str(folder), cfg, hf_model, dtype=cfg.dtype)
    del hf_model
    model = HookedTransformer(cfg, AutoTokenizer.from_pretrained(str(folder)), move_to_device=False)
    model.load_and_process_state_dict(state_dict, **processing)
    return model.to(device)


class _AutoConfigWithLegacyNames:
    """transformers' AutoConfig as transformer-lens reads a named model's config: with the legacy
    names it expects filled in (_LEGACY_NAMES), for a hub config.json saved by today's transformers."""

    @staticmethod
    def from_pretrained(*args: Any, **kwargs: Any) -> Any:
        from transformers import AutoConfig

        return _with_legacy_names(AutoConfig.from_pretrained(*args, **kwargs))


_TL_AUTOCONFIG = threading.Lock()


def _load_named(name: str, layer: int | None, device: str, kwargs: dict[str, Any], **weights: Any) -> HookedTransformer:
    # transformer-lens takes a name only, and reads the hub config itself: the names it expects
    # are filled in by swapping its module's AutoConfig for the call (one call at a time)
    with _TL_AUTOCONFIG, mock.patch.object(tl_loading, "AutoConfig", _AutoConfigWithLegacyNames):
        full = tl_loading.get_pretrained_model_config(name, device=device)
        return HookedTransformer.from_pretrained_no_processing(
            name, device=device, first_n_layers=_first_n_layers(full.n_layers, layer), **weights, **kwargs
        )


def _architecture_of(folder: Path) -> str:
    """'Gemma3ForConditionalGeneration (model_type gemma3)', as the folder's config.json says."""
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        config = {}
    architecture = (config.get("architectures") or ["an unnamed architecture"])[0]
    return f"{architecture} (model_type {config.get('model_type')!r})"


def _load_as(official: str | None, folder: Path, layer: int | None, device: str,
             kwargs: dict[str, Any]) -> HookedTransformer:
    """The SAE's model by its transformer-lens name, with weights and tokenizer from `folder`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if official is None:
        raise SaecatError(f"transformer-lens does not support {_architecture_of(folder)} in {folder}, "
                          "and the SAE names no model to configure it by")
    try:
        tl_loading.get_official_model_name(official)
    except ValueError:
        raise SaecatError(f"transformer-lens does not support {_architecture_of(folder)} in {folder}, "
                          f"nor the SAE's model {official!r} by name") from None
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


def model_for_sae(loaded: "LoadedSae", name: str | None = None, device: str = "cpu",
                  whole: bool = False) -> HookedTransformer:
    """The model to run an SAE's activations through: `name` if given, else the SAE's own; up to
    the hook's block, or `whole` (to its logits)."""
    name = name or loaded.model_name
    if not name:
        raise SaecatError(f"SAE {loaded.source.location} names no model in its config; pass --model")
    return load_model(name, loaded.hook_name, None if whole else loaded.layer, device, loaded.model_kwargs,
                      official=loaded.model_name)


@torch.inference_mode()
def hook_activations(model: HookedTransformer, tokens: torch.Tensor, hook_name: str, layer: int | None) -> torch.Tensor:
    """Activations at the hook for a [batch, pos] token tensor, running only the blocks needed."""
    stop = None if layer is None else layer + 1
    _, cache = model.run_with_cache(tokens, names_filter=hook_name, stop_at_layer=stop)
    return cache[hook_name]
