"""Prompts and answers of automated interpretability: explaining a feature and scoring the explanation.

The methods are the published ones, written out here because their packages need a GPU server
(eai-delphi requires vLLM): the explainer sees a feature's top examples as text with the tokens it
fired on marked `<<so>>`, each followed by its (token, activation) pairs on a 0-10 scale of the
feature's largest activation (EleutherAI's delphi default explainer, in the token-activation-pair
tradition of Bills et al. 2023 and Neuronpedia's `oai_token-act-pair`); the answer's last line
starts "[EXPLANATION]:". The scorer is delphi's detection scorer: held-out activating texts and
texts where the feature never fired, shuffled, shown a few at a time without marks, and the
scorer model answers with one 0 or 1 per text; the score is the balanced accuracy of its answers.

Everything here is pure: no model, no catalog. `ingest.explain` runs it.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Sequence

EXPLAIN_METHOD = "token-act-pair/1"  # bump the version whenever the explainer's prompt changes
SCORE_METHOD = "detection/1"  # ... and this one with the scorer's
MARK_FRACTION = 0.3  # a token is marked where the activation exceeds this share of its example's peak
PAIRS_SHOWN = 11  # (token, activation) pairs listed after an example at most

Message = dict[str, str]


@dataclass(frozen=True)
class Example:
    """A window of text and the feature's activation at each of its tokens (0 where it did not fire)."""
    tokens: Sequence[str]
    values: Sequence[float]


def scale(value: float, peak: float) -> int:
    """An activation on the 0-10 scale of the feature's largest one; any firing shows as 1 or more."""
    return 0 if value <= 0 or peak <= 0 else min(10, math.ceil(10 * value / peak))


def on_one_line(text: str) -> str:
    """Text as one line of a prompt: its line breaks written \\n, so each example stays one line."""
    return text.replace("\r", "\\r").replace("\n", "\\n")


def _marked(example: Example) -> tuple[str, list[int]]:
    """The text on one line with runs of strongly firing tokens in << >>, and the positions marked."""
    top = max(example.values, default=0.0)
    marked = [i for i, v in enumerate(example.values) if v > 0 and v > MARK_FRACTION * top]
    inside, parts = set(marked), []
    for i, token in enumerate(example.tokens):
        if i in inside and i - 1 not in inside:
            parts.append("<<")
        parts.append(on_one_line(token))
        if i in inside and i + 1 not in inside:
            parts.append(">>")
    return "".join(parts), marked


def _example_lines(example: Example, peak: float) -> str:
    text, marked = _marked(example)
    pairs = ", ".join(f"({json.dumps(example.tokens[i])} : {scale(example.values[i], peak)})"
                      for i in marked[:PAIRS_SHOWN])
    return f"{text}\nActivations: {pairs}"


EXPLAIN_SYSTEM = """You study one feature of a language model's internals from text where it fires.
In each example below (one a line; \\n marks a line break within it) the tokens where the feature fires \
most are marked <<like this>> (neighbouring marked tokens share one pair of marks), and the line after \
it lists those tokens with how strongly the feature fired on each, from 1 to 10.
Say in a few words what the feature responds to: the common pattern of the marked tokens and, where \
it matters, of the text around them. Give one description, not a list; do not quote the examples or \
mention the marks.
End with a line that starts with [EXPLANATION]: followed by the description."""

# Three worked examples, on different kinds of pattern (as delphi's explainer has), so that a small
# model learns the form of an answer rather than copying one answer
_SHOTS = [
    ('the price went up by 5<< percent>> last year\nActivations: (" percent" : 10)\n'
     'grew <<30%>> since March\nActivations: ("30" : 4), ("%" : 9)', "percent after a number"),
    ('    for<< key>> in mapping:\\n        pass\nActivations: (" key" : 10)\n'
     'if not<< keys>>:\nActivations: (" keys" : 7)', "the word key as a name in code"),
    ('He said<<,>> then left<<.>>\nActivations: ("," : 6), ("." : 10)\n'
     'Yes<<.>> No<<.>>\nActivations: ("." : 9), ("." : 9)', "punctuation that ends a clause"),
]
EXPLAIN_PREFIX = "[EXPLANATION]:"  # how an answer starts: a model without a chat template is started on it


def explain_messages(examples: Sequence[Example], peak: float, logit_tokens: Sequence[str] = ()) -> list[Message]:
    """The explainer's conversation: the instructions, the worked examples, then the feature's examples."""
    body = "\n".join(_example_lines(e, peak) for e in examples)
    if logit_tokens:
        body += "\nTokens the feature makes more likely next: " + ", ".join(json.dumps(t) for t in logit_tokens)
    shots = [m for text, answer in _SHOTS for m in ({"role": "user", "content": "Examples:\n" + text},
                                                    {"role": "assistant", "content": f"{EXPLAIN_PREFIX} {answer}"})]
    return [{"role": "system", "content": EXPLAIN_SYSTEM}, *shots, {"role": "user", "content": "Examples:\n" + body}]


