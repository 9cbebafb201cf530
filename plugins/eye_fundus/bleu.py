"""BLEU for the diagnosis-text task (T3), on whitespace tokens, through nltk.

Two numbers exist and papers mix them up, so both are named:

* :func:`corpus_bleu`: Papineni et al.'s BLEU-4. N-gram matches and lengths are summed over
  the whole split before the precisions and the brevity penalty are formed. No smoothing:
  a split without a single matching 4-gram scores exactly 0. This is the standard number
  (it equals sacrebleu's ``corpus_bleu`` with ``tokenize="none"``, ``smooth_method="none"``;
  see the function for why it is not nltk's ``corpus_bleu`` verbatim).
* :func:`sentence_bleu_average`: the mean over captions of sentence-level BLEU-4, smoothed
  with nltk's ``SmoothingFunction().method1`` (an epsilon of 0.1 replaces a zero n-gram
  count), because most short captions have no 4-gram match and would otherwise score 0.
  The paper reports a per-sentence average of this kind.

nltk's BLEU is pure counting: it needs no downloaded nltk data.
"""

from __future__ import annotations

import math
from typing import Hashable, Iterable, Sequence, TypeVar

from nltk.translate import bleu_score

T = TypeVar("T", bound=Hashable)

#: the special tokens as strings (the caption task works on ids and passes its own)
PAD_TOKEN, SOS_TOKEN, EOS_TOKEN, UNK_TOKEN = "<pad>", "<sos>", "<eos>", "<unk>"

_ORDER = 4
_WEIGHTS = (0.25, 0.25, 0.25, 0.25)


def strip_special(tokens: Iterable[T], *, eos: T = EOS_TOKEN, skip: Iterable[T] = (PAD_TOKEN, SOS_TOKEN)) -> list[T]:
    """The scored words of a decoded sequence: everything before the first ``eos``, minus ``skip``.

    Works on strings or on token ids (pass the ids as ``eos`` and ``skip``). Nothing after
    EOS is ever scored, even if a decoder wrote something there.
    """
    skipped = set(skip)
    words: list[T] = []
    for token in tokens:
        if token == eos:
            break
        if token not in skipped:
            words.append(token)
    return words


def _check(references: Sequence[Sequence[str]], hypotheses: Sequence[Sequence[str]]) -> None:
    if len(references) != len(hypotheses):
        raise ValueError(f"{len(references)} references for {len(hypotheses)} hypotheses")


def corpus_bleu(references: Sequence[Sequence[str]], hypotheses: Sequence[Sequence[str]]) -> float:
    """Corpus BLEU-4 in [0, 1], one reference (a token list) per hypothesis (a token list).

    Uniform weights, no smoothing, brevity penalty over the summed lengths; 0 when some
    n-gram order has no match at all, and for an empty corpus.

    Clipped n-gram counts, reference lengths and the brevity penalty come from nltk. The sum
    is ours: ``nltk.translate.bleu_score.corpus_bleu`` counts a hypothesis shorter than n
    words as having one n-gram (``max(1, count)``) instead of none, which lowers the score
    whenever captions are short (the paper's modal caption has 4 words) and departs from
    Papineni et al. and sacrebleu by about a BLEU point. On a corpus whose hypotheses all have
    at least 4 words the two agree exactly.
    """
    _check(references, hypotheses)
    matches = [0] * (_ORDER + 1)
    totals = [0] * (_ORDER + 1)
    hyp_length = ref_length = 0
    for ref, hyp in zip(references, hypotheses):
        ref, hyp = list(ref), list(hyp)
        for n in range(1, _ORDER + 1):
            matches[n] += bleu_score.modified_precision([ref], hyp, n).numerator
            totals[n] += max(len(hyp) - n + 1, 0)
        hyp_length += len(hyp)
        ref_length += bleu_score.closest_ref_length([ref], len(hyp))
    if any(matches[n] == 0 for n in range(1, _ORDER + 1)):
        return 0.0  # the geometric mean of the precisions is 0 (this covers an empty corpus)
    log_precision = sum(math.log(matches[n] / totals[n]) for n in range(1, _ORDER + 1)) / _ORDER
    return float(bleu_score.brevity_penalty(ref_length, hyp_length) * math.exp(log_precision))


def sentence_bleu_average(references: Sequence[Sequence[str]], hypotheses: Sequence[Sequence[str]]) -> float:
    """Mean sentence BLEU-4 in [0, 1], smoothed with nltk's ``SmoothingFunction().method1``.

    An empty hypothesis scores 0; an empty corpus scores 0.0.
    """
    _check(references, hypotheses)
    if not hypotheses:
        return 0.0
    smoothing = bleu_score.SmoothingFunction().method1
    total = 0.0
    for ref, hyp in zip(references, hypotheses):
        total += float(bleu_score.sentence_bleu([list(ref)], list(hyp), weights=_WEIGHTS,
                                                smoothing_function=smoothing))
    return total / len(hypotheses)
