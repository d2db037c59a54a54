"""Statistics over seeds against hand-computed values, claim verdicts (floors, Holm, power), `--plan`,
and the study file's checks."""
import json
import math

import numpy as np
import pandas as pd
import pytest

from isolocal.cli import main
from isolocal.config import ConfigError
from isolocal.study.claims import judge_claims
from isolocal.study.job import PRETRAIN, write_json
from isolocal.study.report import loss_heading
from isolocal.study.runner import check_stale
from isolocal.study.schema import load_study, run_spec, select_runs
from isolocal.study.stats import (Interval, holm, mean_ci, one_sided_p, paired_difference, seeds_for_power,
                                  t_test_power, verdict)
from isolocal.study.summary import final_losses, read_metrics, values
from isolocal.study.tables import P_ONE_SIDED, SEEDS_TO_DECIDE, claim_rows, plan_table

T_975_DF2 = 4.302652729749464  # Student t 97.5% quantile, 2 degrees of freedom (printed tables: 4.303)


def test_mean_ci_by_hand():
    # [1, 2, 3]: mean 2, sample sd 1, standard error 1/sqrt(3)
    ci = mean_ci([1.0, 2.0, 3.0])
    half = T_975_DF2 / math.sqrt(3)
    assert (ci.mean, ci.n) == (2.0, 3)
    assert ci.low == pytest.approx(2 - half, rel=1e-9) and ci.high == pytest.approx(2 + half, rel=1e-9)
    assert ci.half_width == pytest.approx(half, rel=1e-9)


def test_mean_ci_degenerate_cases():
    one = mean_ci([7.5])
    assert one.mean == 7.5 and one.n == 1 and math.isnan(one.low) and math.isnan(one.high)
    same = mean_ci([4.0, 4.0, 4.0])
    assert (same.low, same.high) == (4.0, 4.0)
    assert mean_ci([]).n == 0


def test_paired_difference_by_hand():
    # differences [2, 3, 2]: mean 7/3, sd sqrt(1/3), standard error 1/3, t = 7 on 2 df.
    # Two-sided p for t on 2 df has the closed form 1 - t / sqrt(t^2 + 2).
    result = paired_difference([3.0, 5.0, 4.0], [1.0, 2.0, 2.0])
    assert result.diff.mean == pytest.approx(7 / 3)
    assert result.diff.half_width == pytest.approx(T_975_DF2 / 3, rel=1e-9)
    assert result.p_value == pytest.approx(1 - 7 / math.sqrt(51), rel=1e-9)
    assert math.isnan(paired_difference([1.0, 2.0], [0.0, 1.0]).p_value)  # equal differences: no test
    with pytest.raises(ValueError, match="same length"):
        paired_difference([1.0], [1.0, 2.0])


@pytest.mark.parametrize("low, high, threshold, expected", [
    (-0.5, 0.8, -1.0, "holds"),      # non-inferior, margin 1: whole interval above -1
    (-2.5, -1.2, -1.0, "fails"),     # whole interval below -1
    (-1.5, 0.3, -1.0, "undecided"),  # straddles -1
    (0.1, 0.9, 0.0, "holds"),        # superior, margin 0: a better than b
    (-0.4, 0.9, 0.0, "undecided"),
    (3.5, 5.0, 3.0, "holds"),        # superior, margin 3: a beats b by more than 3
    (1.0, 2.5, 3.0, "fails"),
])
def test_verdict_outcomes(low, high, threshold, expected):
    assert verdict(Interval((low + high) / 2, low, high, 3), threshold) == expected


def test_one_seed_claim_is_undecided():
    assert verdict(mean_ci([5.0]), 0.0) == "undecided"


# The worked example of docs/studies.md: differences -0.4, 0.2, -0.1, non-inferior with margin 1 (t = -1).
# mean -0.1, sd 0.3, sem 0.3 / sqrt(3); t-statistic (-0.1 + 1) / sem = 3 sqrt(3) on 2 df.
EXAMPLE = [-0.4, 0.2, -0.1]


