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
