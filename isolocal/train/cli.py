"""`isolocal pretrain | export | info`: run a recipe, export its encoder to timm, inspect its stages."""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pandas as pd

    from isolocal.config import RunConfig


def _config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-c", "--config", help="TOML run config (default: the built-in defaults)")
    parser.add_argument("--set", dest="overrides", action="extend", nargs="+", default=[], metavar="KEY=VALUE",
                        help="override any config field, e.g. --set train.epochs=3 model.boundary=isolated")


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("pretrain", help="pre-train a model (global or isolated; torchrun for data parallel)")
    _config_args(p)
    p.add_argument("--out", help="run directory (overrides out_dir)")
    p.add_argument("--resume", action="store_true", help="continue the run in the run directory from last.pt")
    p.add_argument("--pipeline-stages", type=int, default=None, metavar="N",
                   help="DeepSpeed pipeline over N ranks (launch with torchrun or deepspeed); sets pipeline.stages")
    p.add_argument("--init", default=None, help="pipeline runs: start from this single-process checkpoint's weights")
    p.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)  # appended by the deepspeed launcher
    p.set_defaults(func=pretrain)

    p = subparsers.add_parser("export", help="export a checkpoint's encoder as a timm state dict")
    p.add_argument("--ckpt", required=True, help="isolocal checkpoint (e.g. <run>/last.pt)")
    p.add_argument("--out", required=True, help="output .pt; the timm model name and kwargs go to <out>.json")
    p.set_defaults(func=export)

    p = subparsers.add_parser("info", help="per stage: blocks, parameters, forward FLOPs and time")
    _config_args(p)
    p.add_argument("--repeats", type=int, default=5, help="timed forwards per stage (median reported)")
    p.set_defaults(func=info)


def pretrain(args: argparse.Namespace) -> int:
    from isolocal.config import load_run_config
    from isolocal.train import train

    overrides = args.overrides + ([f"pipeline.stages={args.pipeline_stages}"] if args.pipeline_stages is not None else [])
    cfg = load_run_config(args.config, overrides)
    if args.out:
        cfg.out_dir = args.out
    if cfg.pipeline.stages > 0:
        from isolocal.pipeline.runner import pretrain_pipeline

        summary = pretrain_pipeline(cfg, resume=args.resume, init=args.init)
        if summary["rank"] != 0:
            return 0
    elif args.init:
        raise ValueError("--init starts a pipeline run from a checkpoint; use --resume for single-process runs")
    else:
        summary = train(cfg, resume=args.resume)
    print(f"{summary['mode']} run: {summary['steps']} steps, {summary['epochs_completed']} epochs, "
          f"final loss {summary['final_loss']:.4f}, {summary['time']:.0f} s; "
          f"logs and checkpoints in {summary['out_dir']}")
    return 0


def export(args: argparse.Namespace) -> int:
    from isolocal import create_timm_model, export_timm, load_checkpoint, timm_kwargs
    from isolocal.train.checkpoint import atomic_save

    model = load_checkpoint(args.ckpt)
    create_timm_model(model)  # raises unless the export loads strictly into timm
    name, state_dict = export_timm(model)
    kwargs = timm_kwargs(model)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_save(state_dict, out)
    sidecar = out.with_suffix(".json")
    sidecar.write_text(json.dumps({"timm_model": name, "kwargs": {"num_classes": 0, **kwargs},
                                   "checkpoint": str(args.ckpt)}, indent=2) + "\n")
    print(f"wrote {out} ({len(state_dict)} tensors) and {sidecar}; load with "
          f"timm.create_model({name!r}, num_classes=0, **{kwargs}).load_state_dict(torch.load({str(out)!r}))")
    return 0


def stage_table(cfg: RunConfig, repeats: int = 5) -> pd.DataFrame:
    """One row per stage: its tap (block or Swin stage index), encoder blocks, parameters (encoder and local head), forward FLOPs and median
    forward time for one masked training image (the work a stage does per image in pre-training)."""
    import pandas as pd
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from isolocal.models.mim import LocalMIM

    from isolocal.train.trainer import resolve_device

    device = resolve_device(cfg.train.device)
    model = LocalMIM(cfg.model).to(device).eval()
    m = cfg.model
    images = torch.randn(1, m.in_chans, m.img_size, m.img_size, device=device)
    batch = model.prepare(images, model.random_mask(1, generator=torch.Generator().manual_seed(0)))
    rows, x = [], images
    with torch.no_grad():
        for k, (stage, tap) in enumerate(zip(model.stages, model.taps)):
            with FlopCounterMode(display=False) as counter:
                out, _, _ = model.stage_step(k, x, batch)
            times = []
            for _ in range(repeats + 1):  # the first call warms up and is not counted
                t0 = time.perf_counter()
                model.stage_step(k, x, batch)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - t0)
            times = times[1:]
            head = sum(p.numel() for name, p in stage.named_parameters() if name.startswith(("decoder.", "norm.")))
            total = sum(p.numel() for p in stage.parameters())
            blocks = sum(type(mod).__name__.endswith("Block") for name, mod in stage.named_modules()
                         if not name.startswith("decoder"))  # timm's ViT Block / SwinTransformerBlock
            rows.append({"stage": k, "tap": tap.index, "blocks": blocks, "scale": tap.scale,
                         "target_cell": tap.cell, "params_encoder": total - head, "params_head": head,
                         "gflops": counter.get_total_flops() / 1e9,
                         "fwd_ms": 1e3 * statistics.median(times)})
            x = out
    return pd.DataFrame(rows)


def info(args: argparse.Namespace) -> int:
    from isolocal.config import load_run_config

    if args.repeats < 1:
        raise ValueError(f"--repeats must be >= 1, got {args.repeats}")
    cfg = load_run_config(args.config, args.overrides)
    table = stage_table(cfg, args.repeats)
    m = cfg.model
    print(f"{cfg.preset}: {m.arch} {m.img_size}px patch {m.patch_size}, {m.embed_dim}-d, depth {m.depth}, "
          f"target {m.target}, boundary {m.boundary}, mask ratio {m.mask_ratio}")
    from isolocal.train.trainer import resolve_device

    print(f"per stage, one masked training image on {resolve_device(cfg.train.device).type} "
          "(FLOPs counted by torch.utils.flop_counter):")
    totals = table[["params_encoder", "params_head", "gflops", "fwd_ms"]].sum()
    print(table.to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    print(f"total: {int(totals.params_encoder + totals.params_head):,} parameters, "
          f"{totals.gflops:.4g} GFLOPs, {totals.fwd_ms:.4g} ms")
    return 0
