"""The grounding estimate against ShapeWorld's ground truth, through a running server.

`python -m shapeworld.bench_grounding --n 150 --seed 1234`: starts `vlm-steer serve` (in this process, on a
free loopback port) with an experiment whose arms are the steering methods, sends the caption requests of
held-out bait and random scenes (each arm its users, assigned by the experiment's own sticky hash), and
reads the estimate from /metrics alone: per arm, (suspect + unsure / 2) / mentioned objects, from the
counters' increases.
The true CHAIR_i comes from the scenes; the per-mention verdicts (from the responses' grounding blocks)
are scored against the truth. ``--judge`` names the grounding verifier (default: the embedded judge;
``--judge fisao`` judges with the verifier FiSAO steers with, to measure that bias).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families
from tqdm import tqdm

ARMS = ("none", "tita", "vcd", "fisao", "tita+fisao")


def _data_url(img) -> str:
    import base64
    import io

    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _counts(url: str) -> dict:
    out = {}
    for fam in text_string_to_metric_families(httpx.get(url + "/metrics").text):
        if fam.name in ("vlm_steer_object_mentions", "vlm_steer_suspect_mentions", "vlm_steer_unsure_mentions"):
            for s in fam.samples:
                if s.name.endswith("_total"):
                    out[(fam.name, s.labels["arm"])] = s.value
    return out


def run(n: int, seed: int, judge: str | None) -> dict:
    import socket
    import threading
    import time

    import uvicorn

    from server.app import create_app
    from server.experiments import Experiment
    from server.settings import EMBEDDED, Settings
    from shapeworld.text import CAPTION_PROMPT
    from shapeworld.world import make_scenes, phrase

    arms = [{"name": m.replace("+", "_"), "weight": 1, "steering": {"method": m}} for m in ARMS]
    exp_file = Path(tempfile.mkdtemp()) / "arms.json"
    exp_file.write_text(json.dumps({"name": "grounding-bench", "locked": True, "arms": arms}))
    exp = Experiment.load(exp_file)
    users = {}
    k = 0
    while len(users) < len(arms):  # one user per arm, by the experiment's own assignment
        users.setdefault(exp.assign(f"user-{k}").name, f"user-{k}")
        k += 1
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    extra = {"grounding_verifier": EMBEDDED / "verifier"} if judge == "fisao" else (
        {"grounding_verifier": Path(judge)} if judge else {})
    settings = Settings(port=port, experiment=exp_file, max_tokens_default=40, **extra)
    app = create_app(settings)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    url = f"http://127.0.0.1:{port}"
    while True:
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    report = {"n": n, "seed": seed, "judge": str(settings.grounding_verifier), "splits": {}}
    try:
        for split in ("bait", "random"):
            scenes = make_scenes(split, n, seed)
            before = _counts(url)
            truth = {a["name"]: [0, 0] for a in arms}  # hallucinated, mentioned (distinct objects per caption)
            verdicts = {a["name"]: [] for a in arms}  # (suspect?, hallucinated?) per distinct object
            for arm, user in users.items():
                def one(s):
                    body = {"model": settings.model_name, "temperature": 0, "user": user, "grounding": True,
                            "messages": [{"role": "user", "content": [
                                {"type": "image_url", "image_url": {"url": _data_url(s.image())}},
                                {"type": "text", "text": CAPTION_PROMPT}]}]}
                    r = httpx.post(url + "/v1/chat/completions", json=body, timeout=300)
                    r.raise_for_status()
                    return s, r.json()
                from concurrent.futures import ThreadPoolExecutor

                with ThreadPoolExecutor(16) as pool:
                    for s, body in tqdm(pool.map(one, scenes), total=n, desc=f"{split} {arm}", leave=False):
                        assert body["steering"]["arm"] == arm
                        present = {phrase(o) for o in s.objects}
                        seen = {}
                        for m in body["choices"][0]["grounding"]["mentions"]:
                            seen[m["object"]] = m["verdict"] == "suspect"
                        truth[arm][0] += sum(o not in present for o in seen)
                        truth[arm][1] += len(seen)
                        verdicts[arm] += [(sus, o not in present) for o, sus in seen.items()]
            after = _counts(url)
            rows = {}
            for a in arms:
                name = a["name"]
                d = lambda f: after.get((f, name), 0) - before.get((f, name), 0)  # noqa: E731
                ment, sus, uns = (d("vlm_steer_object_mentions"), d("vlm_steer_suspect_mentions"),
                                  d("vlm_steer_unsure_mentions"))
                tp = sum(s and h for s, h in verdicts[name])
                rows[name] = {"estimated_chair_i": (sus + uns / 2) / ment if ment else 0.0,
                              "suspect_only": sus / ment if ment else 0.0, "unsure": uns,
                              "true_chair_i": truth[name][0] / truth[name][1] if truth[name][1] else 0.0,
                              "mentions": ment, "suspect": sus,
                              "suspect_precision": tp / max(1, sum(s for s, _ in verdicts[name])),
                              "suspect_recall": tp / max(1, sum(h for _, h in verdicts[name]))}
            allv = [v for a in arms for v in verdicts[a["name"]]]
            tp = sum(s and h for s, h in allv)
            rows["all"] = {"suspect_precision": tp / max(1, sum(s for s, _ in allv)),
                           "suspect_recall": tp / max(1, sum(h for _, h in allv))}
            report["splits"][split] = rows
    finally:
        server.should_exit = True
    return report


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=150)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--judge", default=None, help="grounding verifier folder, or 'fisao' (default: the embedded judge)")
    p.add_argument("--json", type=Path, default=None)
    a = p.parse_args()
    report = run(a.n, a.seed, a.judge)
    print(f"judge: {report['judge']}  n={a.n} per split, seed={a.seed}")
    print(f"{'split':<7} {'arm':<11} {'est CHAIR_i':>11} {'true':>7} {'diff':>7} {'suspect only':>12} {'prec':>6} {'recall':>6}")
    for split, rows in report["splits"].items():
        for arm, r in rows.items():
            if arm == "all":
                print(f"{split:<7} {'(all arms)':<11} {'':>11} {'':>7} {'':>7} {'':>12} {r['suspect_precision']:>6.3f} {r['suspect_recall']:>6.3f}")
                continue
            print(f"{split:<7} {arm:<11} {r['estimated_chair_i']:>11.3f} {r['true_chair_i']:>7.3f} "
                  f"{r['estimated_chair_i'] - r['true_chair_i']:>+7.3f} {r['suspect_only']:>12.3f} {r['suspect_precision']:>6.3f} {r['suspect_recall']:>6.3f}")
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
