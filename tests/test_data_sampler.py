"""Token-bucket sampler: budget, coverage, determinism, sharding, resume, fixed shapes."""

from __future__ import annotations

import random

import pytest
import torch

from tests.test_data_helpers import IMG_ARGS, make_images, make_txt
from villa_fast.data import (
    DetectFeatLmdb,
    PadBuckets,
    TokenBucketSampler,
    TxtTokLmdb,
    VqaDataset,
    build_dataloader,
    count_shapes,
    vqa_collate,
)

LENS = [random.Random(7).randint(5, 90) for _ in range(3001)]


@pytest.mark.parametrize("budget", [800, 3000])
@pytest.mark.parametrize("bucket", [64, 8192])
def test_budget_and_coverage(budget, bucket):
    s = TokenBucketSampler(LENS, bucket_size=bucket, batch_size=budget, droplast=False, seed=1)
    batches = list(s)
    for b in batches:
        assert max(LENS[i] for i in b) * len(b) <= budget
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(len(LENS)))
    # droplast: no duplicates, the dropped count accounts for the rest
    d = TokenBucketSampler(LENS, bucket_size=bucket, batch_size=budget, droplast=True, seed=1)
    flat = [i for b in d for i in b]
    assert len(set(flat)) == len(flat) and len(flat) + d.num_dropped == len(LENS)
    assert all(len(b) % 8 == 0 for b in d.epoch_batches())


def test_budget_too_small_is_an_error():
    with pytest.raises(ValueError, match="token budget"):
        list(TokenBucketSampler([100] * 16, batch_size=500))


def test_deterministic_per_seed_and_epoch():
    mk = lambda seed, epoch: TokenBucketSampler(LENS, bucket_size=256, batch_size=2000, seed=seed, epoch=epoch)  # noqa: E731
    assert list(mk(0, 0)) == list(mk(0, 0))
    assert list(mk(0, 0)) != list(mk(0, 1))
    assert list(mk(0, 0)) != list(mk(1, 0))
    s = mk(0, 0)
    s.set_epoch(1)
    assert list(s) == list(mk(0, 1))


@pytest.mark.parametrize("world", [2, 3])
def test_shards_disjoint_and_complete(world):
    shards = []
    for r in range(world):
        s = TokenBucketSampler(LENS, bucket_size=512, batch_size=2000, seed=4, rank=r, world_size=world)
        shards.append([i for b in s for i in b])
    seen = [i for sh in shards for i in sh]
    assert len(seen) == len(set(seen)) == len(LENS)
    even = [
        TokenBucketSampler(LENS, bucket_size=512, batch_size=2000, droplast=True, seed=4, rank=r, world_size=world)
        for r in range(world)
    ]
    assert len({len(s) for s in even}) == 1
    flat = [i for s in even for b in s for i in b]
    assert len(flat) == len(set(flat)) and len(flat) + sum(s.num_dropped for s in even) == len(LENS)


def test_eval_order_keeps_every_example():
    s = TokenBucketSampler(LENS, bucket_size=100, batch_size=1500, shuffle=False)
    assert sorted(i for b in s for i in b) == list(range(len(LENS)))
    assert list(s) == list(TokenBucketSampler(LENS, bucket_size=100, batch_size=1500, shuffle=False, seed=9))


@pytest.fixture(scope="module")
def vqa(tmp_path_factory):
    root = tmp_path_factory.mktemp("sampler")
    make_images(root / "img", n=10)
    make_txt(root / "txt", [f"img{k:03d}.npz" for k in range(10)], n=120, max_len=20)
    return VqaDataset(10, TxtTokLmdb(root / "txt", -1), DetectFeatLmdb(root / "img", **IMG_ARGS))


def test_loader_resume_is_exact(vqa):
    ld = build_dataloader(vqa, vqa_collate, batch_size_tokens=300, is_train=True, seed=5)
    full = [b["input_ids"] for b in ld] + [b["input_ids"] for b in ld]  # epochs 0 and 1
    assert ld.state_dict() == {"epoch": 2, "batch_index": 0, "seed": 5}
    ld = build_dataloader(vqa, vqa_collate, batch_size_tokens=300, is_train=True, seed=5)
    it = iter(ld)
    got = [next(it)["input_ids"] for _ in range(3)]
    state = ld.state_dict()
    assert state == {"epoch": 0, "batch_index": 3, "seed": 5}
    fresh = build_dataloader(vqa, vqa_collate, batch_size_tokens=300, is_train=True, seed=0)
    fresh.load_state_dict(state)
    got += [b["input_ids"] for b in fresh] + [b["input_ids"] for b in fresh]
    assert len(got) == len(full) and all(a.equal(b) for a, b in zip(got, full, strict=True))


