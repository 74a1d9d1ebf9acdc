"""The Dockerfile, checked without a Docker engine (there is none here): hadolint, and what the image
must do read from the parsed instructions."""

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
    env = " ".join(by("ENV"))
    for name in ("vlm", "reward", "verifier"):
        assert f"/app/models/shapeworld/{name}" in env
    args = [i["value"] for i in df.structure if i["instruction"] == "ARG"]
    assert "VARIANT=cpu" in args  # CPU by default, --build-arg VARIANT=gpu for the vLLM image


def test_image_names_every_embedded_default(monkeypatch):
    """The installed package holds no models: every setting that `make serve` fills with an embedded path
    must be set by the image's ENV to the same folder under /app/models."""
    from server.settings import EMBEDDED, Settings

    df = DockerfileParser(path=str(ROOT / "Dockerfile"))
    env = {}
    for i in df.structure:
        if i["instruction"] == "ENV":
            for pair in i["value"].split():
                k, _, v = pair.partition("=")
                env[k] = v
    local = Settings()
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    image = Settings()
    for name in Settings.model_fields:
        want = getattr(local, name)
        if isinstance(want, Path) and want.is_relative_to(EMBEDDED):
            assert getattr(image, name) == Path("/app/models/shapeworld") / want.relative_to(EMBEDDED), name