_TAG = re.compile(r"\[\s*EXPLANATION\s*\]\s*:?\s*(.*)", re.IGNORECASE)


def parse_explanation(answer: str | None) -> str | None:
    """The rest of the line after the first "[EXPLANATION]:" (a model that goes on past its answer
    invents more examples and answers after it), or a reply that is one short line and nothing else;
    None when the answer holds neither (empty, or a ramble without the tag)."""
    if not answer or not answer.strip():
        return None
    tagged = _TAG.search(answer)
    if tagged:
        text = tagged.group(1).strip().splitlines()[0] if tagged.group(1).strip() else ""
    else:
        lines = [line for line in answer.strip().splitlines() if line.strip()]
        text = lines[0] if len(lines) == 1 and len(lines[0].split()) <= 30 else ""
    # a small model copies the prompt's marks into its answer: they are not part of a description
    text = text.replace("<<", "").replace(">>", "").strip().strip("\"'`*").strip().rstrip(".").strip()
    return text or None


SCORE_SYSTEM = """You check a description of a language model feature against texts.
Given the description and some numbered texts (one a line; \\n marks a line break within a text), \
decide for each text whether the feature described would fire somewhere in it.
Answer with a list of 0s and 1s, one per text in order (1: it fires, 0: it does not), and nothing else, \
for example [1, 0, 0, 1, 0]."""

SCORE_PREFIX = "["
# Worked examples of different lengths and answers: the answer has one label per text
_SCORE_SHOTS = [
    ("percent after a number", ["a rise of 2 per cent in wages", "the cat sat on the mat", "grew 30% since March",
                                "turn left at the lights"], [1, 0, 1, 0]),
    ("the word key as a name in code", ["dear sir or madam", "    for key in d:", "open the door",
                                        "thanks, see you", "if not keys:"], [0, 1, 0, 0, 1]),
    ("punctuation that ends a clause", ["Yes. No.", "he said, and left", "x = f(1)"], [1, 1, 0]),
]


def _score_question(explanation: str, texts: Sequence[str]) -> str:
    listing = "\n".join(f"{i}. {on_one_line(t)}" for i, t in enumerate(texts, 1))
    return f"Description: {explanation}\nTexts:\n{listing}"


def score_messages(explanation: str, texts: Sequence[str]) -> list[Message]:
    shots = [m for shot, shot_texts, labels in _SCORE_SHOTS
             for m in ({"role": "user", "content": _score_question(shot, shot_texts)},
                       {"role": "assistant", "content": json.dumps(labels)})]
    return [{"role": "system", "content": SCORE_SYSTEM}, *shots,
            {"role": "user", "content": _score_question(explanation, texts)}]


_LIST = re.compile(r"\[[^\[\]]*\]")


def parse_labels(answer: str | None, n: int) -> list[int] | None:
    """The first bracketed list of exactly n zeros and ones in the answer; None otherwise."""
    for candidate in _LIST.findall(answer or ""):
        try:
            labels = json.loads(candidate)
        except ValueError:
            continue
        if isinstance(labels, list) and len(labels) == n and all(v in (0, 1) and not isinstance(v, bool)
                                                                   for v in labels):
            return [int(v) for v in labels]
    return None


@dataclass(frozen=True)
class Detection:
    """The scorer's answers counted against the truth; failed: prompts whose answer did not parse."""
    tp: int = 0
    fp: int = 0
    tn: int = 0
    fn: int = 0
    failed: int = 0
    prompts: int = 0

    def add(self, truth: Sequence[int], labels: Sequence[int] | None) -> "Detection":
        if labels is None:
            return Detection(self.tp, self.fp, self.tn, self.fn, self.failed + 1, self.prompts + 1)
        pairs = list(zip(truth, labels))
        return Detection(self.tp + pairs.count((1, 1)), self.fp + pairs.count((0, 1)),
                         self.tn + pairs.count((0, 0)), self.fn + pairs.count((1, 0)), self.failed, self.prompts + 1)

    @property
    def balanced_accuracy(self) -> float | None:
        """(recall on activating texts + recall on the others) / 2: 0.5 is chance, whatever the mix;
        None when either kind got no parsed answer."""
        positives, negatives = self.tp + self.fn, self.tn + self.fp
        if not positives or not negatives:
            return None
        return (self.tp / positives + self.tn / negatives) / 2
