"""The checkpoint formats isolocal writes, and their readers (encoders trained elsewhere: `io.foreign`;
the one model loader over both: `io.load`).

- single file (`<run>/last.pt`, `<run>/epoch_NNNN.pt`) from the single-process / data-parallel
  trainer: `{"model": StagewiseEncoder state dict, "config": RunConfig dict, ...the run's position}`.
  Written atomically: a temporary file in the target directory, flushed to disk, then renamed over
  the final name (`os.replace` is atomic on POSIX), so a crash mid-write leaves the previous
  checkpoint intact and never a half-written file under a checkpoint name.
- pipeline directory (`<run>/pipeline/<tag>/`) from the DeepSpeed pipeline runner:
  `layer_XX-model_states.pt` holds stage XX's own state dict (its keys become `stages.XX.<key>`,
  and the files load under any partition, including one process); `mp_rank_XX_model_states.pt`
  holds pipeline rank XX's optimizer state and the runner's client state (`"config"`, position,
  RNG states). `<run>/pipeline/latest` names the newest tag.

Failures are one `CheckpointError` line naming the file: unreadable (empty, truncated, not a torch
file), weights that do not fit the model its config describes (the first differing key and shapes),
non-finite weights (the tensor), a failed write (disk full: the old checkpoint stays, the temp goes).

A path may name a checkpoint file, a pipeline checkpoint (root or tag directory) or a run directory
(its `last.pt`, else its pipeline checkpoint). Readers: `load_model_state` (the config and weights:
`io.load`), `init_state` (weights checked against the new run's model: `pretrain --init`) and
`run_state` (`pretrain --resume`). `saved_model` builds the model a saved config describes, importing
its `imports` first; a head that is still not registered is skipped with one line, as every reader of a
saved model needs only its encoder (training builds its model from its own config, which needs every head).
"""
from __future__ import annotations

import os
import re
import shutil
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from isolocal.config import ConfigError, RunConfig, from_dict
from isolocal.config.imports import import_modules
from isolocal.errors import CheckpointError, CheckpointWriteError
from isolocal.io.paths import shared_mode
from isolocal.models.encoder import StagewiseEncoder

LAST = "last.pt"
PIPELINE_DIR = "pipeline"  # where the pipeline runner keeps a run's checkpoints: <run>/pipeline/<tag>/
_EPOCH_FILE = re.compile(r"epoch_(\d+)\.pt")
_LAYER_FILE = re.compile(r"layer_(\d+)-model_states\.pt")
_TEMP_FILE = re.compile(r"\.(last|epoch_\d+)\.pt\.(\w+\.tmp|link\.tmp)")  # what atomic_save / _atomic_link leave


# ---------------------------------------------------------------------------------- single files

def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_save(obj: Any, path: str | os.PathLike) -> Path:
    """torch.save to `path` via a temporary file + fsync + rename; the old file survives any failure,
    and a failed write (disk full) is one `CheckpointError` line, its temp file removed."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, shared_mode())  # mkstemp's private 0600 would outlive the rename
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as err:  # torch's zip writer reports a full disk as RuntimeError
        Path(tmp).unlink(missing_ok=True)
        kept = "; the previous checkpoints are intact" if any(path.parent.glob("*.pt")) else ""
        raise CheckpointWriteError(f"cannot write {path}: {_first_line(err)}{kept}") from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


def _atomic_link(src: Path, dst: Path) -> None:
    """Point `dst` at `src`'s content without rewriting it (hard link + rename), copying if links fail."""
    tmp = dst.with_name(f".{dst.name}.link.tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
        os.replace(tmp, dst)
    except OSError:
        tmp.unlink(missing_ok=True)
        atomic_save(torch.load(src, map_location="cpu", weights_only=True), dst)


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}".rstrip(": ")


def remove_stale_temps(out_dir: str | os.PathLike) -> list[Path]:
    """Delete the temp files a save that was killed left in `out_dir`; the paths deleted."""
    out_dir = Path(out_dir)
    stale = [p for p in out_dir.glob(".*.tmp") if _TEMP_FILE.fullmatch(p.name)] if out_dir.is_dir() else []
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


