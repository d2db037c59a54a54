"""Tune a study setting on the validation split, never reading test: one variant, one seed, each tried value.

    python experiments/tune.py experiments/objectives.toml supervised --eval head \
        --try base.data.crop_scale_min=0.2 --try base.data.crop_scale_min=0.8

Each `--try` is a study override (several, comma-free, may be joined with `;`); the variant is
pre-trained with it at the study's first seed into `--out`/<try> and evaluated with `read_test=False`:
the table printed holds only validation top-1 (each protocol's stage chosen on validation, and the
top classify head), the numbers a config's comment may cite for the value it keeps.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

from isolocal.eval.protocols import evaluate
from isolocal.study.schema import load_study, resolve_run
from isolocal.train import train


def validation_numbers(result: dict) -> dict[str, float]:
    """Each protocol's validation top-1 at its selected stage, and the top classify head's."""
    rows = result["results"]
    out = {f"{mode}_val_sel": rows[stage][f"{mode}_val"] for mode, stage in result["selected"].items()}
    if "head_val" in rows[-1]:
        out["head_val_top"] = rows[-1]["head_val"]
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("study")
    p.add_argument("variant")
    p.add_argument("--try", dest="tries", action="append", required=True, metavar="KEY=VALUE[;KEY=VALUE]")
    p.add_argument("--eval", nargs="+", default=["knn", "linear"], choices=["knn", "linear", "head"])
    p.add_argument("--out", default="reports/tune")
    args = p.parse_args()
    rows = []
    for i, setting in enumerate(args.tries):
        study = load_study(args.study, setting.split(";"))
        cfg = resolve_run(study, args.variant)
        cfg.out_dir = str(Path(args.out) / args.variant / f"try{i}")
        summary = train(cfg)
        result = evaluate(args.eval, cfg, str(Path(cfg.out_dir) / "last.pt"), progress=False, read_test=False)
        if "test" in result["reads"]:
            raise RuntimeError("tuning read the test split")
        rows.append({"try": setting, "final loss": summary["final_loss"], **validation_numbers(result)})
        print(pd.DataFrame(rows).to_string(index=False, float_format="{:.2f}".format), flush=True)


if __name__ == "__main__":
    main()
