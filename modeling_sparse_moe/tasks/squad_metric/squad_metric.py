"""SQuAD v1.1 / v2.0 exact match and F1, as the official evaluation scripts compute them, as an `evaluate` module.

Load it with `evaluate.load("<path to this folder>")` (no Hub needed). Predictions: [{"id", "prediction_text",
"no_answer_probability" (optional)}]; references: [{"id", "answers": {"text": [...], "answer_start": [...]}}]. An
empty `text` list marks an unanswerable question (v2): the prediction must then be "" to score.
"""

import collections
import re
import string

import datasets
import evaluate

_CITATION = """Rajpurkar et al., SQuAD: 100,000+ Questions for Machine Comprehension of Text (2016); Know What You
Don't Know: Unanswerable Questions for SQuAD (2018)."""
_DESCRIPTION = "Exact match and token F1 after SQuAD's answer normalisation, with SQuAD 2.0's no-answer rule."
_KWARGS_DESCRIPTION = "predictions: list of {id, prediction_text}; references: list of {id, answers}."


def normalize_answer(text: str) -> str:
    """Lower case, remove punctuation, articles (a, an, the) and extra whitespace (the official rule)."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def exact_match(prediction: str, gold: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(gold))


def f1(prediction: str, gold: str) -> float:
    pred_tokens, gold_tokens = normalize_answer(prediction).split(), normalize_answer(gold).split()
    if not pred_tokens or not gold_tokens:  # v2: no-answer is right only against no-answer
        return float(pred_tokens == gold_tokens)
    common = collections.Counter(pred_tokens) & collections.Counter(gold_tokens)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred_tokens), same / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class SquadMetric(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "predictions": {
                        "id": datasets.Value("string"),
                        "prediction_text": datasets.Value("string"),
                        "no_answer_probability": datasets.Value("float32"),
                    },
                    "references": {
                        "id": datasets.Value("string"),
                        "answers": datasets.features.Sequence(
                            {"text": datasets.Value("string"), "answer_start": datasets.Value("int32")}
                        ),
                    },
                }
            ),
        )

    def _compute(self, predictions, references):
        golds = {}
        for ref in references:
            texts = [t for t in ref["answers"]["text"] if normalize_answer(t)]
            golds[ref["id"]] = texts or [""]
        em, f1s, has_ans = {}, {}, {}
        for pred in predictions:
            qid = pred["id"]
            if qid not in golds:
                raise ValueError(f"prediction for unknown id {qid!r}")
            text = pred["prediction_text"]
            em[qid] = max(exact_match(text, g) for g in golds[qid])
            f1s[qid] = max(f1(text, g) for g in golds[qid])
            has_ans[qid] = golds[qid] != [""]
        n = len(em)
        out = {"exact_match": 100.0 * sum(em.values()) / max(n, 1), "f1": 100.0 * sum(f1s.values()) / max(n, 1), "total": n}
        if not all(has_ans.values()):  # v2 breakdown
            for name, want in (("HasAns", True), ("NoAns", False)):
                ids = [q for q in em if has_ans[q] == want]
                out[f"{name}_total"] = len(ids)
                if ids:
                    out[f"{name}_exact"] = 100.0 * sum(em[q] for q in ids) / len(ids)
                    out[f"{name}_f1"] = 100.0 * sum(f1s[q] for q in ids) / len(ids)
        return out
