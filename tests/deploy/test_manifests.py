"""Deploy files that can fail: Kubernetes schemas, promtool, PromQL names against a live server's
/metrics, and a real Prometheus scraping a live server on loopback."""

from __future__ import annotations

import copy
import json
import re
import shutil
import socket
import subprocess
import time
from pathlib import Path

import httpx
import kubernetes_validate
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from shapeworld.world import make_scenes
from tests.server.conftest import data_url

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
K8S = DEPLOY / "kubernetes"
K8S_VERSION = "1.33.0"


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _merge(base, patch):
    """A strategic-merge patch as kustomize applies ours: maps merge, lists of named items merge by name."""
    if isinstance(base, dict) and isinstance(patch, dict):
        out = dict(base)
        for k, v in patch.items():
            out[k] = _merge(base[k], v) if k in base else copy.deepcopy(v)
        return out
    if isinstance(base, list) and isinstance(patch, list) and all(isinstance(x, dict) and "name" in x for x in base + patch):
        out = [copy.deepcopy(x) for x in base]
        for item in patch:
            hit = [i for i, x in enumerate(out) if x["name"] == item["name"]]
            if hit:
                out[hit[0]] = _merge(out[hit[0]], item)
            else:
                out.append(copy.deepcopy(item))
        return out
    return copy.deepcopy(patch)


def _resources() -> list[tuple[str, dict]]:
    kust = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    out = [(f, d) for f in kust["resources"] for d in _docs(K8S / f)]
    gpu = yaml.safe_load((K8S / "gpu" / "kustomization.yaml").read_text())
    base = {(d["kind"], d["metadata"]["name"]): d for _, d in out}
    for p in gpu["patches"]:
        patch = _docs(K8S / "gpu" / p["path"])[0]
        key = (patch["kind"], patch["metadata"]["name"])
        out.append((f"gpu/{p['path']} (merged)", _merge(base[key], patch)))
    return out


@pytest.mark.parametrize("name,doc", _resources(), ids=lambda x: x if isinstance(x, str) else "")
def test_manifest_validates_against_kubernetes_schema(name, doc):
    kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_manifests_agree_with_the_server():
    docs = {d["kind"]: d for _, d in _resources()[:4]}
    pod = docs["Deployment"]["spec"]["template"]["spec"]
    c = pod["containers"][0]
    assert c["readinessProbe"]["httpGet"]["path"] == "/ready"
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert pod["terminationGracePeriodSeconds"] > float(env["VLM_STEER_DRAIN_TIMEOUT"])  # drain finishes first
    assert set(env) - {"VLM_STEER_API_KEYS"} <= {f"VLM_STEER_{k.upper()}" for k in _settings_fields()}
    experiment = yaml.safe_load(docs["ConfigMap"]["data"]["experiment.yaml"])
    from server.experiments import Experiment

    Experiment.model_validate(experiment)


@pytest.mark.parametrize("name,doc", [(n, d) for n, d in _resources() if d["kind"] == "Deployment"],
                         ids=lambda x: x if isinstance(x, str) else "")
