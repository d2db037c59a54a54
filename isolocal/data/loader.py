"""Loaders whose batches, order and augmentations alike, are a function of their seed alone."""
from __future__ import annotations

from collections.abc import Iterator
from functools import partial
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Sampler


class SeededLoader(DataLoader):
    """A DataLoader whose random augmentations, not only its order, follow its generator.

    With workers, torch seeds each worker's global RNG from the generator (``base_seed + worker_id``),
    so transforms are reproducible already. In-process (``num_workers=0``) they would draw from the
    caller's global RNG, which the model also consumes (dropout, drop path) differently in a global
    and an isolated run. So here each iteration draws a seed from the generator and the transforms
    run on a private CPU RNG stream, swapped in only while a batch is fetched; the caller's global
    RNG is left untouched.

    `prefetch` fetches the in-process stream in one background worker instead: the worker's global
    RNG starts from the state the in-process stream would and fetches the batches in the same order,
    so the batches are identical while the next ones are prepared during the current step.
    """

    def __init__(self, *args: Any, prefetch: bool = False, **kwargs: Any) -> None:
        self.prefetch = prefetch
        if prefetch:
            if kwargs.get("num_workers", 0):
                raise ValueError("prefetch runs the in-process stream in one worker; pass num_workers=0 with it")
            kwargs["num_workers"] = 1
        super().__init__(*args, **kwargs)

    def __iter__(self) -> Iterator[Any]:
        if self.num_workers > 0 and not self.prefetch:
            return self._from_workers(super().__iter__())
        seed = int(torch.randint(2**62, (), generator=self.generator))
        state = torch.Generator().manual_seed(seed).get_state()
        if self.prefetch:
            self.worker_init_fn = partial(_start_stream, state)
            return self._from_workers(super().__iter__())
        return self._in_process(super().__iter__(), state)

    @staticmethod
    def _from_workers(batches: Iterator[Any]) -> Iterator[Any]:
        """A worker's error as the same one-line error it is without workers: torch re-raises it with
        the worker's whole traceback in the message; only its last line (the error itself) is kept."""
        while True:
            try:
                batch = next(batches)
            except StopIteration:
                return
            except Exception as err:
                text = str(err)
                if "Original Traceback" not in text:
                    raise
                last = text.strip().splitlines()[-1]
                raise type(err)(last.split(": ", 1)[1] if ": " in last else last) from None
            yield batch

    @staticmethod
    def _in_process(batches: Iterator[Any], state: torch.Tensor) -> Iterator[Any]:
        while True:
            outer = torch.get_rng_state()
            torch.set_rng_state(state)
            try:
                batch = next(batches)
            except StopIteration:
                return
            finally:
                state = torch.get_rng_state()
                torch.set_rng_state(outer)
            yield batch


def _start_stream(state: torch.Tensor, worker_id: int) -> None:
    """A prefetch worker's global RNG: where the in-process stream starts."""
    torch.set_rng_state(state)


def build_loader(
    dataset: Dataset,
    batch_size: int,
    shuffle: bool,
    seed: int,
    num_workers: int = 0,
    drop_last: bool = True,
    sampler: Sampler | None = None,
    prefetch: bool = False,
) -> SeededLoader:
    """A loader whose batches (order and augmentations) are a function of ``seed`` alone.

    Iterating the same loader again continues its generator, giving a new but reproducible order.
    For runs that resume from a checkpoint, build one loader per epoch with ``seed + epoch`` so
    epoch ``e`` is the same whether or not the run was interrupted. For data parallelism pass a
    ``DistributedSampler(dataset, shuffle=True, seed=seed)`` and call its ``set_epoch(epoch)``; the
    sampler then owns the order, so ``shuffle`` must be False. Workers are not persistent, so each
    epoch's workers are re-seeded from the generator. Batches come in pinned memory when CUDA is
    available, so the trainer's ``non_blocking`` copies to the GPU do not wait for its stream.
    ``prefetch`` (with ``num_workers=0``) prepares the same batches one step ahead in a background
    process (see `SeededLoader`).
    """
    if sampler is not None and shuffle:
        raise ValueError("pass shuffle=False with a sampler: the sampler decides the order, shuffle there")
    n = len(sampler) if sampler is not None else len(dataset)
    if drop_last and n < batch_size:
        raise ValueError(f"drop_last with {n} samples and batch_size={batch_size} would yield no batch")
    return SeededLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        sampler=sampler,
        num_workers=num_workers,
        drop_last=drop_last,
        generator=torch.Generator().manual_seed(seed),
        pin_memory=torch.cuda.is_available(),
        prefetch=prefetch,
    )


def views_first(images: torch.Tensor) -> torch.Tensor:
    """A loader batch of stacked views (n, views, C, H, W) -> (views * n, C, H, W) as [view 1; view 2; ...]."""
    return images.transpose(0, 1).flatten(0, 1)
