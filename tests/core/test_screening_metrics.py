"""Screening metrics of classification tasks: hand-computed values, scikit-learn, unseen labels."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from distillkit.builtin.classification import ClassificationMetrics, ClassificationParams, ClassificationTask
from distillkit.config import ConfigErrors, load_config
from tests.conftest import toy_config, write_config

CLASSES = ["a", "b", "c"]
# Eight rows, three classes. (true class, probabilities) -> argmax, confidence
ROWS = [
    (0, [0.70, 0.20, 0.10]),  # a, .70 right
    (0, [0.50, 0.30, 0.20]),  # a, .50 right
    (0, [0.20, 0.70, 0.10]),  # b, .70 wrong (true a ranks 2nd)
    (1, [0.05, 0.85, 0.10]),  # b, .85 right
    (1, [0.25, 0.65, 0.10]),  # b, .65 right
    (1, [0.05, 0.10, 0.85]),  # c, .85 wrong (true b ranks 2nd)
    (2, [0.05, 0.05, 0.90]),  # c, .90 right
    (2, [0.10, 0.65, 0.25]),  # b, .65 wrong (true c ranks 2nd)
]
# An extra row whose label training never saw; the model says c with .75.
UNSEEN_ROW = [0.10, 0.15, 0.75]


def _metrics(rows, unseen_rows=(), topk=(1, 2), spec=0.90, batches=3) -> dict:
    acc = ClassificationMetrics(3, list(topk), CLASSES, spec)
    probs = torch.tensor([p for _, p in rows] + list(unseen_rows))
    y = torch.tensor([t for t, _ in rows] + [0] * len(unseen_rows))
    present = torch.tensor([True] * len(rows) + [False] * len(unseen_rows))
    unseen = ~present
    for idx in torch.arange(len(y)).chunk(batches):  # streamed in batches, like the evaluate stage
        acc.update({"probs": probs[idx]}, {"y": y[idx], "present": present[idx], "unseen": unseen[idx]})
    return acc.compute()


def test_hand_computed_eight_row_example():
    m = _metrics(ROWS)
    # confusion [true, predicted]: a -> (2, 1, 0), b -> (0, 2, 1), c -> (0, 1, 1)
    assert m["confusion"] == [[2, 1, 0], [0, 2, 1], [0, 1, 1]]
    assert m["n"] == 8 and m["unseen"] == 0
    assert m["accuracy"] == pytest.approx(5 / 8)
    assert m["top2"] == pytest.approx(8 / 8)  # every miss has the true class second
    # recall = sensitivity: a 2/3, b 2/3, c 1/2; balanced accuracy their mean = 11/18
    assert m["sensitivity"] == pytest.approx({"a": 2 / 3, "b": 2 / 3, "c": 1 / 2})
    assert m["balanced_accuracy"] == pytest.approx(11 / 18)
    # specificity TN/(TN+FP): a 5/5 (never wrongly predicted), b 3/5 (rows 3 and 8), c 5/6 (row 6)
    assert m["specificity"] == pytest.approx({"a": 1.0, "b": 3 / 5, "c": 5 / 6})
    # precision: a 2/2, b 2/4, c 1/2; F1 = 2TP/(actual+predicted): a 4/5, b 4/7, c 2/4
    assert m["precision"] == pytest.approx({"a": 1.0, "b": 0.5, "c": 0.5})
    assert m["macro_f1"] == pytest.approx((4 / 5 + 4 / 7 + 1 / 2) / 3)
    assert m["majority_rate"] == pytest.approx(3 / 8)  # a and b hold 3 rows each
    # AUC (pairs positive > negative, ties 1/2): a 14/15, b (5 + 3.5 + 1)/15, c (6 + 5)/12
    assert m["auc"] == pytest.approx({"a": 14 / 15, "b": 9.5 / 15, "c": 11 / 12})
    assert m["macro_auc"] == pytest.approx((14 / 15 + 9.5 / 15 + 11 / 12) / 3)
    # sensitivity at specificity >= 0.9: no false positive allowed (5 or 6 negatives), so the
    # threshold sits above the best negative: a > .25 -> .7, .5 (2/3); b > .70 -> .85 (1/3); c > .85 -> .9 (1/2)
    assert m["sens_at_spec"] == pytest.approx({"a": 2 / 3, "b": 1 / 3, "c": 1 / 2})
    # ECE, 15 bins of width 1/15, bin = ceil(15 conf) - 1:
    #   .50 -> 7 {row 2: acc 1}, .65 -> 9 {5, 8: acc .5}, .70 -> 10 {1, 3: acc .5},
    #   .85 -> 12 {4, 6: acc .5}, .90 -> 13 {7: acc 1}
    #   ECE = (1*.5 + 2*.15 + 2*.2 + 2*.35 + 1*.1) / 8 = 2.0 / 8
    assert m["ece"] == pytest.approx(0.25)
    bins = m["reliability"]
    assert len(bins) == 15 and [b["count"] for b in bins] == [0] * 7 + [1, 0, 2, 2, 0, 2, 1, 0]
    assert bins[12]["confidence"] == pytest.approx(0.85) and bins[12]["accuracy"] == pytest.approx(0.5)
    assert bins[7]["accuracy"] == 1.0 and bins[0]["confidence"] is None
    assert bins[12]["lower"] == pytest.approx(12 / 15) and bins[12]["upper"] == pytest.approx(13 / 15)


def test_specificity_target_is_used():
    # at specificity >= 0.5 class b may have 2 false positives of 5: threshold .65 -> .85, .65 (2/3)
    m = _metrics(ROWS, spec=0.5)
    assert m["sens_at_spec"]["b"] == pytest.approx(2 / 3) and m["screening_specificity"] == 0.5


def test_unseen_label_is_scored_as_wrong_and_counted():
    m = _metrics(ROWS, unseen_rows=[UNSEEN_ROW])
    assert m["n"] == 9 and m["unseen"] == 1
    assert m["accuracy"] == pytest.approx(5 / 9) and m["top2"] == pytest.approx(8 / 9)
    # the unseen rows form one extra group of recall 0 in balanced accuracy
    assert m["balanced_accuracy"] == pytest.approx((2 / 3 + 2 / 3 + 1 / 2 + 0) / 4)
    assert m["majority_rate"] == pytest.approx(3 / 9)
    # it is a negative of every class (a 6/6, b 4/6); predicting c is a false positive of c: 5/7
    assert m["specificity"] == pytest.approx({"a": 1.0, "b": 4 / 6, "c": 5 / 7})
    assert m["confusion"] == [[2, 1, 0], [0, 2, 1], [0, 1, 1]]  # classes only
    # AUC c: .9 beats all 7 negatives, .25 beats 5 -> 12/14
    assert m["auc"]["c"] == pytest.approx(12 / 14)
    # ECE: the row joins bin 11 (.75, accuracy 0): (2.0 + .75) / 9
    assert m["ece"] == pytest.approx(2.75 / 9)
    assert m["reliability"][11]["count"] == 1 and m["reliability"][11]["accuracy"] == 0.0


def test_absent_class_has_no_auc_and_is_left_out_of_the_macro():
    rows = [r for r in ROWS if r[0] != 2]  # no true c
    m = _metrics(rows)
    assert m["auc"]["c"] is None and m["sens_at_spec"]["c"] is None and m["sensitivity"]["c"] is None
    assert m["macro_auc"] == pytest.approx((m["auc"]["a"] + m["auc"]["b"]) / 2)
    assert m["balanced_accuracy"] == pytest.approx((2 / 3 + 2 / 3) / 2)
    empty = ClassificationMetrics(3, [1], CLASSES).compute()
    assert empty["n"] == 0 and np.isnan(empty["accuracy"]) and np.isnan(empty["ece"])


def test_encode_marks_labels_training_never_saw():
    task = ClassificationTask("dx", ClassificationParams(hidden=0))
    task.fit(["a", "b", "a"])
    target = task.encode(["a", "zebra", None, "b"])
    assert target["present"].tolist() == [True, False, False, True]
    assert target["unseen"].tolist() == [False, True, False, False]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_agrees_with_scikit_learn_on_random_data(seed):
    sk = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(seed)
    c, n = 5, 300
    y = rng.choice(c - 1, size=n, p=[0.5, 0.2, 0.2, 0.1])  # class 4 never a label
    logits = rng.normal(size=(n, c)) + 1.5 * np.eye(c)[y] * rng.random((n, 1))
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    probs = np.round(probs, 2)  # ties in the scores
    classes = list("vwxyz")
    acc = ClassificationMetrics(c, [1], classes, 0.85)
    for idx in np.array_split(np.arange(n), 7):
        acc.update({"probs": torch.tensor(probs[idx], dtype=torch.float64)},
                   {"y": torch.tensor(y[idx]), "present": torch.ones(len(idx), dtype=torch.bool)})
    m = acc.compute()
    pred = probs.argmax(1)
    assert m["confusion"] == sk.confusion_matrix(y, pred, labels=range(c)).tolist()
    with pytest.warns(UserWarning, match="not in y_true"):  # class 4 is predicted, never true
        assert m["balanced_accuracy"] == pytest.approx(sk.balanced_accuracy_score(y, pred))
    assert m["macro_f1"] == pytest.approx(sk.f1_score(y, pred, average="macro", zero_division=0))
    for i, cls in enumerate(classes):
        if i == c - 1:
            assert m["auc"][cls] is None
            continue
        positive = y == i
        assert m["auc"][cls] == pytest.approx(sk.roc_auc_score(positive, probs[:, i]))
        fpr, tpr, _ = sk.roc_curve(positive, probs[:, i], drop_intermediate=False)
        assert m["sens_at_spec"][cls] == pytest.approx(tpr[fpr <= 1 - 0.85 + 1e-9].max())
        tn, fp, fn, tp = sk.confusion_matrix(positive, pred == i, labels=[False, True]).ravel()
        assert m["sensitivity"][cls] == pytest.approx(tp / (tp + fn))
        assert m["specificity"][cls] == pytest.approx(tn / (tn + fp))
    assert m["macro_auc"] == pytest.approx(np.mean([sk.roc_auc_score(y == i, probs[:, i]) for i in range(c - 1)]))
    # ECE recomputed independently with numpy (on the float32 probabilities the metric keeps,
    # so that confidences like 0.60 = 9/15 fall on the same side of a bin edge)
    conf, right = probs.astype(np.float32).astype(np.float64).max(1), pred == y
    edges = np.arange(16) / 15
    ece = sum(abs(right[s].mean() - conf[s].mean()) * s.sum() / n
              for lo, hi in zip(edges[:-1], edges[1:]) if (s := (conf > lo) & (conf <= hi)).any())
    assert m["ece"] == pytest.approx(ece)
    assert m["majority_rate"] == pytest.approx(np.bincount(y).max() / n)


@pytest.mark.parametrize("value", [0, 1, 1.5])
def test_screening_specificity_must_lie_strictly_between_0_and_1(tmp_path, core_registries, value):
    config = toy_config()
    config["tasks"]["cluster"]["screening_specificity"] = value
    path = write_config(tmp_path, config)
    with pytest.raises(ConfigErrors) as err:
        load_config(path, core_registries)
    assert any(p.startswith("tasks.cluster.screening_specificity") for p in err.value.problems)
    assert str(path) in err.value.render()


def test_sensitivity_at_specificity_allows_exactly_the_target():
    from distillkit.builtin.metrics import sensitivity_at_specificity

    # 10 negatives: specificity 0.90 allows exactly one false positive (the 0.8), so the
    # threshold drops to 0.5 and catches all three positives; 0.95 allows none (0.9 only)
    scores = torch.tensor([0.1] * 9 + [0.8] + [0.9, 0.7, 0.5])
    positive = torch.tensor([False] * 10 + [True] * 3)
    assert sensitivity_at_specificity(scores, positive, 0.90) == pytest.approx(1.0)
    assert sensitivity_at_specificity(scores, positive, 0.95) == pytest.approx(1 / 3)
    assert sensitivity_at_specificity(scores, torch.zeros(13, dtype=torch.bool), 0.9) is None


def test_results_table_shows_balanced_accuracy_majority_auc_and_unseen():
    from distillkit.evaluation import summary_rows

    task = ClassificationTask("dx", ClassificationParams(hidden=0, topk=[1, 2]))
    seen, unseen = _metrics(ROWS), _metrics(ROWS, unseen_rows=[UNSEEN_ROW])
    header, rows = summary_rows({"m1": {"dx": seen}}, {"dx": task})
    assert header == ["model", "dx accuracy", "dx bal. acc", "dx majority", "dx AUC", "dx top-2"]
    assert rows == [["m1", "0.625", f"{11 / 18:.3f}", "0.375", f"{149 / 180:.3f}", "1.000"]]
    header, rows = summary_rows({"m1": {"dx": seen}, "m2": {"dx": unseen}}, {"dx": task})
    assert header[-1] == "dx unseen" and [r[-1] for r in rows] == ["0", "1"]
    assert rows[1][1:4] == [f"{5 / 9:.3f}", f"{11 / 24:.3f}", f"{3 / 9:.3f}"]
