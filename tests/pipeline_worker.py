"""One rank of a pipeline test launch (tests/test_pipeline.py starts N of these with RANK etc. set).

usage: pipeline_worker.py OUT_DIR SPEC_JSON; SPEC holds any of these tasks, run in this order, each
writing OUT_DIR/<task>_rank<r>.pt or .json:
- "grads": cases "P,dp,M,boundary,schedule,clip[,preset]"; for each a real DeepSpeed engine trains 3 steps on
  `case_data` and records every step's gradients (captured just before the optimizer step), the
  parameters after the last step, keyed by the model's parameter name, the loss `train_batch`
  reported at every step (with the rank's replica and whether it holds the last stage), and how
  many of its activation sends were still in flight when `train_batch` returned, and whether the
  module was in training mode after each `train_batch` (it is put in eval mode before each).
- "runs": a list of [RunConfig dict, resume, init], run one after another through the runner, the
  last through `pretrain_pipeline` (which also shuts the process group down); its summary is saved.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

PRESET = "localmim_vit_nano"
MICRO = 4  # images per micro-batch
STEPS = 3


def make_optimizer(params) -> torch.optim.AdamW:
    return torch.optim.AdamW(params, lr=1e-3, betas=(0.9, 0.95), weight_decay=0.05)


def case_data(model, dp: int, micro_batches: int) -> list:
    """data[step][replica][micro] = (images, mask), the same in the workers and the reference."""
    g = torch.Generator().manual_seed(1)
    return [[[(torch.randn(MICRO, 1, 32, 32, generator=g), model.random_mask(MICRO, generator=g))
              for _ in range(micro_batches)] for _ in range(dp)] for _ in range(STEPS)]


def parse_case(case: str) -> tuple[int, int, int, str, str, float, str]:
    p, dp, m, boundary, schedule, clip, *preset = case.split(",")
    return int(p), int(dp), int(m), boundary, schedule, float(clip), (preset or [PRESET])[0]


def build(p: int, dp: int, m: int, boundary: str, schedule: str, clip: float, preset: str):
    import isolocal
    from deepspeed.runtime.pipe.topology import PipeDataParallelTopology

    from isolocal.train.pipeline.engine import build_engine
    from isolocal.train.pipeline.module import StagePipe

    torch.manual_seed(0)
    model = isolocal.create_model(preset, boundary=boundary)
    pipe = StagePipe(model, PipeDataParallelTopology(num_pp=p, num_dp=dp), parts=[round(i * 4 / p) for i in range(p + 1)])
    optimizer = make_optimizer([q for q in pipe.parameters() if q.requires_grad])
    return model, pipe, build_engine(pipe, optimizer, MICRO, m, schedule, clip)


def feed(engine, pipe, micro_batches: list) -> object:
    """What this rank's `train_batch` / `eval_batch` reads (only the first and last ranks read)."""
    if not (engine.is_first_stage() or engine.is_last_stage()):
        return None
    return iter([((x, mask.to(torch.uint8)), torch.zeros(1)) for x, mask in micro_batches])


def local_names(model, pipe) -> list[str]:
    return [f"stages.{k}.{n}" for k in pipe.stage_ids for n, q in model.stages[k].named_parameters() if q.requires_grad]


def run_case(case: str) -> dict:
    p, dp, m, *rest = parse_case(case)
    model, pipe, engine = build(p, dp, m, *rest)
    params = dict(model.named_parameters())
    names = local_names(model, pipe)
    grads: list[dict] = []
    engine.optimizer.register_step_pre_hook(lambda *_: grads.append({n: params[n].grad.clone() for n in names}))
    replica = pipe.mpu().get_data_parallel_id()
    reported, sending, training = [], [], []
    for step in case_data(model, dp, m):
        pipe.eval()  # as after an eval_batch: train_batch must train in training mode (dropout, drop-path)
        reported.append(float(engine.train_batch(feed(engine, pipe, step[replica]))))
        sending.append(len(getattr(engine, "_in_flight", ((), ()))[1]))  # sends not yet finished
        training.append(pipe.training and all(mod.training for mod in pipe.modules()))
    return {"engine": type(engine).__name__, "stages": pipe.stage_ids, "grads": grads,
            "params": {n: params[n].detach().clone() for n in names},
            "reported": (replica, engine.is_last_stage(), reported), "sending": sending,
            "training": training}


def main() -> None:
    out, spec = Path(sys.argv[1]), json.loads(sys.argv[2])
    rank = int(os.environ["RANK"])
    from isolocal.config import RunConfig, from_dict
    from isolocal.train.pipeline.runner import PipelineRun, exit_on_failure, init_distributed, pretrain_pipeline, shutdown

    init_distributed(torch.device("cpu"), timeout_s=30)
    with exit_on_failure():
        if "grads" in spec:
            torch.save({case: run_case(case) for case in spec["grads"]}, out / f"grads_rank{rank}.pt")
        if "runs" not in spec:
            shutdown()
            return
        runs = [(from_dict(RunConfig, cfg), resume, init) for cfg, resume, init in spec["runs"]]
        for run in runs[:-1]:
            PipelineRun(*run).fit()
    result = pretrain_pipeline(*runs[-1])
    (out / f"runs_rank{rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main()
