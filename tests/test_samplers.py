"""Tests for marginloss.samplers.ClassBalancedBatchSampler (P x K sampling)."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from marginloss.samplers import ClassBalancedBatchSampler


def grouped(labels: list[int], batch: list[int], k: int) -> list[list[int]]:
    return [batch[i : i + k] for i in range(0, len(batch), k)]


@settings(max_examples=40, deadline=None)
@given(
    class_sizes=st.lists(st.integers(1, 9), min_size=2, max_size=12),
    p=st.integers(1, 3),
    k=st.integers(1, 4),
    replicas=st.integers(1, 3),
    seed=st.integers(0, 10_000),
    as_tensor=st.booleans(),
)
def test_batches_are_p_distinct_classes_of_k_samples(class_sizes, p, k, replicas, seed, as_tensor):
    labels = [10 * c for c, size in enumerate(class_sizes) for _ in range(size)]
    enough = sum(1 for size in class_sizes if size >= k)
    if len(class_sizes) < p * replicas:
        with pytest.raises(ValueError, match="distinct classes are needed per step"):
            ClassBalancedBatchSampler(labels, p, k, replacement=True, num_replicas=replicas, rank=0)
        return
    replacement = enough < len(class_sizes)
    given_labels = torch.tensor(labels) if as_tensor else labels
    samplers = [
        ClassBalancedBatchSampler(given_labels, p, k, replacement=replacement, seed=seed,
                                  num_replicas=replicas, rank=r)
        for r in range(replicas)
    ]
    per_rank = [list(s) for s in samplers]
    for batches in per_rank:
        assert len(batches) == len(samplers[0]) == max(1, len(labels) // (p * k * replicas))
        for batch in batches:
            assert len(batch) == p * k
            groups = grouped(labels, batch, k)
            classes = [labels[g[0]] for g in groups]
            assert len(set(classes)) == p  # P distinct classes
            for group, label in zip(groups, classes):
                assert all(labels[i] == label for i in group)  # K of the same class
                if class_sizes[label // 10] >= k:
                    assert len(set(group)) == k  # no repeat within a class group
    # ranks of the same step: disjoint classes, so disjoint samples
    for step in range(len(per_rank[0])):
        seen: set[int] = set()
        for batches in per_rank:
            step_classes = {labels[i] for i in batches[step]}
            assert not step_classes & seen
            seen |= step_classes


def test_seeded_and_epochs_differ():
    labels = [c for c in range(6) for _ in range(5)]
    a = ClassBalancedBatchSampler(labels, 3, 2, seed=7)
    b = ClassBalancedBatchSampler(labels, 3, 2, seed=7)
    assert list(a) == list(b) == list(a)  # same seed, same epoch: same batches
    first = list(a)
    a.set_epoch(1)
    assert list(a) != first
    assert list(ClassBalancedBatchSampler(labels, 3, 2, seed=8)) != first


def test_an_epoch_uses_every_sample_of_a_class_before_repeating_one():
    labels = [c for c in range(4) for _ in range(6)]
    sampler = ClassBalancedBatchSampler(labels, 4, 3, num_batches=2)
    batches = list(sampler)
    counts = Counter(i for batch in batches for i in batch)
    assert set(counts.values()) == {1} and len(counts) == 24  # 2 steps x 4 classes x 3 = all


def test_small_class_error_and_replacement():
    labels = [0, 0, 0, 1, 2, 2, 2, 3]
    with pytest.raises(
        ValueError,
        match=r"samples_per_class=3, but 2 class\(es\) have fewer samples, e.g. label \(count\): "
        r"1 \(1\), 3 \(1\); pass replacement=True",
    ):
        ClassBalancedBatchSampler(labels, 2, 3)
    sampler = ClassBalancedBatchSampler(labels, 2, 3, replacement=True, num_batches=20)
    for batch in sampler:
        for group in grouped(labels, batch, 3):
            assert len({labels[i] for i in group}) == 1


def test_distributed_defaults_and_rank_errors():
    sampler = ClassBalancedBatchSampler(list(range(4)) * 2, 2, 2)
    assert (sampler.num_replicas, sampler.rank) == (1, 0)
    with pytest.raises(ValueError, match=r"rank must be in \[0, 2\) \(num_replicas\), got 2"):
        ClassBalancedBatchSampler(list(range(4)) * 2, 1, 2, num_replicas=2, rank=2)
    with pytest.raises(ValueError, match=r"num_replicas must be a positive int, got 0"):
        ClassBalancedBatchSampler(list(range(4)) * 2, 1, 2, num_replicas=0, rank=0)
    with pytest.raises(TypeError, match=r"rank must be an int, got float 0.0"):
        ClassBalancedBatchSampler(list(range(4)) * 2, 1, 2, num_replicas=2, rank=0.0)  # type: ignore[arg-type]


def test_argument_errors():
    with pytest.raises(TypeError, match=r"labels must be an integer tensor, got dtype torch.float32"):
        ClassBalancedBatchSampler(torch.zeros(4), 1, 1)
    with pytest.raises(TypeError, match=r"labels must be ints, got 1 other value\(s\), e.g. 1.5"):
        ClassBalancedBatchSampler([0, 1.5], 1, 1)  # type: ignore[list-item]
    with pytest.raises(TypeError, match=r"labels must be a 1-D integer tensor or a sequence of ints, got str"):
        ClassBalancedBatchSampler("0011", 1, 1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"labels must be a non-empty 1-D sequence of class labels, got shape \(0,\)"):
        ClassBalancedBatchSampler([], 1, 1)
    with pytest.raises(ValueError, match=r"classes_per_batch must be a positive int, got 0"):
        ClassBalancedBatchSampler([0, 1], 0, 1)
    with pytest.raises(TypeError, match=r"samples_per_class must be an int, got float 2.0"):
        ClassBalancedBatchSampler([0, 1], 1, 2.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"num_batches must be a positive int, got -1"):
        ClassBalancedBatchSampler([0, 1], 1, 1, num_batches=-1)
    with pytest.raises(TypeError, match=r"replacement must be a bool, got int"):
        ClassBalancedBatchSampler([0, 1], 1, 1, replacement=1)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"seed must be an int, got str"):
        ClassBalancedBatchSampler([0, 1], 1, 1, seed="0")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"epoch must be an int, got float"):
        ClassBalancedBatchSampler([0, 1], 1, 1).set_epoch(1.0)  # type: ignore[arg-type]


def test_dataloader_and_repr():
    labels = torch.tensor([c for c in range(5) for _ in range(4)])
    dataset = torch.utils.data.TensorDataset(torch.arange(20), labels)
    sampler = ClassBalancedBatchSampler(labels, 2, 2, num_batches=3, seed=1)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler)
    got = [(index.tolist(), y.tolist()) for index, y in loader]
    assert [index for index, _ in got] == list(sampler)
    assert all(len(set(y)) == 2 for _, y in got)
    assert repr(sampler) == (
        "ClassBalancedBatchSampler(num_samples=20, num_classes=5, classes_per_batch=2, "
        "samples_per_class=2, replacement=False, num_batches=3, seed=1, num_replicas=1, rank=0)"
    )
    assert torch.equal(labels, torch.tensor([c for c in range(5) for _ in range(4)]))  # untouched


def test_uses_the_process_group_when_initialised(tmp_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        sampler = ClassBalancedBatchSampler([0, 0, 1, 1], 2, 2)
        assert (sampler.num_replicas, sampler.rank) == (1, 0)
    finally:
        dist.destroy_process_group()
