"""Data set folders as users write them: every malformed file is a DataError naming the file (and line)
and the problem, found at load time; CHAIR's word matching; the CLI's one-line message."""

import json

import pytest
from PIL import Image

from reward_models.data import DataError, DataSet, Vocabulary, write_dataset
from server.cli import main


@pytest.fixture
def folder(tmp_path):
    root = write_dataset(tmp_path / "d", [("a.jpg", Image.new("RGB", (8, 8))), ("b.png", Image.new("RGB", (8, 8)))],
                         [["dog"], ["dog", "hot dog"]], [["a dog"], ["a dog and a hot dog"]],
                         Vocabulary(["dog", "hot dog"], {"dog": ["dog", "puppy"], "hot dog": ["hot dog"]}),
                         {"coco_pope_random": [{"image": "a.jpg", "text": "Is there a dog?", "label": True}]})
    DataSet.load(root)  # valid as written
    return root


def _edit_json(path, fn):
    data = json.loads(path.read_text())
    fn(data)
    path.write_text(json.dumps(data))


CASES = {
    "unknown category id": ("annotations/instances.json", lambda d: d["annotations"][0].update(category_id=99), "category_id 99"),
    "unknown image id": ("annotations/instances.json", lambda d: d["annotations"][0].update(image_id=77), "image_id 77"),
    "no categories": ("annotations/instances.json", lambda d: d.pop("categories"), "'categories'"),
    "image without file_name": ("annotations/instances.json", lambda d: d["images"][0].pop("file_name"), "file_name"),
    "same file twice": ("annotations/instances.json", lambda d: d["images"][1].update(file_name="a.jpg"), "several images"),
    "caption without text": ("annotations/captions.json", lambda d: d["annotations"][0].pop("caption"), "'caption'"),
    "vocabulary category without name": ("vocabulary.json", lambda d: d["categories"][0].pop("name"), "'name'"),
    "synonyms as a string": ("vocabulary.json", lambda d: d["categories"][0].update(synonyms="puppy"), "list of strings"),
    "synonym in two categories": ("vocabulary.json", lambda d: d["categories"][1].update(synonyms=["puppy"]), "both"),
    "template without {}": ("vocabulary.json", lambda d: d.update(template="a photo"), "template"),
    "vocabulary missing a category": ("vocabulary.json", lambda d: d["categories"].pop(1), "missing from the vocabulary"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_malformed_json_files_are_clear_errors(folder, case):
    name, fn, match = CASES[case]
    _edit_json(folder / name, fn)
    with pytest.raises(DataError, match=match) as e:
        DataSet.load(folder)
    assert name.split("/")[-1] in str(e.value)


@pytest.mark.parametrize("line,match", [
    ('{"image": "a.jpg", "text": "Is there a cat?", "label": "maybe"}', "neither yes nor no"),
    ('{"image": "a.jpg", "text": "Is there a cat?"}', "expected"),
    ('{"image": "zzz.jpg", "text": "Is there a cat?", "label": "no"}', "not in instances.json"),
    ('["a.jpg", "Is there a cat?", "no"]', "expected"),
    ('{"image": "a.jpg", "text": ', "not a JSON object"),
    ('{"image": "a.jpg", "text": "Is there a dog?", "label": "no"}', "both yes and no"),
])
def test_malformed_pope_lines_name_file_and_line(folder, line, match):
    f = folder / "pope" / "coco_pope_random.jsonl"
    f.write_text(f.read_text() + "\n" + line + "\n")
    with pytest.raises(DataError, match=match) as e:
        DataSet.load(folder)
    assert "coco_pope_random.jsonl" in str(e.value)


def test_files_the_field_writes_are_accepted(folder):
    f = folder / "pope" / "coco_pope_random.jsonl"
    f.write_bytes("\ufeff".encode() + f.read_bytes().replace(b"\n", b"\r\n"))  # a BOM and CRLF (Windows)
    (folder / "pope" / "more.jsonl").write_text('{"image": "b.png", "text": "Is there a cat?", "label": "No"}\n\n')
    d = DataSet.load(folder)
    assert d.pope["coco_pope_random"][0].label is True and d.pope["more"][0].label is False


def test_missing_or_unreadable_images_and_empty_pope_files(folder):
    (folder / "pope" / "empty.jsonl").write_text("\n")
    with pytest.raises(DataError, match="no questions"):
        DataSet.load(folder)
    (folder / "pope" / "empty.jsonl").unlink()
    (folder / "images" / "b.png").write_bytes(b"not an image")
    with pytest.raises(DataError, match="not a readable image"):
        DataSet.load(folder).image(2)
    (folder / "images" / "b.png").unlink()
    with pytest.raises(DataError, match="missing"):
        DataSet.load(folder)


def test_chair_matching_splits_possessives_and_hyphens():
    v = Vocabulary(["dog", "hot dog", "car"], {"dog": ["dog", "dogs"], "hot dog": ["hot dog"], "car": ["car"]})
    assert v.mentions("the dog's tail, a Hot-Dog, a car's door, dogs' bowls") == ["dog", "hot dog", "car", "dog"]
    assert v.mentions("hotdogs on a carpet") == []


def test_the_cli_says_what_is_wrong_in_one_line(folder, capsys):
    _edit_json(folder / "annotations/instances.json", lambda d: d["annotations"][0].update(category_id=99))
    with pytest.raises(SystemExit) as e:
        main(["bench", "quality", "--data", str(folder), "--methods", "none"])
    assert str(e.value).startswith("vlm-steer: ") and "category_id 99" in str(e.value) and "\n" not in str(e.value)


def test_calibration_without_labelled_vocabulary_objects_changes_nothing(folder, tmp_path):
    from tests.families import build_verifier

    v = build_verifier("siglip", tmp_path / "v")
    main(["train", "calibrate", "--verifier", str(v), "--data", str(folder)])
    before = {f: (v / f).read_text() for f in ("objects.json", "calibration.json")}
    other = tmp_path / "vocab.json"
    Vocabulary.from_names(["cat", "bird"]).save(other)
    with pytest.raises(SystemExit, match="nothing to calibrate on"):
        main(["train", "calibrate", "--verifier", str(v), "--data", str(folder), "--vocabulary", str(other)])
    assert {f: (v / f).read_text() for f in before} == before
    assert json.loads(before["calibration.json"])["data"] == [str(folder)]


def test_coco_categories_default_to_coco80_with_chairs_synonyms(tmp_path):
    """A COCO folder without vocabulary.json: COCO-80 with CHAIR's synonym lists (plurals included)."""
    from PIL import Image

    from reward_models.data import DataSet, Vocabulary, write_dataset

    root = write_dataset(tmp_path / "coco", [("1.jpg", Image.new("RGB", (8, 8)))], [["dog", "dining table"]],
                         [["a puppy under a table"]], Vocabulary.from_names(["dog", "dining table", "person"]))
    (root / "vocabulary.json").unlink()
    v = DataSet.load(root).vocabulary
    assert len(v.names) == 80 and v.template == "a photo of a {}"
    assert v.mentions("Two men and a woman watch puppies near the desk; a motor bike, hot dogs.") == \
        ["person", "person", "dog", "dining table", "motorcycle", "hot dog"]
    other = write_dataset(tmp_path / "other", [("1.jpg", Image.new("RGB", (8, 8)))], [["widget"]], [["a widget"]],
                          Vocabulary.from_names(["widget"]))
    (other / "vocabulary.json").unlink()
    assert DataSet.load(other).vocabulary.names == ["widget"]  # not COCO's categories: their names
