"""The docs check: the fenced code blocks of README.md and docs/*.md are commands that work.

- Every ```bash and ```python block either runs here or says why not, with the HTML comment on the line
  before it: ``<!-- docs-check: skip (the reason) -->``. ``<!-- docs-check: server -->`` runs a block
  against a live server of the embedded models on a free 127.0.0.1 port (``http://127.0.0.1:8000`` in the
  block is rewritten to it). Unmarked blocks run as they are, in document order, in a scratch folder per
  page that links the repository's top-level entries (so ``runs/`` is the scratch folder's own).
- Every command line of every bash block, run or skipped, must parse: ``vlm-steer ...`` (also through
  ``python -m server.cli`` and ``accelerate launch -m server.cli``) with the CLI's own argparse parser,
  ``make TARGET`` against the Makefile, ``python -m MODULE`` against the importable modules.
- The names the pages use exist: every ``vlm_steer_*`` metric in server/metrics.py, every ``VLM_STEER_*``
  variable in the settings, every setting in docs/operations.md's table, every A/B experiment (```yaml
  with ``arms:``) valid for ``server.experiments.Experiment``.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
MARK = re.compile(r"<!--\s*docs-check:\s*(?P<kind>[\w-]+)\s*(?:\((?P<why>[^)]*)\))?\s*-->\s*$")
FENCE = re.compile(r"^```(?P<lang>[\w-]*)[^\n]*\n(?P<code>.*?)^```\s*$", re.M | re.S)
RUNNABLE = ("bash", "python")
KINDS = ("skip", "server")
LIVE = "http://127.0.0.1:8000"
# VLM_STEER_* names that are not settings: the vLLM worker's environment and the test suite's own switches
NOT_SETTINGS = {"VLM_STEER_WORKER_REWARD_MODEL", "VLM_STEER_WORKER_VERIFIER", "VLM_STEER_COUNTERS", "VLM_STEER_EXPLAIN",
                "VLM_STEER_TEST_ENGINE", "VLM_STEER_SCREENSHOT"}
TIMEOUT = 180


@dataclass
class Block:
    page: Path
    line: int
    lang: str
    code: str
    kind: str | None  # None: run as it is; "skip"; "server"
    why: str | None

    @property
    def id(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def blocks(page: Path) -> list[Block]:
    text = page.read_text(encoding="utf-8")
    out = []
    for m in FENCE.finditer(text):
        line = text.count("\n", 0, m.start()) + 1
        before = text[: m.start()].rstrip("\n").rsplit("\n", 1)[-1]
        mark = MARK.search(before)
        out.append(Block(page, line, m["lang"], m["code"], mark["kind"] if mark else None,
                         (mark["why"] or "").strip() if mark else None))
    return out


ALL = [b for p in PAGES for b in blocks(p)]
CODE = [b for b in ALL if b.lang in RUNNABLE]


def test_the_pages_have_code_blocks():
    assert {p.name for p in PAGES} >= {"README.md", "architecture.md", "benchmarks.md", "operations.md", "guide-llava.md"}
    assert len(CODE) > 10


@pytest.mark.parametrize("block", CODE, ids=lambda b: b.id)
def test_every_block_runs_or_says_why_not(block):
    assert block.kind in (None, *KINDS), f"{block.id}: unknown docs-check mark {block.kind!r}"
    if block.kind == "skip":
        assert block.why, f"{block.id}: a skipped block says why: <!-- docs-check: skip (the reason) -->"


# ------------------------------------------------------------------ (a) every command parses

def logical_lines(code: str) -> list[str]:
    """The block's lines with backslash continuations joined."""
    return [line.strip() for line in code.replace("\\\n", " ").splitlines() if line.strip()]


def simple_commands(line: str) -> list[list[str]]:
    """The words of each simple command of one line (split at &&, ||, ;, |; comments dropped); [] when the
    line is not plain shell words (a quoted string that goes on over several lines)."""
    lex = shlex.shlex(line, posix=True, punctuation_chars=";&|")
    lex.whitespace_split, lex.commenters = True, "#"
    try:
        tokens = list(lex)
    except ValueError:
        return []
    out, cur = [], []
    for t in tokens:
        if t and set(t) <= set(";&|"):
            out.append(cur)
            cur = []
        else:
            cur.append(t)
    return [c for c in [*out, cur] if c]


def makefile_targets() -> set[str]:
    return set(re.findall(r"^([A-Za-z][\w.-]*)\s*:(?!=)", (ROOT / "Makefile").read_text(), re.M))


def check_command(words: list[str], parser) -> str | None:
    """Why this command would not run (None: it parses, or it is not one of ours)."""
    while words and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", words[0]):
        words = words[1:]  # environment assignments
    if not words:
        return None
    head, args = words[0], words[1:]
    if head == "accelerate" and args[:1] == ["launch"]:
        head, args = "python", [a for a in args[1:] if not a.startswith("--") or a == "-m"]
    if Path(head).name.startswith("python") and args[:1] == ["-m"] and len(args) > 1:
        module, args = args[1], args[2:]
        if module != "server.cli":
            import importlib.util

            return None if importlib.util.find_spec(module) else f"no module {module}"
        head = "vlm-steer"
    if Path(head).name == "vlm-steer":
        try:
            parser.parse_args(args)
        except SystemExit as e:
            return None if e.code == 0 else f"does not parse: vlm-steer {' '.join(args)}"
        return None
    if head == "make":
        missing = [t for t in args if not t.startswith("-") and "=" not in t and t not in makefile_targets()]
        return f"no Makefile target {missing}" if missing else None
    return None


