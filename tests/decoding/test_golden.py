"""Golden greedy outputs per steering method on fixed scenes (regenerate with tests/make_golden.py)."""

import json

from tests.make_golden import GOLDEN, compute


def test_golden_greedy_outputs(steering_engine):
    expected = json.loads(GOLDEN.read_text())
    got = compute(steering_engine)
    for method, texts in expected.items():
        assert got[method] == texts, method
