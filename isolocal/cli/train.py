"""`isolocal pretrain | export | info`: run a recipe, export its encoder to timm, inspect its stages.

Parsing and printing only: the work is `isolocal.train.pretrain`, `isolocal.io.export.write_timm_export`,
`isolocal.models.stage_cost.stage_table` and `isolocal.train.pipeline.plan.plan_run`.
"""
from __future__ import annotations

import argparse


def _config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-c", "--config", help="TOML run config (default: the built-in defaults)")
    parser.add_argument("--set", dest="overrides", action="extend", nargs="+", default=[], metavar="KEY=VALUE",
                        help="override any config field, e.g. --set train.epochs=3 model.boundary=isolated")


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("pretrain", help="pre-train a model (global or isolated; torchrun for data parallel)")
    _config_args(p)
    p.add_argument("--out", help="run directory (overrides out_dir)")
    p.add_argument("--resume", action="store_true", help="continue the run in the run directory from its checkpoint")
    p.add_argument("--pipeline-stages", type=int, default=None, metavar="N",
                   help="DeepSpeed pipeline over N ranks (launch with torchrun or deepspeed); sets pipeline.stages")
    p.add_argument("--init", default=None,
                   help="start from the weights of this checkpoint or run directory (single-process or pipeline)")
    p.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)  # appended by the deepspeed launcher
    p.set_defaults(func=pretrain)

    p = subparsers.add_parser("export", help="export a checkpoint's encoder as a timm state dict")
    p.add_argument("--ckpt", required=True, help="isolocal checkpoint or run directory (single-process or pipeline)")
    p.add_argument("--out", required=True, help="output .pt; the timm model name and kwargs go to <out>.json")
    p.set_defaults(func=export)

    p = subparsers.add_parser("info", help="per stage: blocks, parameters, forward FLOPs and time")
    _config_args(p)
    p.add_argument("--repeats", type=int, default=5, help="timed forwards per stage (median reported)")
    p.add_argument("--pipeline-stages", type=int, default=None, metavar="S",
                   help="also predict a pipeline of S ranks: partitions, step time, bubble, speed-up")
    p.add_argument("--micro-batches", type=int, default=None, metavar="M",
                   help="micro-batches per step for --pipeline-stages (default: pipeline.micro_batches)")
    p.add_argument("--micro-batch-size", type=int, default=None, metavar="B",
                   help="images per micro-batch for --pipeline-stages (default: train.batch_size / M)")
    p.add_argument("--bandwidth-gbs", type=float, default=10.0,
                   help="point-to-point bandwidth between ranks for --pipeline-stages, GB/s")
    p.set_defaults(func=info)


def pretrain(args: argparse.Namespace) -> int:
    from isolocal.config.load import load_run_config
    from isolocal.train import pretrain

    overrides = args.overrides + ([f"pipeline.stages={args.pipeline_stages}"] if args.pipeline_stages is not None else [])
    cfg = load_run_config(args.config, overrides)
    if args.out:
        cfg.out_dir = args.out
    summary = pretrain(cfg, resume=args.resume, init=args.init)
    if summary.get("rank", 0) == 0 and summary.get("already_finished"):
        print(f"{summary['out_dir']} is already finished: {summary['steps']} steps, {summary['epochs_completed']} "
              f"epochs, final loss {summary['final_loss']:.4f}; nothing to resume (raise train.epochs to go on)")
    elif summary.get("rank", 0) == 0:
        print(f"{summary['mode']} run: {summary['steps']} steps, {summary['epochs_completed']} epochs, "
              f"final loss {summary['final_loss']:.4f}, {summary['time']:.0f} s; "
              f"logs and checkpoints in {summary['out_dir']}")
    return 0


def export(args: argparse.Namespace) -> int:
    from isolocal.io.export import write_timm_export

    import timm

    out, sidecar, name, kwargs = write_timm_export(args.ckpt, args.out)
    module = timm.models.model_entrypoint(name).__module__  # an entrypoint registered outside timm must be imported
    imports = "" if module.startswith("timm.") else f"import {module}; "
    print(f"wrote {out} and {sidecar}; load with {imports}"
          f"timm.create_model({name!r}, num_classes=0, **{kwargs}).load_state_dict(torch.load({str(out)!r}))")
    return 0


def info(args: argparse.Namespace) -> int:
    from isolocal.core.device import resolve_device
    from isolocal.models.stage_cost import stage_table
    from isolocal.config.load import load_run_config

    cfg = load_run_config(args.config, args.overrides)
    plan = None
    if args.pipeline_stages is not None:  # first: its bad values fail before anything is measured
        from isolocal.train.pipeline.plan import plan_run

        micro_batches = cfg.pipeline.micro_batches if args.micro_batches is None else args.micro_batches
        plan = plan_run(cfg, args.pipeline_stages, micro_batches, args.micro_batch_size, args.bandwidth_gbs,
                        args.repeats)
    table = stage_table(cfg, args.repeats)
    m = cfg.model
    shape = (f"{m.block} blocks {m.depths}, channels {m.channels}, {m.stem} stem" if m.arch == "resnet" else
             f"patch {m.patch_size}, {m.embed_dim}-d, depth {m.depth}, target {m.target}")
    print(f"{cfg.preset}: {m.arch} {m.img_size}px {shape}, boundary {m.boundary}, objective {m.objective}, "
          f"mask ratio {m.mask_ratio}")
    print(f"per stage, one masked training image on {resolve_device(cfg.train.device).type} "
          "(FLOPs counted by torch.utils.flop_counter):")
    totals = table[["params_encoder", "params_head", "gflops", "fwd_ms"]].sum()
    print(table.to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    print(f"total: {int(totals.params_encoder + totals.params_head):,} parameters, "
          f"{totals.gflops:.4g} GFLOPs, {totals.fwd_ms:.4g} ms")
    if plan is not None:
        heading, rows = plan
        print(heading)
        print(rows.to_string(index=False, float_format=lambda v: f"{v:.3g}"))
    return 0
