"""Scores of predictions against references: ROUGE-1/2/L, BLEU and exact match, all in 0..100.

ROUGE is Google's `rouge-score` with the Porter stemmer (F-measure, averaged over rows); BLEU is
sacrebleu's corpus BLEU with its default 13a tokenizer; exact match compares the texts after
trimming and collapsing whitespace.
"""
from __future__ import annotations

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")
METRICS = (*ROUGE_TYPES, "bleu", "exact_match")


def normalise(text: str) -> str:
    return " ".join(text.split())


def score(predictions: list[str], references: list[str]) -> dict[str, float]:
    """{rouge1, rouge2, rougeL, bleu, exact_match} (0..100) and n, the number of rows."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    if not predictions:
        raise ValueError("nothing to score")
    import sacrebleu
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)
    sums = dict.fromkeys(ROUGE_TYPES, 0.0)
    for pred, ref in zip(predictions, references):
        result = scorer.score(ref, pred)
        for key in ROUGE_TYPES:
            sums[key] += result[key].fmeasure
    n = len(predictions)
    out = {key: 100.0 * sums[key] / n for key in ROUGE_TYPES}
    out["bleu"] = sacrebleu.corpus_bleu(predictions, [references]).score
    out["exact_match"] = 100.0 * sum(normalise(p) == normalise(r) for p, r in zip(predictions, references)) / n
    out["n"] = n
    return out
