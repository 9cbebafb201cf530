"""The diagnosis-text task: vocabulary, encoding, decoder, decoding, soft targets, losses, BLEU."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from distillkit.errors import DistillkitError
from distillkit.losses import KDLoss, tempered_probs
from eye_fundus.caption import EOS, PAD, SOS, UNK, CaptionDecoder, CaptionParams, CaptionTask

CAPTIONS = [
    "Diabetic retinopathy",
    "macular degeneration of left eye",
    "glaucoma suspect",
    "choroidal malignant melanoma of uvea ciliary body",
]
FEATURES = 16


def make_task(**overrides) -> CaptionTask:
    params = dict(max_length=8, embedding_dim=32, hidden_dim=64)
    params.update(overrides)
    return CaptionTask("diagnosis_text", CaptionParams(**params))


def after_first_eos_is_pad(tokens: torch.Tensor) -> bool:
    for row in tokens.tolist():
        assert row[0] == SOS
        if EOS in row:
            tail = row[row.index(EOS) + 1:]
            if any(t != PAD for t in tail):
                return False
        if any(t in (PAD, SOS) for t in row[1:row.index(EOS) if EOS in row else len(row)]):
            return False
    return True


@pytest.fixture(scope="module")
def trained():
    """A decoder overfitted to the four captions from fixed random features (with scheduled sampling)."""
    torch.manual_seed(0)
    task = make_task(teacher_forcing=0.5)
    task.fit(CAPTIONS)
    head = task.build_head(FEATURES)
    features = torch.randn(len(CAPTIONS), FEATURES)
    target = task.encode(CAPTIONS)
    optimizer = torch.optim.Adam(head.parameters(), lr=2e-2)
    for _ in range(80):
        loss = task.hard_loss(task.forward(head, features, target, train=True), target).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    head.eval()
    return task, head, features, target


# -- vocabulary and encoding -------------------------------------------------------------------
def test_vocabulary_counts_training_captions_only_with_deterministic_ties():
    task = make_task(vocab_size=4)
    task.fit(["b a c", "a b", "a", None, "d  A"])  # counts: a 4, b 2, c 1, d 1
    assert task.vocabulary == ["<pad>", "<sos>", "<eos>", "<unk>", "a", "b", "c", "d"]
    task = make_task(vocab_size=3)
    task.fit(["b a c", "a b", "a", "d A"])
    assert task.vocabulary[4:] == ["a", "b", "c"]  # c and d tie at 1: alphabetical
    task = make_task(min_count=2)
    task.fit(["b a c", "a b", "a", "d A"])
    assert task.vocabulary[4:] == ["a", "b"]
    # "retina" appears only in a validation caption: it becomes <unk>.
    task = make_task()
    task.fit(CAPTIONS)
    assert "retina" not in task.vocabulary
    tokens = task.encode(["glaucoma of retina"])["tokens"][0].tolist()
    assert tokens[:5] == [SOS, task.vocabulary.index("glaucoma"), task.vocabulary.index("of"), UNK, EOS]
    assert task.num_words == 15


def test_encode_layout_truncation_and_missing():
    task = make_task(max_length=3)
    task.fit(["a b c d e", "a"])
    ids = {w: task.vocabulary.index(w) for w in "abcde"}
    enc = task.encode(["a b c d e", "b", None, "   "])
    assert enc["tokens"].dtype == torch.long
    assert enc["tokens"].tolist() == [
        [SOS, ids["a"], ids["b"], ids["c"], EOS],  # 5 words truncated to max_length = 3
        [SOS, ids["b"], EOS, PAD, PAD],
        [PAD] * 5,
        [PAD] * 5,  # a blank caption counts as missing
    ]
    assert enc["present"].tolist() == [True, True, False, False]


def test_encode_decode_round_trip_and_state():
    task = make_task()
    task.fit(CAPTIONS)
    enc = task.encode(CAPTIONS + [None])
    assert task.decode_text(enc["tokens"]) == [c.lower() for c in CAPTIONS] + [""]
    # Decoding stops at the first EOS whatever follows it.
    assert task.decode_text([[SOS, 4, EOS, 5, 6]]) == [task.vocabulary[4]]
    restored = make_task()
    restored.load_state(task.state())
    assert restored.vocabulary == task.vocabulary
    assert torch.equal(restored.encode(CAPTIONS)["tokens"], enc["tokens"][:4])
    with pytest.raises(DistillkitError):
        restored.load_state({"vocabulary": ["a", "b"]})
    assert task.describe() == "diagnosis text of 'diagnosis_text', vocabulary 15, up to 8 words"


def test_params_are_strict_and_default_to_the_paper():
    p = CaptionParams()
    assert (p.kind, p.vocab_size, p.max_length, p.embedding_dim, p.hidden_dim, p.teacher_forcing) == \
        ("caption", 193, 14, 256, 512, 0.5)
    assert (p.decode, p.beam_size, p.bleu, p.weight, p.min_count) == ("greedy", 3, "corpus", 1.0, 1)
    with pytest.raises(ValueError):
        CaptionParams(vocab=10)
    with pytest.raises(ValueError):
        CaptionParams(decode="sample")


# -- decoder -----------------------------------------------------------------------------------
def test_decoder_structure_and_teacher_forced_logits():
    task = make_task()
    task.fit(CAPTIONS)
    head = task.build_head(FEATURES)
    assert isinstance(head, CaptionDecoder)
    assert head.lstm.num_layers == 1 and head.embedding.embedding_dim == 32 and head.lstm.hidden_size == 64
    target = task.encode(CAPTIONS)
    feats = torch.randn(4, FEATURES)
    logits = task.forward(head, feats, target)
    assert logits.shape == (4, 9, len(task.vocabulary))
    # The batched LSTM call equals stepping through the same tokens one at a time.
    state = head.initial_state(feats)
    for t in range(9):
        step, state = head.step(target["tokens"][:, t], state)
        torch.testing.assert_close(step, logits[:, t], atol=1e-5, rtol=1e-5)
    # train=True with teacher_forcing=1 is the same single batched call.
    forced = make_task(teacher_forcing=1.0)
    forced.load_state(task.state())
    torch.testing.assert_close(forced.forward(head, feats, target, train=True), logits)


def test_scheduled_sampling_without_teacher_forcing_reads_own_argmax():
    torch.manual_seed(1)
    task = make_task(teacher_forcing=0.0)
    task.fit(CAPTIONS)
    head = task.build_head(FEATURES)
    feats = torch.randn(4, FEATURES)
    target = task.encode(CAPTIONS)
    logits = task.forward(head, feats, target, train=True)
    own = torch.cat([torch.full((4, 1), SOS), logits.argmax(-1)[:, :-1]], dim=1)
    torch.testing.assert_close(head(feats, own), logits, atol=1e-5, rtol=1e-5)
    # A teacher's prefix (no "present": it came from guide_from_soft) is never sampled over.
    guide = task.guide_from_soft({"tokens": target["tokens"]}, None)
    torch.testing.assert_close(task.forward(head, feats, guide, train=True), head(feats, target["tokens"][:, :9]))


def test_decoder_overfits_four_captions(trained):
    task, head, features, target = trained
    assert task.hard_loss(task.forward(head, features, target), target).max() < 0.05
    predicted = task.predict(head, features)["tokens"]
    assert torch.equal(predicted, target["tokens"])
    assert task.decode_text(predicted) == [c.lower() for c in CAPTIONS]
    beam = make_task(decode="beam", beam_size=3)
    beam.load_state(task.state())
    assert torch.equal(beam.predict(head, features)["tokens"], target["tokens"])
    # Without a guide, forward conditions on the model's own greedy decode.
    free = task.forward(head, features)
    assert torch.equal(free.argmax(-1)[task._through_first_eos(predicted)], predicted[:, 1:][predicted[:, 1:] != PAD])


def test_wide_beam_finds_the_most_probable_caption():
    # max_length 2 and 4 emittable tokens (EOS, <unk>, a, b): a beam of 16 keeps every prefix,
    # so beam search must return the exact argmax over all captions.
    torch.manual_seed(5)
    task = make_task(max_length=2, decode="beam", beam_size=16)
    task.fit(["a b"])
    head = task.build_head(FEATURES).eval()
    feats = torch.randn(5, FEATURES) * 2
    words = [UNK, task.vocabulary.index("a"), task.vocabulary.index("b")]
    candidates = [(EOS,), *[(w, EOS) for w in words], *[(u, v, EOS) for u in words for v in words],
                  *[(u, v, w) for u in words for v in words for w in words]]
    tokens = torch.tensor([[SOS, *c] + [PAD] * (4 - 1 - len(c)) for c in candidates])
    with torch.no_grad():
        best = []
        for row in range(len(feats)):
            logp = torch.log_softmax(head(feats[row:row + 1].expand(len(candidates), -1), tokens[:, :3]), -1)
            picked = logp.gather(-1, tokens[:, 1:, None]).squeeze(-1)
            lengths = torch.tensor([len(c) for c in candidates])
            score = (picked * (torch.arange(3) < lengths[:, None])).sum(1)
            best.append(tokens[score.argmax()])
    assert torch.equal(task.predict(head, feats)["tokens"], torch.stack(best))
    greedy = make_task(max_length=2)
    greedy.load_state(task.state())
    assert not torch.equal(greedy.predict(head, feats)["tokens"], torch.stack(best))  # the search mattered


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_beam_of_one_equals_greedy(seed, trained):
    torch.manual_seed(seed)
    task = make_task()
    task.fit(CAPTIONS)
    beam = make_task(decode="beam", beam_size=1)
    beam.fit(CAPTIONS)
    head = task.build_head(FEATURES).eval()
    feats = torch.randn(6, FEATURES) * 3
    greedy = task.predict(head, feats)["tokens"]
    assert torch.equal(beam.predict(head, feats)["tokens"], greedy)
    _, trained_head, trained_features, _ = trained
    assert torch.equal(beam.predict(trained_head, trained_features)["tokens"],
                       task.predict(trained_head, trained_features)["tokens"])


@pytest.mark.parametrize("decode", ["greedy", "beam"])
def test_decoding_stops_at_eos(decode, trained):
    task = make_task(decode=decode)
    task.fit(CAPTIONS)
    torch.manual_seed(3)
    head = task.build_head(FEATURES).eval()
    with torch.no_grad():
        head.output.bias[EOS] += 50.0  # EOS wins at once
    tokens = task.predict(head, torch.randn(3, FEATURES))["tokens"]
    assert tokens.tolist() == [[SOS, EOS] + [PAD] * 8] * 3
    with torch.no_grad():
        head.output.bias[EOS] -= 50.0
        head.output.bias[PAD] += 50.0  # PAD and SOS are never emitted, even when most likely
        head.output.bias[SOS] += 50.0
    tokens = task.predict(head, torch.randn(3, FEATURES))["tokens"]
    assert after_first_eos_is_pad(tokens)
    _, trained_head, features, target = trained
    tokens = task.predict(trained_head, features)["tokens"]
    assert after_first_eos_is_pad(tokens) and (tokens == EOS).sum(1).tolist() == [1, 1, 1, 1]


# -- soft targets ------------------------------------------------------------------------------
def _teachers(trained, n: int):
    """n teachers: the trained decoder and noisy copies, each with its own features."""
    task, head, features, target = trained
    torch.manual_seed(7)
    heads, feats = [head], [features]
    for _ in range(n - 1):
        other = copy.deepcopy(head)
        with torch.no_grad():
            for p in other.parameters():
                p.add_(0.05 * torch.randn_like(p))
        heads.append(other)
        feats.append(features + 0.3 * torch.randn_like(features))
    return task, heads, feats, target


def test_soft_target_of_one_teacher_is_its_tempered_softmax_on_the_reference(trained):
    task, heads, feats, target = _teachers(trained, 1)
    with torch.inference_mode():
        soft = task.soft_target(heads, feats, [1.0], target, tau=2.0)
        expected = tempered_probs(heads[0](feats[0], target["tokens"][:, :9]), 2.0)
    assert torch.equal(soft["tokens"], target["tokens"])
    torch.testing.assert_close(soft["probs"], expected)
    assert torch.equal(soft["mask"], target["tokens"][:, 1:] != PAD)
    assert soft["mask"].sum(1).tolist() == [3, 6, 3, 8]  # words + EOS
    assert task.guide_from_soft(soft, target)["tokens"] is soft["tokens"]


def test_soft_target_of_two_teachers_is_the_weighted_mean(trained):
    task, heads, feats, target = _teachers(trained, 2)
    with torch.inference_mode():
        soft = task.soft_target(heads, feats, [0.25, 0.75], target, tau=5.0)
        p0 = tempered_probs(heads[0](feats[0], target["tokens"][:, :9]), 5.0)
        p1 = tempered_probs(heads[1](feats[1], target["tokens"][:, :9]), 5.0)
        assert not torch.allclose(p0, p1, atol=1e-3)
        torch.testing.assert_close(soft["probs"], 0.25 * p0 + 0.75 * p1)
        torch.testing.assert_close(soft["probs"].sum(-1), torch.ones(4, 9))
        # A batch where one row has no caption takes the step-by-step path: the captioned
        # rows still read their reference and get the same distributions.
        partial = {"tokens": target["tokens"].clone(), "present": torch.tensor([True, False, True, True])}
        partial["tokens"][1] = PAD
        mixed = task.soft_target(heads, feats, [0.25, 0.75], partial, tau=5.0)
    keep = torch.tensor([0, 2, 3])
    assert torch.equal(mixed["tokens"][keep], target["tokens"][keep])
    torch.testing.assert_close(mixed["probs"][keep], soft["probs"][keep], atol=1e-5, rtol=1e-5)


def _ensemble_greedy(task, heads, feats, weights):
    """Independent reference: re-run each teacher teacher-forced on the growing prefix."""
    batch, width = feats[0].shape[0], task.params.max_length + 2
    tokens = torch.full((batch, width), PAD)
    tokens[:, 0] = SOS
    done = torch.zeros(batch, dtype=torch.bool)
    for t in range(width - 1):
        mean = sum(w * F.softmax(h(f, tokens[:, :-1])[:, t], dim=-1) for h, f, w in zip(heads, feats, weights))
        mean[:, [PAD, SOS]] = -1.0
        nxt = torch.where(done, torch.full_like(done, PAD, dtype=torch.long), mean.argmax(-1))
        tokens[:, t + 1] = nxt
        done |= nxt == EOS
    return tokens


def test_soft_target_on_unlabeled_rows_reads_the_ensembles_greedy_decode(trained):
    task, heads, feats, _ = _teachers(trained, 2)
    weights = [0.25, 0.75]
    torch.manual_seed(11)
    # The training features plus new images: some decodes end early, some may not end at all.
    feats = [torch.cat([f, torch.randn(4, FEATURES)]) for f in feats]
    with torch.inference_mode():
        soft = task.soft_target(heads, feats, weights, None, tau=2.0)
        expected_tokens = _ensemble_greedy(task, heads, feats, weights)
        prefix = soft["tokens"][:, :9]
        expected_probs = sum(w * tempered_probs(h(f, prefix), 2.0) for h, f, w in zip(heads, feats, weights))
    assert torch.equal(soft["tokens"], expected_tokens)
    torch.testing.assert_close(soft["probs"], expected_probs, atol=1e-5, rtol=1e-5)
    for row, mask in zip(soft["tokens"].tolist(), soft["mask"].tolist()):
        out = row[1:]
        valid = out.index(EOS) + 1 if EOS in out else len(out)
        assert mask == [True] * valid + [False] * (len(out) - valid)
    assert soft["mask"].sum(1).lt(9).any(), "no decode ended with EOS: the mask test would be vacuous"
    # On the training images the ensemble reproduces the captions it was trained on.
    assert task.decode_text(soft["tokens"][:4]) == [c.lower() for c in CAPTIONS]
    # The student distills on the teachers' prefix.
    assert torch.equal(task.guide_from_soft(soft, None)["tokens"], soft["tokens"])


def test_soft_target_refuses_a_teacher_with_another_vocabulary(trained):
    task, head, features, target = trained
    other = CaptionDecoder(FEATURES, len(task.vocabulary) + 1, 8, 8)
    with pytest.raises(DistillkitError, match="vocabulary"):
        task.soft_target([head, other], [features, features], [0.5, 0.5], target, tau=1.0)


# -- losses ------------------------------------------------------------------------------------
def test_hard_loss_is_the_mean_ce_over_words_and_eos_only():
    task = make_task(max_length=3)
    task.fit(["a b", "b"])  # vocabulary: 4 specials, a, b
    a, b = task.vocabulary.index("a"), task.vocabulary.index("b")
    target = task.encode(["a b", None])  # row 0: SOS a b EOS PAD; row 1: missing
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 6)
    log_p = torch.log_softmax(logits, -1)
    expected = -(log_p[0, 0, a] + log_p[0, 1, b] + log_p[0, 2, EOS]) / 3
    loss = task.hard_loss(logits, target)
    torch.testing.assert_close(loss, torch.stack([expected, torch.tensor(0.0)]))
    changed = logits.clone()
    changed[0, 3] = torch.tensor([9.0, -9.0, 3.0, 1.0, 0.0, 7.0])  # the PAD position
    changed[1] = 100 * torch.randn(4, 6)  # the row without a caption
    torch.testing.assert_close(task.hard_loss(changed, target), loss)


def test_soft_loss_zero_for_identical_distributions():
    torch.manual_seed(0)
    logits = torch.randn(3, 5, 7)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]], dtype=torch.bool)
    for tau in (0.5, 1.0, 10.0):
        soft = {"probs": tempered_probs(logits, tau), "mask": mask}
        torch.testing.assert_close(make_task().soft_loss(logits, soft, tau), torch.zeros(3), atol=1e-6, rtol=0)


def test_soft_loss_matches_hand_computation_and_ignores_padding():
    tau = 2.0
    logits = torch.tensor([[[1.0, 0.0, -1.0], [0.5, 0.5, 2.0], [3.0, 0.0, 0.0]]])  # (1, 3, 3)
    probs = torch.tensor([[[0.7, 0.2, 0.1], [0.1, 0.1, 0.8], [0.3, 0.3, 0.4]]])
    mask = torch.tensor([[True, True, False]])
    expected = 0.0
    for t in range(2):  # the two valid positions
        z = [v / tau for v in logits[0, t].tolist()]
        log_norm = math.log(sum(math.exp(v) for v in z))
        expected += sum(p * (math.log(p) - (zv - log_norm)) for p, zv in zip(probs[0, t].tolist(), z))
    expected /= 2
    task = make_task()
    loss = task.soft_loss(logits, {"probs": probs, "mask": mask}, tau)
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    garbage = probs.clone()
    garbage[0, 2] = torch.tensor([float("nan"), -5.0, 1e9])
    other_logits = logits.clone()
    other_logits[0, 2] = torch.tensor([50.0, -50.0, 0.0])
    again = task.soft_loss(other_logits, {"probs": garbage, "mask": mask}, tau)
    assert again.item() == pytest.approx(expected, abs=1e-6)


def test_kd_loss_is_zero_when_the_student_equals_its_teacher(trained):
    task, head, features, target = trained
    with torch.inference_mode():
        soft = task.soft_target([head], [features], [1.0], None, tau=4.0)
    guide = task.guide_from_soft(soft, None)
    logits = task.forward(head, features, {k: v.clone() for k, v in guide.items()}, train=True)
    total, _ = KDLoss(KDLoss.Params())({"caption": task}, {"caption": logits}, None,
                                       {"caption": {k: v.clone() for k, v in soft.items()}}, 0.95, {"caption": 4.0})
    assert total.item() == pytest.approx(0.0, abs=1e-5)


# -- metrics -----------------------------------------------------------------------------------
def test_metrics_score_only_captioned_rows_and_never_after_eos():
    task = make_task()
    task.fit(CAPTIONS)
    target = task.encode(CAPTIONS + [None])
    prediction = target["tokens"].clone()
    prediction[4, :3] = torch.tensor([SOS, 5, EOS])  # the uncaptioned row is not scored
    # Garbage after EOS in row 0 ("diabetic retinopathy" EOS ...) must not count.
    prediction[0, 4:] = 6
    metrics = task.metrics()
    metrics.update({"tokens": prediction[:2]}, {k: v[:2] for k, v in target.items()})
    metrics.update({"tokens": prediction[2:]}, {k: v[2:] for k, v in target.items()})
    out = metrics.compute()
    assert out["n"] == 4
    assert out["bleu"] == out["bleu_corpus"] == pytest.approx(1.0)
    # Unlike corpus BLEU, nltk's sentence BLEU-4 of a perfect 2-word caption is not 1: it has
    # no 3- or 4-grams, which method1 smooths to 0.1 / 1 each, giving (1 * 1 * 0.1 * 0.1)^(1/4).
    two_words = math.sqrt(0.1)
    assert out["bleu_sentence_avg"] == pytest.approx((1 + 1 + 2 * two_words) / 4, abs=1e-12)


def test_metrics_value_and_unknown_reference_words():
    task = make_task(bleu="sentence_average")
    task.fit(["a b c d e f"])
    ids = {w: task.vocabulary.index(w) for w in "abcdef"}
    # Reference "a b c d x" (x unknown -> <unk>); hypothesis "a b c d <unk>": the decoded
    # <unk> is not the reference's word, so BLEU sees 4 of 5 unigrams matched, and so on.
    target = task.encode(["a b c d x"])
    prediction = torch.tensor([[SOS, ids["a"], ids["b"], ids["c"], ids["d"], UNK, EOS, PAD, PAD, PAD]])
    metrics = task.metrics()
    metrics.update({"tokens": prediction}, target)
    out = metrics.compute()
    expected = math.exp(0.25 * (math.log(4 / 5) + math.log(3 / 4) + math.log(2 / 3) + math.log(1 / 2)))
    assert out["bleu_corpus"] == pytest.approx(expected, abs=1e-12)
    assert out["bleu"] == out["bleu_sentence_avg"] == pytest.approx(expected, abs=1e-12)
    assert task.primary_metric == "bleu"


def test_empty_split_metrics():
    task = make_task()
    task.fit(CAPTIONS)
    out = task.metrics().compute()
    assert out == {"bleu": 0.0, "bleu_corpus": 0.0, "bleu_sentence_avg": 0.0, "n": 0, "bleu_constant": 0.0}


def test_hard_and_soft_loss_sum_over_words_with_reduction_sum():
    task, summed = make_task(max_length=3), make_task(max_length=3, reduction="sum")
    task.fit(["a b", "b"])
    summed.fit(["a b", "b"])
    target = task.encode(["a b", "b"])  # 3 and 2 predicted positions (words + EOS)
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 6)
    torch.testing.assert_close(summed.hard_loss(logits, target),
                               task.hard_loss(logits, target) * torch.tensor([3.0, 2.0]))
    mask = torch.tensor([[True, True, True, False], [True, True, False, False]])
    soft = {"probs": tempered_probs(torch.randn(2, 4, 6), 2.0), "mask": mask}
    torch.testing.assert_close(summed.soft_loss(logits, soft, 2.0),
                               task.soft_loss(logits, soft, 2.0) * torch.tensor([3.0, 2.0]))
    assert make_task().params.reduction == "mean"


def test_tokenizer_ignores_punctuation_and_keeps_intra_word_hyphens():
    from eye_fundus.caption import tokenize

    assert tokenize("Cataract, left eye.") == ["cataract", "left", "eye"]
    assert tokenize("non-proliferative DR (mild);  o'brien") == ["non-proliferative", "dr", "mild", "o'brien"]
    task = make_task()
    task.fit(["cataract, left", "cataract"])
    assert task.vocabulary.count("cataract") == 1 and "cataract," not in task.vocabulary
    # the metric's references are the encoded tokens, so BLEU sees the same words
    assert task.decode_text(task.encode(["Cataract,  LEFT."])["tokens"]) == ["cataract left"]


def test_min_caption_count_drops_rare_diagnoses_from_the_target():
    task = make_task(min_caption_count=2)
    task.fit(["mild dr", "mild dr.", "rare thing", None])
    assert "rare" not in task.vocabulary and "thing" not in task.vocabulary
    encoded = task.encode(["mild dr", "rare thing", "Mild DR!", "unseen"])
    assert encoded["present"].tolist() == [True, False, True, False]
    restored = make_task(min_caption_count=2)
    restored.load_state(task.state())
    assert restored.encode(["rare thing", "mild dr"])["present"].tolist() == [False, True]
    kept_all = make_task()
    kept_all.fit(["mild dr", "rare thing"])
    assert kept_all.encode(["rare thing"])["present"].tolist() == [True]


FREQUENT = ["mild", "diabetic", "retinopathy", "left", "eye"]


def test_bleu_constant_scores_always_writing_the_most_frequent_training_caption():
    """The baseline a text head must beat: chosen on the training labels (ties alphabetical),
    scored exactly as a model that writes it for every row would be."""
    from eye_fundus.bleu import corpus_bleu, sentence_bleu_average

    train = ["no diabetic retinopathy seen", "No diabetic retinopathy, seen.", "mild diabetic retinopathy left eye",
             "mild diabetic retinopathy left eye", "cataract", None, "a b c d e f g"]
    for bleu in ("corpus", "sentence_average"):
        task = make_task(bleu=bleu, max_length=5)
        task.fit(train)
        assert task.most_frequent == FREQUENT  # 2 each: "mild ..." < "no ..."
        refs = ["no diabetic retinopathy seen", "mild diabetic retinopathy left eye", "cataract",
                "mild diabetic retinopathy right eye", None]
        target = task.encode(refs)
        constant = task.encode([" ".join(FREQUENT)] * len(refs))["tokens"]
        metrics = task.metrics()
        metrics.update({"tokens": constant[:, 1:]}, target)
        out = metrics.compute()
        assert out["bleu_constant"] == pytest.approx(out["bleu"])  # a model that writes it scores the same
        references = [r.split() for r in refs if r]
        always = [FREQUENT] * 4
        expected = corpus_bleu(references, always) if bleu == "corpus" else sentence_bleu_average(references, always)
        assert out["bleu_constant"] == pytest.approx(expected) and out["bleu_constant"] > 0
        # a different model output leaves the baseline unchanged
        other = task.metrics()
        other.update({"tokens": task.encode(["cataract"] * len(refs))["tokens"][:, 1:]}, target)
        assert other.compute()["bleu_constant"] == pytest.approx(out["bleu_constant"])
    # the baseline travels with the task's state (the checkpoint), and ties never depend on row order
    again = make_task(max_length=5)
    again.load_state(task.state())
    assert again.most_frequent == FREQUENT
    reordered = make_task(max_length=5)
    reordered.fit(list(reversed(train)))
    assert reordered.most_frequent == FREQUENT
    assert ("bleu_constant", "most frequent") in task.headline_metrics()


def test_losses_of_bf16_logits_are_fp32_and_equal_the_float64_computation():
    """Under training.mixed_precision the decoder's logits may come in bf16: both losses upcast
    them and compute in fp32 (checked against float64 on the same bf16-rounded logits)."""
    task = make_task(max_length=3)
    task.fit(["a b", "b"])
    a, b = task.vocabulary.index("a"), task.vocabulary.index("b")
    target = task.encode(["a b", "b"])  # SOS a b EOS PAD / SOS b EOS PAD PAD
    torch.manual_seed(0)
    logits = (3 * torch.randn(2, 4, 6)).to(torch.bfloat16)
    exact = logits.double()
    log_p = exact - torch.logsumexp(exact, -1, keepdim=True)
    expected_ce = torch.stack([-(log_p[0, 0, a] + log_p[0, 1, b] + log_p[0, 2, EOS]) / 3,
                               -(log_p[1, 0, b] + log_p[1, 1, EOS]) / 2])
    ce = task.hard_loss(logits, target)
    assert ce.dtype == torch.float32
    torch.testing.assert_close(ce.double(), expected_ce, atol=1e-6, rtol=1e-6)

    tau = 2.0
    probs = torch.softmax(torch.randn(2, 4, 6), -1)
    mask = torch.tensor([[True, True, True, False], [True, True, False, False]])
    log_q = exact / tau - torch.logsumexp(exact / tau, -1, keepdim=True)
    kl = (probs.double() * (probs.double().log() - log_q)).sum(-1)
    expected_kl = (kl * mask).sum(1) / mask.sum(1)
    soft = task.soft_loss(logits, {"probs": probs, "mask": mask}, tau)
    assert soft.dtype == torch.float32
    torch.testing.assert_close(soft.double(), expected_kl, atol=1e-6, rtol=1e-6)