def test_probes_ask_liveness_and_readiness_of_their_endpoints(name, doc, live):
    """Readiness on /ready (out of the Service while draining or with the engine down), liveness on /health
    (a restart only for a dead or stalled engine), and a startup probe on /health that gives the models time to
    load before liveness counts (a loading pod is unready, not killed); each endpoint answers as its probe
    expects on a live server."""
    c = doc["spec"]["template"]["spec"]["containers"][0]
    probes = {k: c[k] for k in ("startupProbe", "readinessProbe", "livenessProbe")}
    assert {k: p["httpGet"]["path"] for k, p in probes.items()} == {
        "startupProbe": "/health", "readinessProbe": "/ready", "livenessProbe": "/health"}
    assert all(p["httpGet"]["port"] == "http" for p in probes.values())
    startup = probes["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 300  # minutes to load, not seconds
    assert "initialDelaySeconds" not in probes["livenessProbe"]  # the startup probe holds liveness back
    liveness = probes["livenessProbe"]
    assert liveness["timeoutSeconds"] >= 2 and liveness["failureThreshold"] >= 2  # one slow answer kills nothing
    env = {e["name"]: e.get("value") for e in c["env"]}
    stall = float(env.get("VLM_STEER_ENGINE_STALL_TIMEOUT", _settings_fields()["engine_stall_timeout"].default))
    assert stall >= 30  # well above the longest step
    for path, body in (("/ready", {"status": "ready"}), ("/health", {"status": "ok"})):
        r = httpx.get(live.url + path)
        assert r.status_code == 200 and r.json() == body


def _settings_fields():
    from server.settings import Settings

    return Settings.model_fields


# ------------------------------------------------------------ Prometheus

def promtool() -> str:
    path = shutil.which("promtool")
    assert path, "promtool is missing: `make test` installs Debian's prometheus package"
    return path


def test_promtool_checks_config_and_rules(tmp_path):
    subprocess.run([promtool(), "check", "rules", str(DEPLOY / "prometheus" / "alerts.yml")], check=True)
    subprocess.run([promtool(), "check", "config", str(DEPLOY / "prometheus" / "prometheus.yml")], check=True)


def test_promtool_unit_tests_of_the_alerts():
    """The per-arm hallucination alert fires for the arm above the control arm plus the margin, and only it."""
    subprocess.run([promtool(), "test", "rules", str(Path(__file__).parent / "alerts_test.yml")], check=True)


def _expressions() -> list[str]:
    rules = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())
    exprs = [r["expr"] for g in rules["groups"] for r in g["rules"]]
    dash = json.loads((DEPLOY / "grafana" / "vlm-steer.json").read_text())
    exprs += [t["expr"] for p in dash["panels"] for t in p["targets"]]
    exprs += [v["query"] for v in dash["templating"]["list"] if v["type"] == "query"]
    return exprs


def exported_names(text: str) -> set[str]:
    names = set()
    for fam in text_string_to_metric_families(text):
        names.add(fam.name)
        suffixes = {"counter": ["_total", "_created"], "histogram": ["_bucket", "_sum", "_count", "_created"],
                    "gauge": [], "summary": ["_sum", "_count", "_created"]}.get(fam.type, [])
        names.update(fam.name + s for s in suffixes)
    return names


