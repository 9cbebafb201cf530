"""BLEU: hand-computed values, agreement with sacrebleu, and the special-token rules."""

from __future__ import annotations

import math
import random

import pytest

from eye_fundus.bleu import corpus_bleu, sentence_bleu_average, strip_special

REF = "diabetic retinopathy with macular edema of the left eye".split()  # 9 words
HYP = "diabetic retinopathy with macular edema of eye".split()  # 7 words


def test_known_pair_matches_hand_computation():
    # Clipped n-gram precisions of HYP against REF:
    #   1-grams: all 7 words occur in REF                                       -> 7/7
    #   2-grams: 5 of 6 match ("of eye" does not)                               -> 5/6
    #   3-grams: 4 of 5 match ("edema of eye" does not)                         -> 4/5
    #   4-grams: 3 of 4 match ("macular edema of eye" does not)                 -> 3/4
    # Brevity penalty: c = 7 < r = 9 -> exp(1 - 9/7).
    precisions = [7 / 7, 5 / 6, 4 / 5, 3 / 4]
    brevity = math.exp(1 - 9 / 7)
    expected = brevity * math.exp(sum(0.25 * math.log(p) for p in precisions))
    assert expected == pytest.approx(0.6319146, abs=1e-7)
    assert corpus_bleu([REF], [HYP]) == pytest.approx(expected, abs=1e-12)
    # No zero count, so method1 smoothing changes nothing for this pair.
    assert sentence_bleu_average([REF], [HYP]) == pytest.approx(expected, abs=1e-12)


def test_identical_and_disjoint_and_empty():
    assert corpus_bleu([REF], [REF]) == pytest.approx(1.0)
    assert corpus_bleu([REF], ["glaucoma"]) == 0.0
    assert corpus_bleu([], []) == 0.0
    assert sentence_bleu_average([], []) == 0.0
    assert corpus_bleu([REF], [[]]) == 0.0
    assert sentence_bleu_average([REF], [[]]) == 0.0


def test_no_matching_fourgram_is_exactly_zero_without_smoothing_but_not_with_it():
    # 3 of 4 words match but no 4-gram does: corpus BLEU is exactly 0 (nltk alone gives ~1e-78),
    # while method1 smoothing replaces the zero count by 0.1.
    ref, hyp = "a b c d".split(), "a b c x".split()
    assert corpus_bleu([ref], [hyp]) == 0.0
    smoothed = math.exp(0.25 * (math.log(3 / 4) + math.log(2 / 3) + math.log(1 / 2) + math.log(0.1 / 1)))
    assert sentence_bleu_average([ref], [hyp]) == pytest.approx(smoothed, abs=1e-12)


def test_corpus_bleu_sums_counts_before_dividing():
    # Pair 1 is perfect (6 words); pair 2 is HYP/REF above. Corpus BLEU pools the counts:
    refs = ["a b c d e f".split(), REF]
    hyps = ["a b c d e f".split(), HYP]
    precisions = [(6 + 7) / (6 + 7), (5 + 5) / (5 + 6), (4 + 4) / (4 + 5), (3 + 3) / (3 + 4)]
    brevity = math.exp(1 - (6 + 9) / (6 + 7))
    expected = brevity * math.exp(sum(0.25 * math.log(p) for p in precisions))
    assert corpus_bleu(refs, hyps) == pytest.approx(expected, abs=1e-12)
    assert sentence_bleu_average(refs, hyps) == pytest.approx((1.0 + 0.6319146) / 2, abs=1e-7)


def test_hypothesis_shorter_than_n_has_no_ngrams_of_that_order():
    # Papineni et al. (and sacrebleu): a 2-word hypothesis has no 3- or 4-grams at all.
    refs = ["a b c d e".split(), "a b c".split()]
    hyps = ["a b c d e".split(), "a b".split()]
    precisions = [7 / 7, 5 / 5, 3 / 3, 2 / 2]
    brevity = math.exp(1 - 8 / 7)
    assert corpus_bleu(refs, hyps) == pytest.approx(brevity * math.prod(precisions) ** 0.25, abs=1e-12)
    # nltk's corpus_bleu counts max(1, 0) = 1 such n-gram (3/4 and 2/3): why we sum ourselves.
    from nltk.translate.bleu_score import corpus_bleu as nltk_corpus_bleu
    nltk_value = nltk_corpus_bleu([[r] for r in refs], hyps)
    assert nltk_value == pytest.approx(brevity * (3 / 4 * 2 / 3) ** 0.25, abs=1e-12)


def test_equals_nltk_corpus_bleu_when_every_hypothesis_has_four_words():
    from nltk.translate.bleu_score import corpus_bleu as nltk_corpus_bleu
    refs, hyps = _random_corpus(3)
    kept = [(r, h) for r, h in zip(refs, hyps) if len(h) >= 4]
    refs, hyps = [r for r, _ in kept], [h for _, h in kept]
    assert corpus_bleu(refs, hyps) == pytest.approx(nltk_corpus_bleu([[r] for r in refs], hyps), abs=1e-12)


def _random_corpus(seed: int, n: int = 60):
    rng = random.Random(seed)
    words = [f"w{i}" for i in range(25)]
    refs, hyps = [], []
    for _ in range(n):
        ref = [rng.choice(words) for _ in range(rng.randint(2, 14))]
        hyp = [w if rng.random() < 0.7 else rng.choice(words) for w in ref]
        if rng.random() < 0.3:
            hyp = hyp[: rng.randint(0, len(hyp))]  # short hypotheses exercise the brevity penalty
        elif rng.random() < 0.3:
            hyp = hyp + [rng.choice(words) for _ in range(rng.randint(1, 3))]
        refs.append(ref)
        hyps.append(hyp)
    return refs, hyps


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_corpus_bleu_equals_sacrebleu(seed):
    sacrebleu = pytest.importorskip("sacrebleu")
    refs, hyps = _random_corpus(seed)
    ours = corpus_bleu(refs, hyps)
    theirs = sacrebleu.corpus_bleu([" ".join(h) for h in hyps], [[" ".join(r) for r in refs]],
                                   tokenize="none", smooth_method="none", force=True).score
    assert 0.0 < ours < 1.0
    assert ours * 100 == pytest.approx(theirs, abs=1e-6)


def test_corpus_bleu_equals_sacrebleu_when_zero():
    sacrebleu = pytest.importorskip("sacrebleu")
    refs, hyps = [["a", "b", "c"]], [["a", "b", "x"]]
    theirs = sacrebleu.corpus_bleu(["a b x"], [["a b c"]], tokenize="none", smooth_method="none", force=True).score
    assert corpus_bleu(refs, hyps) * 100 == pytest.approx(theirs, abs=1e-6) and theirs == 0.0


def test_strip_special_stops_at_eos_and_drops_sos_and_pad():
    assert strip_special(["<sos>", "a", "<pad>", "b", "<eos>", "c", "d"]) == ["a", "b"]
    assert strip_special([1, 5, 6, 2, 7, 0], eos=2, skip=(0, 1)) == [5, 6]
    assert strip_special([1, 5, 6], eos=2, skip=(0, 1)) == [5, 6]


def test_mismatched_lengths_are_an_error():
    with pytest.raises(ValueError):
        corpus_bleu([REF], [HYP, HYP])
