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

_RNG = random.Random(7)
LENS = [_RNG.randint(5, 90) for _ in range(3001)]


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


def _authors_token_buckets(lens, ids, bucket_size, max_tok, droplast, size_mul=8):
    """The batching loop of UNITER's data/sampler.py TokenBucketSampler, after its shuffle and before its batch
    shuffle, transcribed literally."""
    buckets = [
        sorted(ids[i : i + bucket_size], key=lambda i: lens[i], reverse=True) for i in range(0, len(ids), bucket_size)
    ]
    batches = []
    for bucket in buckets:
        max_len = 0
        batch_indices = []
        for g in range(0, len(bucket), size_mul):
            indices = bucket[g : g + size_mul]
            max_len = max(max_len, max(lens[i] for i in indices))
            if max_len * (len(batch_indices) + size_mul) > max_tok:
                if not batch_indices:
                    raise ValueError("max_tokens too small / max_seq_len too long")
                assert len(batch_indices) % size_mul == 0
                batches.append(batch_indices)
                batch_indices = list(indices)
            else:
                batch_indices.extend(indices)
        if not droplast and batch_indices:
            batches.append(batch_indices)
    return batches


@pytest.mark.parametrize("droplast", [False, True])
@pytest.mark.parametrize(("budget", "bucket", "mul"), [(800, 64, 8), (3000, 8192, 8), (2000, 300, 4), (1000, 37, 3)])
def test_batches_are_the_authors(budget, bucket, mul, droplast):
    """Batch for batch the authors' sampler: max_len runs over the whole sorted bucket (its longest example), and a
    batch grows while a full group more fits."""
    n = len(LENS)
    ordered = TokenBucketSampler(
        LENS, bucket_size=bucket, batch_size=budget, droplast=droplast, size_multiple=mul, shuffle=False
    )
    assert ordered.epoch_batches() == _authors_token_buckets(LENS, list(range(n)), bucket, budget, droplast, mul)
    # shuffled: the same batches over the epoch's permutation, in a shuffled order
    from villa_fast.data.sampler import _epoch_rng

    shuffled = TokenBucketSampler(
        LENS, bucket_size=bucket, batch_size=budget, droplast=droplast, size_multiple=mul, seed=3, epoch=2
    )
    perm = list(range(n))
    _epoch_rng(3, 2).shuffle(perm)
    want = _authors_token_buckets(LENS, perm, bucket, budget, droplast, mul)
    assert sorted(shuffled.epoch_batches()) == sorted(want)
    if bucket >= n and droplast:  # one bucket: every batch has the size its longest example allows
        assert {len(b) for b in ordered.epoch_batches()} == {budget // max(LENS) // mul * mul}


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


@pytest.mark.parametrize("kind", ["tokens", "examples"])
def test_resume_mid_epoch_with_workers(vqa, kind):
    """A multi-process DataLoader begins two iterators over its batch sampler: a loader resumed mid-epoch with
    workers continues right after the batches already handed out, and ends the epoch where an uninterrupted one
    does."""
    from villa_fast.data.sampler import build_example_dataloader

    def build(workers):
        if kind == "tokens":
            return build_dataloader(vqa, vqa_collate, batch_size_tokens=300, is_train=True, seed=5, num_workers=workers)
        return build_example_dataloader(vqa, vqa_collate, batch_size=16, is_train=True, seed=5, num_workers=workers)

    full = [b["input_ids"] for b in build(0)]
    assert len(full) > 4
    state = {"epoch": 0, "batch_index": 3, "seed": 5}
    ld = build(2)
    ld.load_state_dict(state)
    rest = [b["input_ids"] for b in ld]
    assert len(rest) == len(full) - 3 and all(a.equal(b) for a, b in zip(rest, full[3:], strict=True))
    assert ld.state_dict() == {"epoch": 1, "batch_index": 0, "seed": 5}
    assert ld.sampler.start_batch == 0
    # the sampler alone: repeated iter() calls continue from the same place until one reaches the epoch's end
    s = ld.sampler
    s.load_state_dict(state)
    unread = iter(s)
    assert list(iter(s)) == s.epoch_batches()[3:] and s.start_batch == 0
    del unread
    assert list(s) == s.epoch_batches()


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


def test_fixed_shape_batches_priced_by_example():
    """``pad_prices``: a shape's batch size is the budget over the largest price among the examples it holds (its
    own and those of every shape it contains, which may be carried up to it), not over its padded rows; every
    batch stays within the budget at its examples' prices and one size per shape holds."""
    rng = random.Random(0)
    dims = [(rng.randint(5, 30), rng.randint(10, 60)) for _ in range(400)]
    # prices unrelated to the padded row (a VCR question: four rows' text priced together, plus its regions)
    prices = [4 * t + n + rng.randint(0, 20) for t, n in dims]
    pb = PadBuckets.fit(dims, 3, 3)
    budget = 4000
    sampler = TokenBucketSampler(
        [t + n for t, n in dims],
        batch_size=budget,
        droplast=True,
        seed=3,
        pad_dims=dims,
        pad_buckets=pb,
        pad_prices=prices,
    )
    sizes = sampler.shape_sizes()
    assert set(sizes) == set(pb.shapes())
    for shape, size in sizes.items():
        held = [p for p, d in zip(prices, dims, strict=True) if d[0] <= shape[0] and d[1] <= shape[1]]
        assert size == (budget // max(held) // 8 * 8 if held else 0)
        # the padded-row price would allow more examples: the prices are what binds here
        assert size <= TokenBucketSampler([1], batch_size=budget).batch_size_of(shape) or not held
    seen = 0
    for batch in sampler.epoch_batches():
        assert len(batch) * max(prices[i] for i in batch) <= budget
        own = pb.shape_of(max(dims[i][0] for i in batch), max(dims[i][1] for i in batch))
        # the size of the shape it was formed for: its own, or a larger one its examples were carried up to
        assert any(len(batch) == n and s[0] >= own[0] and s[1] >= own[1] for s, n in sizes.items())
        seen += len(batch)
    assert seen + sampler.num_dropped == len(dims) and seen > 0
    # the prices decide: doubling them halves (about) every batch
    dear = TokenBucketSampler(
        [1] * len(dims), batch_size=budget, pad_dims=dims, pad_buckets=pb, pad_prices=[2 * p for p in prices]
    )
    assert all(dear.batch_size_of(s) <= max(sizes[s] // 2, 8) for s in sizes if sizes[s])
    with pytest.raises(ValueError, match="one price per example"):
        TokenBucketSampler([1, 2], batch_size=budget, pad_dims=[(3, 4), (5, 6)], pad_buckets=pb, pad_prices=[7])
    with pytest.raises(ValueError, match="positive"):
        TokenBucketSampler([1], batch_size=budget, pad_dims=[(3, 4)], pad_buckets=pb, pad_prices=[0])
    expensive = TokenBucketSampler(
        [1] * 8, batch_size=100, pad_dims=[(5, 5)] * 8, pad_buckets=PadBuckets.fit([(5, 5)]), pad_prices=[50] * 8
    )
    with pytest.raises(ValueError, match="priced at 50 tokens"):
        expensive.epoch_batches()
