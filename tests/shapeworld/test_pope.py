"""POPE question sampling (random, popular, adversarial) of ShapeWorld scenes."""

from collections import Counter

from shapeworld.pope import MAX_POSITIVES, SAMPLINGS, questions_for, training_statistics
from shapeworld.world import DEFAULT_BIAS, make_scenes


def test_questions_balanced_and_true_to_the_scene():
    for s in make_scenes("random", 100, 1234):
        for name in SAMPLINGS:
            qs = questions_for(s, name)
            pos = [q for q in qs if q.answer]
            neg = [q for q in qs if not q.answer]
            assert len(pos) == len(neg) == min(len(s.objects), MAX_POSITIVES)
            assert all(q.obj in s.objects for q in pos)
            assert all(q.obj not in s.objects for q in neg)
            assert len({q.obj for q in neg}) == len(neg)


def test_adversarial_asks_for_the_missing_partner_on_bait_scenes():
    for s in make_scenes("bait", 100, 1234):
        trig = next(t for t, _ in DEFAULT_BIAS.pairs if t in s.objects)
        neg = [q.obj for q in questions_for(s, "adversarial") if not q.answer]
        assert DEFAULT_BIAS.partner(trig) in neg


def test_popular_prefers_frequent_objects():
    stats = training_statistics()
    top = {i for i in stats.frequency.argsort()[::-1][:6]}
    from shapeworld.world import OBJECTS

    counts = Counter(OBJECTS.index(q.obj) for s in make_scenes("random", 50, 1234)
                     for q in questions_for(s, "popular") if not q.answer)
    assert sum(c for i, c in counts.items() if i in top) / sum(counts.values()) > 0.8


def test_deterministic():
    s = make_scenes("random", 1, 4321)[0]
    assert questions_for(s, "random") == questions_for(s, "random")
