"""The verifier's calibration from labelled data sets: the embedded verifier's committed thresholds are
reproduced through the exported ShapeWorld scenes, and any dual encoder (SigLIP here) calibrates on any
data set folder."""

import json
import shutil

import pytest
from PIL import Image

from reward_models.data import Vocabulary, write_dataset
from decoding.verifier import Verifier
from server.cli import main
from shapeworld.models import MODELS_DIR
from tests.families import build_verifier

THRESHOLDS = ("low", "high", "group_low", "group_high")


def test_embedded_calibration_is_reproduced_through_exported_scenes(tmp_path):
    v = tmp_path / "verifier"
    shutil.copytree(MODELS_DIR / "verifier", v)
    (v / "calibration.json").unlink()
    main(["train", "calibrate", "--out", str(tmp_path)])
    got = json.loads((v / "calibration.json").read_text())
    want = json.loads((MODELS_DIR / "verifier" / "calibration.json").read_text())
    assert {k: got[k] for k in THRESHOLDS} == pytest.approx({k: want[k] for k in THRESHOLDS}, abs=1e-6)
    assert json.loads((v / "objects.json").read_text()) == json.loads((MODELS_DIR / "verifier" / "objects.json").read_text())


def test_any_dual_encoder_calibrates_on_a_data_set(tmp_path):
    v = build_verifier("siglip", tmp_path / "siglip")
    colours = {"red": (220, 40, 40), "blue": (50, 90, 235), "green": (40, 180, 60)}
    names = [f"{c} square" for c in colours] + [f"{c} circle" for c in colours]
    images, objects = [], []
    for k in range(12):
        c = list(colours)[k % 3]
        images.append((f"{k}.png", Image.new("RGB", (32, 32), colours[c])))
        objects.append([f"{c} square"])
    data = write_dataset(tmp_path / "data", images, objects, [[o[0]] for o in objects], Vocabulary.from_names(names))
    main(["train", "calibrate", "--verifier", str(v), "--data", str(data)])
    cal = json.loads((v / "calibration.json").read_text())
    assert set(THRESHOLDS) <= set(cal) and cal["n_images"] == 12
    verifier = Verifier(v)  # loads with the vocabulary and calibration it was given, and rewards
    assert verifier.calibrated and verifier.phrases == names
    assert verifier.rewards([images[0][1]]).shape == (1, len(names))
