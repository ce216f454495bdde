"""Task metrics through maintained implementations: sacrebleu for BLEU/chrF, and the official SQuAD v1.1/v2.0
exact-match and F1 through a local `evaluate` module (`squad_metric/`), loaded with `evaluate.load(<path>)` because
`evaluate.load("squad")` needs the Hub."""

from __future__ import annotations

import os
from functools import lru_cache

SQUAD_METRIC_PATH = os.path.join(os.path.dirname(__file__), "squad_metric")


def bleu_chrf(hypotheses: list[str], references: list[str]) -> dict[str, float]:
    """Corpus BLEU (sacrebleu defaults: 13a tokenisation, exp smoothing) and chrF, both 0-100."""
    import sacrebleu

    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses for {len(references)} references")
    return {
        "bleu": sacrebleu.corpus_bleu(hypotheses, [references]).score,
        "chrf": sacrebleu.corpus_chrf(hypotheses, [references]).score,
    }


@lru_cache(maxsize=1)
def squad_metric():
    import evaluate

    return evaluate.load(SQUAD_METRIC_PATH)


def squad_scores(predictions: dict[str, str], references: list[dict], no_answer_probability: dict | None = None) -> dict:
    """Exact match and F1 (0-100) of `predictions` ({id: text}, "" for no answer) against SQuAD records with `id`
    and `answers`. With any unanswerable reference the v2 rules apply: an empty prediction matches an empty gold,
    and HasAns/NoAns breakdowns are added."""
    preds = [
        {"id": r["id"], "prediction_text": predictions.get(r["id"], ""),
         "no_answer_probability": (no_answer_probability or {}).get(r["id"], 0.0)}
        for r in references
    ]
    refs = [{"id": r["id"], "answers": {"text": list(r["answers"]["text"]), "answer_start": list(r["answers"]["answer_start"])}} for r in references]
    return squad_metric().compute(predictions=preds, references=refs)