def test_every_promql_name_is_exported_by_the_live_server(live):
    exported = exported_names(httpx.get(live.url + "/metrics").text)
    used = {m for e in _expressions() for m in re.findall(r"\b(vlm_steer_[a-z0-9_]+)", e)}
    assert used, "no metric names found in the rules and dashboard"
    assert used <= exported, f"not exported by the server: {sorted(used - exported)}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_prometheus_scrapes_the_live_server(live, client, tmp_path):
    """A real Prometheus with the project's scrape config (pointed at the live server) reads back the
    request counter after requests were served."""
    binary = shutil.which("prometheus")
    assert binary, "prometheus is missing: `make test` installs Debian's prometheus package"
    cfg = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    cfg["global"]["scrape_interval"] = "1s"
    cfg["scrape_configs"] = [j for j in cfg["scrape_configs"] if "static_configs" in j]  # no Kubernetes API here
    cfg["scrape_configs"][0]["static_configs"][0]["targets"] = [live.url.removeprefix("http://")]
    cfg["rule_files"] = [str(DEPLOY / "prometheus" / "alerts.yml")]
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(cfg))
    port = _free_port()
    proc = subprocess.Popen([binary, f"--config.file={tmp_path / 'prometheus.yml'}", f"--storage.tsdb.path={tmp_path / 'data'}",
                             f"--web.listen-address=127.0.0.1:{port}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        image = data_url(make_scenes("random", 1, 4300)[0].image())
        sent = 3
        for _ in range(sent):
            client.chat.completions.create(model="shapeworld", max_tokens=4, temperature=0, extra_body={"user": "prom-e2e"},
                                           messages=[{"role": "user", "content": [
                                               {"type": "image_url", "image_url": {"url": image}},
                                               {"type": "text", "text": "describe the image ."}]}])
        query = 'sum(vlm_steer_request_success_total{job="vlm-steer"})'
        deadline, value = time.time() + 60, 0.0
        while time.time() < deadline and value < sent:
            try:
                r = httpx.get(f"http://127.0.0.1:{port}/api/v1/query", params={"query": query}, timeout=2).json()
                if r["data"]["result"]:
                    value = float(r["data"]["result"][0]["value"][1])
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        assert value >= sent, f"Prometheus read {value} finished requests, expected at least {sent}"
        rules = httpx.get(f"http://127.0.0.1:{port}/api/v1/rules", timeout=2).json()["data"]["groups"]
        assert {r["name"] for g in rules for r in g["rules"]} >= {"VlmSteerHighErrorRate", "VlmSteerSteeringDegraded"}
    finally:
        proc.terminate()
        proc.wait(timeout=20)


# ------------------------------------------------------------ the GPU overlay (it cannot run here)

def _gpu_deployment() -> dict:
    return next(d for name, d in _resources() if name.startswith("gpu/") and d["kind"] == "Deployment")


def _dockerfile_image() -> tuple[dict[str, str], str, str]:
    """The image's ENV, its user's uid and home folder, read from the Dockerfile."""
    from dockerfile_parse import DockerfileParser

    df = DockerfileParser(path=str(DEPLOY.parent / "Dockerfile"))
    env = {}
    for i in df.structure:
        if i["instruction"] == "ENV":
            env.update(pair.partition("=")[::2] for pair in i["value"].split())
    useradd = next(i["value"] for i in df.structure if i["instruction"] == "RUN" and "useradd" in i["value"]).split()
    uid, user = useradd[useradd.index("--uid") + 1], useradd[-1]
    assert "--create-home" in useradd and "--home-dir" not in useradd  # Debian's default: /home/USER
    assert [i["value"] for i in df.structure if i["instruction"] == "USER"] == [uid]
    return env, uid, f"/home/{user}"


# What the GPU stack writes at run time by default, in the image user's home or the temporary folder:
# vLLM's envs.py (VLLM_CACHE_ROOT ~/.cache/vllm, VLLM_CONFIG_ROOT ~/.config/vllm, VLLM_RPC_BASE_PATH the temp
# folder), Triton's knobs (~/.triton/cache), torch inductor (/tmp/torchinductor_USER), Hugging Face
# (~/.cache/huggingface), FlashInfer (~/.cache/flashinfer), the vllm engine's temporary files (tempfile).
GPU_WRITES = ["{home}/.cache/vllm", "{home}/.config/vllm", "/tmp", "{home}/.triton/cache", "/tmp/torchinductor_vlmsteer",
              "{home}/.cache/huggingface", "{home}/.cache/flashinfer"]


def _writable(pod: dict) -> list[str]:
    c = pod["containers"][0]
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    volumes = {v["name"]: v for v in pod["volumes"]}
    return [m["mountPath"] for m in c["volumeMounts"] if not m.get("readOnly") and "emptyDir" in volumes[m["name"]]]


def _covered(path: str, mounts: list[str]) -> bool:
    return any(path == m or path.startswith(m.rstrip("/") + "/") for m in mounts)


def test_cpu_deployment_gives_a_read_only_root_a_writable_tmp():
    """torch needs a usable temporary folder at import (tempfile.gettempdir() in torch._dynamo): with a
    read-only root and no /tmp the server exits at startup (found by `make image-check`)."""
    pod = next(d for _, d in _resources()[:4] if d["kind"] == "Deployment")["spec"]["template"]["spec"]
    assert _covered("/tmp", _writable(pod))


def test_gpu_overlay_keeps_a_read_only_root_with_writable_tmp_and_caches():
    pod = _gpu_deployment()["spec"]["template"]["spec"]
    _, uid, home = _dockerfile_image()
    assert str(pod["securityContext"]["runAsUser"]) == uid  # so HOME is the image user's home
    writable = _writable(pod)
    for path in (p.format(home=home) for p in GPU_WRITES):
        assert _covered(path, writable), f"{path} is not writable"


def test_gpu_overlay_uses_no_embedded_model_beside_the_users(monkeypatch):
    """The image's ENV and the overlay's env together name the user's checkpoints only: no setting resolves
    into the embedded ShapeWorld models (the image's /app/models, or a checkout's models/shapeworld)."""
    from server.settings import EMBEDDED, Settings

    image_env, _, _ = _dockerfile_image()
    env = {**image_env, **{e["name"]: e["value"] for e in _gpu_deployment()["spec"]["template"]["spec"]["containers"][0]["env"]
                           if "value" in e}}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    s = Settings()
    assert str(s.model).startswith("/models/")
    paths = {name: getattr(s, name) for name in Settings.model_fields if isinstance(getattr(s, name), Path)}
    embedded = [n for n, p in paths.items() if "/app/models" in str(p) or Path(p).is_relative_to(EMBEDDED)]
    assert not embedded, {n: str(paths[n]) for n in embedded}
    assert s.grounding_verifier == s.verifier  # the judge defaults to the user's verifier