def test_one_sided_p_by_hand():
    # the t distribution on 2 df has the closed-form tail P(T > x) = (1 - x / sqrt(x^2 + 2)) / 2
    x = 3 * math.sqrt(3)
    p = (1 - x / math.sqrt(x * x + 2)) / 2
    assert p == pytest.approx(0.01755, abs=1e-5)
    assert one_sided_p(EXAMPLE, -1.0) == pytest.approx(p, rel=1e-9)
    assert one_sided_p([-v for v in EXAMPLE], 1.0) == pytest.approx(1 - p, rel=1e-9)  # the reverse null
    # p < 0.025 exactly when the 95% interval's lower bound is above the threshold
    assert mean_ci(EXAMPLE).low == pytest.approx(-0.1 - T_975_DF2 * 0.3 / math.sqrt(3)) and mean_ci(EXAMPLE).low > -1
    assert one_sided_p(EXAMPLE, 0.0) == pytest.approx(0.689, abs=1e-3)  # superior, margin 0: t-statistic -1/sqrt(3)
    assert math.isnan(one_sided_p([1.0], 0.0))
    assert (one_sided_p([2.0, 2.0], 1.0), one_sided_p([2.0, 2.0], 3.0), one_sided_p([2.0, 2.0], 2.0)) == (0.0, 1.0, 1.0)


def test_holm_by_hand():
    # m = 4 at 0.025: the smallest p is compared with 0.025 / 4 = 0.00625 (0.005 passes), the next with
    # 0.025 / 3 = 0.00833 (0.011 does not) and Holm stops there; unadjusted, 0.02 and 0.011 pass too.
    p = [0.005, 0.02, 0.011, 0.3]
    adjusted = holm(p)
    assert adjusted == pytest.approx([0.02, 0.04, 0.033, 0.3])
    assert list(adjusted < 0.025) == [True, False, False, False]
    assert list(np.asarray(p) < 0.025) == [True, True, True, False]
    # m = 3: 0.004 < 0.025 / 3, then 0.012 < 0.025 / 2, then 0.02 < 0.025: all rejected, where
    # Bonferroni (0.025 / 3 for each) rejects only the first. Adjusted values never decrease with p.
    assert holm([0.02, 0.004, 0.012]) == pytest.approx([0.024, 0.012, 0.024])
    assert holm([math.nan, 0.01]) == pytest.approx([1.0, 0.02])  # a claim without a p still counts in m


def test_power_reproduces_the_textbook_sample_sizes():
    # one-sample t-test at two-sided 0.05 (one-sided 0.025: the far tail adds under 1e-5 here), 80% power:
    # effect size 1 needs 10, effect size 0.5 needs 34 (G*Power); one seed fewer falls short
    assert t_test_power(1.0, 1.0, 9) == pytest.approx(0.748, abs=1e-3)
    assert t_test_power(1.0, 1.0, 10) == pytest.approx(0.803, abs=1e-3)
    assert t_test_power(0.5, 1.0, 33) == pytest.approx(0.795, abs=1e-3)
    assert t_test_power(0.5, 1.0, 34) == pytest.approx(0.808, abs=1e-3)
    assert seeds_for_power(1.0, 1.0) == 10 and seeds_for_power(2.0, 4.0) == 34  # only distance / sd counts
    # the worked example: distance 0.9 at sd 0.3, power 0.745 at 3 seeds and 0.967 at 4; as superior with
    # margin 0, distance 0.1: 73 seeds
    assert seeds_for_power(0.9, 0.3) == 4 and seeds_for_power(0.1, 0.3) == 73
    assert t_test_power(0.9, 0.3, np.array([3, 4])) == pytest.approx([0.745, 0.967], abs=1e-3)
    assert seeds_for_power(0.0, 1.0) is None and seeds_for_power(0.01, 1.0) is None  # never; beyond 1000
    assert seeds_for_power(0.5, 0.0) == 2
    with pytest.raises(ValueError, match="must be >= 0"):
        seeds_for_power(-1.0, 1.0)


