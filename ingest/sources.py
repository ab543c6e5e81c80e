"""Where an SAE comes from, and loading it through sae-lens.

Three sources, all read by sae-lens itself: a registry release and sae_id (the hub, or the hub
cache when offline), a hub repo id and a path inside it, or a local sae-lens folder. The
result is checked (finite weights, consistent shapes) before any work is done with it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from sae_lens import SAE
from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory

from catalog.errors import SaecatError, one_line

LOCAL_RELEASE = "local"


@dataclass(frozen=True)
class SaeSource:
    """What the user named: (release, sae_id) and how to fetch it."""

    release: str
    sae_id: str
    kind: str  # 'registry', 'hub' or 'local'
    path: Path | None = None  # the folder, for 'local'

    @property
    def location(self) -> str:
        return str(self.path) if self.kind == "local" else f"{self.kind}:{self.release}/{self.sae_id}"

    @classmethod
    def recorded(cls, release: str, sae_id: str, location: str | None) -> "SaeSource":
        """The source an ingestion recorded as `location` in `saes.source`."""
        kind = (location or "").split(":", 1)[0]
        if kind in ("registry", "hub"):
            return cls(release, sae_id, kind)
        if not location:
            raise SaecatError(f"SAE ({release}, {sae_id}) has no recorded source to load it from")
        return cls(release, sae_id, "local", Path(location))


@dataclass
class LoadedSae:
    """An SAE loaded by sae-lens plus the facts about it that the catalog records."""

    source: SaeSource
    sae: SAE
    model_name: str | None
    hook_name: str
    layer: int | None
    prepend_bos: bool
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    neuronpedia_id: str | None = None
    decoder_folded: bool = False
    release_info: dict[str, Any] | None = None

    @property
    def architecture(self) -> str:
        return self.sae.cfg.architecture()

    def digest(self) -> str:
        """A hash of the weights, so a checkpoint is never resumed with a changed SAE."""
        h = hashlib.sha256()
        for name, tensor in sorted(self.sae.state_dict().items()):
            h.update(name.encode())
            h.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy())  # no copy: GBs at 1M
        return h.hexdigest()[:24]


def resolve_source(release: str | None, sae_id: str | None, sae_path: str | None) -> SaeSource:
    """Turn the CLI's --release/--sae-id/--sae-path into a source, or say what is missing."""
    if sae_path is not None:
        folder = Path(sae_path).expanduser()
        if not folder.is_dir():
            raise SaecatError(f"SAE folder {folder} does not exist")
        return SaeSource(release or LOCAL_RELEASE, sae_id or folder.resolve().name, "local", folder)
    if not release or not sae_id:
        raise SaecatError("name an SAE: --release and --sae-id (registry or hub repo), or --sae-path")
    registry = get_pretrained_saes_directory()
    if release in registry:
        if sae_id not in registry[release].saes_map:
            ids = list(registry[release].saes_map)
            raise SaecatError(
                f"unknown sae_id {sae_id!r} in release {release!r}; it has {len(ids)}, e.g. {', '.join(ids[:5])}"
            )
        return SaeSource(release, sae_id, "registry")
    if "/" in release:
        return SaeSource(release, sae_id, "hub")
    raise SaecatError(f"unknown release {release!r}: not in the sae-lens registry and not a hub repo id (owner/name)")


def layer_of(hook_name: str) -> int | None:
    """The block a transformer-lens hook belongs to ('blocks.8.hook_resid_pre' -> 8)."""
    match = re.match(r"blocks\.(\d+)\.", hook_name)
    return int(match.group(1)) if match else None


def _hub_error(err: Exception, source: SaeSource) -> SaecatError:
    return SaecatError(
        f"cannot fetch {source.release}/{source.sae_id} from the Hugging Face hub and it is not in the "
        f"local cache (HF_HOME): {type(err).__name__}. Connect to the network, or pass --sae-path to a local folder"
    )


SAE_CFG = "cfg.json"
SAE_WEIGHTS = "sae_weights.safetensors"


