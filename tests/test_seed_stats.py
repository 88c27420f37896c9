"""txtrain-summary's statistics over seeds (Student's t, Welch's test: checked against
published values) and txtrain-plot's mean curve with a band per group."""

import csv
import json
import math
from pathlib import Path

import pytest
import yaml

from txtrain import plots, summary
from txtrain.summary import betainc, grouped_rows, mean_std_ci, t_cdf, t_quantile, welch_p


@pytest.mark.parametrize("p,df,expected", [
    (0.975, 2, 4.302653), (0.975, 1, 12.706205), (0.975, 9, 2.262157), (0.975, 30, 2.042272),
    (0.995, 10, 3.169273), (0.95, 4, 2.131847), (0.025, 2, -4.302653),
])
def test_t_quantiles_match_the_tables(p, df, expected):
    assert t_quantile(p, df) == pytest.approx(expected, abs=1e-6)
    assert t_cdf(t_quantile(p, df), df) == pytest.approx(p, abs=1e-12)


def test_the_incomplete_beta_function_in_closed_forms():
    for x in (0.0, 0.1, 0.5, 0.93, 1.0):
        assert betainc(1, 1, x) == pytest.approx(x, abs=1e-14)
        assert betainc(3, 1, x) == pytest.approx(x ** 3, abs=1e-14)
        assert betainc(1, 4, x) == pytest.approx(1 - (1 - x) ** 4, abs=1e-14)
    # t's distribution in closed form for 1 (Cauchy), 2 and 4 degrees of freedom
    for t in (-3.0, -0.2, 0.0, 1.0, 3.4, 40.0):
        assert t_cdf(t, 1) == pytest.approx(0.5 + math.atan(t) / math.pi, abs=1e-13)
        assert t_cdf(t, 2) == pytest.approx(0.5 + t / (2 * math.sqrt(2 + t * t)), abs=1e-13)
        u = t * t / (4 + t * t)
        assert t_cdf(t, 4) == pytest.approx(0.5 + 0.75 * math.copysign(math.sqrt(u), t) * (1 - u / 3),
                                            abs=1e-13)


# R's sleep data: extra hours of sleep under two drugs (Student, 1908), ten patients each.
# t.test(extra ~ group, data = sleep): Welch t = -1.8608, df = 17.776, p-value = 0.07939;
# t.test(sleep$extra[1:10]): mean 0.75, 95 percent confidence interval -0.5297804 2.0297804.
DRUG_1 = [0.7, -1.6, -0.2, -1.2, -0.1, 3.4, 3.7, 0.8, 0.0, 2.0]
DRUG_2 = [1.9, 0.8, 1.1, 0.1, -0.1, 4.4, 5.5, 1.6, 4.6, 3.4]


def test_welch_and_the_confidence_interval_match_r():
    assert welch_p(DRUG_1, DRUG_2) == pytest.approx(0.07939, abs=5e-6)
    assert welch_p(DRUG_2, DRUG_1) == welch_p(DRUG_1, DRUG_2)
    mean, std, half_width = mean_std_ci(DRUG_1)
    assert mean == pytest.approx(0.75)
    assert (mean - half_width, mean + half_width) == pytest.approx((-0.5297804, 2.0297804), abs=1e-7)
    assert std == pytest.approx(1.789010, abs=1e-6)
    # Undefined: a single value, or no spread in either
    assert mean_std_ci([2.0]) == (2.0, None, None)
    assert welch_p([1.0], DRUG_2) is None and welch_p([1.0, 1.0], [2.0, 2.0]) is None


