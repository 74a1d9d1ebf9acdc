"""`make gpu-check` refuses on CPU with a clear message, and its code paths run end to end on tiny pairs
(`--tiny-on-cpu`, transformers engine): the table it prints on a GPU comes from code that runs."""

import json
import subprocess
import sys

import torch

from tests.gpu_check import main


def test_refuses_without_a_gpu():
    if torch.cuda.is_available():  # on a GPU machine the check itself is the test
        return
    r = subprocess.run([sys.executable, "-m", "tests.gpu_check"], capture_output=True, text=True)
    assert r.returncode == 1 and "needs a CUDA GPU" in r.stderr


def test_dry_run_on_tiny_pairs(tmp_path, capsys):
    """Both engines asked for: the transformers rows measure, greedy-equal and sample; the vllm rows (vllm is
    not in this virtualenv) say why instead of stopping the check, and the table is still printed and written."""
    rows = main(["--tiny-on-cpu", "--engines", "transformers,vllm", "--n", "8", "--max-tokens", "6",
                 "--out", str(tmp_path / "check.json")])
    assert [(r["pair"], r["engine"]) for r in rows] == [(p, e) for p in ("llava-1.5-7b", "qwen2.5-vl-7b")
                                                         for e in ("transformers", "vllm")]
    for r in rows[::2]:
        assert r["equal"] == (4, 4) and r["none"] > 0 and 0 < r["limit"] < 1 and r["tita_x"] > 0
        assert r["sampled"] == (8, 8)
    for r in rows[1::2]:
        assert r["error"] == "vllm is not installed in this python"
    assert json.loads((tmp_path / "check.json").read_text()) == json.loads(json.dumps(rows))
    assert "vllm is not installed" in capsys.readouterr().out
