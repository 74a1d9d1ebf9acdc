"""The serving, decoding and training code does not depend on ShapeWorld, the project's test world (issue
19): `server/`, `decoding/` and `reward_models/` import nothing from `shapeworld/`; the CLI finds the
embedded world through its entry point."""

import ast
from pathlib import Path

ROOT = Path(__file__).parents[1]


def shapeworld_imports(package: str) -> list[str]:
    found = []
    for f in sorted((ROOT / package).rglob("*.py")):
        for node in ast.walk(ast.parse(f.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            found += [f"{f.relative_to(ROOT)}: {n}" for n in names if n.split(".")[0] == "shapeworld"]
    return found


def test_serving_decoding_and_training_import_nothing_from_shapeworld():
    for package in ("server", "decoding", "reward_models"):
        assert shapeworld_imports(package) == [], package


def test_the_cli_finds_the_embedded_world_by_its_entry_point():
    from server.cli import _embedded

    world = _embedded()
    assert world.__name__ == "shapeworld.commands"
    images, prompt = world.images(2, 1234)
    assert len(images) == 2 and prompt
