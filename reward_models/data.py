"""A data set in the field's formats: a folder of images with COCO-style annotations, POPE question files
and an object vocabulary. What the quality benchmark, the verifier's calibration and the reward model's
training read, for any data (ShapeWorld exports itself this way: `vlm-steer data shapeworld`).

Layout of a data set folder::

    images/                      the images (file names as in the annotations)
    annotations/instances.json   COCO instances: images, categories, annotations (objects per image)
    annotations/captions.json    COCO captions (optional): reference captions per image
    pope/<name>.jsonl            POPE question files (optional), one JSON object per line:
                                 {"question_id": .., "image": file name, "text": question, "label": "yes"|"no"}
    vocabulary.json              the object vocabulary (optional: default, COCO-80 with CHAIR's synonyms
                                 when the categories are COCO's, else the categories' names)
    prompts.json                 optional: {"caption": the prompt that asks for a caption,
                                            "question": a yes/no question with {} for the object}

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
COCO80 = Path(__file__).resolve().parent / "vocabularies" / "coco80.json"  # COCO's categories, CHAIR's synonyms
CAPTION_PROMPT = "Describe this image in detail."  # unless prompts.json names the data set's own
QUESTION_PROMPT = "Is there a {} in the image?"  # POPE's question (Li et al. 2023), filled with a category


class DataError(ValueError):
    """A data set file that cannot be used: the message names the file (and line) and the problem."""


def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8-sig"))  # a byte-order mark (Windows editors) is fine
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{path}: not valid UTF-8 JSON ({e})") from None


def _need(cond: bool, where, what: str) -> None:
    if not cond:
        raise DataError(f"{where}: {what}")


@dataclass
class Vocabulary:
    """Object categories and the words that mention them (CHAIR's synonym lists)."""

    names: list[str]
    synonyms: dict[str, list[str]]  # category -> words or phrases that mention it (the name included)
    template: str = "a {}"

    @classmethod
    def load(cls, path: str | Path) -> "Vocabulary":
        path = Path(path)
        spec = _read_json(path)
        _need(isinstance(spec, dict) and isinstance(spec.get("categories"), list), path,
              'expected {"template": "a {}", "categories": [{"name": ..., "synonyms": [...]}, ...]}'
              + (' (this looks like a verifier\'s objects.json)' if isinstance(spec, dict) and "phrases" in spec else ""))
        names, synonyms = [], {}
        for k, c in enumerate(spec["categories"]):
            _need(isinstance(c, dict) and isinstance(c.get("name"), str) and c["name"].strip(), path,
                  f"category {k} needs a non-empty string 'name'")
            syns = c.get("synonyms", [])
            _need(isinstance(syns, list) and all(isinstance(w, str) for w in syns), path,
                  f"category {c['name']!r}: 'synonyms' must be a list of strings")
            _need(c["name"] not in synonyms, path, f"category {c['name']!r} is listed twice")
            names.append(c["name"])
            synonyms[c["name"]] = list(dict.fromkeys(w for w in [c["name"], *syns] if w.strip()))
        owner: dict[tuple, str] = {}
        for n in names:
            for w in synonyms[n]:
                key = tuple(_words(w))
                _need(owner.setdefault(key, n) == n, path, f"{w!r} is a synonym of both {owner[key]!r} and {n!r}")
        template = spec.get("template", "a {}")
        _need(isinstance(template, str) and "{}" in template, path, f"'template' must hold {{}} (got {template!r})")
        return cls(names, synonyms, template)

    @classmethod
    def coco80(cls) -> "Vocabulary":
        """COCO's 80 categories with CHAIR's synonym lists (and their plurals): the default for photos."""
        return cls.load(COCO80)

    @classmethod
    def from_names(cls, names: list[str], template: str = "a {}") -> "Vocabulary":
        return cls(list(names), {n: [n] for n in names}, template)

    def save(self, path: str | Path) -> None:
        cats = [{"name": n, "synonyms": self.synonyms[n]} for n in self.names]
        Path(path).write_text(json.dumps({"template": self.template, "categories": cats}, indent=1))

    def verifier_spec(self) -> dict:
        """The verifier's ``objects.json``: its phrases are the category names; the synonyms (beyond the name
        itself) are what grounding reports match in generated text."""
        syn = {n: [w for w in self.synonyms[n] if w != n] for n in self.names}
        return {"phrases": self.names, "template": self.template, **({"synonyms": syn} if any(syn.values()) else {})}

    def mentions(self, text: str) -> list[str]:
        """The categories a text mentions, in order of appearance: whole-word matches of each category's
        synonyms, the longest first (so "hot dog" is not also a "dog"), case-insensitive
        (``reward_models.grounding.MentionFinder``, which also gives their offsets)."""
        from reward_models.grounding import MentionFinder

        return [m.object for m in MentionFinder(self.names, self.synonyms)(text)]


def _default_vocabulary(categories: list[str]) -> Vocabulary:
    """Without a vocabulary.json: COCO-80 with CHAIR's synonyms when the categories are COCO's (photos), else
    the category names alone."""
    coco = Vocabulary.coco80()
    if set(categories) <= set(coco.names):
        return coco
    return Vocabulary.from_names(categories)


def _words(text: str) -> list[str]:
    """Lower-case words; apostrophes and hyphens split ("dog's" -> dog s, "Hot-Dog" -> hot dog), as
    CHAIR's tokenizer splits off possessives."""
    return re.findall(r"[^\W_]+", text.lower())


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
        """Read and check a data set folder; ``DataError`` names the file and the problem."""
        from pycocotools.coco import COCO

        root = Path(root)
        if not (root / INSTANCES).exists():
            raise DataError(f"{root} is not a data set folder: {root / INSTANCES} does not exist")
        inst = _read_json(root / INSTANCES)
        _need(isinstance(inst, dict) and all(isinstance(inst.get(k), list) for k in ("images", "categories", "annotations")),
              root / INSTANCES, "COCO instances need 'images', 'categories' and 'annotations' lists")
        for k, im in enumerate(inst["images"]):
            _need(isinstance(im, dict) and "id" in im and isinstance(im.get("file_name"), str), root / INSTANCES,
                  f"image {k} needs an 'id' and a 'file_name'")
        for k, c in enumerate(inst["categories"]):
            _need(isinstance(c, dict) and "id" in c and isinstance(c.get("name"), str), root / INSTANCES,
                  f"category {k} needs an 'id' and a 'name'")
        image_ids = {im["id"] for im in inst["images"]}
        cat_ids = {c["id"] for c in inst["categories"]}
        for k, a in enumerate(inst["annotations"]):
            _need(isinstance(a, dict) and a.get("image_id") in image_ids, root / INSTANCES,
                  f"annotation {k} names image_id {a.get('image_id') if isinstance(a, dict) else a!r}, not among the images")
            _need(a.get("category_id") in cat_ids, root / INSTANCES,
                  f"annotation {k} names category_id {a.get('category_id')!r}, not among the categories")
        coco = _quiet(lambda: COCO(str(root / INSTANCES)))
        ids = sorted(coco.getImgIds())
        files = {i: coco.imgs[i]["file_name"] for i in ids}
        dup = {f for f in files.values() if list(files.values()).count(f) > 1}
        _need(not dup, root / INSTANCES, f"file names used by several images: {sorted(dup)[:3]}")
        missing = [f for f in files.values() if not (root / "images" / f).is_file()]
        _need(not missing, root / "images", f"{len(missing)} image file(s) of instances.json missing, e.g. {missing[:3]}")
        names = {c["id"]: c["name"] for c in coco.loadCats(coco.getCatIds())}
        objects = {i: {names[a["category_id"]] for a in coco.loadAnns(coco.getAnnIds(imgIds=[i]))} for i in ids}
        captions: dict[int, list[str]] = {i: [] for i in ids}
        if (root / CAPTIONS).exists():
            caps = _read_json(root / CAPTIONS)
            _need(isinstance(caps, dict) and isinstance(caps.get("annotations"), list), root / CAPTIONS,
                  "COCO captions need an 'annotations' list")
            for k, a in enumerate(caps["annotations"]):
                _need(isinstance(a, dict) and a.get("image_id") in captions and isinstance(a.get("caption"), str),
                      root / CAPTIONS, f"annotation {k} needs an image_id of instances.json and a 'caption' string")
                captions[a["image_id"]].append(a["caption"])
        by_file = {f: i for i, f in files.items()}
        pope = {}
        for f in sorted((root / POPE_DIR).glob("*.jsonl")) if (root / POPE_DIR).exists() else []:
            pope[f.stem] = _pope_file(f, by_file)
        vocab = (Vocabulary.load(root / VOCABULARY) if (root / VOCABULARY).exists()
                 else _default_vocabulary([names[k] for k in sorted(names)]))
        unknown = sorted(set(names.values()) - set(vocab.names))
        _need(not unknown, root / VOCABULARY, f"categories of instances.json missing from the vocabulary (they could "
                                              f"never be mentioned, lowering recall): {unknown[:5]}")
        prompts = _read_json(root / PROMPTS) if (root / PROMPTS).exists() else {}
        _need(isinstance(prompts, dict) and all(isinstance(v, str) for v in prompts.values()), root / PROMPTS,
              'expected {"caption": "the prompt that asks for a caption", "question": "is there a {} ?"}')
        _need("{}" in prompts.get("question", "{}"), root / PROMPTS, "'question' must hold {} (where the object goes)")
        return cls(root, files, objects, captions, pope, vocab, prompts, by_file)

    @property
    def image_ids(self) -> list[int]:
        return list(self.files)

    def image(self, image_id: int) -> Image.Image:
        path = self.root / "images" / self.files[image_id]
        try:
            return Image.open(path).convert("RGB")
        except (OSError, Image.DecompressionBombError) as e:
            raise DataError(f"{path}: not a readable image ({e})") from None

    def image_by_file(self, file_name: str) -> Image.Image:
        return self.image(self._by_file[file_name])

    def image_id(self, file_name: str) -> int:
        return self._by_file[file_name]

    @property
    def caption_prompt(self) -> str:
        return self.prompts.get("caption", CAPTION_PROMPT)

    @property
    def question_prompt(self) -> str:
        """A yes/no question about one object, ``{}`` filled with its category name."""
        return self.prompts.get("question", QUESTION_PROMPT)

    def sample_images(self, n: int, seed: int) -> tuple[list[Image.Image], str]:
        """``n`` images drawn with ``seed`` (each once while the data set lasts) and the caption prompt: the
        requests of the load and speed benchmarks."""
        import random

        ids = list(self.image_ids)
        random.Random(seed).shuffle(ids)
        return [self.image(ids[k % len(ids)]) for k in range(n)], self.caption_prompt


def _label(value) -> bool:
    v = str(value).strip().lower()
    if v not in ("yes", "no", "true", "false", "1", "0"):
        raise ValueError(f"label {value!r} is neither yes nor no")
    return v in ("yes", "true", "1")


def _pope_file(path: Path, by_file: dict[str, int]) -> list[PopeQuestion]:
    """A POPE question file: one JSON object per line (blank lines skipped)."""
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 ({e})") from None
    out = []
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            q = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: not a JSON object ({e.msg})") from None
        _need(isinstance(q, dict) and isinstance(q.get("image"), str) and isinstance(q.get("text"), str) and "label" in q,
              where, 'expected {"question_id": .., "image": file name, "text": question, "label": "yes"|"no"}')
        _need(q["image"] in by_file, where, f"image {q['image']!r} is not in instances.json")
        try:
            label = _label(q["label"])
        except ValueError as e:
            raise DataError(f"{where}: {e}") from None
        out.append(PopeQuestion(q.get("question_id", n), q["image"], q["text"], label))
    _need(bool(out), path, "no questions")
    seen: dict[tuple, bool] = {}
    for q in out:
        _need(seen.setdefault((q.image, q.text), q.label) == q.label, path,
              f"{q.image!r} {q.text!r} is labelled both yes and no")
    return out


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
