"""A data set in the field's formats: a folder of images with COCO-style annotations, POPE question files
and an object vocabulary. What the quality benchmark, the verifier's calibration and the reward model's
training read, for any data (ShapeWorld exports itself this way: `vlm-steer data shapeworld`).

Layout of a data set folder::

    images/                      the images (file names as in the annotations)
    annotations/instances.json   COCO instances: images, categories, annotations (objects per image)
    annotations/captions.json    COCO captions (optional): reference captions per image
    pope/<name>.jsonl            POPE question files (optional), one JSON object per line:
                                 {"question_id": .., "image": file name, "text": question, "label": "yes"|"no"}
    vocabulary.json              the object vocabulary (optional: default, the categories' names)
    prompts.json                 optional: {"caption": the prompt that asks for a caption}

The vocabulary (``vocabulary.json``): ``{"template": "a {}", "categories": [{"name": "dog", "synonyms":
["dog", "puppy", ...]}, ...]}``: the words by which a caption mentions each category, as CHAIR (Rohrbach
et al. 2018) matches them, and the phrase the verifier scores (``template`` filled with the name).
COCO is read with pycocotools.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

INSTANCES = "annotations/instances.json"
CAPTIONS = "annotations/captions.json"
POPE_DIR = "pope"
VOCABULARY = "vocabulary.json"
PROMPTS = "prompts.json"


@dataclass
class Vocabulary:
    """Object categories and the words that mention them (CHAIR's synonym lists)."""

    names: list[str]
    synonyms: dict[str, list[str]]  # category -> words or phrases that mention it (the name included)
    template: str = "a {}"

    @classmethod
    def load(cls, path: str | Path) -> "Vocabulary":
        spec = json.loads(Path(path).read_text())
        cats = spec["categories"]
        return cls([c["name"] for c in cats], {c["name"]: list(dict.fromkeys([c["name"], *c.get("synonyms", [])]))
                                               for c in cats}, spec.get("template", "a {}"))

    @classmethod
    def from_names(cls, names: list[str], template: str = "a {}") -> "Vocabulary":
        return cls(list(names), {n: [n] for n in names}, template)

    def save(self, path: str | Path) -> None:
        cats = [{"name": n, "synonyms": self.synonyms[n]} for n in self.names]
        Path(path).write_text(json.dumps({"template": self.template, "categories": cats}, indent=1))

    def verifier_spec(self) -> dict:
        """The verifier's ``objects.json`` (its phrases are the category names)."""
        return {"phrases": self.names, "template": self.template}

    def mentions(self, text: str) -> list[str]:
        """The categories a text mentions, in order of appearance: whole-word matches of each category's
        synonyms, the longest first (so "hot dog" is not also a "dog"), case-insensitive."""
        words = _words(text)
        table = sorted(((tuple(_words(s)), n) for n, syns in self.synonyms.items() for s in syns),
                       key=lambda t: -len(t[0]))
        found, i = [], 0
        while i < len(words):
            for seq, name in table:
                if seq and tuple(words[i : i + len(seq)]) == seq:
                    found.append(name)
                    i += len(seq)
                    break
            else:
                i += 1
        return found


def _words(text: str) -> list[str]:
    return re.findall(r"[\w'-]+", text.lower())


@dataclass(frozen=True)
class PopeQuestion:
    question_id: int | str
    image: str  # file name
    text: str
    label: bool  # True: "yes"


@dataclass
class DataSet:
    """A data set folder (see the module's docstring), read once."""

    root: Path
    files: dict[int, str]  # image id -> file name
    objects: dict[int, set[str]]  # image id -> category names present
    captions: dict[int, list[str]]
    pope: dict[str, list[PopeQuestion]]
    vocabulary: Vocabulary
    prompts: dict[str, str] = field(default_factory=dict)
    _by_file: dict[str, int] = field(default_factory=dict)

    @classmethod
    def load(cls, root: str | Path) -> "DataSet":
        from pycocotools.coco import COCO

        root = Path(root)
        if not (root / INSTANCES).exists():
            raise FileNotFoundError(f"{root} is not a data set folder: {root / INSTANCES} does not exist")
        coco = _quiet(lambda: COCO(str(root / INSTANCES)))
        ids = sorted(coco.getImgIds())
        files = {i: coco.imgs[i]["file_name"] for i in ids}
        names = {c["id"]: c["name"] for c in coco.loadCats(coco.getCatIds())}
        objects = {i: {names[a["category_id"]] for a in coco.loadAnns(coco.getAnnIds(imgIds=[i]))} for i in ids}
        captions: dict[int, list[str]] = {i: [] for i in ids}
        if (root / CAPTIONS).exists():
            caps = _quiet(lambda: COCO(str(root / CAPTIONS)))
            for a in caps.dataset.get("annotations", []):
                captions.setdefault(a["image_id"], []).append(a["caption"])
        pope = {}
        for f in sorted((root / POPE_DIR).glob("*.jsonl")) if (root / POPE_DIR).exists() else []:
            pope[f.stem] = [PopeQuestion(q.get("question_id", k), q["image"], q["text"], _label(q["label"]))
                            for k, line in enumerate(f.read_text().splitlines()) if line.strip()
                            for q in [json.loads(line)]]
        vocab = (Vocabulary.load(root / VOCABULARY) if (root / VOCABULARY).exists()
                 else Vocabulary.from_names([names[k] for k in sorted(names)]))
        prompts = json.loads((root / PROMPTS).read_text()) if (root / PROMPTS).exists() else {}
        return cls(root, files, objects, captions, pope, vocab, prompts, {f: i for i, f in files.items()})

    @property
    def image_ids(self) -> list[int]:
        return list(self.files)

    def image(self, image_id: int) -> Image.Image:
        return Image.open(self.root / "images" / self.files[image_id]).convert("RGB")

    def image_by_file(self, file_name: str) -> Image.Image:
        return self.image(self._by_file[file_name])


def _label(value) -> bool:
    v = str(value).strip().lower()
    if v not in ("yes", "no", "true", "false", "1", "0"):
        raise ValueError(f"POPE label {value!r} is neither yes nor no")
    return v in ("yes", "true", "1")


def _quiet(fn):
    """pycocotools prints progress to stdout; a benchmark's output is its table."""
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()):
        return fn()


