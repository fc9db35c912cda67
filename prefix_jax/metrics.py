"""Text generation metrics from well-kept libraries: sacrebleu BLEU, rouge-score ROUGE-L."""

from __future__ import annotations

import sacrebleu
from rouge_score import rouge_scorer


def corpus_bleu(predictions: list[str], references: list[list[str]]) -> float:
    """sacrebleu corpus BLEU (13a tokenization) against all references of each example."""
    n_refs = max(len(r) for r in references)
    # sacrebleu takes reference streams of equal length; None marks a missing reference.
    streams = [[r[k] if k < len(r) else None for r in references] for k in range(n_refs)]
    return float(sacrebleu.corpus_bleu(predictions, streams).score)


def rouge_l(predictions: list[str], references: list[list[str]]) -> float:
    """Mean over examples of the best ROUGE-L F1 against that example's references (x100)."""
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    scores = [scorer.score_multi(refs, pred)["rougeL"].fmeasure
              for pred, refs in zip(predictions, references)]
    return 100.0 * sum(scores) / max(len(scores), 1)
