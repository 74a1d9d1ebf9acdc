"""The VLM trainer's grounding loss: which object lies under each image slot, read from the projector."""

import math

import torch
from transformers import AutoModelForImageTextToText

from shapeworld.data import patch_labels
from shapeworld.models import MODELS_DIR
from shapeworld.train_vlm import grounding_loss
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
