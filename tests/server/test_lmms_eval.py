"""lmms-eval 0.7.3, the field's evaluation harness, as a client of a live server (docs/evaluate.md): the task
`vlm-steer export lmms-eval` writes, run by lmms-eval's own `openai` model against the profiles
`shapeworld:none` and `shapeworld:tita`, scored by lmms-eval's own POPE functions, gives every answer and
every figure `vlm-steer bench quality` gives on the same data (its evaluation through the engine).

lmms-eval lives in its own virtualenv (`make install-lmms-eval`, a prerequisite of `make test`): its path is
`.venv-lmms/bin/python`, or the environment's LMMS_EVAL_PYTHON."""

import json
import os
import subprocess
from pathlib import Path

import pytest
import yaml

from decoding.request import SteeringSpec
from reward_models.data import DataSet
from bench.quality import evaluate
from server.cli import main
from server.export_lmms_eval import export_lmms_eval
from tests.server.conftest import start

ROOT = Path(__file__).resolve().parents[2]
LMMS_PYTHON = Path(os.environ.get("LMMS_EVAL_PYTHON", ROOT / ".venv-lmms" / "bin" / "python"))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("lmms") / "bait-6"
    main(["data", "shapeworld", "--split", "bait", "--n", "6", "--seed", "1234", "--out", str(root)])
    return root


def test_the_export_is_lmms_evals_pope_task_on_the_data(data, tmp_path):
    names = export_lmms_eval(data, tmp_path / "task")
    ds = DataSet.load(data)
    assert names == ["steered_pope", *(f"steered_pope_{f}" for f in ds.pope)]
    group = yaml.safe_load((tmp_path / "task" / "steered_pope.yaml").read_text())
    assert group == {"group": "steered_pope", "task": names[1:]}
    text = (tmp_path / "task" / "steered_pope_random.yaml").read_text()
    assert "process_results: !function utils.pope_process_results" in text  # lmms-eval's own scoring
    assert "max_new_tokens: 1" in text
    rows = [json.loads(line) for line in (tmp_path / "task" / "steered_pope_random.jsonl").read_text().splitlines()]
    assert [(r["question"], r["answer"] == "yes") for r in rows] == [(q.text, q.label) for q in ds.pope["random"]]
    assert all(Path(r["image"]).is_file() for r in rows)
    with pytest.raises(SystemExit, match="no POPE question files"):
        (data.parent / "nopope").mkdir()
        for sub in ("annotations", "images"):
            (data.parent / "nopope" / sub).symlink_to(data / sub)
        main(["export", "lmms-eval", "--data", str(data.parent / "nopope"), "--out", str(tmp_path / "x")])


def run_lmms_eval(url: str, model: str, task: Path, out: Path) -> tuple[dict, dict]:
    """lmms-eval's results (task -> metrics) and its answers (task -> doc id -> prediction)."""
    assert LMMS_PYTHON.exists(), f"{LMMS_PYTHON}: no lmms-eval virtualenv (make install-lmms-eval)"
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_CACHE": str(out / "hf"), "HF_HOME": str(out / "hf")}
    env.pop("PYTHONPATH", None)  # lmms-eval's own interpreter: nothing of ours on its path
    done = subprocess.run([str(LMMS_PYTHON), "-m", "lmms_eval", "--model", "openai", "--model_args",
                           f"model={model},base_url={url}/v1,api_key=none,num_concurrent=8", "--include_path", str(task),
                           "--tasks", "steered_pope", "--output_path", str(out), "--log_samples"],
                          cwd=out, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (results,) = out.rglob("*_results.json")
    scores = {t: {k.split(",")[0]: v for k, v in r.items() if k.endswith(",none")}
              for t, r in json.loads(results.read_text())["results"].items()}
    answers = {}
    for f in out.rglob("*_samples_*.jsonl"):
        task = f.stem.split("_samples_")[1]
        answers[task] = {s["doc_id"]: s["pope_accuracy"]["prediction"] for s in map(json.loads, f.read_text().splitlines())}
    return scores, answers


@pytest.mark.parametrize("method", ["none", "tita"])
def test_lmms_eval_through_a_profile_gives_bench_qualitys_figures(method, data, steering_engine, tmp_path):
    task = tmp_path / "task"
    export_lmms_eval(data, task)
    ds = DataSet.load(data)
    bench = evaluate(steering_engine, ds, SteeringSpec(method), batch=8, max_tokens=1)
    with start(steering_engine) as srv:
        scores, answers = run_lmms_eval(srv.url, f"shapeworld:{method}", task, tmp_path / "out")
        metrics = srv.app.state.vlm.metrics
        labels = {(s.labels["model"], s.labels["method"], s.labels["arm"]) for fam in metrics.registry.collect()
                  if fam.name == "vlm_steer_request_success" for s in fam.samples}
    assert labels == {("shapeworld", method, f"shapeworld:{method}")}  # every request chose its method by model name
    for name, questions in ds.pope.items():
        task_name = f"steered_pope_{name}"
        said = ["yes" if a else "no" for a in bench["pope_answers"][name]]
        assert [answers[task_name][i] for i in range(len(questions))] == said, name
        ours = bench["pope"][name]
        assert scores[task_name]["pope_f1_score"] == pytest.approx(ours["f1"], abs=1e-9)
        assert scores[task_name]["pope_accuracy"] == pytest.approx(ours["accuracy"], abs=1e-9)
        assert scores[task_name]["pope_precision"] == pytest.approx(ours["precision"], abs=1e-9)
        assert scores[task_name]["pope_recall"] == pytest.approx(ours["recall"], abs=1e-9)
