"""`otmdr eval --corruptions`, `otmdr corrupt` and their errors, on a small digits run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from otmdr.cli import main
from conftest import require_oracle

DEMO = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("robustness") / "run"
    args = ["train", "--config", str(DEMO), "--out", str(out), "--set", "train.epochs=2", "--set",
            "train.progress=false", "--set", "model.options={hidden: [32]}"]
    assert main(args) == 0
    return out


def test_eval_corruptions_writes_a_table_json_and_heatmap(run, tmp_path, capsys):
    assert main(["eval", str(run), "--no-temperature-scaling", "--corruptions", "contrast,impulse_noise",
                 "--severities", "1,5", "--test-limit", "120", "--json", str(tmp_path / "e.json"),
                 "--heatmap", str(tmp_path / "heat.png")]) == 0
    printed = capsys.readouterr().out
    assert "mean corruption accuracy" in printed and "impulse_noise" in printed
    result = json.loads((tmp_path / "e.json").read_text())
    shift = result["corruptions"]
    assert shift["images"] == 120 and shift["severities"] == [1, 5]
    assert shift["clean"]["accuracy"] == pytest.approx(result["test"]["accuracy"])  # the same 120 images
    cells = [shift["corruptions"][n][s]["accuracy"] for n in ("contrast", "impulse_noise") for s in ("1", "5")]
    assert shift["mean_corruption_accuracy"] == pytest.approx(np.mean(cells))
    # salt-and-pepper on 7 % of the pixels of an 8x8 digit hurts more than on 1 %
    assert shift["corruptions"]["impulse_noise"]["5"]["nll"] > shift["corruptions"]["impulse_noise"]["1"]["nll"]
    assert (tmp_path / "heat.png").stat().st_size > 5000


def test_a_written_corrupted_copy_gives_the_same_numbers_as_on_the_fly(run, tmp_path):
    copy = tmp_path / "digits-c"
    assert main(["corrupt", "--dataset", "digits", "--out", str(copy), "--corruptions", "fog,glass_blur",
                 "--limit", "90", "--seed", "4"]) == 0
    assert sorted(p.name for p in copy.iterdir()) == ["fog.npy", "glass_blur.npy", "labels.npy", "meta.json"]
    common = ["eval", str(run), "--no-temperature-scaling", "--test-limit", "90", "--corruptions", "all"]
    assert main([*common, "--corrupted-dir", str(copy), "--json", str(tmp_path / "read.json")]) == 0
    assert main([*common[:-1], "fog,glass_blur", "--corruption-seed", "4", "--json", str(tmp_path / "gen.json")]) == 0
    read = json.loads((tmp_path / "read.json").read_text())["corruptions"]
    generated = json.loads((tmp_path / "gen.json").read_text())["corruptions"]
    assert list(read["corruptions"]) == ["fog", "glass_blur"]  # 'all' = what the folder holds
    assert read["corruptions"] == generated["corruptions"]
    assert "read from" in read["source"] and "generated" in generated["source"]


def test_bad_corruption_requests_fail_with_one_line(run, tmp_path, capsys):
    def error(args: list[str]) -> str:
        assert main(args) == 2
        err = capsys.readouterr().err
        assert err.startswith("otmdr: error:") and err.count("\n") == 1 and "Traceback" not in err
        return err

    assert "rain" in error(["eval", str(run), "--corruptions", "fog,rain"])
    assert "1..5" in error(["eval", str(run), "--corruptions", "fog", "--severities", "0-6"])
    assert "not a directory" in error(["eval", str(run), "--corruptions", "all", "--corrupted-dir",
                                       str(tmp_path / "nowhere")])
    copy = tmp_path / "small-c"
    assert main(["corrupt", "--dataset", "digits", "--out", str(copy), "--corruptions", "fog", "--limit", "30"]) == 0
    assert "--test-limit 30" in error(["eval", str(run), "--corruptions", "all", "--corrupted-dir", str(copy)])
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    assert "mine" in error(["corrupt", "--dataset", "digits", "--out", str(mine), "--corruptions", "fog"])
    assert (mine / "notes.txt").read_text() == "keep me" and sorted(p.name for p in mine.iterdir()) == ["notes.txt"]
    assert "unknown dataset" in error(["corrupt", "--dataset", "svhn", "--out", str(tmp_path / "svhn")])


def test_eval_autoattack_reports_each_stage_and_explains_a_missing_package(run, tmp_path, capsys, monkeypatch):
    require_oracle("pyautoattack", "the autoattack extra, which `otmdr eval --attack autoattack` drives")
    # a radius this large breaks every point in the first stage, which keeps the test fast
    assert main(["eval", str(run), "--no-temperature-scaling", "--test-limit", "12", "--attack", "autoattack",
                 "--eps", "0.5", "--json", str(tmp_path / "aa.json")]) == 0
    result = json.loads((tmp_path / "aa.json").read_text())
    attack = result["attack"]
    details = attack["autoattack"]["0.5"]
    assert attack["method"] == "autoattack" and details["settings"]["version"] == "standard"
    assert details["clean_accuracy"] == pytest.approx(result["test"]["accuracy"])  # the same 12 images
    assert details["clean_accuracy"] > 0.5
    assert attack["robust_accuracy"]["0.5"] == details["robust_accuracy"] == 0.0  # every point broken...
    assert details["stages"] == {"apgd-ce": 0.0, "apgd-t": 0.0, "fab-t": 0.0, "square": 0.0}  # ...by the first stage
    assert details["n_examples"] == 12 and details["max_perturbation"] <= 0.5 + 1e-6
    assert list(details["stages"])[0] == "apgd-ce" and "apgd-ce" in capsys.readouterr().out
    monkeypatch.setitem(__import__("sys").modules, "pyautoattack", None)
    assert main(["eval", str(run), "--test-limit", "12", "--attack", "autoattack", "--eps", "0.5"]) == 2
    assert "pip install 'otmdr[autoattack]'" in capsys.readouterr().err


def test_the_fixed_training_subset_covers_every_class_of_a_class_ordered_split():
    import torch

    from otmdr.eval.subsets import fixed_training_subset
    from otmdr.data import BatchLoader, ImageData, get_spec

    labels = torch.arange(10).repeat_interleave(200)  # an image folder: stored class by class
    images = torch.randint(0, 255, (2000, 1, 8, 8), dtype=torch.uint8)

    class Data:
        train = BatchLoader(ImageData(images, labels, [str(c) for c in range(10)]), get_spec("digits"), 64,
                            shuffle=True)

    batches = fixed_training_subset(Data, 100, 32)
    seen = torch.cat([y for _, y in batches])
    assert len(seen) == 100 and set(seen.tolist()) == set(range(10))
    again = torch.cat([y for _, y in fixed_training_subset(Data, 100, 32)])
    assert torch.equal(seen, again)  # the same images for every run


def test_landscape_refuses_two_architectures_before_computing(tmp_path, capsys):
    from otmdr.cli import main

    runs = []
    for name, model in (("a", "mlp"), ("b", "lenet")):
        out = tmp_path / name
        assert main(["train", "--config", str(DEMO), "--out", str(out), "--set", "train.epochs=1", "--set",
                     f"model.name={model}", "--set", "train.progress=false", "--set", "model.options={}"]) == 0
        runs.append(out)
    capsys.readouterr()
    assert main(["landscape", str(runs[0]), str(runs[1]), "--out", str(tmp_path / "land")]) == 2
    err = capsys.readouterr().err
    assert "different architectures" in err and not (tmp_path / "land").exists()


def test_mce_against_a_hand_computation():
    from otmdr.eval.run_robustness import corruption_errors

    def result(clean: float, cells: dict[str, list[float]]) -> dict:
        table = {n: {str(s): {"accuracy": a} for s, a in zip((1, 3), accs)} for n, accs in cells.items()}
        return {"clean": {"accuracy": clean}, "corruptions": table, "severities": [1, 3],
                "mean_corruption_accuracy": float(np.mean([a for v in cells.values() for a in v]))}

    model = result(0.9, {"fog": [0.8, 0.6], "snow": [0.7, 0.5]})  # errors 0.2+0.4, 0.3+0.5; clean error 0.1
    base = result(0.8, {"fog": [0.6, 0.4], "snow": [0.7, 0.3]})  # errors 0.4+0.6, 0.3+0.7; clean error 0.2
    mce = corruption_errors(model, base)
    assert mce["ce"] == pytest.approx({"fog": 0.6 / 1.0, "snow": 0.8 / 1.0})
    assert mce["mce"] == pytest.approx(0.7)
    assert mce["relative_ce"] == pytest.approx({"fog": (0.1 + 0.3) / (0.2 + 0.4), "snow": (0.2 + 0.4) / (0.1 + 0.5)})
    assert mce["relative_mce"] == pytest.approx((0.4 / 0.6 + 1.0) / 2)
    with pytest.raises(ValueError, match="other corruptions"):
        corruption_errors(model, result(0.8, {"fog": [0.6, 0.4]}))


def test_eval_baseline_reports_the_mce_and_refuses_bad_baselines(run, tmp_path, capsys):
    import torch

    out = tmp_path / "e.json"
    common = ["eval", str(run), "--no-temperature-scaling", "--test-limit", "60", "--corruptions", "contrast,fog",
              "--severities", "2,4", "--json", str(out)]
    assert main([*common, "--baseline", str(run)]) == 0  # against itself: every CE is 100 %
    mce = json.loads(out.read_text())["corruptions"]["mce"]
    assert mce["mce"] == pytest.approx(1.0) and set(mce["ce"]) == {"contrast", "fog"}
    assert mce["baseline"] == str(run) and "mCE 100.0%" in capsys.readouterr().out
    out.unlink()

    def error(baseline: str, args: list[str] = common) -> str:
        assert main([*args, "--baseline", baseline]) == 2
        err = capsys.readouterr().err
        assert err.startswith("otmdr: error: --baseline") and err.count("\n") == 1 and "Traceback" not in err
        assert not out.exists()  # nothing written
        return err

    assert "no such run" in error(str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    assert "is it a run directory" in error(str(tmp_path / "empty"))
    other = tmp_path / "other" / "checkpoints"
    other.mkdir(parents=True)
    state = torch.load(run / "checkpoints" / "last.pt", map_location="cpu", weights_only=False)
    state["config"]["data"]["name"] = "mnist"
    torch.save(state, other / "last.pt")
    assert "same dataset" in error(str(other.parent))
    assert "needs --corruptions" in error(str(run), common[:5] + ["--json", str(out)])


@pytest.fixture(scope="module")
def bnn(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("robustness") / "bnn"
    assert main(["train", "--config", str(DEMO), "--out", str(out), "--set", "train.epochs=1", "--set",
                 "train.progress=false", "--set", "model.name=bayes-mlp", "--set", "model.options={hidden: [16]}",
                 "--set", "optim.base=adam", "--set", "optim.lr=0.01", "--set", "optim.weight_decay=0",
                 "--set", "bayes.test_samples=4"]) == 0
    return out


BNN_EVAL = ["--no-temperature-scaling", "--test-limit", "40", "--corruptions", "contrast,fog", "--severities", "1,3",
            "--attack", "pgd", "--eps", "2/255,4/255", "--steps", "1"]


def test_predictive_samples_sets_a_bnns_draws_everywhere_and_is_refused_for_a_deterministic_run(
        run, bnn, tmp_path, capsys, monkeypatch):
    """A Bayesian network's corruption grid costs one forward pass per draw, image and condition: a
    100-draw study's robustness evaluation can ask for fewer. Every part (clean, corrupted, attacked)
    must then use the same draws."""
    import otmdr.eval.attacks as attacks
    import otmdr.eval.corruption_grid as grid

    used: list[int] = []
    real_predict, real_robust = grid.predict, attacks.robust_accuracies
    monkeypatch.setattr(grid, "predict", lambda *a, samples, **k: used.append(samples) or real_predict(
        *a, samples=samples, **k))
    monkeypatch.setattr(attacks, "robust_accuracies", lambda *a, samples, **k: used.append(samples) or real_robust(
        *a, samples=samples, **k))
    common = ["eval", str(bnn), "--no-temperature-scaling", "--test-limit", "40", "--corruptions", "contrast",
              "--severities", "1", "--attack", "pgd", "--eps", "2/255", "--steps", "1"]
    for draws, expected in ((["--predictive-samples", "2"], 2), ([], 4)):  # default: the run's bayes.test_samples
        used.clear()
        assert main([*common, *draws, "--json", str(tmp_path / f"{expected}.json")]) == 0
        assert json.loads((tmp_path / f"{expected}.json").read_text())["test_samples"] == expected
        assert used == [expected] * 3  # clean and contrast images, then the attack

    capsys.readouterr()
    assert main(["eval", str(run), "--predictive-samples", "3", "--json", str(tmp_path / "det.json")]) == 2
    err = capsys.readouterr().err
    assert "--predictive-samples" in err and "not a Bayesian network" in err and err.count("\n") == 1
    assert not (tmp_path / "det.json").exists()
    assert main(["eval", str(bnn), "--predictive-samples", "0"]) == 2
    assert "--predictive-samples" in capsys.readouterr().err


def test_a_bnns_evaluation_also_scores_each_half_of_its_draws(run, bnn, tmp_path):
    """The split-half Monte-Carlo check (benchmarks/robustness.py reports it): every accuracy of a
    Bayesian network's corruption grid and attack is also recorded from each half of its draws, at
    no extra forward pass; a deterministic model records none."""
    assert main(["eval", str(bnn), *BNN_EVAL, "--predictive-samples", "4", "--json", str(tmp_path / "b.json")]) == 0
    result = json.loads((tmp_path / "b.json").read_text())
    split = result["corruptions"]["monte_carlo"]
    assert (split["samples"], split["halves"]) == (4, [2, 2])
    cells = [split["cells"][name][s] for name in ("contrast", "fog") for s in ("1", "3")]
    assert sorted(split["cells"]) == ["contrast", "fog"] and all(len(c) == 2 for c in cells)
    assert split["mean_corruption_accuracy"] == pytest.approx([np.mean([c[h] for c in cells]) for h in (0, 1)])
    assert all(0 <= a <= 1 and round(40 * a) == pytest.approx(40 * a) for c in cells for a in c)  # 40 images
    attack = result["attack"]
    assert set(attack["monte_carlo"]["robust_accuracy"]) == set(attack["robust_accuracy"])
    assert attack["monte_carlo"]["halves"] == [2, 2]
    assert main(["eval", str(run), *BNN_EVAL, "--json", str(tmp_path / "d.json")]) == 0
    deterministic = json.loads((tmp_path / "d.json").read_text())
    assert "monte_carlo" not in deterministic["corruptions"] and "monte_carlo" not in deterministic["attack"]
