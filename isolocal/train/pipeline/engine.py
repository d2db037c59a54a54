"""Two pipeline engines over one `StagePipe`, one per schedule (`isolocal.config.schedule`):

- `DefaultScheduleEngine` ("1f1b"): DeepSpeed's default 1F1B train schedule (gradients cross rank
  boundaries), with one fused `torch.autograd.backward(outputs, grads)` per micro-batch instead of
  DeepSpeed's one backward per float output, which re-traverses the graph the outputs share (same
  gradients: tests/test_pipeline.py compares them with a single process; docs/pipeline.md).
- `IsolatedScheduleEngine` ("isolated"): for models whose boundaries are all isolated. Per micro-batch
  a rank loads or receives, runs its stages forward, sends (asynchronously), and back-propagates its own
  local losses at once; no gradient is ever communicated between ranks, only downstream
  dependencies exist (it cannot deadlock), a rank holds the activations of at most two
  micro-batches, and a batch does not end in DeepSpeed's pipeline-wide loss broadcast.

Both measure (and, with `clip_grad > 0`, clip) each stage's gradient norm on its own before the
optimizer step, with the trainer's `clip_stage_gradients`: DeepSpeed's own `gradient_clipping` uses
one norm across the pipeline, which would couple isolated stages, so it is always off.

The engines subclass DeepSpeed's private names (`_INSTRUCTION_MAP`, `_exec_*`), which is why
`isolocal.train.pipeline` accepts only the DeepSpeed versions it is tested with.
"""
from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.distributed as dist
from deepspeed.runtime.config import DeepSpeedConfig
from deepspeed.runtime.pipe import schedule
from deepspeed.runtime.pipe.engine import PipelineEngine
from torch import Tensor

from isolocal.config.schedule import ISOLATED, ONE_F_ONE_B, resolve_schedule
from isolocal.train.pipeline.module import StagePipe
from isolocal.train.pipeline.timing import RankTimes
from isolocal.train.step import clip_stage_gradients


class StageNormsEngine(PipelineEngine):
    """Per-stage gradient norms (`grad_norms`, one slot per model stage) and per-stage clipping."""

    schedule_name: ClassVar[str]  # the schedule it runs (`isolocal.config.schedule.SCHEDULES`)
    clip_grad = 0.0
    grad_norms: Tensor | None = None

    def profile(self, times: RankTimes) -> None:
        """Count every instruction's time in its category (`INSTRUCTION_CATEGORY`) from now on: an
        instance map of timed handlers shadows the class's."""
        self._INSTRUCTION_MAP = {cmd: times.timed(INSTRUCTION_CATEGORY[cmd], handler)
                                 for cmd, handler in type(self)._INSTRUCTION_MAP.items()}

    def _exec_optimizer_step(self, lr_kwargs: Any = None) -> None:
        """Norms stay on the device (zeros for other ranks' stages): the runner reads them when it logs.
        After the step, this rank's heads' `after_step`."""
        local = self.module.stage_parameters()
        ids = self.module.stage_ids
        norms = torch.zeros_like(self.module.loss_sums)
        norms[ids[0]:ids[-1] + 1] = clip_stage_gradients(list(local.values()), self.clip_grad)
        self.grad_norms = norms
        PipelineEngine._exec_optimizer_step(self, lr_kwargs)
        self.module.model.after_optimizer_step(ids)

    def _exec_reduce_grads(self) -> None:
        """Without data-parallel replicas there is nothing to average: DeepSpeed would still flatten
        every gradient, all-reduce it over one process and copy it back, each step."""
        if self.is_data_parallel:
            PipelineEngine._exec_reduce_grads(self)

    # Handlers are looked up in this map, not by method name: subclasses extend it.
    _INSTRUCTION_MAP = {**PipelineEngine._INSTRUCTION_MAP, schedule.OptimizerStep: _exec_optimizer_step,
                        schedule.ReduceGrads: _exec_reduce_grads}


