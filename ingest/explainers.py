"""The models that write and score explanations: an OpenAI-compatible chat endpoint, or a local model.

An endpoint is any server speaking OpenAI's chat completions (vLLM, a llama.cpp server, ollama,
`transformers serve`, a hosted API): `openai`'s client sends the requests, retries rate limits
(429), server errors and timeouts with exponential backoff (honouring Retry-After), and the key
comes from the environment ($SAECAT_EXPLAINER_KEY, else $OPENAI_API_KEY), never from a flag. A
local model is a transformers causal LM run in this process: a hub name, a folder, or a GGUF file
(dequantized once, as ingestion does).
"""

from __future__ import annotations

import asyncio
import os
import threading
from pathlib import Path
from typing import Protocol

from catalog.errors import SaecatError
from ingest.autointerp import Message

KEY_VARIABLES = ("SAECAT_EXPLAINER_KEY", "OPENAI_API_KEY")


class Explainer(Protocol):
    name: str  # the model, as stored with each explanation and score

    async def complete(self, messages: list[Message], max_tokens: int, prefix: str = "") -> str | None:
        """The model's reply to the conversation (greedy), or None when it gave none. `prefix`: how
        the reply is to start, given to a model that continues text (a local model without a chat
        template) as the reply's beginning; a chat model is asked by the conversation alone."""

    async def close(self) -> None:
        """Let go of connections."""


class FatalEndpointError(SaecatError):
    """An endpoint error no retry will mend (unreachable, refused key, unknown model): the run stops."""


def open_explainer(spec: str, model: str | None = None, *, timeout: float = 120.0, retries: int = 5,
                   device: str = "cpu") -> Explainer:
    """`spec` an http(s) base URL (with `model`, the name the endpoint serves) or a local model."""
    if spec.startswith(("http://", "https://")):
        if not model:
            raise SaecatError(f"name the model {spec} serves with --explainer-model (its /v1/models lists them)")
        return ChatEndpoint(spec, model, timeout=timeout, retries=retries)
    if model:
        raise SaecatError("--explainer-model names a model of an http endpoint; a local model is named by --explainer")
    return LocalModel(spec, device)


class ChatEndpoint:
    """An OpenAI-compatible chat completions endpoint."""

    def __init__(self, base_url: str, model: str, *, timeout: float, retries: int):
        try:
            import openai
        except ImportError as err:
            raise SaecatError("an explainer endpoint needs openai's client: pip install 'saecat[explain]'") from err

        key = next((os.environ[v] for v in KEY_VARIABLES if os.environ.get(v)), "no-key")
        self.name, self.base_url = model, base_url
        self.client = openai.AsyncOpenAI(base_url=base_url, api_key=key, timeout=timeout, max_retries=retries)

    async def complete(self, messages: list[Message], max_tokens: int, prefix: str = "") -> str | None:
        import openai

        try:
            reply = await self.client.chat.completions.create(model=self.name, messages=messages,  # type: ignore[arg-type]
                                                              max_tokens=max_tokens, temperature=0.0)
        except openai.APITimeoutError:  # after the retries: this request fails, the run goes on
            raise
        except openai.APIConnectionError as err:  # after the retries: nothing listens there
            raise FatalEndpointError(f"cannot reach the explainer at {self.base_url} ({err.__cause__ or err})") from err
        except (openai.AuthenticationError, openai.PermissionDeniedError) as err:
            raise FatalEndpointError(f"{self.base_url} refused the key (set $SAECAT_EXPLAINER_KEY): {err}") from err
        except openai.NotFoundError as err:
            raise FatalEndpointError(f"{self.base_url} does not serve {self.name!r}: {err}") from err
        if not reply.choices:
            return None
        return reply.choices[0].message.content

    async def close(self) -> None:
        await self.client.close()


class LocalModel:
    """A transformers causal LM in this process, one generation at a time (greedy)."""

    def __init__(self, spec: str, device: str = "cpu"):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from ingest.model import gguf_folder

        path = Path(spec)
        folder = gguf_folder(path) if path.suffix == ".gguf" and path.is_file() else spec
        self.name = path.stem if path.suffix == ".gguf" else spec
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(str(folder))
            self.model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).to(device).eval()
        except OSError as err:
            raise SaecatError(f"cannot load the explainer model {spec!r}: {err}") from err
        self.device = device
        self._lock = threading.Lock()

    def prompt(self, messages: list[Message], prefix: str = "") -> str:
        """The model's chat template where it has one; else, for a base model, the conversation as
        plain text, each answer on the line after its question, the last one begun with `prefix`."""
        if self.tokenizer.chat_template:
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) + prefix
        text = "".join(m["content"] + ("\n" if m["role"] == "user" else "\n\n") for m in messages)
        return text + prefix

    def _generate(self, text: str, max_tokens: int) -> str:
        import torch

        plain = not self.tokenizer.chat_template  # a base model: its answer is one line
        inputs = self.tokenizer(text, return_tensors="pt", add_special_tokens=plain)
        with self._lock, torch.inference_mode():
            out = self.model.generate(**inputs.to(self.device), max_new_tokens=max_tokens, do_sample=False,
                                      stop_strings=["\n"] if plain else None, tokenizer=self.tokenizer,
                                      pad_token_id=self.tokenizer.pad_token_id or self.tokenizer.eos_token_id)
        reply = self.tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        return reply.split("\n")[0] if plain else reply

    async def complete(self, messages: list[Message], max_tokens: int, prefix: str = "") -> str | None:
        reply = await asyncio.to_thread(self._generate, self.prompt(messages, prefix), max_tokens)
        return prefix + reply

    async def close(self) -> None:
        return None