STUDY = """
[study]
name = "claims"
out_dir = "{out}"
seeds = [0, 1, 2]
evals = ["knn", "linear", "finetune"]
{claims}

[base]
preset = "localmim_vit_nano"
[base.data]
name = "synthetic"

[variants.g]
model = {{ boundary = "global" }}
[variants.i]
model = {{ boundary = "isolated" }}
[variants.top]
preset = "mae_vit_nano"
[variants.random]
[variants.pixels]
pretrain = false
"""

CLAIMS = """
[study.claims.holds]
a = "i"
b = "g"
metric = "finetune"
margin = 1.0
direction = "noninferior"
[study.claims.fails]
a = "top"
b = "g"
metric = "knn"
layer = 4
margin = 0.0
direction = "superior"
[study.claims.undecided]
a = "g"
b = "top"
metric = "nmi"
layer = [2, 3]
margin = 0.0
direction = "superior"
statement = "local losses raise NMI at layers 2-3"
[study.claims.floored]
a = "top"
b = "i"
metric = "linear"
layer = 4
margin = 1.0
direction = "noninferior"
"""


def _study(tmp_path, claims=CLAIMS):
    path = tmp_path / "study.toml"
    path.write_text(STUDY.format(out=tmp_path / "out", claims=claims))
    return path


def _summary(rows):
    return pd.DataFrame(rows, columns=["variant", "seed", "metric", "stage", "layer", "value"])


def _claims_summary():
    rows = []
    for seed, (g, d) in enumerate(zip([80.0, 81.0, 79.0], EXAMPLE)):  # i - g: the worked example
        rows += [("g", seed, "finetune", None, None, g), ("i", seed, "finetune", None, None, g + d)]
    for seed, (g, top) in enumerate([(70.0, 60.0), (71.0, 62.0), (69.0, 61.0)]):  # top - g about -9
        rows += [("g", seed, "knn", 3, 4, g), ("top", seed, "knn", 0, 4, top), ("g", seed, "knn", 0, 1, 99.0)]
    for seed, (g, top) in enumerate([(0.02, 0.01), (0.01, 0.02), (0.03, 0.01)]):  # NMI at layers 2 and 3
        rows += [("g", seed, "nmi", None, 2, g), ("g", seed, "nmi", None, 3, g),
                 ("top", seed, "nmi", None, 2, top), ("top", seed, "nmi", None, 3, top)]
    for seed, (i, top) in enumerate([(85.0, 45.0), (86.0, 47.0), (84.0, 46.0)]):  # top's probe is at pixels'
        rows += [("i", seed, "linear", 3, 4, i), ("top", seed, "linear", 0, 4, top)]
    for seed in range(3):  # the floors: k-NN and linear probe at their validation-selected stage
        rows += [("random", seed, "knn_sel", None, None, 20.0 + seed), ("random", seed, "linear_sel", None, None, 30.0 - seed),
                 ("pixels", seed, "knn_sel", None, None, 50.0 + seed), ("pixels", seed, "linear_sel", None, None, 46.0 - seed)]
    return _summary(rows)


