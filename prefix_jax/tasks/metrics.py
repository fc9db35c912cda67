"""Text generation metrics from well-kept libraries: sacrebleu BLEU, rouge-score ROUGE-L (the
quick train-time pair), and the E2E challenge set: NIST (nltk), METEOR 1.5, ROUGE-L and CIDEr
(pycocoevalcap). Where each comes from and how it compares with the official scripts: README."""

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


def normalize_answer(text: str) -> str:
    """What exact match compares: case-folded, whitespace collapsed, ends stripped. (No
    punctuation or article removal as in SQuAD's script: that is English-specific.)"""
    return " ".join(text.casefold().split())


def exact_match(predictions: list[str], references: list[list[str]]) -> float:
    """Percent of examples whose prediction equals one of its references (normalize_answer)."""
    hits = [normalize_answer(pred) in {normalize_answer(r) for r in refs}
            for pred, refs in zip(predictions, references)]
    return 100.0 * sum(hits) / max(len(hits), 1)


# the metrics a generation evaluator can be asked for by name (tasks/evals.GENERATION_METRICS)
BY_NAME = {"bleu": corpus_bleu, "rouge_l": rouge_l, "exact_match": exact_match}


def scores(names: tuple[str, ...], predictions: list[str], references: list[list[str]]
           ) -> dict[str, float]:
    """The named metrics (keys of BY_NAME) of the predictions, in the order named."""
    return {name: BY_NAME[name](predictions, references) for name in names}


def nist(predictions: list[str], references: list[list[str]], n: int = 5) -> float:
    """Corpus NIST (nltk) over sacrebleu's 13a tokens (the mteval-v13a tokenization), n-grams
    up to 5 as mteval's default; E2E reports it unscaled (e.g. 8.8)."""
    from nltk.translate.nist_score import corpus_nist
    from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a

    tokenize = Tokenizer13a()
    hyps = [tokenize(p).split() for p in predictions]
    if not any(hyps):
        return 0.0
    refs = [[tokenize(r).split() for r in rs] for rs in references]
    # nltk divides by the number of hypothesis n-grams of each order; orders no hypothesis
    # reaches (only with very short outputs) add nothing to NIST's sum, so leave them out.
    return float(corpus_nist(refs, hyps, n=min(n, max(len(h) for h in hyps))))


def coco_caption_scores(predictions: list[str], references: list[list[str]]) -> dict[str, float]:
    """METEOR 1.5, ROUGE-L and CIDEr from pycocoevalcap (the MS-COCO caption evaluation code the
    E2E challenge's scripts use), after its PTB tokenizer. METEOR runs Java (the jar and its
    paraphrase table ship inside the package); METEOR and ROUGE-L are x100, CIDEr unscaled."""
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    tokenizer = PTBTokenizer()
    refs = tokenizer.tokenize({i: [{"caption": r} for r in rs] for i, rs in enumerate(references)})
    hyps = tokenizer.tokenize({i: [{"caption": p}] for i, p in enumerate(predictions)})
    try:
        meteor = Meteor()  # a Java process; the wrapper ends it when garbage-collected
    except FileNotFoundError as e:
        from prefix_jax.errors import UserError

        raise UserError("METEOR needs Java on the PATH (pycocoevalcap runs meteor-1.5.jar); "
                        "install a JRE, e.g. apt-get install default-jre-headless") from e
    meteor_score = meteor.compute_score(refs, hyps)[0]
    return {"meteor": 100.0 * float(meteor_score),
            "rouge_l": 100.0 * float(Rouge().compute_score(refs, hyps)[0]),
            "cider": float(Cider().compute_score(refs, hyps)[0])}


def e2e_scores(predictions: list[str], references: list[list[str]]) -> dict[str, float]:
    """The five E2E challenge metrics, on the scales of Li & Liang's tables."""
    return {"bleu": corpus_bleu(predictions, references),
            "nist": nist(predictions, references),
            **coco_caption_scores(predictions, references)}
