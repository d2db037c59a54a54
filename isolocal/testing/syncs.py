"""Count host synchronisations: the reads that make the CPU wait for a device stream to drain.

`HostSyncCounter` is a context manager that records every operation that needs a tensor's values
on the host while it is active:
- `aten._local_scalar_dense`, what `.item()`, `int(t)`, `float(t)`, `bool(t)`, `if t:` and a tensor
  used as an index dispatch to;
- ops whose result (a Python value or an output shape) depends on tensor values: `aten.equal`,
  `aten.is_nonzero`, `aten.nonzero`, `aten.masked_select`, `aten.unique*`, `aten.bincount`,
  `aten.repeat_interleave` with tensor repeats, and indexing with a bool mask;
- copies from a non-CPU device to the CPU (`aten._to_copy` / `aten.copy_`), the device-to-host copies,
  and host-to-device copies that wait for the stream (blocking, or from pageable memory);
- `Tensor.cpu()`, `.tolist()`, `.numpy()` on any tensor. On a CPU-only run nothing crosses a
  device, so these stand for the device-to-host copies they would be if the tensor lived on a GPU.

On a CPU run every tensor is treated as if it lived on the accelerator, so the count is an upper
bound of the syncs the same code makes on CUDA: a read of a host-made mask counts here although it
is free on a GPU run. Each event keeps its dtype and device, so a test can allow host reads of
integer/bool index data and forbid the rest (`floating()`), and a GPU run can keep only the events
on the device (`on_device()`). `torch._assert_async` is not counted: on CUDA it checks on the device, without a sync.
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten

_VALUE_READS = {
    aten._local_scalar_dense.default, aten.equal.default, aten.is_nonzero.default, aten.nonzero.default,
    aten.masked_select.default, aten.bincount.default, aten._unique.default, aten._unique2.default,
    aten.unique_dim.default, aten.unique_consecutive.default, aten.repeat_interleave.Tensor,
    aten.repeat_interleave.self_Tensor,
}
_COPIES = {aten._to_copy.default, aten.copy_.default}
_INDEXING = {aten.index.Tensor, aten.index_put.default, aten.index_put_.default}
_HOST_METHODS = {torch.Tensor.cpu, torch.Tensor.tolist, torch.Tensor.numpy, torch.Tensor.__array__}


@dataclass(frozen=True)
class SyncEvent:
    """One host read: the op, and the dtype and device of the tensor it read."""

    op: str
    dtype: torch.dtype
    device: str

    @property
    def floating(self) -> bool:
        return self.dtype.is_floating_point or self.dtype.is_complex


def _first_tensor(args: Any) -> torch.Tensor | None:
    for a in args:
        if isinstance(a, torch.Tensor):
            return a
        if isinstance(a, (list, tuple)):
            t = _first_tensor(a)
            if t is not None:
                return t
    return None


def _bool_index(indices: Any) -> torch.Tensor | None:
    for index in indices or ():
        if isinstance(index, torch.Tensor) and index.dtype in (torch.bool, torch.uint8):
            return index
    return None


def _blocking_transfer(func: Any, args: tuple, kwargs: dict) -> torch.Tensor | None:
    """The source of a device-to-host copy, or of a host-to-device copy that waits for the stream
    (blocking, or from pageable memory, which CUDA stages only after the stream drains)."""
    if func is aten.copy_.default:
        dst, src = args[0].device, args[1]
        non_blocking = args[2] if len(args) > 2 else kwargs.get("non_blocking", False)
    else:
        dst, src = kwargs.get("device"), args[0]
        non_blocking = kwargs.get("non_blocking", False)
    if dst is None or torch.device(dst).type == src.device.type:
        return None
    if src.device.type != "cpu":
        return src  # device -> host (or device -> another device through the host)
    return None if non_blocking and src.is_pinned() else src


class _Dispatch(TorchDispatchMode):
    def __init__(self, owner: HostSyncCounter):
        super().__init__()
        self.owner = owner

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not self.owner._inside_host_method:
            read = None
            if func in _VALUE_READS:
                read = _first_tensor(args)
            elif func in _COPIES:
                read = _blocking_transfer(func, args, kwargs)
            elif func in _INDEXING:
                read = _bool_index(args[1] if len(args) > 1 else None)
            if read is not None:
                self.owner._record(str(func), read)
        return func(*args, **kwargs)


class _Function(TorchFunctionMode):
    def __init__(self, owner: HostSyncCounter):
        super().__init__()
        self.owner = owner

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func not in _HOST_METHODS or self.owner._inside_host_method:
            return func(*args, **kwargs)
        self.owner._record(f"Tensor.{func.__name__}", args[0])
        self.owner._inside_host_method = True  # its own copy / scalar reads are this one event
        try:
            return func(*args, **kwargs)
        finally:
            self.owner._inside_host_method = False


class HostSyncCounter:
    """`with HostSyncCounter() as syncs: ...` then `syncs.events`, `len(syncs)`, `syncs.by_op()`.

    `host`: tensors that stay on the host on a GPU run too, so reading them is no sync there (the
    step counts of torch's non-fused optimizers); reads of them are not counted.
    """

    def __init__(self, host: Iterable[torch.Tensor] = ()) -> None:
        self.events: list[SyncEvent] = []
        self._host = {t.untyped_storage().data_ptr() for t in host}
        self._inside_host_method = False
        self._modes = (_Function(self), _Dispatch(self))

    def _record(self, op: str, tensor: torch.Tensor) -> None:
        if tensor.untyped_storage().data_ptr() not in self._host:
            self.events.append(SyncEvent(op, tensor.dtype, str(tensor.device)))

    def __enter__(self) -> HostSyncCounter:
        for mode in self._modes:
            mode.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        for mode in reversed(self._modes):
            mode.__exit__(*exc)

    def __len__(self) -> int:
        return len(self.events)

    def floating(self) -> list[SyncEvent]:
        """Reads of floating-point tensors (activations, losses, norms): never needed in a training step."""
        return [e for e in self.events if e.floating]

    def on_device(self) -> list[SyncEvent]:
        """Reads of tensors that live on an accelerator: the real syncs of a GPU run."""
        return [e for e in self.events if not e.device.startswith("cpu")]

    def by_op(self) -> dict[str, int]:
        return dict(Counter(e.op for e in self.events))
