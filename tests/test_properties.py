"""Issue 10, part 6: property-based tests (hypothesis) of the core invariants.

- The batch planner, for any lengths, world size and budget: every sample exactly once per epoch (eval, and
  train with padding), dropped + seen = all (train with drop), the budget and batch size respected, the
  same number of steps on every rank.
- Collation and masking, for any lengths: masks are exactly the real frames, padding is zero, real frames are
  unchanged; the model's scores of a sample do not depend on the padding it gets in a batch.
- The checkpoint protocol, for any kill point of a simulated save sequence: resume finds the newest tag whose
  save finished, or starts fresh; never a torn tag, never an unexpected error.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from carat.data.loader.collate import DecodedSample, collate, to_batch  # noqa: E402
from carat.data.loader.plan import FILLER, batch_cost, plan_epoch  # noqa: E402
from carat.data.sources.segment import FEATURE_DIMS, MODALITIES  # noqa: E402
from carat.train import checkpoint as ckpt  # noqa: E402

lengths_strategy = st.lists(st.tuples(st.integers(0, 60), st.integers(1, 200), st.integers(1, 400)),
                            min_size=1, max_size=80)


def _seen(plan) -> list[int]:
    return [int(i) for rank in plan.schedule for b in rank if b != FILLER for i in plan.batches[b]]


@settings(max_examples=150, deadline=None)
@given(lengths=lengths_strategy, world=st.integers(1, 8), budget=st.integers(50, 5000),
       max_batch=st.integers(1, 32), seed=st.integers(0, 2**16), epoch=st.integers(0, 5),
       jitter=st.sampled_from([0.0, 0.2]))
def test_the_plan_covers_every_sample_once_within_budget_with_equal_steps(lengths, world, budget, max_batch, seed,
                                                                         epoch, jitter):
    arr = np.array(lengths, dtype=np.int64)
    n = len(arr)
    common = dict(token_budget=budget, max_batch_size=max_batch, world_size=world, seed=seed, epoch=epoch)
    for plan in (plan_epoch(arr, train=False, **common),
                 plan_epoch(arr, train=True, remainder="pad", sort_jitter=jitter, **common)):
        assert sorted(_seen(plan)) == list(range(n))
        assert len({len(s) for s in plan.schedule}) == 1 and len(plan.schedule) == world
    plan = plan_epoch(arr, train=True, remainder="drop", sort_jitter=jitter, **common)
    dropped = [int(i) for b in plan.dropped for i in plan.batches[b]]
    assert sorted(_seen(plan) + dropped) == list(range(n))
    assert len(plan.dropped) < world and len({len(s) for s in plan.schedule}) == 1
    for batch in plan.batches:
        assert 1 <= len(batch) <= max_batch
        if len(batch) > 1:  # a single sample over the budget rides alone
            assert batch_cost(arr[batch], (1.0, 1.0, 1.0)) <= budget


@settings(max_examples=60, deadline=None)
@given(lengths=st.lists(st.tuples(st.integers(0, 12), st.integers(0, 12), st.integers(0, 12)), min_size=1,
                        max_size=6), seed=st.integers(0, 1000))
def test_collation_keeps_real_frames_masks_them_and_zeroes_the_padding(lengths, seed):
    rng = np.random.default_rng(seed)
    samples = [DecodedSample(key=f"k{i}", features={m: rng.standard_normal((n, FEATURE_DIMS[m])).astype(np.float32)
                                                    for m, n in zip(MODALITIES, row)},
                             labels=np.zeros(6, np.uint8), intensities=np.full(6, np.nan, np.float32))
               for i, row in enumerate(lengths)]
    batch = to_batch(collate(samples, 1.0, alloc=lambda shape, dtype: torch.empty(shape, dtype=dtype)))
    for j, m in enumerate(MODALITIES):
        x, mask = getattr(batch, m), getattr(batch, f"{m}_mask")
        for i, s in enumerate(samples):
            n = lengths[i][j]
            assert mask[i].sum() == n and bool(mask[i, :n].all())
            assert torch.equal(x[i, :n], torch.from_numpy(s.features[m]))
            assert not x[i, n:].any()


@pytest.fixture(scope="module")
def tiny_model():
    from tests.model_helpers import tiny_model as build

    return build(seed=0).eval()


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(own=st.tuples(st.integers(1, 9), st.integers(1, 20), st.integers(1, 40)),
       other=st.tuples(st.integers(1, 9), st.integers(1, 20), st.integers(1, 40)), seed=st.integers(0, 100))
def test_a_samples_scores_do_not_depend_on_its_padding(tiny_model, own, other, seed):
    from tests.model_helpers import make_batch

    alone = make_batch({m: [n] for m, n in zip(MODALITIES, own)}, seed=seed)
    pair = make_batch({m: [n, o] for m, n, o in zip(MODALITIES, own, other)}, seed=seed + 1)
    for m in MODALITIES:  # the first row of the pair is the sample alone, padded to the pair's width
        n = alone[m].shape[1]
        pair[m][0] = 0
        pair[m][0, :n] = alone[m][0]
        pair[f"{m}_mask"][0] = False
        pair[f"{m}_mask"][0, :n] = alone[f"{m}_mask"][0]
    with torch.no_grad():
        a = tiny_model.scores(tiny_model(**alone))[0]
        b = tiny_model.scores(tiny_model(**pair))[0]
    assert torch.allclose(a, b, atol=1e-5), (a, b)


# -- the checkpoint protocol under a kill at any point ---------------------------------------------------------
SAVE_FILES = ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt",
              "zero_pp_rank_1_mp_rank_00_optim_states.pt")


def _save_steps(root: Path, tag: str, epoch: int):
    """The file operations of one save in the order Checkpointer.save_checkpoint performs them, as callables."""
    tag_dir = root / tag
    steps = [lambda: ckpt.clear_tag(tag_dir), lambda: tag_dir.mkdir(parents=True, exist_ok=True)]
    for name in SAVE_FILES:  # DeepSpeed's files: not atomic, a kill leaves half a file
        steps.append(lambda name=name: (tag_dir / name).write_bytes(bytes([epoch]) * 50))
        steps.append(lambda name=name: (tag_dir / name).write_bytes(bytes([epoch]) * 100))
    for rank in (0, 1):
        steps.append(lambda rank=rank: ckpt.write_text_atomic(tag_dir / f"rng_rank{rank}.pt", f"rng{epoch}"))
    steps.append(lambda: ckpt.write_completion_marker(tag_dir, ckpt.list_tag_files(tag_dir), {"epoch": epoch}))
    steps.append(lambda: ckpt.write_latest(root, tag))
    return steps


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(epochs=st.integers(1, 4), kill_at=st.integers(0, 60), keep=st.integers(1, 3))
def test_a_kill_at_any_point_of_a_save_resumes_from_the_newest_finished_one(tmp_path, epochs, kill_at, keep):
    from carat.train.checkpointer import prune_checkpoints

    root = tmp_path / f"run-{epochs}-{kill_at}-{keep}"
    shutil.rmtree(root, ignore_errors=True)
    committed = 0  # the newest epoch whose marker was written: the marker, not `latest`, commits a save
    done = 0
    for epoch in range(1, epochs + 1):
        steps = _save_steps(root, f"epoch-{epoch:03d}", epoch)
        marker_step = len(steps) - 2
        for index, step in enumerate(steps):
            if done == kill_at:
                break
            step()
            done += 1
            if index == marker_step:
                committed = epoch
        else:
            prune_checkpoints(root, keep)
            continue
        break
    point = ckpt.find_resume_point(root)
    if committed == 0:
        assert point is None or point.tag is None  # nothing committed: a fresh start, with a warning if torn
    else:
        assert point is not None and point.tag == f"epoch-{committed:03d}"
        assert ckpt.incomplete_reason(root / point.tag) is None
        assert (root / point.tag / "mp_rank_00_model_states.pt").read_bytes() == bytes([committed]) * 100