def fake_run(run_dir: Path, overrides: list[str], losses: list[float], matches: list[float]) -> None:
    (run_dir / ".hydra").mkdir(parents=True)
    (run_dir / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    steps = range(10, 10 * len(losses) + 1, 10)
    (run_dir / "metrics.jsonl").write_text("".join(
        json.dumps({"step": s, "loss": loss, "tokens": 100 * s}) + "\n" for s, loss in zip(steps, losses)))
    (run_dir / "eval.jsonl").write_text("".join(
        json.dumps({"step": s, "exact_match": m}) + "\n" for s, m in zip(steps, matches)))
    (run_dir / "run.json").write_text(json.dumps({"result": {"tokens_per_s": 1000.0, "seconds": 2.0}}))


@pytest.fixture
def sweep(tmp_path) -> Path:
    """2 learning rates x 3 seeds; final losses 1, 2, 3 (lr 1e-3) and 4, 4.5, 6 (lr 3e-3)."""
    finals = {"1e-3": [1.0, 2.0, 3.0], "3e-3": [4.0, 4.5, 6.0]}
    job = 0
    for lr, losses in finals.items():
        for seed, final in enumerate(losses):
            fake_run(tmp_path / str(job), ["task=reverse", f"seed={seed}", f"optim.lr={lr}",
                                           "hydra.sweep.dir=x"],
                     [9.0, final], [0.1, 0.5 + final / 10])
            job += 1
    return tmp_path


def test_runs_differing_only_in_seed_are_one_row(sweep):
    rows = grouped_rows(sweep, baseline="optim.lr=0.001")  # 0.001 is 1e-3
    assert [row["optim.lr"] for row in rows] == ["1e-3", "3e-3"]
    first, second = rows
    assert first["n_seeds"] == second["n_seeds"] == 3
    # By hand: losses 1, 2, 3 have mean 2, standard deviation 1, and the half-width of the 95%
    # interval is t(0.975, 2) / sqrt(3) = 4.302653 / 1.732051 = 2.484138.
    assert (first["final_loss_mean"], first["final_loss_std"]) == pytest.approx((2.0, 1.0))
    assert first["final_loss_ci95"] == pytest.approx(2.484138, abs=1e-6)
    # 4, 4.5, 6: mean 4.8333, variance (0.6944 + 0.1111 + 1.3611) / 2 = 1.0833
    assert second["final_loss_mean"] == pytest.approx(29 / 6)
    assert second["final_loss_std"] == pytest.approx(math.sqrt(13 / 12))
    # Welch by hand: t = (29/6 - 2) / sqrt(1/3 + 13/36) = (17/6) / (5/6) = 3.4, and
    # df = (25/36)^2 / ((1/3)^2 / 2 + (13/36)^2 / 2) = 1250/313 = 3.9936: p = 0.02735 (with
    # df = 4 exactly, p = 0.02728 from the closed form above: a hair less)
    assert first["final_loss_p"] is None  # the baseline itself
    assert second["final_loss_p"] == pytest.approx(0.027345, abs=1e-6)
    assert second["best_exact_match_mean"] == pytest.approx(0.5 + 29 / 60)
    assert second["best_exact_match_p"] == pytest.approx(second["final_loss_p"])
    assert first["run_dirs"] == "0 1 2" and first["tokens_per_s"] == 1000.0
    assert "seed" not in first and "task" not in first  # the same in every run


def test_the_command_writes_the_statistics_to_summary_csv(sweep, capsys):
    summary.main([str(sweep), "--baseline", "optim.lr=1e-3"])
    table = capsys.readouterr().out
    assert table.splitlines()[0].startswith("| optim.lr | n_seeds | final_loss_mean |")
    with (sweep / "summary.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == [
        "optim.lr", "n_seeds", "final_loss_mean", "final_loss_std", "final_loss_ci95",
        "final_loss_p", "best_exact_match_mean", "best_exact_match_std", "best_exact_match_ci95",
        "best_exact_match_p", "tokens_per_s", "seconds", "run_dirs"]
    assert rows[0]["final_loss_p"] == ""
    assert float(rows[1]["final_loss_p"]) == pytest.approx(0.027345, abs=1e-6)


@pytest.mark.parametrize("args,message", [
    (["--baseline", "optim.lr=1e-2"], "matches 0 groups"),
    (["--baseline", "task=reverse"], "matches 2 groups"),
])
def test_a_baseline_must_name_one_group(sweep, capsys, args, message):
    with pytest.raises(SystemExit) as stopped:
        summary.main([str(sweep), *args])
    assert stopped.value.code == 2
    error = capsys.readouterr().err
    assert error.startswith("error: ") and message in error and error.count("\n") == 1


def test_a_baseline_needs_a_sweep_over_seeds(tmp_path, capsys):
    fake_run(tmp_path / "0", ["optim.lr=1e-3"], [2.0], [0.1])
    fake_run(tmp_path / "1", ["optim.lr=3e-3"], [1.0], [0.2])
    with pytest.raises(SystemExit):
        summary.main([str(tmp_path), "--baseline", "optim.lr=1e-3"])
    assert "differ in seed" in capsys.readouterr().err
    summary.main([str(tmp_path)])  # without it: one row per run, as before
    assert "| optim.lr | final_loss |" in capsys.readouterr().out


def test_the_sweep_plot_draws_a_mean_and_a_band_per_group(sweep, monkeypatch):
    pytest.importorskip("matplotlib")
    drawn = []
    save = plots.save
    monkeypatch.setattr(plots, "save", lambda fig, path: drawn.append(fig) or save(fig, path))
    assert plots.plot_sweep(sweep) == sweep / "loss.png" and (sweep / "loss.png").is_file()
    ax, twin = drawn[0].axes
    assert [line.get_label() for line in ax.lines] == ["optim.lr=1e-3 (3 seeds)",
                                                       "optim.lr=3e-3 (3 seeds)"]
    assert list(ax.lines[0].get_ydata()) == pytest.approx([9.0, 2.0])  # the mean over seeds
    assert len(ax.collections) == 2 and len(twin.collections) == 2  # a band per group, each axis
    band = ax.collections[0].get_paths()[0].vertices[:, 1]
    assert min(band) == pytest.approx(1.0) and max(band) == pytest.approx(9.0)  # 2 +- 1 at the end
