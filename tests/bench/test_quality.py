"""The quality benchmark on data set folders in the field's formats: ShapeWorld exported by
`vlm-steer data shapeworld` reproduces the figures of the benchmark before it read files (golden, computed
by that code on the same scenes; the TITA entries recomputed through the files when the label-free reward
model replaced the labelled one, none/FiSAO/VCD unchanged), and the readers handle COCO and POPE files as the field writes them."""

import json
from pathlib import Path

import pytest

from reward_models.data import DataSet, Vocabulary, write_dataset
from bench.quality import run_quality
from server.cli import main

GOLDEN = json.loads((Path(__file__).parents[1] / "golden_quality.json").read_text())


@pytest.mark.parametrize("split", ["random", "bait"])
def test_exported_shapeworld_reproduces_the_direct_benchmark(steering_engine, tmp_path, split):
    main(["data", "shapeworld", "--split", split, "--n", "24", "--seed", "4321", "--out", str(tmp_path / split)])
    data = DataSet.load(tmp_path / split)
    assert len(data.image_ids) == 24 and set(data.pope) == {"random", "popular", "adversarial"}
    engine = steering_engine if steering_engine.name == "transformers" else _transformers()  # the golden's engine
    rep = run_quality(engine, data, ["none", "tita", "fisao", "tita+fisao", "vcd"], batch=32)
    for m, want in GOLDEN[split].items():
        got = rep["methods"][m]
        assert {k: got[k] for k in ("chair_i", "chair_s", "recall")} == {k: want[k] for k in ("chair_i", "chair_s", "recall")}, m
        assert got["pope"] == want["pope"], m


def _transformers():
    from decoding.transformers_engine import TransformersEngine
    from shapeworld.models import MODELS_DIR

    return TransformersEngine(MODELS_DIR / "vlm", reward_path=MODELS_DIR / "reward", verifier_path=MODELS_DIR / "verifier")


def test_vocabulary_mentions_with_synonyms():
    v = Vocabulary(["dog", "hot dog", "person"], {"dog": ["dog", "puppy"], "hot dog": ["hot dog"],
                                                 "person": ["person", "man", "woman", "people"]})
    assert v.mentions("A man and a puppy eat a hot dog; the Dog barks.") == ["person", "dog", "hot dog", "dog"]
    assert v.mentions("doggy mannequin") == []  # whole words only


def test_coco_and_pope_files_as_the_field_writes_them(tmp_path):
    from PIL import Image

    root = write_dataset(tmp_path / "d", [("a.jpg", Image.new("RGB", (8, 8))), ("b.jpg", Image.new("RGB", (8, 8)))],
                         [["dog"], ["dog", "person"]], [["a dog"], ["a man with a dog"]],
                         Vocabulary.from_names(["dog", "person"]),
                         {"coco_pope_random": [{"image": "a.jpg", "text": "Is there a dog in the image?", "label": True},
                                               {"image": "b.jpg", "text": "Is there a cat in the image?", "label": False}]})
    # POPE's own files name the label "yes"/"no" and may omit question ids
    (root / "pope" / "extra.jsonl").write_text(json.dumps({"image": "a.jpg", "text": "Is there a person?", "label": "no"}) + "\n")
    d = DataSet.load(root)
    assert d.objects == {1: {"dog"}, 2: {"dog", "person"}} and d.captions[2] == ["a man with a dog"]
    assert [q.label for q in d.pope["coco_pope_random"]] == [True, False] and d.pope["extra"][0].label is False
    assert d.image_by_file("b.jpg").size == (8, 8)
    (root / "pope" / "bad.jsonl").write_text(json.dumps({"image": "a.jpg", "text": "?", "label": "maybe"}) + "\n")
    with pytest.raises(ValueError, match="neither yes nor no"):
        DataSet.load(root)
    with pytest.raises(ValueError, match="not a data set folder"):  # a DataError
        DataSet.load(tmp_path)


def test_bench_quality_on_a_data_folder_with_another_family(tmp_path):
    """`bench quality --model DIR --data FOLDER` for a non-LLaVA family (a tiny Qwen2.5-VL with its own
    reward model and verifier): every method runs and the report has CHAIR and each POPE file."""
    from tests.families import build_set

    paths = build_set("qwen2_5_vl", tmp_path / "qwen")
    main(["data", "shapeworld", "--split", "bait", "--n", "4", "--seed", "4321", "--out", str(tmp_path / "data")])
    out = tmp_path / "q.json"
    main(["bench", "quality", "--model", str(paths["model"]), "--reward-model", str(paths["reward"]),
          "--verifier", str(paths["verifier"]), "--data", str(tmp_path / "data"),
          "--methods", "none,tita,fisao,vcd", "--json", str(out)])
    rep = json.loads(out.read_text())
    assert rep["n"] == 4 and rep["model"] == str(paths["model"])
    for m in ("none", "tita", "fisao", "vcd"):
        r = rep["methods"][m]
        assert 0 <= r["chair_i"] <= 1 and set(r["pope"]) == {"random", "popular", "adversarial"}
