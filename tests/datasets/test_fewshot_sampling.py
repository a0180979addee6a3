"""Few-shot sampling (Dassl's semantics, re-implemented independently) and CoOp's base-to-new class split."""

import random

import pytest
from fake_coop import dassl_fewshot

from vpeft.datasets import DatasetSplits, Datum, fewshot_splits, generate_fewshot, subsample_classes


def _data(counts, seed=0):
    """Items of classes with the given counts, interleaved in a shuffled order."""
    items = [Datum(f"/d/c{y}/{i}.png", y, f"class_{y}") for y, n in enumerate(counts) for i in range(n)]
    random.Random(seed).shuffle(items)
    return items


def _as_tuples(items):
    return [(d.impath, d.label, d.classname) for d in items]


@pytest.mark.parametrize("shots", [1, 2, 4, 8, 16])
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_generate_fewshot_equals_dassl(shots, seed):
    data = _data([20, 17, 30, 16], seed=seed)
    random.seed(seed)
    want = dassl_fewshot(_as_tuples(data), shots)
    random.seed(seed)
    got = generate_fewshot(data, shots)
    assert _as_tuples(got) == want


def test_short_class_is_an_error_naming_class_and_counts():
    data = _data([20, 3, 20])
    with pytest.raises(ValueError, match=r"class 'class_1' \(label 1\) has 3 items, fewer than the 16"):
        generate_fewshot(data, 16)
    splits = DatasetSplits("toy", data, [], [], ["class_0", "class_1", "class_2"])
    with pytest.raises(ValueError, match="toy train split, 16-shot: class 'class_1'"):
        fewshot_splits(splits, 16, seed=1)


def test_short_class_all_and_repeat_follow_dassl():
    data = _data([20, 3, 20])
    random.seed(5)
    want_all = dassl_fewshot(_as_tuples(data), 16)  # Dassl repeat=False keeps the 3
    random.seed(5)
    assert _as_tuples(generate_fewshot(data, 16, on_short="all")) == want_all

    # Dassl repeat=True: random.choices(items, k=K) for a short class, in the same loop.
    random.seed(5)
    groups = {}
    for d in data:
        groups.setdefault(d.label, []).append(d)
    want_rep = []
    for g in groups.values():
        want_rep.extend(random.sample(g, 16) if len(g) >= 16 else random.choices(g, k=16))
    random.seed(5)
    assert generate_fewshot(data, 16, repeat=True) == want_rep
    with pytest.raises(ValueError, match="on_short"):
        generate_fewshot(data, 16, on_short="skip")


def test_zero_shots_is_full_data_and_random_state_is_restored():
    data = _data([5, 5])
    splits = DatasetSplits("toy", data, data[:4], data[:2], ["a", "b"])
    assert generate_fewshot(data, 0) == data
    full = fewshot_splits(splits, 0, seed=1)
    assert full.train == data and full.val == splits.val and full.test == splits.test
    random.seed(123)
    expected_next = random.random()
    random.seed(123)
    fewshot_splits(splits, 1, seed=1)
    assert random.random() == expected_next


def _five_class_splits():
    names = ["c0", "c1", "c2", "c3", "c4"]

    def items(tag):
        return [Datum(f"/{tag}/{y}.png", y, names[y]) for y in (4, 0, 3, 1, 2)]

    return DatasetSplits("toy", items("train"), items("val"), items("test"), names)


def test_base_to_new_on_odd_class_count():
    splits = _five_class_splits()
    # CoOp: labels sorted, m = ceil(5 / 2) = 3 -> base {0, 1, 2}, new {3, 4} relabelled to {0, 1}.
    base = subsample_classes(splits, "base")
    assert base.classnames == ["c0", "c1", "c2"]
    assert [(d.impath, d.label) for d in base.train] == [("/train/0.png", 0), ("/train/1.png", 1), ("/train/2.png", 2)]
    new = subsample_classes(splits, "new")
    assert new.classnames == ["c3", "c4"]
    for split in ("train", "val", "test"):
        tag = split
        assert [(d.impath, d.label, d.classname) for d in getattr(new, split)] == [
            (f"/{tag}/4.png", 1, "c4"), (f"/{tag}/3.png", 0, "c3")]
    assert subsample_classes(splits, "all") == splits
    with pytest.raises(ValueError, match="subsample"):
        subsample_classes(splits, "half")
