"""The Dockerfile, checked without a Docker engine (there is none here): hadolint, and what the image
must do read from the parsed instructions."""

import fnmatch
import subprocess
import sys
from pathlib import Path

from dockerfile_parse import DockerfileParser

ROOT = Path(__file__).resolve().parents[2]


def test_hadolint_passes():
    hadolint = Path(sys.executable).parent / "hadolint"
    subprocess.run([str(hadolint), "--failure-threshold", "info", str(ROOT / "Dockerfile")], check=True)


def test_image_serves_the_embedded_models_as_non_root_with_a_health_check():
    df = DockerfileParser(path=str(ROOT / "Dockerfile"))
    final = [i for i in df.structure if i["startline"] >= max(j["startline"] for j in df.structure if j["instruction"] == "FROM")]
    by = lambda name: [i["value"] for i in final if i["instruction"] == name]
    assert by("ENTRYPOINT") == ['["vlm-steer", "serve"]']
    assert by("USER") == ["10001"] and by("EXPOSE") == ["8000"]
    assert any("/health" in v for v in by("HEALTHCHECK"))
    assert by("STOPSIGNAL") == ["SIGTERM"]
    for src in [v.split()[0] for v in by("COPY")]:
        assert (ROOT / src).exists(), src  # everything copied is in the repository
    args = [i["value"] for i in df.structure if i["instruction"] == "ARG"]
    assert "VARIANT=cpu" in args  # CPU by default, --build-arg VARIANT=gpu for the vLLM image


def _stages(df: DockerfileParser) -> dict[str, list[dict]]:
    """The instructions of each named stage (``FROM ... AS name``)."""
    out, name = {}, None
    for i in df.structure:
        if i["instruction"] == "FROM":
            name = i["value"].split()[-1]
            out[name] = []
        elif name:
            out[name].append(i)
    return out


def test_build_arguments_keep_the_registry_defaults():
    """The base image and the torch index are build arguments (`make image-check` builds from a local base and
    PyPI); with none given, a user with registry access gets python:3.11-slim and the PyTorch CPU index."""
    df = DockerfileParser(path=str(ROOT / "Dockerfile"))
    args = dict(i["value"].partition("=")[::2] for i in df.structure if i["instruction"] == "ARG" and "=" in i["value"])
    assert args["BASE_IMAGE"] == "python:3.11-slim"
    assert args["TORCH_INDEX"] == "https://download.pytorch.org/whl/cpu"
    froms = [i["value"] for i in df.structure if i["instruction"] == "FROM"]
    assert froms[0] == "${BASE_IMAGE} AS base"
    cpu = " ".join(i["value"] for i in _stages(df)["deps-cpu"] if i["instruction"] == "RUN")
    assert "torch==" in cpu and '--index-url "$TORCH_INDEX"' in cpu


def test_gpu_variant_has_a_c_compiler():
    """Triton compiles its CUDA launcher with the system C compiler at run time: the GPU stage installs gcc
    and the C library's headers, and compiles against Python.h in the build (image_check.py builds it)."""
    run = " ".join(i["value"] for i in _stages(DockerfileParser(path=str(ROOT / "Dockerfile")))["deps-gpu"]
                   if i["instruction"] == "RUN")
    assert "apt-get install" in run and "gcc libc6-dev" in run and "Python.h" in run and "gcc -shared" in run


def test_image_runs_the_checkout_so_embedded_defaults_follow_the_model():
    """The image names no model path: it installs the package editable in /app beside /app/models, where the
    settings look for the embedded models (server/settings.py's EMBEDDED), so a mounted VLM_STEER_MODEL gets
    no ShapeWorld reward model, verifier, judge or examples (image_check.py asserts it in the built image)."""
    from server.settings import EMBEDDED

    df = DockerfileParser(path=str(ROOT / "Dockerfile"))
    final = _stages(df)["final"]
    env = " ".join(i["value"] for i in df.structure if i["instruction"] == "ENV")
    assert "models" not in env and "MODEL" not in env and "VERIFIER" not in env, env
    assert [i["value"] for i in final if i["instruction"] == "WORKDIR"] == ["/app"]
    copies = {tuple(i["value"].split()) for i in final if i["instruction"] == "COPY"}
    rel = EMBEDDED.relative_to(ROOT)  # models/shapeworld, beside server/
    assert ("server", "./server") in copies and (rel.parts[0], f"./{rel.parts[0]}") in copies
    run = " ".join(i["value"] for i in final if i["instruction"] == "RUN")
    assert "pip install --no-cache-dir -e ." in run and "pip install --no-cache-dir -e '.[vllm]'" in run


def _dockerignored(rel: str, patterns: list[str]) -> bool:
    """Docker's rule, for the patterns .dockerignore uses: a pattern matches the path or a folder above it;
    ``**/`` matches any depth. (Hand-written: Docker's own matcher is Go code with no Python binding.)"""
    parts = rel.split("/")
    for p in patterns:
        p = p.strip("/")
        deep = p.startswith("**/")
        p = p.removeprefix("**/")
        n = len(p.split("/"))
        starts = range(len(parts)) if deep else [0]
        if any(fnmatch.fnmatchcase("/".join(parts[s:e]), p) for s in starts for e in range(s + n, len(parts) + 1)
               if e - s == n):
            return True
    return False


def test_dockerignore_keeps_virtualenvs_runs_and_git_out_and_every_copied_source_in():
    patterns = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    for rel in (".git/config", ".venv/bin/python", ".venv-vllm/bin/python", "runs/quality.json",
                "server/__pycache__/app.cpython-311.pyc", ".pytest_cache/v/cache"):
        assert _dockerignored(rel, patterns), rel
    df = DockerfileParser(path=str(ROOT / "Dockerfile"))
    sources = [v.split()[0] for v in (i["value"] for i in df.structure if i["instruction"] == "COPY")]
    tracked = subprocess.run(["git", "ls-files", *sources], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    assert tracked and not [f for f in tracked if _dockerignored(f, patterns)]
