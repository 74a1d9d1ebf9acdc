"""`make gpu-check` refuses on CPU with a clear message, and its code paths run end to end on tiny pairs
(`--tiny-on-cpu`, transformers engine): the table it prints on a GPU comes from code that runs."""

import subprocess
import sys

import torch

from tests.gpu_check import main


def test_refuses_without_a_gpu():
    if torch.cuda.is_available():  # on a GPU machine the check itself is the test
        return
    r = subprocess.run([sys.executable, "-m", "tests.gpu_check"], capture_output=True, text=True)
    assert r.returncode == 1 and "needs a CUDA GPU" in r.stderr


def test_dry_run_on_tiny_pairs(tmp_path):
    rows = main(["--tiny-on-cpu", "--engines", "transformers", "--n", "8", "--max-tokens", "6",
                 "--out", str(tmp_path / "check.json")])
    assert [r["pair"] for r in rows] == ["llava-1.5-7b", "qwen2.5-vl-7b"]
    for r in rows:
        assert r["equal"] == (4, 4) and r["none"] > 0 and 0 < r["limit"] < 1 and r["tita_x"] > 0
