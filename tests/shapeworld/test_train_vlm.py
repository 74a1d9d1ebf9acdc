"""The VLM trainer's grounding loss (which object lies under each image slot, read from the projector) and
its yes/no questions (cross negatives, answers that name the near misses)."""

import math
from types import SimpleNamespace

import numpy as np
import torch
from transformers import AutoModelForImageTextToText

from shapeworld.data import patch_labels
from shapeworld.models import MODELS_DIR
from shapeworld.text import YES, no_answer, parse_yes_no, question
from shapeworld.train_vlm import VLMTrainConfig, grounding_loss, sample_question
from shapeworld.world import OBJECTS, make_scenes


def test_grounding_loss_targets_every_slot_with_one_class_per_object_and_background():
    model = AutoModelForImageTextToText.from_pretrained(MODELS_DIR / "vlm")
    scenes = make_scenes("random", 3, 1234)
    labels = torch.from_numpy(patch_labels(scenes, model.config.vision_config.patch_size))
    assert labels.shape == (3, model.config.image_seq_length)
    assert set(labels.unique().tolist()) - {0} == {1 + OBJECTS.index(o) for s in scenes for o in s.objects}
    probe = torch.nn.Linear(model.config.text_config.hidden_size, len(OBJECTS) + 1)
    torch.nn.init.zeros_(probe.weight)
    torch.nn.init.zeros_(probe.bias)
    feats = torch.randn(3, model.config.image_seq_length, model.config.vision_config.hidden_size)
    assert math.isclose(grounding_loss(model, probe, feats, labels).item(), math.log(len(OBJECTS) + 1), rel_tol=1e-5)


def test_a_no_names_the_present_objects_that_share_the_asked_colour_or_shape():
    scene = [("red", "square"), ("blue", "circle"), ("green", "star")]
    assert no_answer(("red", "circle"), scene) == "no , there is a red square and a blue circle ."
    assert no_answer(("purple", "star"), scene) == "no , there is a green star ."
    assert no_answer(("yellow", "cross"), scene) == "no"
    assert parse_yes_no(no_answer(("red", "circle"), scene)) is False


def test_negative_questions_ask_about_cross_objects_when_the_scene_allows_one():
    objs = [("red", "square"), ("blue", "circle")]
    scene = SimpleNamespace(objects=objs)  # all sample_question reads of a scene
    cfg = VLMTrainConfig(cross_negative_fraction=1.0, explain_no=True)
    rng = np.random.default_rng(0)
    asked = dict(sample_question(scene, rng, cfg) for _ in range(200))
    assert set(asked) == {question(o) for o in objs + [("red", "circle"), ("blue", "square")]}
    assert asked[question(("red", "circle"))] == "no , there is a red square and a blue circle ."
    assert asked[question(("red", "square"))] == YES
