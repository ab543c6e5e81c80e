"""The explainer's and scorer's prompts and the parsing of their answers (ingest.autointerp), on
their own: the 0-10 scale and the marks against hand-worked cases, the balanced accuracy against
scikit-learn's, and answers as models give them, well and badly formed."""

from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn.metrics import balanced_accuracy_score

from ingest.autointerp import (Detection, Example, explain_messages, parse_explanation, parse_labels, scale,
                               score_messages)
from ingest.explain import Task


def test_scale_is_ceil_of_tenths_of_the_peak():
    assert [scale(v, 8.0) for v in (0.0, -1.0, 0.01, 0.8, 0.81, 4.0, 8.0, 9.0)] == [0, 0, 1, 1, 2, 5, 10, 10]
    assert scale(3.0, 0.0) == 0


def test_examples_are_marked_in_runs_with_their_pairs():
    example = Example(["a", " b", " c", " d", " e"], [0.0, 5.0, 4.0, 1.0, 10.0])  # 1.0 is not above 0.3 x 10
    user = explain_messages([example], peak=10.0)[-1]["content"]
    assert user == 'Examples:\na<< b c>> d<< e>>\nActivations: (" b" : 5), (" c" : 4), (" e" : 10)'


def test_pairs_are_capped_and_tokens_quoted():
    tokens = [f'"{i}<' for i in range(20)]
    user = explain_messages([Example(tokens, [1.0] * 20)], peak=1.0, logit_tokens=["x", "\n"])[-1]["content"]
    pairs = user.split("Activations: ")[1].splitlines()[0]
    assert pairs.count("(") == 11 and pairs.startswith('("\\"0<" : 10)')
    assert user.endswith('Tokens the feature makes more likely next: "x", "\\n"')


def test_prompts_are_system_shot_and_question():
    roles = [m["role"] for m in explain_messages([Example(["x"], [1.0])], 1.0)]
    assert roles == ["system", *["user", "assistant"] * 3, "user"]
    scored = score_messages("digits", ["a 1", "b"])
    assert [m["role"] for m in scored] == roles
    assert scored[-1]["content"] == "Description: digits\nTexts:\n1. a 1\n2. b"


@pytest.mark.parametrize("answer, expected", [
    ("Looking at these...\n[EXPLANATION]: closing brackets in code", "closing brackets in code"),
    ("[EXPLANATION]: the word 'import'.\n\nExamples:\nmore\n[EXPLANATION]: made up", "the word 'import'"),
    ("[explanation] : Numbers after a decimal point.\n", "Numbers after a decimal point"),
    ('"commas between arguments"', "commas between arguments"),
    ("  **Python keywords**  ", "Python keywords"),
    ("[EXPLANATION]: the module is parsed from a<< doc>>string", "the module is parsed from a docstring"),
    ("", None),
    ("   \n ", None),
    (None, None),
    ("[EXPLANATION]:", None),
    ("It could be this.\nOr maybe that.\nHard to say.", None),
    (" ".join(["word"] * 40), None),
])
def test_parse_explanation(answer, expected):
    assert parse_explanation(answer) == expected


@pytest.mark.parametrize("answer, n, expected", [
    ("[1, 0, 1]", 3, [1, 0, 1]),
    ("The answer is [0,0,1,1,0] I think", 5, [0, 0, 1, 1, 0]),
    ("[1, 0]\n[1, 0, 1]", 3, [1, 0, 1]),  # the first list of the right length
    ("[1, 0, 2]", 3, None),
    ("[true, false, true]", 3, None),
    ("[1, 0, 1", 3, None),
    ("yes, no, yes", 3, None),
    ("", 3, None),
    (None, 2, None),
    ("[[1, 0]]", 2, [1, 0]),
])
def test_parse_labels(answer, n, expected):
    assert parse_labels(answer, n) == expected


def test_balanced_accuracy_equals_scikit_learns_and_ignores_failed_prompts():
    rng = np.random.default_rng(0)
    detection, truths, labels = Detection(), [], []
    for _ in range(40):
        truth = rng.integers(0, 2, 5).tolist()
        answer = rng.integers(0, 2, 5).tolist() if rng.random() > 0.2 else None
        detection = detection.add(truth, answer)
        if answer is not None:
            truths += truth
            labels += answer
    assert detection.prompts == 40 and 0 < detection.failed < 40
    assert detection.tp + detection.fp + detection.tn + detection.fn == len(truths)
    assert detection.balanced_accuracy == pytest.approx(balanced_accuracy_score(truths, labels))
    assert Detection().add([1, 1], [1, 0]).balanced_accuracy is None  # no text without the feature


def test_score_batches_hold_every_text_once_in_a_fixed_order():
    pos = [Example([f"p{i}", "!"], [1.0, 0.0]) for i in range(7)]
    neg = [Example([f"n{i}", "?"], [0.0, 0.0]) for i in range(7)]
    task = Task(feature=3, ingested_at=None, peak=1.0, shown=[], shown_ranks=[], held_out=pos, negatives=neg,
                logit_tokens=[])
    batches = task.score_batches(5)
    assert [len(texts) for texts, _ in batches] == [5, 5, 4]
    pairs = [(t, y) for texts, truth in batches for t, y in zip(texts, truth)]
    assert sorted(pairs) == sorted([(f"p{i}!", 1) for i in range(7)] + [(f"n{i}?", 0) for i in range(7)])
    assert pairs != [(f"p{i}!", 1) for i in range(7)] + [(f"n{i}?", 0) for i in range(7)]  # shuffled
    assert task.score_batches(5) == batches
    assert json.dumps(batches)  # plain data, as the scorer's prompts need
