"""``vlm-steer export lmms-eval``: an lmms-eval task for a data set folder's POPE files, so that lmms-eval
(0.7.3, its ``openai`` model: ``model``, ``messages``, ``max_tokens``, ``temperature`` only) scores a running
server's answers with its own POPE scoring (``lmms_eval.tasks.pope.utils``). The method is chosen by the
model name (``vlm:tita``, ``server.profiles``): lmms-eval cannot send the ``steering`` field.

Written to ``TASKDIR``, for each ``pope/<file>.jsonl`` of the data folder (``reward_models.data``):

    <name>_<file>.jsonl   one line per question: question_id, question, answer (yes/no), category (the file),
                          image (the image file's absolute path)
    <name>_<file>.yaml    the task: lmms-eval's stock POPE task (lmms_eval/tasks/pope/pope.yaml) read from the
                          JSON lines above (``dataset_path: json``), its images cast to ``datasets.Image``
                          (``process_docs``), no pre- or post-prompt (the question as the data set asks it, as
                          ``vlm-steer bench quality`` does) and ``max_new_tokens: 1`` (lmms-eval's POPE
                          scoring takes the whole answer as yes or no: one token is the answer, as bench
                          quality reads it)
    <name>.yaml           a group of those tasks
    utils.py              lmms-eval's POPE functions, imported, and the image cast

Run: ``HF_HUB_OFFLINE=1 .venv-lmms/bin/lmms-eval --model openai --model_args model=vlm:tita,base_url=http://127.0.0.1:8000/v1,api_key=none
--include_path TASKDIR --tasks <name>`` (docs/evaluate.md).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

from reward_models.data import DataError, DataSet

UTILS = '''"""lmms-eval's POPE task functions (lmms_eval.tasks.pope.utils), reused as they are, and the cast that
turns the image paths of the exported JSON lines into images (written by `vlm-steer export lmms-eval`)."""

import datasets

from lmms_eval.tasks.pope.utils import (  # noqa: F401
    pope_aggregate_accuracy,
    pope_aggregate_f1_score,
    pope_aggregate_precision,
    pope_aggregate_recall,
    pope_aggregate_yes_ratio,
    pope_doc_to_text,
    pope_doc_to_visual,
    pope_process_results,
)


def process_docs(dataset):
    return dataset.cast_column("image", datasets.Image())
'''

METRICS = ["accuracy", "precision", "recall", "f1_score", "yes_ratio"]


def task_config(task: str, data_file: Path) -> dict:
    """One POPE task over ``data_file``: lmms-eval's stock POPE task but for its data and prompts."""
    return {
        "task": task,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data_file)}},
        "test_split": "test",
        "output_type": "generate_until",
        "process_docs": "!function utils.process_docs",
        "doc_to_visual": "!function utils.pope_doc_to_visual",
        "doc_to_text": "!function utils.pope_doc_to_text",
        "doc_to_target": "answer",
        "generation_kwargs": {"max_new_tokens": 1, "temperature": 0, "top_p": 1.0, "num_beams": 1, "do_sample": False},
        "process_results": "!function utils.pope_process_results",
        "metric_list": [{"metric": f"pope_{m}", "aggregation": f"!function utils.pope_aggregate_{m}",
                         "higher_is_better": True} for m in METRICS],
        "lmms_eval_specific_kwargs": {"default": {"pre_prompt": "", "post_prompt": ""}},
        "metadata": [{"version": 0.0}],
    }


def _dump(config: dict) -> str:
    """YAML with lmms-eval's ``!function`` tags unquoted (PyYAML would quote them as strings)."""
    text = yaml.safe_dump(config, sort_keys=False, width=1000)
    return re.sub(r"'(!function [\w.]+)'", r"\1", text)


def export_lmms_eval(data: str | Path, out: str | Path, name: str = "steered_pope") -> list[str]:
    """Write the task folder (see the module docstring); returns the task names, the group's first.
    ``DataError`` for a data folder without POPE files."""
    ds = DataSet.load(data)
    if not ds.pope:
        raise DataError(f"{Path(data) / 'pope'}: no POPE question files (pope/<name>.jsonl) to export")
    if not re.fullmatch(r"[A-Za-z_][\w]*", name):
        raise DataError(f"--name {name!r}: a task name is letters, digits and underscores")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tasks = []
    for split, questions in ds.pope.items():
        task = f"{name}_{re.sub(r'[^A-Za-z0-9_]', '_', split)}"
        rows = out / f"{task}.jsonl"
        with rows.open("w", encoding="utf-8") as f:
            for q in questions:
                f.write(json.dumps({"question_id": str(q.question_id), "question": q.text,
                                    "answer": "yes" if q.label else "no", "category": split,
                                    "image": str((ds.root / "images" / q.image).resolve())}) + "\n")
        (out / f"{task}.yaml").write_text(_dump(task_config(task, rows.resolve())), encoding="utf-8")
        tasks.append(task)
    (out / f"{name}.yaml").write_text(_dump({"group": name, "task": tasks}), encoding="utf-8")
    (out / "utils.py").write_text(UTILS, encoding="utf-8")
    return [name, *tasks]