def epoch_checkpoints(out_dir: str | os.PathLike) -> list[Path]:
    """`epoch_NNNN.pt` files in `out_dir`, oldest first."""
    files = [p for p in Path(out_dir).glob("epoch_*.pt") if _EPOCH_FILE.fullmatch(p.name)]
    return sorted(files, key=lambda p: int(_EPOCH_FILE.fullmatch(p.name).group(1)))


def save_checkpoint(state: dict, out_dir: str | os.PathLike, epoch_end: int | None, keep_last: int) -> Path:
    """Write `state`; after `epoch_end` completed epochs as `epoch_NNNN.pt` (keeping the newest
    `keep_last`), otherwise (a stop mid-epoch) only as `last.pt`. `last.pt` always ends up current."""
    out_dir = Path(out_dir)
    last = out_dir / LAST
    if epoch_end is None:
        return atomic_save(state, last)
    path = atomic_save(state, out_dir / f"epoch_{epoch_end:04d}.pt")
    _atomic_link(path, last)
    for old in epoch_checkpoints(out_dir)[:-keep_last]:
        old.unlink()
    return path


def load_state(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    """A checkpoint dict; tensors only (weights_only), so loading never runs pickled code."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    return torch_load(path, map_location=map_location)


def torch_load(path: Path, **kwargs: Any) -> Any:
    """torch.load(weights_only) with an unreadable file as one `CheckpointError` line naming it."""
    size = path.stat().st_size
    if size == 0:
        raise CheckpointError(f"checkpoint {path} is empty (0 bytes): a save that did not finish?")
    try:
        return torch.load(path, weights_only=True, **kwargs)
    except Exception as err:  # torch raises UnpicklingError, RuntimeError or EOFError by cause
        raise CheckpointError(f"checkpoint {path} ({size} bytes) is unreadable: truncated or not a torch "
                              f"checkpoint ({_first_line(err)})") from None


def check_finite_weights(state: Mapping[str, Tensor], path: str | os.PathLike) -> None:
    """Refuse weights with NaN or inf, naming the first such tensor (a diverged run's checkpoint)."""
    for key, value in state.items():
        if isinstance(value, Tensor) and value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise CheckpointError(f"checkpoint {path} has non-finite weights in {key}: it comes from a run "
                                  "that diverged; use an earlier checkpoint")


def check_fits(model: nn.Module, state: Mapping[str, Tensor], path: str | os.PathLike,
               model_source: str = "its config describes", file_keys: Mapping[str, str] | None = None) -> None:
    """Refuse a state dict that does not fit `model`, naming the first differing key and its shapes.
    Buffers the model rebuilds from its config (non-persistent) are not compared: older checkpoints
    that saved them still fit. `model_source` says where the model came from; `file_keys` maps a key of
    `state` to the file's own name for it, when the file names its entries otherwise (foreign formats)."""
    expected = model.state_dict()
    rebuilt = {name for name, _ in model.named_buffers()} - expected.keys()
    for key in sorted((expected.keys() | state.keys()) - rebuilt):
        want, got = expected.get(key), state.get(key)
        if want is None or got is None or tuple(want.shape) != tuple(getattr(got, "shape", ())):
            shape = lambda t: "missing" if t is None else f"shape {tuple(t.shape)}"  # noqa: E731
            named = (file_keys or {}).get(key, key)
            where = key if named == key else f"{key} (the file's {named})"
            raise CheckpointError(f"checkpoint {path} does not fit the model {model_source}: first "
                                  f"difference at {where} (checkpoint: {shape(got)}, model: {shape(want)})")


# ---------------------------------------------------------------------------- pipeline directories

def pipeline_tag_dir(path: str | os.PathLike, tag: str | None = None) -> Path:
    """The tag directory of a pipeline checkpoint (`tag` None: the one `latest` names); `path` may be
    the tag directory, the checkpoint root or the run directory holding it."""
    root = Path(path)
    if (root / PIPELINE_DIR / "latest").is_file():
        root = root / PIPELINE_DIR
    if tag is None:
        if any(_LAYER_FILE.fullmatch(p.name) for p in root.glob("layer_*")):
            return root  # already a tag directory
        latest = root / "latest"
        if not latest.is_file():
            raise FileNotFoundError(f"{root} is not a pipeline checkpoint: it has neither layer files "
                                    "nor a 'latest' file")
        tag = latest.read_text().strip()
    tag_dir = root / tag
    if not tag_dir.is_dir():
        tags = sorted(p.name for p in root.iterdir() if p.is_dir())
        raise FileNotFoundError(f"no checkpoint tag {tag!r} in {root}; tags there: {', '.join(tags) or 'none'}")
    return tag_dir


def pipeline_client_state(path: str | os.PathLike, tag: str | None = None) -> dict:
    """The runner's client state (config, position, RNG states) saved with a pipeline checkpoint."""
    tag_dir = pipeline_tag_dir(path, tag)
    files = sorted(tag_dir.glob("mp_rank_*_model_states.pt"))
    if not files:
        raise FileNotFoundError(f"{tag_dir} has no mp_rank_*_model_states.pt (the run's client state)")
    state = torch_load(files[0], map_location="cpu")
    if not isinstance(state, Mapping) or "config" not in state:
        raise ValueError(f"{tag_dir} was not written by isolocal's pipeline runner (no config)")
    return state


def pipeline_state_dict(path: str | os.PathLike, tag: str | None = None) -> dict[str, Tensor]:
    """A StagewiseEncoder state dict (`stages.<k>.` keys) from a pipeline checkpoint's layer files."""
    tag_dir = pipeline_tag_dir(path, tag)
    state: dict[str, Tensor] = {}
    layers = []
    for file in sorted(tag_dir.iterdir()):
        match = _LAYER_FILE.fullmatch(file.name)
        if match:
            k = int(match.group(1))
            layers.append(k)
            for key, value in torch_load(file, map_location="cpu").items():
                state[f"stages.{k}.{key}"] = value
    if layers != list(range(len(layers))) or not layers:
        raise ValueError(f"{tag_dir}: layer files {layers} are not one per stage 0..S-1")
    return state


def prune_pipeline_tags(root: str | os.PathLike, keep_last: int) -> None:
    """Delete all but the newest `keep_last` `step_*` tag directories of a pipeline checkpoint."""
    tags = sorted(p for p in Path(root).iterdir() if p.is_dir() and p.name.startswith("step_"))
    for old in tags[:-keep_last]:
        shutil.rmtree(old)


def pipeline_model_state(path: str | os.PathLike, tag: str | None = None
                         ) -> tuple[RunConfig, StagewiseEncoder, dict[str, Tensor]]:
    """(config, the model it describes at init (`saved_model`), the checkpoint's state dict for it, checked
    finite) of a pipeline checkpoint. Layer files hold only the stages; anything else in the model's state
    is rebuilt from the config."""
    cfg = from_dict(RunConfig, pipeline_client_state(path, tag)["config"])
    model = saved_model(cfg, path)
    full = model.state_dict()
    stages = without_skipped_heads(model, pipeline_state_dict(path, tag))
    if not stages.keys() <= full.keys():
        raise ValueError(f"{pipeline_tag_dir(path, tag)}: layer keys {sorted(stages.keys() - full.keys())[:3]} "
                         "do not belong to the model its config describes")
    state = {**full, **stages}
    check_finite_weights(state, path)
    return cfg, model, state


# ---------------------------------------------------------------------------------- saved models

def saved_model(cfg: RunConfig, path: str | os.PathLike) -> StagewiseEncoder:
    """The model (at init) a checkpoint's saved config describes, after importing the config's `imports`.
    A stage whose head is still not registered (its module gone or not importable) is built without it,
    and one line on stderr names those stages and what failed."""
    if cfg.model is None:
        raise ValueError(f"{path}: its config has no resolved model section")
    failed = []
    for spec in cfg.imports:  # each on its own: one that fails does not keep the others out
        try:
            import_modules([spec])
        except ConfigError as err:
            failed.append(str(err))
    model = StagewiseEncoder(cfg.model, skip_missing_heads=True)
    skipped = model.plan.skipped
    if skipped:
        names = sorted({model.plan.objectives[k] for k in skipped})
        why = f" ({'; '.join(failed)})" if failed else ""
        print(f"isolocal: {path}: the heads of stages {list(skipped)} (objective {', '.join(map(repr, names))}) "
              f"were skipped: no head of that name is registered here{why}; the encoder is loaded. For the whole "
              "model import the head's module: --import MODULE_OR_PATH or imports = [...]", file=sys.stderr)
    return model


def without_skipped_heads(model: StagewiseEncoder, state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """`state` without the weights of the heads `model` skipped (`saved_model`): its encoder's stay."""
    skipped = tuple(f"stages.{k}.{part}." for k in model.plan.skipped for part in ("head", "decoder"))
    return {key: value for key, value in state.items() if not key.startswith(skipped)}


# ------------------------------------------------------------------------------ isolocal readers

def locate(path: str | os.PathLike) -> tuple[str, Path]:
    """("file", path) or ("pipeline", path) for a checkpoint file, pipeline checkpoint or run directory."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if path.is_file():
        return "file", path
    if (path / LAST).is_file():
        return "file", path / LAST
    if (path / PIPELINE_DIR / "latest").is_file() or (path / "latest").is_file() \
            or any(_LAYER_FILE.fullmatch(p.name) for p in path.glob("layer_*")):
        return "pipeline", path
    raise FileNotFoundError(f"{path} holds no isolocal checkpoint: expected a run directory (with {LAST} or "
                            f"{PIPELINE_DIR}/), a pipeline checkpoint directory or a checkpoint file")


def holds(obj: Any) -> str:
    """What a checkpoint file's object is, in a few words, for errors about a file that is not what was expected."""
    if not isinstance(obj, Mapping):
        return f"a {type(obj).__name__}"
    keys = sorted(map(str, obj))
    tensors = sum(isinstance(v, Tensor) for v in obj.values())
    if tensors == len(obj) and obj:
        return f"a bare state dict of {tensors} tensors (first key {keys[0]!r})"
    shown = ", ".join(repr(k) for k in keys[:6]) + (", ..." if len(keys) > 6 else "")
    return f"a dict with keys {shown}"


def run_state(path: str | os.PathLike) -> dict:
    """What a run saved about itself (config, step, epoch, world size, RNG states; a single file also
    its model and optimizers): what `pretrain --resume` checks and restores. A file without a run's
    config (an export, a foreign or hand-made checkpoint) is refused in one line saying what it holds."""
    kind, path = locate(path)
    if kind == "pipeline":
        return pipeline_client_state(path)
    state = load_state(path)
    if not isinstance(state, Mapping) or "config" not in state:
        raise CheckpointError(f"{path} holds {holds(state)}, not the state of an isolocal run (its 'config', "
                              "'model' and position): --resume continues a run from the checkpoint its "
                              "`isolocal pretrain` wrote")
    return state


def is_isolocal(obj: Any) -> bool:
    """Whether a file's object is an isolocal checkpoint: a state dict under 'model' with the run's 'config'."""
    return isinstance(obj, Mapping) and "config" in obj and isinstance(obj.get("model"), Mapping)


def checked_state(state: Any, path: Path) -> tuple[RunConfig, dict[str, Tensor]]:
    """(config, state dict) of an isolocal checkpoint's object, its weights checked finite."""
    if not isinstance(state, Mapping) or "model" not in state or "config" not in state:
        raise CheckpointError(f"{path} is not an isolocal checkpoint (it lacks 'model' or 'config')")
    check_finite_weights(state["model"], path)
    return from_dict(RunConfig, state["config"]), state["model"]


def init_state(path: str | os.PathLike, model: StagewiseEncoder) -> dict[str, Tensor]:
    """The weights of the checkpoint at `path` for `model` (`pretrain --init`), refused in one line when
    the file's model is of another family, or of the same family but another size (the first differing key)."""
    cfg, state = load_model_state(path)
    if cfg.model is not None and cfg.model.arch != model.cfg.arch:
        raise CheckpointError(f"checkpoint {path} holds a {cfg.model.arch} model (preset {cfg.preset}) and this "
                              f"run's config describes a {model.cfg.arch} model: --init needs a checkpoint of "
                              "the same model")
    check_fits(model, state, path, "this run's config describes")
    return state


def load_model_state(path: str | os.PathLike) -> tuple[RunConfig, dict[str, Tensor]]:
    """(the run's resolved config, a StagewiseEncoder state dict) from any isolocal checkpoint or run directory."""
    kind, path = locate(path)
    if kind == "pipeline":
        cfg, _, state = pipeline_model_state(path)
        return cfg, state
    return checked_state(load_state(path), path)
