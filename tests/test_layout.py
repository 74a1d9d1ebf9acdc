"""The codebase's shape: serving, decoding and training code does not depend on ShapeWorld, the project's
test world (issue 19), and the CLI finds it through its entry point; no import cycles between modules or
packages (imports inside functions count); packages layered so data flows one way; every module says
what it is for (issue 21)."""

import ast
from pathlib import Path

import pytest

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

PACKAGES = ("decoding", "reward_models", "bench", "server", "shapeworld")
# what each package may import: decoding is the core; reward_models builds what it needs; the benchmarks
# measure both (and drive a server over HTTP only); the server serves both and its CLI runs the benchmarks;
# ShapeWorld, the test world, sits on top (its benchmarks drive the server) and nothing imports it
ALLOWED = {"decoding": set(), "reward_models": {"decoding"}, "bench": {"decoding", "reward_models"},
           "server": {"decoding", "reward_models", "bench"}, "shapeworld": {"decoding", "reward_models", "bench", "server"}}


def modules() -> dict[str, Path]:
    found = {}
    for pk in PACKAGES:
        for f in (ROOT / pk).rglob("*.py"):
            found[".".join(f.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")] = f
    return found


def imports(mods: dict[str, Path]) -> dict[str, set[str]]:
    """module -> the project's modules it imports (anywhere in its body)."""
    def owner(name: str) -> str | None:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    graph = {}
    for m, f in mods.items():
        out = set()
        for node in ast.walk(ast.parse(f.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
            out |= {o for o in map(owner, names) if o and o != m}
        graph[m] = out
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one node (Tarjan)."""
    index, low, stack, on, found, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_cycle_finder_finds_cycles():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles_between_modules():
    assert cycles(imports(modules())) == []


def test_packages_import_only_the_layers_below():
    graph = imports(modules())
    wrong = sorted(f"{a} -> {b}" for a, bs in graph.items() for b in bs
                   if b.split(".")[0] != a.split(".")[0] and b.split(".")[0] not in ALLOWED[a.split(".")[0]])
    assert wrong == []


@pytest.mark.parametrize("path", sorted(str(p.relative_to(ROOT)) for p in modules().values()))
def test_every_module_says_what_it_is_for(path):
    doc = ast.get_docstring(ast.parse((ROOT / path).read_text()))
    assert doc and len(doc.split("\n")[0]) > 20, f"{path}: its first line should say what it is for"

