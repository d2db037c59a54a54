"""Pipeline scaling tools: the cost model on hand-computed schedules, the cost partition, the
start-up profiling pass, the per-rank breakdown timer and `isolocal info --pipeline-stages`.
(Runs with `pipeline.partition = "cost"` and `pipeline.profile = true` are in tests/test_pipeline.py,
inside its 2-rank launch.)"""
from __future__ import annotations

import itertools
import time

import pytest
import torch

import isolocal
from isolocal.config import ConfigError
from isolocal.train.pipeline.costmodel import Link, StageCost, balance_bound, predict, rank_order, simulate
from isolocal.train.pipeline.partition import cost_parts, describe
from isolocal.train.pipeline.timing import RankTimes, measure_stage_costs
from isolocal.config.load import load_run_config

# Two ranks of one stage each: rank 0 takes 1 + 1 per micro-batch, rank 1 2 + 2, a send 0.5.
TWO = [StageCost(1.0, 1.0), StageCost(2.0, 2.0)]
HOP = Link(latency_s=0.5)


def test_isolated_schedule_matches_a_hand_computed_step():
    """M = 2. Rank 0: F0 0-1, B0 1-2, F1 2-3, B1 3-4. Rank 1: F0 1.5-3.5 (after the 0.5 send),
    B0 3.5-5.5, F1 5.5-7.5 (its input arrived at 3.5), B1 7.5-9.5."""
    assert simulate(TWO, [0, 1, 2], 2, "isolated", HOP, steps=1) == [[9.5, 9.5]]
    synced = predict(TWO, [0, 1, 2], 2, "isolated", HOP, sync_every=1)
    assert synced.step_s == pytest.approx(9.5)
    assert synced.bubble == pytest.approx(1 - 12 / 19)
    assert synced.busy_s == (4.0, 8.0) and synced.bound == pytest.approx(1.5)
    # without a per-step barrier the slower rank sets the pace: 8 per step, rank 0 idles half the time
    free = predict(TWO, [0, 1, 2], 2, "isolated", HOP, sync_every=0)
    assert free.step_s == pytest.approx(8.0) and free.bubble == pytest.approx(0.25)
    assert free.speedup == pytest.approx(1.5)


def test_1f1b_schedule_matches_a_hand_computed_step():
    """Equal stages F = 1, B = 2, M = 2, free sends. Rank 0: F0 0-1, F1 1-2, B0 4-6 (after rank 1's
    B0 2-4), B1 7-9 (after rank 1's B1 5-7); 9 per step, the textbook bubble (S-1)/(M+S-1) = 1/3."""
    equal = [StageCost(1.0, 2.0), StageCost(1.0, 2.0)]
    assert rank_order("1f1b", 0, 2, 2) == [("F", 0), ("F", 1), ("B", 0), ("B", 1)]
    assert rank_order("1f1b", 1, 2, 2) == [("F", 0), ("B", 0), ("F", 1), ("B", 1)]
    assert simulate(equal, [0, 1, 2], 2, "1f1b", steps=1) == [[9.0, 9.0]]
    guess = predict(equal, [0, 1, 2], 2, "1f1b")
    assert guess.step_s == pytest.approx(9.0) and guess.bubble == pytest.approx(1 / 3)


@pytest.mark.parametrize("schedule,sync_every", [("isolated", 1), ("isolated", 4), ("1f1b", 1)])
def test_more_micro_batches_shrink_the_bubble_and_a_slower_stage_lengthens_the_step(schedule, sync_every):
    costs = [StageCost(1.0, 1.5, 1000), StageCost(1.2, 1.4, 1000), StageCost(0.8, 1.0, 1000), StageCost(1.1, 1.3)]
    parts, link = [0, 1, 2, 3, 4], Link(0.01, 1e6)
    bubbles = [predict(costs, parts, m, schedule, link, sync_every).bubble for m in (1, 2, 4, 8, 16)]
    assert all(a > b for a, b in zip(bubbles, bubbles[1:])), bubbles
    base = predict(costs, parts, 4, schedule, link, sync_every).step_s
    for k in range(4):
        slower = list(costs)
        slower[k] = StageCost(costs[k].forward_s * 1.5, costs[k].backward_s, costs[k].activation_bytes)
        assert predict(slower, parts, 4, schedule, link, sync_every).step_s > base, k
    one_rank = predict(costs, [0, 4], 4, schedule)
    assert one_rank.bubble == pytest.approx(0.0, abs=1e-12) and one_rank.speedup == pytest.approx(1.0)


def test_1f1b_order_is_deepspeeds_train_schedule():
    from deepspeed.runtime.pipe.schedule import BackwardPass, ForwardPass, TrainSchedule

    for ranks, micro_batches in itertools.product((1, 2, 3, 4), (1, 2, 3, 5, 8)):
        for rank in range(ranks):
            cmds = [c for step in TrainSchedule(micro_batches, ranks, rank).steps() for c in step]
            deepspeed = ["F" if isinstance(c, ForwardPass) else "B" for c in cmds
                         if isinstance(c, (ForwardPass, BackwardPass))]
            mine = rank_order("1f1b", rank, ranks, micro_batches)
            assert [kind for kind, _ in mine] == deepspeed, (ranks, micro_batches, rank)
            for kind in "FB":
                assert [m for k, m in mine if k == kind] == list(range(micro_batches))