def test_claim_table_gives_every_verdict(tmp_path):
    study = load_study(_study(tmp_path))
    summary = _claims_summary()
    # the tap-layer selection reads g's stage 3 and top's only stage, both at layer 4
    assert list(values(summary, "g", "knn", layer=4)) == [70.0, 71.0, 69.0]
    table = claim_rows(study, summary).set_index("claim")
    assert list(table["verdict"]) == ["**holds**", "**fails**", "**undecided**", "**uninformative**"]
    diffs = paired_difference([79.6, 81.2, 78.9], [80.0, 81.0, 79.0])
    assert table.loc["holds", "95% CI"] == f"[{diffs.diff.low:.3f}, {diffs.diff.high:.3f}]"
    assert table.loc["holds", P_ONE_SIDED] == f"{one_sided_p(EXAMPLE, -1.0):.3g}" == "0.0175"
    assert table.loc["holds", "direction, margin"] == "non-inferior, margin 1: a − b > −1"
    assert table.loc["fails", "direction, margin"] == "superior, margin 0: a − b > 0"
    assert table.loc["holds", SEEDS_TO_DECIDE] == "4"  # the worked example
    assert table.loc["undecided", "statement"] == "local losses raise NMI at layers 2-3"
    # floors: top's probe (45, 47, 46) minus pixels' (46, 45, 44) is not above 0 at 95%; top clears random
    assert table.loc["floored", "floors"] == "a not above pixels"
    assert list(table["floors"][:3]) == ["cleared", "cleared", "–"]  # NMI has no floors
    # Holm over the 3 informative claims: the holds claim's p 0.0175 x 3 > 0.025, so Holm leaves it undecided
    assert list(table["Holm verdict"]) == ["**undecided**", "**fails**", "**undecided**", "**uninformative**"]


def test_an_uninformative_claim_is_not_in_the_holm_family(tmp_path):
    study = load_study(_study(tmp_path))
    study.claims = {name: study.claims[name] for name in ("holds", "floored")}
    results = {r.name: r for r in judge_claims(study, _claims_summary())}
    assert results["holds"].holm_verdict == "holds"  # a family of one: 0.0175 < 0.025, not 2 x 0.0175
    assert [c.describe() for c in results["floored"].floors if not c.cleared] == ["a not above pixels"]
    assert results["floored"].verdict == results["floored"].holm_verdict == "uninformative"


def test_a_side_that_is_a_floor_is_not_checked_against_the_floors(tmp_path):
    claim = '[study.claims.x]\na = "i"\nb = "random"\nmetric = "finetune"\nmargin = 0.0\ndirection = "superior"'
    study = load_study(_study(tmp_path, claim))
    (result,) = judge_claims(study, _claims_summary())
    assert [(c.side, c.floor) for c in result.floors] == [("a", "random"), ("a", "pixels")]


def test_plan_table_from_a_summary(tmp_path):
    study = load_study(_study(tmp_path))
    plan = plan_table(study, _claims_summary()).set_index("claim")
    assert list(plan.columns) == ["seeds", "mean a − b", "sd", "threshold", "verdict", SEEDS_TO_DECIDE]
    assert plan.loc["holds"].to_dict() == {"seeds": 3, "mean a − b": "-0.100", "sd": "0.300", "threshold": "-1.000",
                                           "verdict": "holds", SEEDS_TO_DECIDE: "4"}
    d = np.array([0.01, -0.01, 0.02])  # NMI: distance from 0 over sd
    assert plan.loc["undecided", SEEDS_TO_DECIDE] == str(seeds_for_power(abs(d.mean()), d.std(ddof=1)))
    assert t_test_power(abs(d.mean()), d.std(ddof=1), int(plan.loc["undecided", SEEDS_TO_DECIDE])) >= 0.8