class DefaultScheduleEngine(StageNormsEngine):
    """DeepSpeed's train schedule with one fused backward per micro-batch on non-last ranks."""

    schedule_name = ONE_F_ONE_B

    def _exec_backward_pass(self, buffer_id: int) -> None:
        if self.is_last_stage():
            return PipelineEngine._exec_backward_pass(self, buffer_id)
        outputs = [t for t in self.pipe_buffers["outputs"][buffer_id] if t.is_floating_point()]
        self._running_engine_backward = True  # DeepSpeed's output hooks accept this backward
        try:
            torch.autograd.backward(outputs, grad_tensors=list(self.grad_layer))
        finally:
            self._running_engine_backward = False
        self.pipe_buffers["outputs"][buffer_id] = None
        self.pipe_buffers["output_tensors"][buffer_id] = None

    _INSTRUCTION_MAP = {**StageNormsEngine._INSTRUCTION_MAP, schedule.BackwardPass: _exec_backward_pass}


class LocalBackward(schedule.BufferOpInstruction):
    """Back-propagate the local loss of this rank's last stage for one micro-batch."""


class IsolatedSchedule(schedule.PipeSchedule):
    """Per micro-batch: [load | recv] forward [send] local backward; then reduce and step."""

    def steps(self):
        last = self.stage_id == self.stages - 1
        for m in range(self.micro_batches):
            buf = m % 2
            cmds = [schedule.LoadMicroBatch(buf) if self.stage_id == 0 else schedule.RecvActivation(buf),
                    schedule.ForwardPass(buf)]
            if not last:
                cmds.append(schedule.SendActivation(buf))
            cmds.append(LocalBackward(buf))
            if m == self.micro_batches - 1:
                cmds += [schedule.ReduceGrads(), schedule.OptimizerStep()]
            yield cmds

    def num_pipe_buffers(self) -> int:
        return min(2, self.micro_batches)


class IsolatedScheduleEngine(StageNormsEngine):
    """Gradient-isolated pipeline training: each rank trains its stages on their local losses only."""

    schedule_name = ISOLATED

    _in_flight: tuple = ((), ())  # (outputs being sent, their isend handles)

    def train_batch(self, data_iter: Any = None) -> Tensor:
        """One optimizer step of the isolated schedule, run here explicitly: DeepSpeed's `train_batch`
        picks its schedule through a private hook (`_train_schedule`) that its newer sources no longer
        call. Returns the last rank's mean loss (NaN elsewhere, see `_aggregate_total_loss`)."""
        if not torch.is_grad_enabled():
            raise RuntimeError("train_batch() needs gradients enabled; use eval_batch() instead")
        if data_iter is not None:
            self.set_dataiterator(data_iter)
        self.module.train()
        self.total_loss = None
        self.total_additional_losses = None
        self._exec_schedule(IsolatedSchedule(micro_batches=self.micro_batches, stages=self.num_stages,
                                             stage_id=self.stage_id))
        with torch.no_grad():
            self.agg_train_loss = self._aggregate_total_loss()
        return self.agg_train_loss

    def _backward_local(self, loss: Tensor) -> None:
        (loss / self.micro_batches).backward()

    def profile(self, times: RankTimes) -> None:
        """Also the local backwards run inside a forward, and the wait for the last send of a batch."""
        StageNormsEngine.profile(self, times)
        self._backward_local = times.timed("backward", self._backward_local)
        if not self.is_last_stage():
            self._finish_send = times.timed("send", self._finish_send)

    def _exec_send_activations(self, buffer_id: int) -> None:
        """Send without waiting for the receiver (busy with its previous micro-batch), so this rank goes
        on with its own backward; the previous send is finished first, so at most one is in flight."""
        self._finish_send()
        outputs = self.pipe_buffers["outputs"][buffer_id]
        if self.first_output_send:
            self.first_output_send = False
            self._send_tensor_meta(outputs, self.next_stage)
        dest = self.grid.stage_to_global(self.next_stage)
        self._in_flight = (outputs, [dist.isend(t, dest) for t in outputs])  # tensors live until waited

    def _finish_send(self) -> None:
        for work in self._in_flight[1]:
            work.wait()
        self._in_flight = ((), ())

    def _exec_schedule(self, pipe_schedule: schedule.PipeSchedule) -> None:
        """Every batch ends with its last send finished: gloo drops a send whose handle is destroyed
        (say with the engine), and the receiver then waits forever."""
        PipelineEngine._exec_schedule(self, pipe_schedule)
        self._finish_send()

    def _exec_recv_activations(self, buffer_id: int) -> None:
        PipelineEngine._exec_recv_activations(self, buffer_id)
        # Nothing received ever needs a gradient: no gradient goes back to the sender.
        self.pipe_buffers["inputs"][buffer_id] = tuple(t.detach() for t in self.pipe_buffers["inputs"][buffer_id])

    def _exec_forward_pass(self, buffer_id: int) -> None:
        if not self.module.training:  # eval_batch: DeepSpeed's own inference path
            return PipelineEngine._exec_forward_pass(self, buffer_id)
        outputs = self.module(self.pipe_buffers["inputs"][buffer_id], backward=self._backward_local)
        self.pipe_buffers["inputs"][buffer_id] = None
        self.pipe_buffers["outputs"][buffer_id] = tuple(t.detach() for t in outputs)
        self.pipe_buffers["output_tensors"][buffer_id] = self.module.pending_loss  # graph kept for LocalBackward
        if self.is_last_stage():  # what DeepSpeed's train_batch reports (and broadcasts) as the loss
            total = outputs[1].detach().sum()
            self.total_loss = total if self.total_loss is None else self.total_loss + total

    def _aggregate_total_loss(self) -> Tensor:
        """The last rank's mean loss, not broadcast (NaN elsewhere): DeepSpeed's broadcast would make
        every step end in a pipeline-wide sync, while nothing here depends on a later rank, so a rank
        may start its next batch as soon as its own work is done. (Runners gather losses when they log.)"""
        if not self.is_last_stage():
            return torch.tensor(float("nan"))
        return self._scale_loss_by_gas(self.total_loss)

    def _exec_local_backward(self, buffer_id: int) -> None:
        self._backward_local(self.pipe_buffers["output_tensors"][buffer_id])
        self.pipe_buffers["output_tensors"][buffer_id] = None
        self.pipe_buffers["outputs"][buffer_id] = None

    _INSTRUCTION_MAP = {
        **StageNormsEngine._INSTRUCTION_MAP,
        schedule.SendActivation: _exec_send_activations,
        schedule.RecvActivation: _exec_recv_activations,
        schedule.ForwardPass: _exec_forward_pass,
        LocalBackward: _exec_local_backward,
    }


