"""CHAIR and the yes/no scores on known inputs."""

import pytest

from shapeworld.metrics import binary_scores, chair

R, B, G = ("red", "circle"), ("blue", "square"), ("green", "star")


def test_chair_hand_made():
    # caption 1: says R, B; truth R -> 1 hallucination of 2 mentions
    # caption 2: says G; truth G, B -> clean, recall 1/2
    # caption 3: says R twice; truth R -> counted once, clean
    m = chair([[R, B], [G], [R, R]], [[R], [G, B], [R]])
    assert m["chair_i"] == pytest.approx(1 / 4)
    assert m["chair_s"] == pytest.approx(1 / 3)
    assert m["recall"] == pytest.approx(3 / 4)


def test_chair_empty_caption():
    m = chair([[]], [[R]])
    assert m == {"chair_i": 0.0, "chair_s": 0.0, "recall": 0.0}


def test_binary_scores_hand_made():
    pred = [True, True, False, False, True, False]
    truth = [True, False, True, False, True, False]
    s = binary_scores(pred, truth)
    # tp=2 fp=1 fn=1 tn=2
    assert s["accuracy"] == pytest.approx(4 / 6)
    assert s["precision"] == pytest.approx(2 / 3)
    assert s["recall"] == pytest.approx(2 / 3)
    assert s["f1"] == pytest.approx(2 / 3)
    assert s["yes_ratio"] == pytest.approx(3 / 6)


def test_binary_scores_all_no():
    s = binary_scores([False, False], [True, False])
    assert s["precision"] == 0.0 and s["f1"] == 0.0 and s["accuracy"] == 0.5