def test_plan_on_a_study_directory(tmp_path, capsys):
    path = _study(tmp_path)
    assert main(["compare", "-c", str(path), "--plan"]) == 2  # no runs there: refused as --report-only is
    assert "--plan: " in capsys.readouterr().err and not (tmp_path / "out").exists()
    (tmp_path / "out" / "runs" / "g" / "seed0").mkdir(parents=True)  # started, none finished
    assert main(["compare", "-c", str(path), "--plan"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:3] == ["claim", "seeds", "mean"] and len(lines) == 5
    assert lines[1].split()[:2] == ["holds", "0"] and not (tmp_path / "out" / "report.md").exists()
    for extra in (["--only", "g"], ["--report-only"]):
        assert main(["compare", "-c", str(path), "--plan", *extra]) == 2
        assert f"does not go with {extra[0]}" in capsys.readouterr().err


def _claim(**fields):
    fields = {"a": "g", "b": "i", "metric": "finetune", "margin": 1.0, "direction": "noninferior", **fields}
    return "[study.claims.x]\n" + "\n".join(f"{k} = {v!r}".replace("'", '"') for k, v in fields.items()
                                            if v is not None)


@pytest.mark.parametrize("claims, message", [
    (_claim(b="nope"), "study.claims.x.b = 'nope' is not a variant"),
    (_claim(metric="accuracy"), "metric 'accuracy' is unknown"),
    (_claim(metric="knn"), "one value per stage; set either stage .* or use knn_sel / knn_top"),
    (_claim(b="top", metric="knn", stage=2), "stage 2 is not among variant top's"),
    (_claim(metric="nmi", layer=9), "layer 9 is not among variant g's"),
    (_claim(b="random", metric="loss_total"), "variant random is not pre-trained"),
    (_claim(colour=1), "unknown config key study.claims.x.colour"),
    (_claim(margin=None), "study.claims.x has no margin; add margin = 1.0"),
    (_claim(direction=None), 'study.claims.x has no direction; add direction = "noninferior"'),
    (_claim(direction="better"), "study.claims.x.direction 'better' is unknown; use \"noninferior\""),
    (_claim(margin=0.0), "margin = 0.0 must be > 0 for a non-inferiority claim"),
    (_claim(margin=-1.0, direction="superior"), "margin = -1.0 must be >= 0 for a superiority claim"),
    ('[study.claims.x]\n[study.claims.x.a]', "study.claims.x has no b"),
])
def test_bad_claims_are_errors_before_any_work(tmp_path, claims, message):
    with pytest.raises(ConfigError, match=message):
        load_study(_study(tmp_path, claims))
    assert not (tmp_path / "out").exists()


def test_an_accuracy_claim_needs_both_floors_and_their_metric(tmp_path):
    path = _study(tmp_path, _claim())
    path.write_text(path.read_text().replace("[variants.pixels]\npretrain = false\n", ""))
    with pytest.raises(ConfigError, match=r"study.claims.x: metric 'finetune' is an accuracy, .* add \[variants.pixels\]"):
        load_study(path)
    with pytest.raises(ConfigError, match=r"floors' linear_sel, which needs 'linear' in study.evals"):
        load_study(_study(tmp_path, _claim()), ["study.evals=['knn','finetune']"])
    load_study(path, ["study.claims.x.metric=loss_total"])  # no floors for a loss


def test_study_checks_and_run_layout(tmp_path):
    path = _study(tmp_path, "")
    study = load_study(path)
    runs = study.runs()
    assert [(r.variant, r.seed) for r in runs[:5]] == [("g", 0), ("i", 0), ("top", 0), ("random", 0), ("pixels", 0)]
    assert runs[6].dir == tmp_path / "out" / "runs" / "i" / "seed1"
    assert study.pretrain == {"g": True, "i": True, "top": True, "random": False, "pixels": False}
    assert study.baseline == "g"  # the first variant unless set
    assert [(r.variant, r.seed) for r in select_runs(study, ["top:2", "random"])] == [
        ("random", 0), ("random", 1), ("top", 2), ("random", 2)]
    with pytest.raises(ConfigError, match="seed '7' is not one of"):
        select_runs(study, ["g:7"])
    with pytest.raises(ConfigError, match="no variant 'x'"):
        select_runs(study, ["x"])
    for override, message in [("base.train.seed=3", "base.train.seed conflicts with study.seeds"),
                              ("study.seeds=[1,1]", "study.seeds must be distinct"),
                              ("study.evals=['knn','probe']", "study.evals may hold"),
                              ("study.baseline=h", "study.baseline 'h' is not a variant")]:
        with pytest.raises(ConfigError, match=message):
            load_study(path, [override])


def test_study_without_seeds_keeps_the_older_layout(tmp_path):
    path = _study(tmp_path, "")
    path.write_text(path.read_text().replace("seeds = [0, 1, 2]\n", "")
                    .replace('name = "synthetic"', 'name = "synthetic"\n[base.train]\nseed = 5'))
    study = load_study(path)
    assert study.seeds is None
    assert [(r.variant, r.seed, r.dir) for r in study.runs()] == [
        (v, 5, tmp_path / "out" / "runs" / v) for v in ("g", "i", "top", "random", "pixels")]


@pytest.mark.parametrize("name", ["quickstart", "reference"])
def test_shipped_study_files_load(name):
    study = load_study(f"experiments/{name}.toml")
    assert "random" in study.variants and not study.pretrain["random"]


def test_run_made_with_another_config_is_refused(tmp_path):
    study = load_study(_study(tmp_path, ""))
    run = study.runs()[1]
    spec = run_spec(study, run)
    run.dir.mkdir(parents=True)
    del spec["config"]["train"]["compile"]  # a config field added to isolocal after the run was made
    write_json(run.dir / "run.json", spec)
    check_stale(study, study.runs())
    spec["config"]["train"]["epochs"] = 7
    write_json(run.dir / "run.json", spec)
    with pytest.raises(ConfigError, match=r"runs/i/seed0 was run with a different config: config.train.epochs \(7 -> 1\)"):
        check_stale(study, study.runs())


def _pretrained(run, kinds):
    """A run directory holding what the loss table reads: pretrain.json and one record per kind."""
    run.dir.mkdir(parents=True)
    write_json(run.dir / PRETRAIN, {"time": 1.0})
    records = [{"kind": kind, "step": n, "loss": float(n), "loss_stage": [float(n)]} for n, kind in enumerate(kinds)]
    (run.dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return run


def test_loss_heading_says_whether_a_run_ended_with_an_epoch_or_a_max_steps_stop(tmp_path):
    g, i = load_study(_study(tmp_path, "")).runs()[:2]
    _pretrained(g, ["step", "step", "epoch", "knn"])  # ended with an epoch (online k-NN after it)
    _pretrained(i, ["step", "epoch", "step", "step"])  # stopped mid-epoch by train.max_steps
    assert final_losses(read_metrics(g.dir))[["kind", "loss"]].tolist() == ["epoch", 2.0]
    assert final_losses(read_metrics(i.dir))[["kind", "loss"]].tolist() == ["step", 3.0]
    assert loss_heading([g]) == "Pre-training losses (mean over the last epoch, per stage by its tap layer)"
    assert loss_heading([i]).startswith("Pre-training losses (the last logged step's: train.max_steps stopped every")
    both = loss_heading([g, i])
    assert "mean over the last epoch; the last logged step's for i seed 0, which train.max_steps stopped" in both


def test_a_run_gets_the_study_evaluations_that_apply_to_it():
    """`head` scores only models with a classify head, and the pixel floor gets its probes only: a study that
    asks for `head` next to mim variants and the floors runs every variant."""
    from isolocal.study.job import run_evals

    def spec(variant: str, objective: object) -> dict:
        return {"variant": variant, "evals": ["knn", "linear", "head", "finetune"],
                "config": {"model": {"objective": objective}}}

    assert run_evals(spec("mim_global", "mim")) == ["knn", "linear", "finetune"]
    assert run_evals(spec("classify", "classify")) == ["knn", "linear", "head", "finetune"]
    assert run_evals(spec("mixed", ["mim", "classify", "mim", "contrastive"])) == ["knn", "linear", "head", "finetune"]
    assert run_evals(spec("pixels", "classify")) == ["knn", "linear"]
