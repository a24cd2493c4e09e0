"""Quality metrics of the benchmark: ROUGE two ways, and agreement with the full model's output.

- `rouge_f`: ROUGE-1/2/L F1 by Google's `rouge-score`, stemming on (the usual reference
  implementation; ROUGE-L is the sentence-level LCS).
- `authors_rouge_f`: ROUGE as ConsistentEE's evaluation script computed it (its
  released code): the PyPI `rouge` package (pinned 1.0.1), `Rouge().get_scores(hyp, ref)`, F of
  rouge-1, rouge-2 and rouge-l, no stemming, the package's own tokenization. It raises on an empty
  hypothesis; that scores 0 here.
- `token_agreement`: the share of the full model's output positions where this run emitted the same
  token (over the full model's length).
Scores are averaged per example and reported x100.
"""

from __future__ import annotations

from functools import cache

KINDS = ("rouge1", "rouge2", "rougeL")


@cache
def _scorer():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(list(KINDS), use_stemmer=True)


def rouge_f(hyp: str, ref: str) -> dict[str, float]:
    """rouge-score F1 of rouge1, rouge2, rougeL (stemming on), each in [0, 1]."""
    s = _scorer().score(ref, hyp)
    return {k: s[k].fmeasure for k in KINDS}


def authors_rouge_f(hyp: str, ref: str) -> dict[str, float]:
    """The `rouge` package's F of rouge-1/2/l, as ConsistentEE's evaluate script; empty output: 0."""
    from rouge import Rouge

    try:
        s = Rouge().get_scores(hyp, ref)[0]
    except ValueError:  # "Hypothesis is empty." (also for text that is only dots / whitespace)
        return dict.fromkeys(KINDS, 0.0)
    return {"rouge1": s["rouge-1"]["f"], "rouge2": s["rouge-2"]["f"], "rougeL": s["rouge-l"]["f"]}


def token_agreement(ids: list[int], full_ids: list[int]) -> float:
    """Share of full_ids' positions where ids has the same token."""
    return sum(a == b for a, b in zip(ids, full_ids)) / max(len(full_ids), 1)


def mean_x100(scores: list[dict[str, float]]) -> dict[str, float]:
    """Per-example scores -> their means x100, rounded to 2 decimals."""
    n = max(len(scores), 1)
    return {k: round(100 * sum(s[k] for s in scores) / n, 2) for k in KINDS}