def test_bad_cost_model_inputs_are_refused():
    with pytest.raises(ValueError, match="schedule must be one of isolated, 1f1b, got 'gpipe'"):
        predict(TWO, [0, 1, 2], 2, "gpipe")
    with pytest.raises(ValueError, match=r"parts \[0, 2, 2\] must be increasing stage indices from 0 to 2"):
        predict(TWO, [0, 2, 2], 2, "isolated")
    with pytest.raises(ValueError, match="micro_batches must be >= 1, got 0"):
        predict(TWO, [0, 1, 2], 0, "isolated")


def test_cost_partition_balances_a_deliberately_unbalanced_stage_list():
    """A heavy first stage: by count the ranks would split 3 | 3; by cost it gets a rank of its own."""
    costs = [StageCost(4.0, 4.0)] + [StageCost(0.5, 0.5)] * 5
    parts = cost_parts(costs, 2)
    assert parts == [0, 1, 6]
    assert balance_bound(costs, parts) == pytest.approx(13 / 8)
    assert balance_bound(costs, [0, 3, 6]) == pytest.approx(13 / 10)
    assert "rank 0: stages 0-0 (62%), rank 1: stages 1-5 (38%); balance bound 1.62x" in describe(parts, costs, 1)
    # the first rank's data loading counts against it
    assert cost_parts([StageCost(1.0, 0.0)] * 4, 2, data_s=1.5) == [0, 1, 4]


def test_cost_partition_is_the_best_contiguous_split():
    g = torch.Generator().manual_seed(0)
    for n, ranks in [(4, 2), (6, 3), (8, 4), (7, 7), (5, 1)]:
        costs = [StageCost(float(f), float(b)) for f, b in torch.rand(n, 2, generator=g).tolist()]
        splits = [[0, *cuts, n] for cuts in itertools.combinations(range(1, n), ranks - 1)]
        best = min(max(sum(c.forward_s + c.backward_s for c in costs[a:b]) for a, b in zip(s, s[1:]))
                   for s in splits)
        parts = cost_parts(costs, ranks, micro_batches=3)
        assert parts in splits
        assert max(sum(c.forward_s + c.backward_s for c in costs[a:b]) for a, b in zip(parts, parts[1:])) == \
            pytest.approx(best)
    with pytest.raises(ValueError, match="between 1 and the model's 4 stages, got 5"):
        cost_parts([StageCost(1.0, 1.0)] * 4, 5)


def test_bad_partition_is_a_config_error_naming_the_valid_ones():
    with pytest.raises(ConfigError, match="^pipeline.partition must be count or cost, got 'time'$"):
        load_run_config(None, ["pipeline.partition=time"])
    assert load_run_config(None, ["pipeline.partition=cost"]).pipeline.partition == "cost"


def test_profiling_pass_measures_every_stage_and_leaves_the_model_as_it_was():
    torch.manual_seed(0)
    model = isolocal.create_model("localmim_vit_nano", boundary="isolated", drop_path_rate=0.1).train()
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    costs = measure_stage_costs(model, micro_batch=4, repeats=1)
    assert len(costs) == model.num_stages
    assert all(c.forward_s > 0 and c.backward_s > 0 and c.step_s > 0 for c in costs)
    image_bits, x_at_most = 4 * (4 * 32 * 32), 4 * 4 * (1 + 64) * model.cfg.embed_dim  # cls + 8x8 patches
    assert all(image_bits < c.activation_bytes < image_bits + x_at_most + 4 * 4 + 4 * 64 for c in costs)
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())


def test_rank_times_count_nested_spans_in_their_own_category_over_whole_steps():
    times = RankTimes(rank=1, trace_steps=1)
    with times.span("forward"):  # before the first mark: not counted
        time.sleep(0.01)
    times.mark()
    for _ in range(2):
        with times.span("forward"):
            time.sleep(0.02)
            times.timed("backward", time.sleep)(0.03)
        times.mark()
    with times.span("optimizer"):  # after the last mark: not a whole step
        time.sleep(0.01)
    out = times.summary()
    assert out["rank"] == 1 and out["steps"] == 2
    assert out["forward"] == pytest.approx(20, abs=8) and out["backward"] == pytest.approx(30, abs=8)
    assert out["optimizer"] == 0 and out["other"] >= -1e-6
    assert out["step_ms"] == pytest.approx(sum(v for k, v in out.items() if k not in ("rank", "steps", "step_ms")))
    assert [e["name"] for e in times.events] == ["backward", "forward"]  # the first counted step only


@pytest.mark.parametrize("measure, source", [([], "counted FLOPs at 10 TFLOP/s"),
                                             (["--measure", "--repeats", "1"], "one cpu measurement per stage")],
                         ids=["counted", "measured"])
def test_info_predicts_a_pipeline_for_any_preset(capsys, measure, source):
    from isolocal.cli import main

    assert main(["info", "--set", "preset=localmim_vit_nano", *measure, "--pipeline-stages", "2",
                 "--micro-batches", "4", "--micro-batch-size", "4"]) == 0
    out = capsys.readouterr().out
    assert "pipeline of 2 ranks, 4 micro-batches of 4 images" in out and source in out
    for partition, schedule in itertools.product(("count", "cost"), ("isolated", "1f1b")):
        assert any(line.split()[:2] == [partition, schedule] for line in out.splitlines()), (partition, schedule)


def test_info_refuses_a_bad_pipeline_before_measuring(capsys):
    from isolocal.cli import main

    assert main(["info", "--set", "preset=localmim_vit_nano", "--pipeline-stages", "5"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == "isolocal info: error: --pipeline-stages must be between 1 and the model's 4 stages, got 5"
