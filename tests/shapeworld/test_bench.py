"""The benchmark commands end to end on a few scenes: JSON shape, plots, speed ratios."""

import json

from server.cli import main


def test_bench_quality_json_and_plot(tmp_path):
    out, png = tmp_path / "q.json", tmp_path / "q.png"
    main(["bench", "quality", "--split", "bait", "--methods", "none,fisao", "--n", "6", "--seed", "1234",
          "--json", str(out), "--plot", str(png)])
    rep = json.loads(out.read_text())
    assert rep["split"] == "bait" and rep["n"] == 6 and rep["seed"] == 1234
    for m in ("none", "fisao"):
        r = rep["methods"][m]
        assert {"chair_i", "chair_s", "recall", "pope", "tokens_per_second"} <= set(r)
        for s in ("random", "popular", "adversarial"):
            assert set(r["pope"][s]) == {"accuracy", "precision", "recall", "f1", "yes_ratio"}
    assert png.stat().st_size > 10_000


def test_bench_sweep_plot(tmp_path):
    png = tmp_path / "s.png"
    main(["bench", "quality", "--split", "bait", "--methods", "none", "--sweep", "tita:0,0.6", "--n", "4",
          "--json", str(tmp_path / "s.json"), "--plot", str(png)])
    rep = json.loads((tmp_path / "s.json").read_text())
    assert {"tita@0", "tita@0.6"} <= set(rep["methods"])
    # strength 0 is the unsteered model
    assert rep["methods"]["tita@0"]["chair_i"] == rep["methods"]["none"]["chair_i"]
    assert png.exists()


def test_bench_speed_reports_ratios(tmp_path):
    out = tmp_path / "speed.json"
    main(["bench", "speed", "--methods", "none,tita", "--n", "8", "--batch", "4", "--json", str(out)])
    rep = json.loads(out.read_text())
    assert rep["methods"]["none"]["ratio_to_none"] == 1.0
    assert 0 < rep["methods"]["tita"]["ratio_to_none"]
    assert "tita" in rep["methods"]["tita"]["steering_seconds"]


def test_bench_speed_ignore_eos_generates_max_tokens(tmp_path):
    out = tmp_path / "speed.json"
    main(["bench", "speed", "--methods", "none,fisao", "--n", "4", "--batch", "4", "--ignore-eos", "--json", str(out)])
    rep = json.loads(out.read_text())
    assert rep["ignore_eos"] is True
    for m in ("none", "fisao"):  # every request runs to 40 tokens, whatever its captions say
        assert rep["methods"][m]["tokens_per_request"] == 40.0


def test_bench_speed_on_a_data_set_folders_images(tmp_path):
    """`bench speed --data DIR` takes its requests from a data set folder (images and caption prompt)."""
    from reward_models.data import DataSet

    main(["data", "shapeworld", "--split", "bait", "--n", "3", "--seed", "4321", "--out", str(tmp_path / "d")])
    images, prompt = DataSet.load(tmp_path / "d").sample_images(5, 0)
    assert len(images) == 5 and prompt == "describe the image ."  # 3 images, cycled
    out = tmp_path / "speed.json"
    main(["bench", "speed", "--methods", "none", "--n", "4", "--batch", "4", "--data", str(tmp_path / "d"),
          "--json", str(out)])
    rep = json.loads(out.read_text())
    assert rep["n"] == 4 and rep["images"] == str(tmp_path / "d") and rep["methods"]["none"]["tokens"] > 0
