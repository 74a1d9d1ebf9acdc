"""Grounding reports: mentions and offsets on fixed texts, verdicts by the thresholds, counts."""

from reward_models.grounding import MentionFinder, report, verdict


def test_mentions_and_offsets_with_synonyms_longest_first():
    f = MentionFinder(["dog", "hot dog", "person"], {"person": ["man", "people"], "dog": ["puppy", "dogs"]})
    text = "A man eats a Hot-Dog; two dogs and a puppy's ball. Dogma is no dog."
    got = [(m.object, m.text, m.start, m.end) for m in f(text)]
    assert got == [("person", "man", 2, 5), ("hot dog", "Hot-Dog", 13, 20), ("dog", "dogs", 26, 30),
                   ("dog", "puppy", 37, 42), ("dog", "dog", 63, 66)]
    for _, t, s, e in got:
        assert text[s:e] == t


def test_two_word_phrases_as_shapeworld_mentions_them():
    f = MentionFinder(["red circle", "blue square", "red square"])
    text = "a red circle and a blue square ."
    assert [(m.object, m.start, m.end) for m in f(text)] == [("red circle", 2, 12), ("blue square", 19, 30)]
    assert f("the red and the circle") == []  # not adjacent: no mention
    assert f("") == []


def test_verdicts_and_counts_per_object():
    f = MentionFinder(["red circle", "blue square", "green star"])
    scores = {"red circle": 2.0, "blue square": -0.5, "green star": 1.1}
    r = report("a red circle , a blue square , a blue square and a green star .", scores, f, low=0.9, high=1.3)
    assert [m["verdict"] for m in r["mentions"]] == ["grounded", "suspect", "suspect", "unsure"]
    assert r["counts"] == {"mentions": 4, "grounded": 1, "unsure": 1, "suspect": 2, "objects": 3, "suspect_objects": 1,
                           "unsure_objects": 1}
    assert report("nothing here .", scores, f, 0.9, 1.3) == {
        "mentions": [], "counts": {"mentions": 0, "grounded": 0, "unsure": 0, "suspect": 0, "objects": 0, "suspect_objects": 0, "unsure_objects": 0}}
    assert verdict(0.9, 0.9, 1.3) == "suspect" and verdict(1.3, 0.9, 1.3) == "grounded"
