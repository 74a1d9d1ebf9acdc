"""The image, built and run for real (`make image-check`, CI after the test suites; not part of `make test`,
whose pytest run does not collect this file): Debian's Docker engine on a private socket and data root, a
Debian bookworm base (Python 3.11) made with mmdebstrap where no registry is reachable, the CPU image from
the repository's Dockerfile, then the image as users run it: its non-root user, `/health` and a steered
request on a published loopback port, its HEALTHCHECK, SIGTERM exiting 0, and no embedded default beside a
mounted model; last, the GPU variant's compiler stage (the rest of that variant needs a GPU and vLLM's
CUDA wheels). Everything lives in one scratch folder that is deleted afterwards: nothing is cached across
runs.

Why these choices (measured on the project's CPU machine kind, shared platform notes "Containers"):
- dockerd runs with ``--iptables=false``: it leaves the host's firewall as it was; the build steps use the
  host's network (``--network host``, so pip reaches PyPI as the host does) and the published port works
  through Docker's userland proxy on 127.0.0.1.
- Egress goes through a TLS proxy whose CA is in the host's bundle only: the bundle is copied into the
  local base image (the one this check makes and deletes), never into the Dockerfile's published image.
- ``TORCH_INDEX`` is PyPI (the PyTorch index is unreachable here): its torch 2.13.0 is the CUDA-linked
  build, which runs on CPU (a 5.5 GB image instead of about 1.5 GB).

Environment: IMAGE_CHECK_KEEP=1 keeps the scratch folder (logs) after a failure.
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import httpx
import pytest
import yaml

from shapeworld.text import CAPTION_PROMPT
from shapeworld.world import make_scenes
from tests.server.conftest import data_url

ROOT = Path(__file__).resolve().parents[2]
DOCKERD, DOCKER, MMDEBSTRAP = "/usr/sbin/dockerd", "/usr/bin/docker", "/usr/bin/mmdebstrap"
CA_BUNDLE = Path(os.environ.get("CA_BUNDLE", "/etc/ssl/certs/ca-certificates.crt"))
BASE = "vlm-steer-base:bookworm"
IMAGE, GPU_STAGE = "vlm-steer:check", "vlm-steer:check-gpu-deps"
TORCH_INDEX = "https://pypi.org/simple"
APP_UID = "10001"  # the Dockerfile's USER
BUILD_TIMEOUT = 20 * 60


def log(msg: str) -> None:
    print(f"[image-check {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def tail(path: Path, n: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except FileNotFoundError:
        return f"({path} missing)"


def _die_with_parent() -> None:
    """dockerd gets SIGTERM when this process dies (a CI timeout, ^C), so no daemon outlives the check."""
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class Docker:
    """Debian's dockerd on a private socket, data root and exec root under ``work``."""

    def __init__(self, work: Path):
        self.work = work
        self.sock = work / "docker.sock"
        self.env = {**os.environ, "DOCKER_HOST": f"unix://{self.sock}", "DOCKER_CONFIG": str(work / "client"),
                    "DOCKER_BUILDKIT": "1"}  # BuildKit builds only the stages the target needs
        # what dockerd makes outside its private folders, removed afterwards unless it was there before
        self.leftovers = [p for p in (Path("/etc/docker/key.json"), Path("/run/docker")) if not p.exists()]
        self.bridge_existed = Path("/sys/class/net/docker0").exists()
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        out = open(self.work / "dockerd.log", "wb")
        self.proc = subprocess.Popen(
            [DOCKERD, "--host", f"unix://{self.sock}", "--data-root", str(self.work / "data"),
             "--exec-root", str(self.work / "exec"), "--pidfile", str(self.work / "dockerd.pid"),
             "--iptables=false", "--ip-forward=false"],
            stdout=out, stderr=subprocess.STDOUT, preexec_fn=_die_with_parent)
        deadline = time.time() + 90
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"dockerd exited {self.proc.returncode}:\n{tail(self.work / 'dockerd.log')}")
            if self.sock.exists() and self.run("version", check=False).returncode == 0:
                return
            time.sleep(0.5)
        raise RuntimeError(f"dockerd did not answer in 90 s:\n{tail(self.work / 'dockerd.log')}")

    def run(self, *args: str, check: bool = True, timeout: float = 120, log_to: Path | None = None) -> subprocess.CompletedProcess:
        if log_to is not None:
            with open(log_to, "ab") as f:
                p = subprocess.run([DOCKER, *args], env=self.env, stdout=f, stderr=subprocess.STDOUT, timeout=timeout)
            if check and p.returncode:
                raise AssertionError(f"docker {' '.join(args[:3])} ... exited {p.returncode}:\n{tail(log_to)}")
            return p
        p = subprocess.run([DOCKER, *args], env=self.env, capture_output=True, text=True, timeout=timeout)
        if check and p.returncode:
            raise AssertionError(f"docker {' '.join(args)} exited {p.returncode}:\n{p.stdout}\n{p.stderr}")
        return p

    def inspect(self, name: str, fmt: str) -> object:
        return json.loads(self.run("inspect", "--format", "{{json " + fmt + "}}", name).stdout)

    def stop(self) -> None:
        """Every container removed, the daemon stopped (it takes its containerd with it), its bridge gone."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            ids = self.run("ps", "-aq", check=False).stdout.split()
            if ids:
                self.run("rm", "-f", *ids, check=False)
            self.proc.terminate()
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=30)
        if not self.bridge_existed and Path("/sys/class/net/docker0").exists():
            subprocess.run(["ip", "link", "delete", "docker0"], check=False)
        for p in self.leftovers:
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)


def _unmount_under(path: Path) -> None:
    mounts = [line.split()[1] for line in Path("/proc/mounts").read_text().splitlines()]
    for m in sorted((m for m in mounts if m.startswith(str(path) + "/")), key=len, reverse=True):
        subprocess.run(["umount", "-l", m], check=False)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def docker(request):
    for tool in (DOCKERD, DOCKER, MMDEBSTRAP):
        assert Path(tool).exists(), f"{tool} is missing: `make image-check` installs Debian's docker.io and mmdebstrap"
    work = Path(tempfile.mkdtemp(prefix="vlm-steer-image-"))
    d = Docker(work)
    try:
        d.start()
        log(f"dockerd {d.run('version', '--format', '{{.Server.Version}}').stdout.strip()} on {d.sock}")
        yield d
    finally:
        t0 = time.time()
        d.stop()
        _unmount_under(work)
        if request.session.testsfailed and os.environ.get("IMAGE_CHECK_KEEP"):
            shutil.rmtree(work / "data", ignore_errors=True)
            log(f"kept the logs in {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
        log(f"cleaned up (containers, dockerd, images, scratch folder) in {time.time() - t0:.0f} s")


@pytest.fixture(scope="module")
def base(docker):
    """Debian bookworm minbase with Python 3.11 and pip, imported as an image (no registry needed)."""
    t0 = time.time()
    rootfs = docker.work / "rootfs.tar"
    hooks = [
        'rm -f "$1"/usr/lib/python3*/EXTERNALLY-MANAGED',  # pip installs into the image's system Python
        # The TLS proxy's CA for pip in the build steps: in this local base only (deleted after the check).
        f'cp {CA_BUNDLE} "$1"/etc/ssl/certs/ca-certificates.crt',
    ]
    cmd = [MMDEBSTRAP, "--variant=minbase", "--include=python3,python3-pip,python-is-python3,passwd,ca-certificates",
           *(f"--customize-hook={h}" for h in hooks), "bookworm", str(rootfs)]
    with open(docker.work / "mmdebstrap.log", "wb") as f:
        p = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, timeout=15 * 60)
    assert p.returncode == 0, f"mmdebstrap exited {p.returncode}:\n{tail(docker.work / 'mmdebstrap.log')}"
    docker.run("import", "--change", "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
               "--change", "ENV LANG=C.UTF-8", "--change", 'CMD ["python3"]', str(rootfs), BASE, timeout=600)
    rootfs.unlink()
    log(f"base image {BASE} in {time.time() - t0:.0f} s "
        f"({docker.run('run', '--rm', BASE, 'python', '--version').stdout.strip()})")
    return BASE


def build(docker, tag: str, *args: str) -> float:
    t0 = time.time()
    docker.run("build", "--progress=plain", "--network", "host", "--build-arg", f"BASE_IMAGE={BASE}",
               "--build-arg", f"TORCH_INDEX={TORCH_INDEX}", "-t", tag, *args, str(ROOT),
               timeout=BUILD_TIMEOUT, log_to=docker.work / f"build-{tag.replace(':', '-')}.log")
    return time.time() - t0


@pytest.fixture(scope="module")
def image(docker, base):
    seconds = build(docker, IMAGE)
    size = docker.inspect(IMAGE, ".Size")
    log(f"built {IMAGE} in {seconds:.0f} s, {size / 2**30:.1f} GiB")
    return IMAGE


class Running:
    def __init__(self, docker: Docker, name: str, port: int, started: float):
        self.docker, self.name, self.port, self.started = docker, name, port, started
        self.url = f"http://127.0.0.1:{port}"

    def state(self) -> dict:
        return self.docker.inspect(self.name, ".State")

    def logs(self) -> str:
        p = self.docker.run("logs", "--tail", "40", self.name, check=False)
        return p.stdout + p.stderr


def manifest_run_flags() -> list[str]:
    """`docker run` flags for what the CPU Kubernetes Deployment asks of the container: its securityContext
    (read-only root filesystem, dropped capabilities, no privilege escalation) and its emptyDir mounts (as
    tmpfs of the same size). The user stays the image's own: the manifest's runAsUser must be that one."""
    pod = yaml.safe_load((ROOT / "deploy" / "kubernetes" / "deployment.yaml").read_text())["spec"]["template"]["spec"]
    c = pod["containers"][0]
    assert str(pod["securityContext"]["runAsUser"]) == APP_UID
    sc, flags = c["securityContext"], []
    if sc.get("readOnlyRootFilesystem"):
        flags.append("--read-only")
    if sc.get("allowPrivilegeEscalation") is False:
        flags += ["--security-opt", "no-new-privileges"]
    flags += [f for cap in sc.get("capabilities", {}).get("drop", []) for f in ("--cap-drop", cap)]
    empty = {v["name"]: v["emptyDir"] for v in pod.get("volumes", []) if "emptyDir" in v}
    for m in c.get("volumeMounts", []):
        if m["name"] in empty:
            size = empty[m["name"]].get("sizeLimit", "1Gi").replace("Gi", "g").replace("Mi", "m")
            flags += ["--tmpfs", f"{m['mountPath']}:rw,exec,size={size}"]  # an emptyDir is not noexec
    return flags


@pytest.fixture(scope="module")
def container(docker, image):
    """The image as the CPU Kubernetes manifest runs it (``manifest_run_flags``), the port published on
    loopback only."""
    port, name = free_port(), "vlm-steer-check"
    flags = manifest_run_flags()
    log(f"docker run {' '.join(flags)}")
    docker.run("run", "-d", "--name", name, "-p", f"127.0.0.1:{port}:8000", *flags, image)
    c = Running(docker, name, port, time.time())
    deadline = c.started + 180
    while time.time() < deadline:
        assert c.state()["Status"] == "running", f"the container stopped:\n{c.logs()}"
        try:
            if httpx.get(c.url + "/health", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    else:
        raise AssertionError(f"/health did not answer 200 within 180 s:\n{c.logs()}")
    log(f"/health 200 after {time.time() - c.started:.1f} s")
    return c


def test_runs_as_its_non_root_user(docker, container):
    assert docker.inspect(IMAGE, ".Config.User") == APP_UID
    # the server itself (PID 1, the ENTRYPOINT in exec form) runs as that user
    uid = docker.run("exec", container.name, "python", "-c", "import os; print(os.stat('/proc/1').st_uid)").stdout
    assert uid.strip() == APP_UID


def test_health_answers_on_the_published_port(container):
    r = httpx.get(container.url + "/health", timeout=5)
    assert r.status_code == 200, r.text


def test_a_steered_request_gives_the_golden_answers(container):
    """Greedy captions of a fixed scene from the image's embedded models equal tests/golden.json's (computed
    with the engine in a checkout): TITA's differs from the plain model's, so the embedded reward model is
    loaded and steers."""
    golden = json.loads((ROOT / "tests" / "golden.json").read_text())
    scene = make_scenes("random", 4, 777)[1]  # golden.json's third entry: this scene's caption
    got = {}
    for method in ("none", "tita"):
        r = httpx.post(container.url + "/v1/chat/completions", timeout=120, json={
            "model": "vlm", "max_tokens": 40, "temperature": 0, "steering": {"method": method},
            "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(scene.image())}},
                                                      {"type": "text", "text": CAPTION_PROMPT}]}]})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["steering"]["method"] == method, body["steering"]
        got[method] = body["choices"][0]["message"]["content"]
    assert got == {"none": golden["none"][2], "tita": golden["tita"][2]}
    assert got["none"] != got["tita"]
    log(f"steered request: none -> {got['none']!r}, tita -> {got['tita']!r}")


def test_healthcheck_turns_healthy(docker, container):
    health = docker.inspect(IMAGE, ".Config.Healthcheck")
    assert health and "/health" in " ".join(health["Test"]), health
    deadline = time.time() + 120
    while time.time() < deadline:
        status = container.state()["Health"]
        if status["Status"] == "healthy":
            log(f"HEALTHCHECK healthy after {time.time() - container.started:.0f} s")
            return
        assert status["Status"] == "starting", status
        time.sleep(1)
    raise AssertionError(f"HEALTHCHECK still {status}")


def test_sigterm_exits_zero(docker, container):
    """`docker stop` sends the image's STOPSIGNAL (SIGTERM): the server drains and exits 0 well within the
    grace period (not killed at its end, which would be 137)."""
    t0 = time.time()
    docker.run("stop", "--time", "60", container.name, timeout=90)
    seconds = time.time() - t0
    state = container.state()
    assert state["ExitCode"] == 0 and not state["OOMKilled"], (state, container.logs())
    assert seconds < 55, f"stopped after {seconds:.0f} s: the grace period ran out"
    log(f"SIGTERM: exit 0 after {seconds:.1f} s")


def _settings_in_image(docker, *env: str) -> dict:
    code = ("import json; from server.settings import Settings; s = Settings(); print(json.dumps({k: str(v) if v is not None "
            "else None for k, v in s.model_dump(include={'model', 'reward_model', 'verifier', 'grounding_verifier', "
            "'playground_examples'}).items()}))")
    args = [a for e in env for a in ("-e", e)]
    return json.loads(docker.run("run", "--rm", "--read-only", *args, "--entrypoint", "python", IMAGE, "-c", code).stdout)


def test_embedded_defaults_only_with_the_embedded_model(docker, image):
    """The image names no model paths: its settings resolve as a checkout's do. Without settings it serves the
    embedded models; with a mounted VLM_STEER_MODEL nothing of ShapeWorld is used unless named."""
    env = docker.inspect(IMAGE, ".Config.Env")
    assert not [e for e in env if "/app/models" in e], env
    embedded = "/app/models/shapeworld"
    assert _settings_in_image(docker) == {
        "model": f"{embedded}/vlm", "reward_model": f"{embedded}/reward", "verifier": f"{embedded}/verifier",
        "grounding_verifier": f"{embedded}/judge", "playground_examples": f"{embedded}/examples"}
    assert _settings_in_image(docker, "VLM_STEER_MODEL=/models/llava") == {
        "model": "/models/llava", "reward_model": None, "verifier": None, "grounding_verifier": None,
        "playground_examples": None}
    assert _settings_in_image(docker, "VLM_STEER_MODEL=/models/llava", "VLM_STEER_VERIFIER=/models/clip")[
        "grounding_verifier"] == "/models/clip"  # the judge defaults to the user's verifier, as in a checkout


def test_gpu_variant_has_a_c_compiler(docker, base):
    """The GPU variant's dependency stage (a base with the C compiler and Python headers Triton compiles
    with; its RUN step compiles a Python extension's shape and fails the build without them)."""
    seconds = build(docker, GPU_STAGE, "--build-arg", "VARIANT=gpu", "--target", "deps-gpu")
    out = docker.run("run", "--rm", "--read-only", "--entrypoint", "gcc", GPU_STAGE, "--version").stdout
    assert out.startswith("gcc"), out
    log(f"GPU compiler stage built in {seconds:.0f} s: {out.splitlines()[0]}")
