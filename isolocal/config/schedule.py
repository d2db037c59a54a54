"""The pipeline schedules and how `pipeline.schedule` picks one: one vocabulary for the config, the
engines, the cost model and every printed plan.

- "isolated": per micro-batch each rank loads or receives, runs its stages forward, sends, and
  back-propagates its own local losses; no gradient crosses a rank. Valid only when every boundary
  of the model is isolated.
- "1f1b": DeepSpeed's train schedule (one forward, one backward), gradients cross ranks; valid for
  any model.
`pipeline.schedule` = "auto" takes "isolated" when every boundary is isolated, else "1f1b";
"default" (DeepSpeed's default schedule) is a synonym of "1f1b".
"""
from __future__ import annotations

ISOLATED, ONE_F_ONE_B = "isolated", "1f1b"
SCHEDULES = (ISOLATED, ONE_F_ONE_B)
SYNONYMS = {"default": ONE_F_ONE_B}
CONFIG_VALUES = ("auto", *SCHEDULES, *SYNONYMS)  # what `pipeline.schedule` accepts


def check_schedule_value(value: str, error: type[ValueError] = ValueError) -> None:
    """An `error` naming `value` and the valid `pipeline.schedule` values when it is none of them."""
    if value not in CONFIG_VALUES:
        raise error(f"pipeline.schedule must be one of {', '.join(CONFIG_VALUES)}, got {value!r}")


def resolve_schedule(value: str, isolated: bool) -> str:
    """The schedule (one of `SCHEDULES`) a `pipeline.schedule` value runs for a model whose boundaries are
    all isolated (`isolated`) or not; "isolated" for a model that lets gradient cross a boundary is an error."""
    check_schedule_value(value)
    if value == "auto":
        return ISOLATED if isolated else ONE_F_ONE_B
    if value == ISOLATED and not isolated:
        raise ValueError("pipeline.schedule 'isolated' sends no gradient between ranks, so it needs every "
                         "model.boundary isolated; this model lets gradient cross a boundary: use 'auto' or '1f1b'")
    return SYNONYMS.get(value, value)