def test_every_command_of_every_bash_block_parses(capsys):
    from server.cli import build_parser

    bad, checked = [], 0
    for b in ALL:
        if b.lang != "bash":
            continue
        for line in logical_lines(b.code):
            for words in simple_commands(line):
                problem = check_command(words, build_parser())
                checked += 1
                if problem:
                    bad.append(f"{b.id}: {problem}")
    capsys.readouterr()  # --help output of commands that print it
    assert not bad, "\n".join(bad)
    assert checked > 30


@pytest.mark.parametrize("block", [b for b in ALL if b.lang == "python"], ids=lambda b: b.id)
def test_python_blocks_compile(block):
    compile(block.code, block.id, "exec")


# ------------------------------------------------------------------ names the pages use

def all_text() -> str:
    return "\n".join(p.read_text(encoding="utf-8") for p in PAGES)


def test_every_metric_named_exists():
    from server.metrics import Metrics

    names = set()
    for family in Metrics("m").registry.collect():
        suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count", ""], "gauge": [""]}[family.type]
        names |= {family.name + s for s in suffixes}
    used = set(re.findall(r"\bvlm_steer_\w+", all_text()))
    assert used and not used - names, sorted(used - names)


def test_every_environment_variable_named_is_a_setting():
    from server.settings import Settings

    fields = {f"VLM_STEER_{n.upper()}" for n in Settings.model_fields}
    used = set(re.findall(r"\bVLM_STEER_[A-Z0-9_]*[A-Z0-9]", all_text()))
    assert not used - fields - NOT_SETTINGS, sorted(used - fields - NOT_SETTINGS)


def test_operations_lists_every_setting():
    from server.settings import Settings

    ops = (ROOT / "docs" / "operations.md").read_text(encoding="utf-8")
    missing = [n for n in Settings.model_fields
               if f"| `--{n.replace('_', '-')}` | `VLM_STEER_{n.upper()}` |" not in ops]
    assert not missing, f"docs/operations.md's settings table lacks {missing}"


def test_experiment_files_are_valid():
    from server.experiments import Experiment

    found = [b for b in ALL if b.lang == "yaml" and "arms:" in b.code]
    assert found
    for b in found:
        Experiment.model_validate(yaml.safe_load(b.code))


def test_profiles_files_are_valid():
    from server.profiles import ProfilesFile

    found = [b for b in ALL if b.lang == "yaml" and b.code.startswith("profiles:")]
    assert found
    for b in found:
        ProfilesFile.model_validate(yaml.safe_load(b.code))


# ------------------------------------------------------------------ (b) the short blocks run

def environment() -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("VLM_STEER_")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = str(ROOT)
    return env


@pytest.fixture(scope="module")
def workdirs(tmp_path_factory):
    """One scratch folder per page, linking the repository's top-level entries (its own runs/)."""
    made = {}

    def get(page: Path) -> Path:
        if page not in made:
            d = tmp_path_factory.mktemp(page.stem)
            for entry in ROOT.iterdir():
                if entry.name not in ("runs", ".git"):
                    (d / entry.name).symlink_to(entry)
            made[page] = d
        return made[page]

    return get


def run_block(block: Block, cwd: Path, code: str) -> subprocess.CompletedProcess:
    cmd = ["bash", "-euo", "pipefail", "-c", code] if block.lang == "bash" else [sys.executable, "-c", code]
    done = subprocess.run(cmd, cwd=cwd, env=environment(), capture_output=True, text=True, timeout=TIMEOUT)
    assert done.returncode == 0, f"{block.id} failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


@pytest.mark.parametrize("block", [b for b in CODE if b.kind is None], ids=lambda b: b.id)
def test_short_blocks_run(block, workdirs):
    run_block(block, workdirs(block.page), block.code)


@pytest.fixture(scope="module")
def docs_server(steering_engine):
    """The embedded models as `make serve` serves them (model "vlm", grounding judge), on a free port."""
    from server.settings import Settings
    from tests.server.conftest import LiveServer, free_port

    with LiveServer(Settings(port=free_port()), engine=steering_engine) as srv:
        yield srv


@pytest.mark.parametrize("block", [b for b in CODE if b.kind == "server"], ids=lambda b: b.id)
def test_server_blocks_run_against_a_live_server(block, docs_server, workdirs):
    assert LIVE in block.code, f"{block.id}: a server block talks to {LIVE}"
    done = run_block(block, workdirs(block.page), block.code.replace(LIVE, docs_server.url))
    assert '"error"' not in done.stdout, done.stdout
    assert "arm" in done.stdout  # the response's steering block is printed