INSTRUCTION_CATEGORY = {
    schedule.LoadMicroBatch: "data", schedule.ForwardPass: "forward", schedule.BackwardPass: "backward",
    LocalBackward: "backward", schedule.SendActivation: "send", schedule.SendGrad: "send",
    schedule.RecvActivation: "recv", schedule.RecvGrad: "recv", schedule.ReduceGrads: "optimizer",
    schedule.ReduceTiedGrads: "optimizer", schedule.OptimizerStep: "optimizer",
}  # `RankTimes` categories

ENGINES: dict[str, type[StageNormsEngine]] = {engine.schedule_name: engine
                                             for engine in (IsolatedScheduleEngine, DefaultScheduleEngine)}


def build_engine(pipe: StagePipe, optimizer: torch.optim.Optimizer, micro_batch_size: int, micro_batches: int,
                 schedule_name: str = "auto", clip_grad: float = 0.0) -> StageNormsEngine:
    """A DeepSpeed pipeline engine over `pipe` that steps the given torch optimizer, in a process group
    DeepSpeed has initialized (`deepspeed.init_distributed`).

    `schedule_name`: a `pipeline.schedule` value ("auto", "isolated", "1f1b" or its synonym "default"),
    resolved for the model by `isolocal.config.schedule.resolve_schedule`.
    """
    engine_class = ENGINES[resolve_schedule(schedule_name, pipe.model.isolated)]
    dp = pipe.topology().get_dim("data")
    config = {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": micro_batches,
        "train_batch_size": micro_batch_size * micro_batches * dp,
        "gradient_clipping": 0.0,  # DeepSpeed's clips with one norm over all ranks; see module docstring
        "steps_per_print": 2**62,
        "pipeline": {"activation_checkpoint_interval": 0},
    }
    # What `deepspeed.initialize` does for a `PipelineModule`, with our engine class instead of its
    # `PipelineEngine` (it has no argument for the class). The rest of `initialize` is left out on purpose:
    # it serves features these runs never use (zero.Init, tensor-parallel model init, Muon, python-gc control).
    mpu = pipe.mpu()
    engine = engine_class(args=None, model=pipe, optimizer=optimizer, mpu=mpu, config=config,
                          config_class=DeepSpeedConfig(config, mpu))
    engine.clip_grad = clip_grad
    return engine