def write_dataset(root: str | Path, images: list[tuple[str, Image.Image]], objects: list[list[str]],
                  captions: list[list[str]], vocabulary: Vocabulary, pope: dict[str, list[dict]] | None = None,
                  prompts: dict[str, str] | None = None) -> Path:
    """Write a data set folder: ``images`` (file name, image), per image its category names and reference
    captions, the vocabulary and POPE question files (name -> questions with image, text, label)."""
    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "annotations").mkdir(exist_ok=True)
    cat_id = {n: k + 1 for k, n in enumerate(vocabulary.names)}
    imgs, anns, caps = [], [], []
    for i, ((name, img), objs, refs) in enumerate(zip(images, objects, captions, strict=True), start=1):
        img.save(root / "images" / name)
        imgs.append({"id": i, "file_name": name, "width": img.width, "height": img.height})
        for o in objs:
            anns.append({"id": len(anns) + 1, "image_id": i, "category_id": cat_id[o], "bbox": [0, 0, 0, 0],
                         "area": 0, "iscrowd": 0})
        caps += [{"id": len(caps) + 1, "image_id": i, "caption": c} for c in refs]
    cats = [{"id": cat_id[n], "name": n, "supercategory": "object"} for n in vocabulary.names]
    (root / INSTANCES).write_text(json.dumps({"images": imgs, "annotations": anns, "categories": cats}))
    (root / CAPTIONS).write_text(json.dumps({"images": imgs, "annotations": caps}))
    vocabulary.save(root / VOCABULARY)
    if prompts:
        (root / PROMPTS).write_text(json.dumps(prompts))
    if pope:
        (root / POPE_DIR).mkdir(exist_ok=True)
        for name, qs in pope.items():
            lines = [json.dumps({"question_id": k, "image": q["image"], "text": q["text"],
                                 "label": "yes" if q["label"] else "no"}) for k, q in enumerate(qs)]
            (root / POPE_DIR / f"{name}.jsonl").write_text("\n".join(lines) + "\n")
    return root
