"""Scenes: the same per seed, well formed, objects in reading order, bait scenes and the planted bias, patch labels."""

import hashlib

import numpy as np
import pytest

from shapeworld.data import patch_labels
from shapeworld.world import CELL, COLOURS, DEFAULT_BIAS, OBJECTS, SHAPES, make_scene, make_scenes


def test_vocabulary_size():
    assert len(COLOURS) >= 6 and len(SHAPES) >= 6 and len(OBJECTS) == len(COLOURS) * len(SHAPES)


def test_same_arguments_same_scene_and_pixels():
    a, b = make_scene("random", 7, 1234), make_scene("random", 7, 1234)
    assert a == b
    assert hashlib.sha1(a.image().tobytes()).digest() == hashlib.sha1(b.image().tobytes()).digest()
    assert make_scene("random", 7, 1235) != a


@pytest.mark.parametrize("split", ["train", "random", "bait"])
def test_scenes_are_well_formed(split):
    for s in make_scenes(split, 300, 5):
        objs = s.objects
        assert 1 <= len(objs) <= 4 and len(set(objs)) == len(objs)
        cells = [p.cell for p in s.placed]
        assert len(set(cells)) == len(cells)
        for p in s.placed:  # each object lies inside its own cell
            x0, y0 = (p.cell % 2) * CELL, (p.cell // 2) * CELL
            assert x0 <= p.cx - p.size / 2 and p.cx + p.size / 2 <= x0 + CELL
            assert y0 <= p.cy - p.size / 2 and p.cy + p.size / 2 <= y0 + CELL
        assert s.image().size == (64, 64)


def test_objects_listed_in_reading_order():
    s = make_scene("random", 3, 1234)
    assert [p.obj for p in sorted(s.placed, key=lambda p: p.cell)] == s.objects


def test_bait_scenes_hold_a_trigger_without_its_partner():
    for s in make_scenes("bait", 300, 9):
        triggers = [t for t, _ in DEFAULT_BIAS.pairs if t in s.objects]
        assert triggers
        assert all(DEFAULT_BIAS.partner(t) not in s.objects for t in triggers)


def test_training_scenes_carry_the_planted_bias_and_random_scenes_do_not():
    def rate(split):
        with_trigger = [s for s in make_scenes(split, 3000, 11) if DEFAULT_BIAS.pairs[0][0] in s.objects]
        return np.mean([DEFAULT_BIAS.pairs[0][1] in s.objects for s in with_trigger])

    assert rate("train") > 0.9
    assert rate("random") < 0.25


def test_patch_labels_mark_object_patches():
    s = make_scene("random", 0, 1234)
    lab = patch_labels([s], 8)[0].reshape(8, 8)
    for p in s.placed:  # the patch under each object's centre carries that object's label
        assert lab[int(p.cy) // 8, int(p.cx) // 8] == 1 + OBJECTS.index(p.obj)
    assert (lab == 0).sum() > 0