def _read_cfg(folder: Path) -> dict[str, Any]:
    """A local folder's cfg.json, checked for what sae-lens needs before it reads it: a JSON
    object with positive integer d_in and d_sae, a known architecture and that architecture's
    required fields."""
    from sae_lens.loading.pretrained_sae_loaders import handle_config_defaulting
    from sae_lens.registry import SAE_CLASS_REGISTRY, get_sae_class

    path = folder / SAE_CFG
    if not path.is_file():
        raise SaecatError(f"{folder} is not a sae-lens folder: {SAE_CFG} is missing")
    try:
        cfg = json.loads(path.read_bytes())
    except UnicodeDecodeError as err:
        raise SaecatError(f"malformed {path}: not UTF-8 text ({err.reason} at byte {err.start})") from err
    except json.JSONDecodeError as err:
        raise SaecatError(f"malformed {path}: not JSON ({err.msg} at line {err.lineno} column {err.colno})") from err
    if not isinstance(cfg, dict):
        raise SaecatError(f"malformed {path}: a JSON object was expected, not a {type(cfg).__name__}")
    try:
        defaulted = handle_config_defaulting(dict(cfg))  # a pre-6.0 config gets the defaults sae-lens gives it
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise SaecatError(f"malformed {path}: {one_line(err)}") from err
    for key in ("d_in", "d_sae"):
        if key not in defaulted:
            raise SaecatError(f"malformed {path}: the key {key!r} is missing")
        value = defaulted[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise SaecatError(f"malformed {path}: {key} must be a positive integer, not {value!r}")
    architecture = defaulted.get("architecture")
    if architecture is None:
        raise SaecatError(f"malformed {path}: the key 'architecture' is missing")
    try:
        _, config_class = get_sae_class(architecture)
    except (KeyError, TypeError) as err:
        raise SaecatError(f"{path}: unknown SAE architecture {architecture!r}; "
                          f"{sae_lens_version()} knows {', '.join(sorted(SAE_CLASS_REGISTRY))}") from err
    required = [f.name for f in dataclasses.fields(config_class)
                if f.init and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    missing = [name for name in required if name not in defaulted]
    if missing:
        raise SaecatError(f"malformed {path}: a {architecture} SAE needs {', '.join(map(repr, missing))}")
    return cfg


def sae_lens_version() -> str:
    import sae_lens

    return f"sae-lens {sae_lens.__version__}"


def check_safetensors(path: Path, what: str) -> dict[str, tuple[str, tuple[int, ...]]]:
    """The (dtype, shape) of each tensor in a safetensors file, read from its header only; a file
    that is truncated, overwritten or not safetensors at all is one error naming it."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return {name: (f.get_slice(name).get_dtype(), tuple(f.get_slice(name).get_shape())) for name in f.keys()}
    except SafetensorError as err:
        raise SaecatError(f"{what} {path} is not a readable safetensors file (truncated or overwritten?): "
                          f"{one_line(err)}") from err


_FLOAT_DTYPES = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"}


def _check_weights_file(folder: Path) -> None:
    path = folder / SAE_WEIGHTS
    if not path.is_file():
        raise SaecatError(f"{folder} is not a sae-lens folder: {SAE_WEIGHTS} is missing")
    header = check_safetensors(path, "SAE weights")
    if not header:
        raise SaecatError(f"SAE weights {path} hold no tensors")
    for name, (dtype, _) in sorted(header.items()):
        if dtype not in _FLOAT_DTYPES:
            raise SaecatError(f"SAE weights {path}: {name} is stored as {dtype}; SAE weights are floating point")


def _load_local(folder: Path, device: str) -> tuple[SAE, dict[str, Any]]:
    """A local sae-lens folder, its files checked first so that damage is reported by name."""
    cfg = _read_cfg(folder)
    _check_weights_file(folder)
    try:
        # computed in float32 whatever the stored dtype, as from_pretrained does for the registry
        sae = SAE.load_from_disk(folder, device=device, dtype="float32")
    except RuntimeError as err:
        text = one_line(err)
        if not text.startswith("Error(s) in loading state_dict"):
            raise
        detail = text.split(":", 1)[1].strip().replace(" in state_dict", "")
        raise SaecatError(f"SAE weights {folder / SAE_WEIGHTS} do not fit {SAE_CFG} "
                          f"({cfg.get('architecture')}, d_in={cfg.get('d_in')}, d_sae={cfg.get('d_sae')}): "
                          f"{detail}") from err
    return sae, cfg


def _load(source: SaeSource, device: str) -> tuple[SAE, dict[str, Any]]:
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled
    from safetensors import SafetensorError

    try:
        if source.kind == "local":
            return _load_local(source.path, device)
        sae, cfg_dict, _ = SAE.from_pretrained_with_cfg_and_sparsity(source.release, source.sae_id, device=device)
        return sae, cfg_dict
    except SaecatError:
        raise
    except (LocalEntryNotFoundError, OfflineModeIsEnabled, HfHubHTTPError, ConnectionError) as err:
        raise _hub_error(err, source) from err
    except json.JSONDecodeError as err:
        raise SaecatError(f"malformed cfg.json for {source.location}: {err}") from err
    except SafetensorError as err:  # a damaged download in the hub cache
        raise SaecatError(f"cannot load SAE {source.location}: its weights file is not readable safetensors "
                          f"(truncated or overwritten?): {one_line(err)}") from err
    except (KeyError, TypeError, ValueError, RuntimeError, OSError) as err:
        raise SaecatError(f"cannot load SAE {source.location}: {one_line(err)}") from err


CHECK_ELEMENTS = 2**24  # weights checked for NaN and inf at once: 64 MiB of float32


def _check_weights(sae: SAE, source: SaeSource) -> None:
    d_in, d_sae = sae.cfg.d_in, sae.cfg.d_sae
    if tuple(sae.W_dec.shape) != (d_sae, d_in):
        raise SaecatError(
            f"SAE {source.location}: W_dec has shape {tuple(sae.W_dec.shape)}, cfg says ({d_sae}, {d_in})"
        )
    for name, tensor in sae.state_dict().items():
        # in parts: isfinite makes an abs() copy and masks of what it reads (4.4 GiB for a 1M-wide W_enc)
        parts = tensor.detach().reshape(-1).split(CHECK_ELEMENTS)
        if not all(bool(torch.isfinite(part).all()) for part in parts):
            bad = sum(int((~torch.isfinite(part)).sum()) for part in parts)
            raise SaecatError(f"SAE {source.location}: {name} has {bad} non-finite values (NaN or inf)")


def load_sae(source: SaeSource, device: str = "cpu", fold_decoder_norm: bool = False) -> LoadedSae:
    """Load and check an SAE; optionally fold decoder norms into the encoder (recorded)."""
    sae, cfg_dict = _load(source, device)
    _check_weights(sae, source)
    meta = sae.cfg.metadata
    hook_name = meta.hook_name
    if not hook_name:
        raise SaecatError(f"SAE {source.location}: its config names no hook (metadata.hook_name)")
    model_kwargs = dict(meta.model_from_pretrained_kwargs or {})
    model_kwargs.update(cfg_dict.get("model_from_pretrained_kwargs") or {})

    neuronpedia_id = None
    release_info = None
    if source.kind == "registry":
        entry = get_pretrained_saes_directory()[source.release]
        neuronpedia_id = entry.neuronpedia_id.get(source.sae_id)
        release_info = {"release": source.release, "repo_id": entry.repo_id, "model": entry.model,
                        "conversion_func": entry.conversion_func}
    if fold_decoder_norm:
        sae.fold_W_dec_norm()
    sae.eval()
    return LoadedSae(
        source=source,
        sae=sae,
        model_name=meta.model_name,
        hook_name=hook_name,
        layer=layer_of(hook_name),
        prepend_bos=bool(meta.prepend_bos if meta.prepend_bos is not None else True),
        model_kwargs=model_kwargs,
        neuronpedia_id=neuronpedia_id,
        decoder_folded=fold_decoder_norm,
        release_info=release_info,
    )