def test_pad_buckets_fix_shapes(vqa):
    plain = build_dataloader(vqa, vqa_collate, batch_size_tokens=400, is_train=True, seed=0)
    pb = PadBuckets(txt=(8, 16, 24), img=(4, 8))
    fixed = build_dataloader(vqa, vqa_collate, batch_size_tokens=400, is_train=True, seed=0, pad_buckets=pb)
    a, b = list(plain), list(fixed)
    shapes = {(x["input_ids"].shape, x["img_feat"].shape[:2]) for x in b}
    assert count_shapes(b) == len(shapes) <= len(pb.txt) * len(pb.img)
    for x in b:
        lt, n = x["input_ids"].size(1), x["img_feat"].size(1)
        assert lt in pb.txt and n in pb.img and x["attn_masks"].size(1) == lt + n
        assert x["input_ids"].size(0) * (lt + n) <= 400
    assert count_shapes(a) >= count_shapes(b)
    assert sum(len(x["txt_lens"]) for x in b) + fixed.sampler.num_dropped == len(vqa)


def test_concatenation_keeps_rows_per_example_and_refuses_a_mix():
    from villa_fast.data import ConcatDatasetWithLens

    class _Ds(torch.utils.data.Dataset):
        def __init__(self, rows):
            self.lens, self.pad_dims = [3, 4], [(3, 1), (4, 1)]
            if rows is not None:
                self.rows_per_example = rows

        def __len__(self):
            return 2

    assert ConcatDatasetWithLens([_Ds(2), _Ds(2)]).rows_per_example == 2
    assert ConcatDatasetWithLens([_Ds(None), _Ds(1)]).rows_per_example == 1
    with pytest.raises(ValueError, match="different rows per example"):
        ConcatDatasetWithLens([_Ds(2), _Ds(None)])
    with pytest.raises(ValueError, match="rows_per_example"):
        TokenBucketSampler([3, 4], rows_per_example=0)


def test_fitted_sizes_pad_least():
    """PadBuckets.fit: per dimension, the sizes minimising the summed padding (brute force on small cases), the
    largest the data's largest, at most as many as asked."""
    import itertools

    from villa_fast.data.batch import _least_padding

    def padding(values, sizes):
        return sum(min(s for s in sizes if s >= v) - v for v in values)

    rng = random.Random(0)
    for _ in range(150):
        values = [rng.randint(1, 25) for _ in range(rng.randint(1, 30))]
        k = rng.randint(1, 4)
        got = _least_padding(values, k)
        distinct = sorted(set(values))
        best = min(
            padding(values, [*c, distinct[-1]])
            for r in range(min(k, len(distinct)))
            for c in itertools.combinations(distinct[:-1], r)
        )
        assert padding(values, got) == best and len(got) <= k and got[-1] == max(values)
    pb = PadBuckets.fit([(10, 36), (12, 36), (30, 100), (11, 50)], n_txt=2, n_img=2)
    assert pb.txt == (12, 30) and pb.img == (50, 100)
    with pytest.raises(ValueError, match="at least one"):
        PadBuckets.fit([])


@pytest.mark.parametrize("droplast", [True, False])
def test_fixed_shape_remainders_join_a_larger_shape(vqa, droplast):
    """A shape's examples that do not fill its last batch move up to a larger shape; every shape keeps one batch
    size (the collate pads a batch of carried examples to the shape it was formed for); only the largest
    shapes' remainders are dropped (or, without droplast, form shorter batches)."""
    pb = PadBuckets.fit(vqa.pad_dims)
    loader = build_dataloader(vqa, vqa_collate, batch_size_tokens=600, is_train=droplast, seed=0, pad_buckets=pb)
    sampler = loader.sampler
    sampler.shuffle = True  # an evaluation loader keeps every example; shuffled here like a training one
    sizes: dict[tuple, set] = {}
    seen = 0
    for b in loader:
        shape = (b["input_ids"].size(1), b["img_feat"].size(1))
        n = b["input_ids"].size(0)
        assert shape in pb.shapes() and n * sum(shape) <= 600
        sizes.setdefault(shape, set()).add(n)
        seen += n
    if droplast:
        assert all(v == {sampler.batch_size_of(s)} for s, v in sizes.items()), sizes
        # what is dropped is less than one batch of each shape nothing larger holds
        tops = [s for s in pb.shapes() if not any(t != s and t[0] >= s[0] and t[1] >= s[1] for t in pb.shapes())]
        assert sampler.num_dropped < sum(sampler.batch_size_of(s) for s in tops)
    assert seen + sampler.num_dropped == len(vqa)
