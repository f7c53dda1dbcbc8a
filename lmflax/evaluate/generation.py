"""Metrics of generated text against references: BLEU (sacrebleu) and ROUGE-1/2/L/Lsum
(rouge-score).

Both score detokenized text, the way results are published: BLEU with sacrebleu's standard 13a
tokenization on the raw strings (no tokenized or lower-cased shortcuts), ROUGE as the mean
F-measure over examples with Porter stemming (Lin 2004; the CNN/DailyMail convention). ROUGE-L
is the longest common subsequence of the whole texts, ROUGE-Lsum the summary-level one over
their sentences, which are the texts' lines (as rouge-score and Hugging Face's `evaluate`
take them: CNN/DailyMail's highlights are one sentence per line). Scores are percentages
(0-100).
"""

from __future__ import annotations

from collections.abc import Sequence

METRICS = ("bleu", "rouge")


def _check(predictions: Sequence[str], references: Sequence[str]) -> None:
    if len(predictions) != len(references):
        raise ValueError(
            f"{len(predictions)} predictions but {len(references)} references; they must pair up"
        )
    if not predictions:
        raise ValueError("no predictions to score")


def bleu(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Corpus BLEU (0-100) of detokenized predictions against one reference each."""
    import sacrebleu  # deferred: slow to import, and only seq2seq evaluation needs it

    _check(predictions, references)
    return float(sacrebleu.corpus_bleu(list(predictions), [list(references)]).score)


def rouge(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Mean ROUGE-1, ROUGE-2, ROUGE-L and ROUGE-Lsum F-measures (0-100) over the examples
    (Lsum: sentences are lines)."""
    from rouge_score import rouge_scorer  # deferred: pulls in nltk, only summaries need it

    _check(predictions, references)
    names = ("rouge1", "rouge2", "rougeL", "rougeLsum")
    scorer = rouge_scorer.RougeScorer(list(names), use_stemmer=True)
    totals = dict.fromkeys(names, 0.0)
    for pred, ref in zip(predictions, references, strict=True):
        scores = scorer.score(ref, pred)  # (target, prediction)
        for n in names:
            totals[n] += scores[n].fmeasure
    return {n: 100.0 * totals[n] / len(predictions) for n in names}


def generation_metrics(
    names: Sequence[str], predictions: Sequence[str], references: Sequence[str]
) -> dict[str, float]:
    """The named metrics ('bleu', 'rouge') as one flat dict: bleu, rouge1, rouge2, rougeL,
    rougeLsum."""
    out: dict[str, float] = {}
    for name in names:
        if name == "bleu":
            out["bleu"] = bleu(predictions, references)
        elif name == "rouge":
            out.update(rouge(predictions, references))
        else:
            raise ValueError(f"unknown generation metric {name!r}; accepted: {METRICS}")
    return out
