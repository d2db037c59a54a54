"""Statistics over seeds against hand-computed values, claim verdicts, and the study file's checks."""
import math

import pandas as pd
import pytest

from isolocal.config import ConfigError
from isolocal.study.job import write_json
from isolocal.study.runner import check_stale
from isolocal.study.schema import load_study, run_spec, select_runs
from isolocal.study.stats import Interval, mean_ci, paired_difference, verdict
from isolocal.study.summary import values
from isolocal.study.tables import claim_rows

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


@pytest.mark.parametrize("low, high, margin, expected", [
    (-0.5, 0.8, 1.0, "holds"),      # whole interval above -1
    (-2.5, -1.2, 1.0, "fails"),     # whole interval below -1
    (-1.5, 0.3, 1.0, "undecided"),  # straddles -1
    (0.1, 0.9, 0.0, "holds"),       # margin 0: a better than b
    (-0.4, 0.9, 0.0, "undecided"),
    (3.5, 5.0, -3.0, "holds"),      # margin -3: a beats b by more than 3
    (1.0, 2.5, -3.0, "fails"),
])
def test_verdict_outcomes(low, high, margin, expected):
    assert verdict(Interval((low + high) / 2, low, high, 3), margin) == expected


def test_one_seed_claim_is_undecided():
    assert verdict(mean_ci([5.0]), 0.0) == "undecided"


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
"""

CLAIMS = """
[study.claims.holds]
a = "i"
b = "g"
metric = "finetune"
margin = 1.0
[study.claims.fails]
a = "top"
b = "g"
metric = "knn"
layer = 4
[study.claims.undecided]
a = "g"
b = "top"
metric = "nmi"
layer = [2, 3]
statement = "local losses raise NMI at layers 2-3"
"""


def _summary(rows):
    return pd.DataFrame(rows, columns=["variant", "seed", "metric", "stage", "layer", "value"])


def test_claim_table_gives_all_three_verdicts(tmp_path):
    path = tmp_path / "study.toml"
    path.write_text(STUDY.format(out=tmp_path / "out", claims=CLAIMS))
    study = load_study(path)
    rows = []
    for seed, (g, i) in enumerate([(80.0, 79.8), (81.0, 80.9), (79.0, 79.1)]):  # i - g in [-0.2, 0.1]
        rows += [("g", seed, "finetune", None, None, g), ("i", seed, "finetune", None, None, i)]
    for seed, (g, top) in enumerate([(70.0, 60.0), (71.0, 62.0), (69.0, 61.0)]):  # top - g about -9
        rows += [("g", seed, "knn", 3, 4, g), ("top", seed, "knn", 0, 4, top), ("g", seed, "knn", 0, 1, 99.0)]
    for seed, (g, top) in enumerate([(0.02, 0.01), (0.01, 0.02), (0.03, 0.01)]):  # NMI at layers 2 and 3
        rows += [("g", seed, "nmi", None, 2, g), ("g", seed, "nmi", None, 3, g),
                 ("top", seed, "nmi", None, 2, top), ("top", seed, "nmi", None, 3, top)]
    summary = _summary(rows)
    # the tap-layer selection reads g's stage 3 and top's only stage, both at layer 4
    assert list(values(summary, "g", "knn", layer=4)) == [70.0, 71.0, 69.0]
    table = claim_rows(study, summary).set_index("claim")
    assert list(table["verdict"]) == ["**holds**", "**fails**", "**undecided**"]
    diffs = paired_difference([79.8, 80.9, 79.1], [80.0, 81.0, 79.0])
    assert table.loc["holds", "95% CI"] == f"[{diffs.diff.low:.3f}, {diffs.diff.high:.3f}]"
    assert table.loc["undecided", "statement"] == "local losses raise NMI at layers 2-3"


@pytest.mark.parametrize("claims, message", [
    ('[study.claims.x]\na = "g"\nb = "nope"\nmetric = "finetune"', "study.claims.x.b = 'nope' is not a variant"),
    ('[study.claims.x]\na = "g"\nb = "i"\nmetric = "accuracy"', "metric 'accuracy' is unknown"),
    ('[study.claims.x]\na = "g"\nb = "i"\nmetric = "knn"', "one value per stage; set either stage"),
    ('[study.claims.x]\na = "g"\nb = "top"\nmetric = "knn"\nstage = 2', "stage 2 is not among variant top's"),
    ('[study.claims.x]\na = "g"\nb = "i"\nmetric = "nmi"\nlayer = 9', "layer 9 is not among variant g's"),
    ('[study.claims.x]\na = "g"\nb = "random"\nmetric = "loss_total"', "variant random is not pre-trained"),
    ('[study.claims.x]\na = "g"\nb = "i"\nmetric = "finetune"\ncolour = 1', "unknown config key study.claims.x.colour"),
])
def test_bad_claims_are_errors_before_any_work(tmp_path, claims, message):
    path = tmp_path / "study.toml"
    path.write_text(STUDY.format(out=tmp_path / "out", claims=claims))
    with pytest.raises(ConfigError, match=message):
        load_study(path)
    assert not (tmp_path / "out").exists()


def test_study_checks_and_run_layout(tmp_path):
    path = tmp_path / "study.toml"
    path.write_text(STUDY.format(out=tmp_path / "out", claims=""))
    study = load_study(path)
    runs = study.runs()
    assert [(r.variant, r.seed) for r in runs[:4]] == [("g", 0), ("i", 0), ("top", 0), ("random", 0)]
    assert runs[5].dir == tmp_path / "out" / "runs" / "i" / "seed1"
    assert study.pretrain == {"g": True, "i": True, "top": True, "random": False}
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
    path = tmp_path / "study.toml"
    path.write_text(STUDY.format(out=tmp_path / "out", claims="").replace("seeds = [0, 1, 2]\n", "")
                    .replace('name = "synthetic"', 'name = "synthetic"\n[base.train]\nseed = 5'))
    study = load_study(path)
    assert study.seeds is None
    assert [(r.variant, r.seed, r.dir) for r in study.runs()] == [
        (v, 5, tmp_path / "out" / "runs" / v) for v in ("g", "i", "top", "random")]


@pytest.mark.parametrize("name", ["quickstart", "reference"])
def test_shipped_study_files_load(name):
    study = load_study(f"experiments/{name}.toml")
    assert "random" in study.variants and not study.pretrain["random"]


def test_run_made_with_another_config_is_refused(tmp_path):
    path = tmp_path / "study.toml"
    path.write_text(STUDY.format(out=tmp_path / "out", claims=""))
    study = load_study(path)
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
