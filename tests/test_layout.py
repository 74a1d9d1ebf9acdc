"""The serving, decoding and training code does not depend on ShapeWorld, the project's test world
(issue 19: `decoding/` and `reward_models/` now; `server/`'s CLI commands and load generator still do)."""

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


def test_decoding_and_reward_models_import_nothing_from_shapeworld():
    assert shapeworld_imports("decoding") == [] and shapeworld_imports("reward_models") == []
