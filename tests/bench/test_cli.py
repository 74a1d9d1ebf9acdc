"""The benchmarks' command line: bad arguments and missing model folders are one line, before any work."""

import pytest

from server.cli import main


def test_a_missing_model_folder_is_one_line():
    with pytest.raises(SystemExit) as e:
        main(["bench", "speed", "--model", "/nonexistent-model-folder", "--n", "2"])
    assert str(e.value) == "vlm-steer: model /nonexistent-model-folder: no such folder (models load from local folders)"


@pytest.mark.parametrize("flag", ["--repeats", "--running"])
@pytest.mark.parametrize("value", ["0", "-3", "two"])
def test_the_arrival_bench_refuses_counts_below_one(flag, value, capsys):
    with pytest.raises(SystemExit) as e:
        main(["bench", "arrival", flag, value])
    assert e.value.code == 2
    assert f"argument {flag}: {value} is not an integer >= 1" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["bench", "speed", "--methods", "none,nosuch"], "argument --methods: unknown steering method 'nosuch'"),
    (["bench", "arrival", "--methods", "tita+tita"], "argument --methods: steering method 'tita+tita' names a method twice"),
    (["bench", "quality", "--methods", "tita+nosuch"], "argument --methods: unknown steering method 'tita+nosuch'"),
    (["bench", "quality", "--split", "random,nosuch"], "argument --split: unknown split 'nosuch'"),
    (["bench", "speed", "--n", "0"], "argument --n: 0 is not an integer >= 1"),
    (["bench", "speed", "--batch", "0"], "argument --batch: 0 is not an integer >= 1"),
    (["bench", "quality", "--n", "0"], "argument --n: 0 is not an integer >= 1"),
])
def test_bad_benchmark_arguments_are_one_line_before_any_work(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_a_method_the_models_cannot_run_is_one_line():
    with pytest.raises(SystemExit) as e:
        main(["bench", "quality", "--methods", "none,tita", "--reward", "", "--n", "2"])
    assert str(e.value).startswith("vlm-steer: steering method 'tita' needs")


def test_the_vllm_engine_without_vllm_is_one_line(monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "vllm", None)  # `import vllm` fails, as in a virtualenv without it
    with pytest.raises(SystemExit) as e:
        main(["bench", "arrival", "--repeats", "1", "--running", "1"])
    assert str(e.value).startswith("vlm-steer: the vllm engine needs vLLM")
