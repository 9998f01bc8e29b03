"""Token-bucket and example batching, rank sharding, resumable loading and GPU prefetch.

What a batch size counts depends on the task, as in the authors' scripts (each task declares it:
``villa_fast.tasks.Task.train_batch_unit`` / ``val_batch_unit``): tokens for VQA, SNLI-VE, NLVR2,
VCR training and pre-training (their ``TokenBucketSampler``, :class:`TokenBucketSampler` here),
examples for referring expressions, retrieval training with sampled negatives and VCR validation
(their plain ``DataLoader(batch_size=...)``, :class:`ExampleBatchSampler` here).

Token batching (the authors' scheme, step for step): shuffle the examples, cut them into buckets
of ``bucket_size``, sort each bucket by length (longest first) and walk it ``size_multiple``
examples at a time; ``max_len`` is the longest example of the bucket met so far, never reset
within the bucket (so, as the bucket is sorted, its first example's length), and a group joins
the current batch while ``max_len * (n + size_multiple)`` stays within ``batch_size`` tokens
(``n`` the examples already in it), else it starts the next batch.  Every batch of a bucket but
its last thus has the same size, set by the bucket's longest example; the last (the bucket's
remainder) is dropped with ``droplast``.  Then the batch order is shuffled.  Everything is drawn
from a generator seeded by ``(seed, epoch)``, so each epoch is reproducible, and ``state_dict``
(epoch and batch index) restores the exact position.

Distributed: all ranks draw the same permutation and rank ``r`` keeps ``perm[r::world]``,
so shards are disjoint and together complete; with ``even_batches`` every rank cuts its
epoch to the smallest rank's batch count (the cut examples are counted in ``num_dropped``).

Fixed shapes (``pad_buckets``): examples are grouped by the padded ``(L_txt, N)`` shape
their row needs, each shape gets one batch size (``budget // (L_txt + N)`` rounded down
to ``size_multiple``), and every batch is padded to its shape, so an epoch meets one shape
per occupied bucket (plus the smaller remainders when ``droplast`` is off). A dataset whose
examples the authors price otherwise than by their padded rows (VCR: a question's four rows at its
``id2len`` plus its regions) gives ``pad_prices``; a shape's batch size is then
``budget // p`` with ``p`` the largest price among the examples the shape holds. A shape's
examples that do not fill its last batch join the next larger shape that holds them
(padded further instead of left out); only the largest shapes' remainders are dropped.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Iterator, Sequence

import torch
from torch.utils.data import DataLoader, Sampler

from villa_fast.data.batch import PadBuckets, pad_batch

__all__ = [
    "BUCKET_SIZE",
    "ExampleBatchSampler",
    "ResumableBatchSampler",
    "PrefetchLoader",
    "TokenBucketLoader",
    "TokenBucketSampler",
    "build_dataloader",
    "build_example_dataloader",
    "move_to_device",
]

logger = logging.getLogger(__name__)

BUCKET_SIZE = 8192


def _epoch_rng(seed: int, epoch: int) -> random.Random:
    return random.Random((int(seed) * 1_000_003 + int(epoch)) & ((1 << 63) - 1))


class ResumableBatchSampler(Sampler[list[int]]):
    """The position protocol of the resumable batch samplers: ``epoch``, ``seed`` and ``start_batch`` (the
    batches already handed out in ``epoch``). A subclass gives ``epoch_batches()``, this rank's batches of the
    current epoch; ``iter()`` continues after the first ``start_batch`` of them, and ``state_dict()`` ->
    ``{"epoch", "batch_index", "seed"}`` restores that position.

    ``iter()`` leaves the position as it is: every iterator begun before one of them reaches the end of the
    epoch continues from the same batch (a multi-process ``DataLoader`` begins an iterator over its batch
    sampler, drops it unread and begins another). An iterator that runs to the end of the epoch sets
    ``start_batch`` back to 0, the start of an epoch."""

    epoch: int
    seed: int
    start_batch: int

    def epoch_batches(self, epoch: int | None = None) -> list[list[int]]:
        raise NotImplementedError

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "batch_index": self.start_batch, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        self.epoch = int(state["epoch"])
        self.start_batch = int(state.get("batch_index", 0))
        self.seed = int(state.get("seed", self.seed))

    def __iter__(self) -> Iterator[list[int]]:
        return self._continue(self.epoch_batches()[self.start_batch :])

    def _continue(self, batches: list[list[int]]) -> Iterator[list[int]]:
        yield from batches
        self.start_batch = 0

    def __len__(self) -> int:
        return len(self.epoch_batches())


class TokenBucketSampler(ResumableBatchSampler):
    """Yields lists of example indices; see the module docstring.

    Args:
        lens: per-example length (text tokens + regions), as datasets' ``lens``.
        bucket_size: examples per sorting bucket (8192 in the authors' code).
        batch_size: token budget per batch, padding included.
        droplast: drop each bucket's last partial batch (the authors' training setting).
        size_multiple: batches grow by this many examples.
        seed, epoch: the generator's seed; ``set_epoch`` moves on.
        rank, world_size: shard of a distributed run.
        shuffle: ``False`` keeps index order (buckets still sorted by length) for evaluation.
        pad_dims, pad_buckets: per-example ``(txt_len, num_bb)`` upper bounds and the
            :class:`PadBuckets` that turn them into fixed shapes.
        rows_per_example: rows an example makes in a batch (NLVR2 "paired": 2, one per image); with
            ``pad_buckets`` each costs ``rows_per_example * (L_txt + N)`` tokens of the budget.
        pad_prices: with ``pad_buckets``, per-example token price instead (each shape's batch size is then
            set by the largest price among the examples its padded shape holds, see :meth:`batch_size_of`).
        even_batches: cut every rank to the same number of batches (default: on when
            ``world_size > 1`` and ``droplast``).
    """

    def __init__(
        self,
        lens: Sequence[int],
        bucket_size: int = BUCKET_SIZE,
        batch_size: int = 8192,
        droplast: bool = False,
        size_multiple: int = 8,
        *,
        seed: int = 0,
        epoch: int = 0,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = True,
        pad_dims: Sequence[tuple[int, int]] | None = None,
        pad_buckets: PadBuckets | None = None,
        even_batches: bool | None = None,
        rows_per_example: int = 1,
        pad_prices: Sequence[int] | None = None,
    ):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world_size {world_size}")
        if batch_size <= 0 or bucket_size <= 0 or size_multiple <= 0:
            raise ValueError("batch_size, bucket_size and size_multiple must be positive")
        if pad_buckets is not None and pad_dims is None:
            raise ValueError("pad_buckets needs the dataset's pad_dims")
        if int(rows_per_example) < 1:
            raise ValueError(f"rows_per_example must be >= 1, got {rows_per_example}")
        self.rows_per_example = int(rows_per_example)
        self._lens = list(lens)
        self._pad_dims = None if pad_dims is None else list(pad_dims)
        self._pad_prices = None
        self._shape_sizes: dict[tuple[int, int], int] | None = None
        self._set_prices(pad_prices)
        self._bucket_size = bucket_size
        self._max_tok = batch_size
        self._droplast = droplast
        self._size_mul = size_multiple
        self.seed = int(seed)
        self.epoch = int(epoch)
        self.rank, self.world_size = rank, world_size
        self.shuffle = shuffle
        self.pad_buckets = pad_buckets
        self.even_batches = (world_size > 1 and droplast) if even_batches is None else even_batches
        self.start_batch = 0
        self.num_dropped = 0
        self._cache: tuple[tuple[int, int], list[list[int]]] | None = None

    # -- configuration -------------------------------------------------------------
    def set_lens(
        self,
        lens: Sequence[int],
        pad_dims: Sequence[tuple[int, int]] | None = None,
        pad_prices: Sequence[int] | None = None,
    ) -> None:
        """Replace the lengths (datasets whose pairing changes per epoch)."""
        self._lens = list(lens)
        if pad_dims is not None:
            self._pad_dims = list(pad_dims)
        if self.pad_buckets is not None and pad_prices is not None:
            self._set_prices(pad_prices)
        self._cache = None

    def _set_prices(self, pad_prices: Sequence[int] | None) -> None:
        self._shape_sizes = None
        if pad_prices is None:
            self._pad_prices = None
            return
        prices = [int(p) for p in pad_prices]
        if self._pad_dims is None or len(prices) != len(self._pad_dims):
            raise ValueError(
                f"pad_prices needs one price per example of pad_dims: {len(prices)} prices for "
                f"{0 if self._pad_dims is None else len(self._pad_dims)} examples"
            )
        if any(p <= 0 for p in prices):
            raise ValueError("pad_prices must be positive token counts")
        self._pad_prices = prices

    # -- batching --------------------------------------------------------------------
    def _shard(self, rng: random.Random) -> list[list[int]]:
        ids = list(range(len(self._lens)))
        if self.shuffle:
            rng.shuffle(ids)
        return [ids[r :: self.world_size] for r in range(self.world_size)]

    def _batches_one(self, ids: list[int], rng: random.Random) -> tuple[list[list[int]], int]:
        if self.pad_buckets is not None:
            return self._batches_fixed(ids)
        lens, mul, budget = self._lens, self._size_mul, self._max_tok
        batches, dropped = [], 0
        for start in range(0, len(ids), self._bucket_size):
            bucket = sorted(ids[start : start + self._bucket_size], key=lambda i: lens[i], reverse=True)
            # max_len runs over the whole bucket (longest first): every batch is priced at the bucket's longest
            # example, and a batch grows only while a full group more still fits
            max_len, cur = 0, []
            for g in range(0, len(bucket), mul):
                group = bucket[g : g + mul]
                max_len = max(max_len, max(lens[i] for i in group))
                if max_len * (len(cur) + mul) > budget:
                    if not cur:
                        raise ValueError(
                            f"token budget {budget} cannot hold {mul} examples of length {max_len}: "
                            "raise the batch size or lower max_txt_len / max_bb"
                        )
                    batches.append(cur)
                    cur = list(group)
                else:
                    cur.extend(group)
            if cur:
                if self._droplast:
                    dropped += len(cur)
                else:
                    batches.append(cur)
        return batches, dropped

    def batch_size_of(self, shape: tuple[int, int]) -> int:
        """Examples per batch of a padded ``(L_txt, N)`` shape (fixed-shape mode): the budget over
        ``rows_per_example * (L_txt + N)``, or with ``pad_prices`` over the largest price among the examples
        whose padded shape the shape holds (0 for a shape that holds none), in ``size_multiple`` steps."""
        if self._pad_prices is None:
            return fixed_batch_size(shape, self._max_tok, self.rows_per_example, self._size_mul)
        if self._shape_sizes is None:
            self._shape_sizes = self._priced_sizes()
        size = self._shape_sizes.get(tuple(shape))
        if size is None:  # a shape outside pad_buckets: the examples it holds
            dims = self._pad_dims
            held = [p for p, d in zip(self._pad_prices, dims, strict=True) if d[0] <= shape[0] and d[1] <= shape[1]]
            size = self._max_tok // max(held) // self._size_mul * self._size_mul if held else 0
        return size

    def _priced_sizes(self) -> dict[tuple[int, int], int]:
        pb = self.pad_buckets
        if pb is None:
            return {}
        top: dict[tuple[int, int], int] = {}
        for p, d in zip(self._pad_prices, self._pad_dims, strict=True):
            sh = pb.shape_of(*d)
            top[sh] = max(top.get(sh, 0), p)
        sizes = {}
        for shape in pb.shapes():
            held = [p for sh, p in top.items() if sh[0] <= shape[0] and sh[1] <= shape[1]]
            price = max(held, default=0)
            sizes[shape] = self._max_tok // price // self._size_mul * self._size_mul if price else 0
        return sizes

    def shape_sizes(self) -> dict[tuple[int, int], int]:
        """``{padded shape: examples per batch}`` over ``pad_buckets``' shapes (fixed-shape mode)."""
        if self.pad_buckets is None:
            return {}
        return {tuple(s): self.batch_size_of(tuple(s)) for s in self.pad_buckets.shapes()}

    def _batches_fixed(self, ids: list[int]) -> tuple[list[list[int]], int]:
        pb = self.pad_buckets
        groups: dict[tuple[int, int], list[int]] = {}
        for i in ids:
            groups.setdefault(pb.shape_of(*self._pad_dims[i]), []).append(i)
        order = sorted(groups, key=lambda sh: (sum(sh), sh))
        batches, dropped = [], 0
        for k, shape in enumerate(order):
            members = groups[shape]
            per = self.batch_size_of(shape)
            if per == 0:
                if self._pad_prices is None:
                    what = f"{self.rows_per_example} row(s) of padded shape {shape}"
                else:
                    top = max(self._pad_prices[i] for i in members)
                    what = f"padded shape {shape} (the largest priced at {top} tokens)"
                raise ValueError(
                    f"token budget {self._max_tok} cannot hold {self._size_mul} examples of {what}: "
                    "raise the batch size or lower max_txt_len / max_bb"
                )
            full = len(members) // per * per
            batches += [members[s : s + per] for s in range(0, full, per)]
            rest = members[full:]
            if not rest:
                continue
            # the remainder joins the next larger occupied shape that holds it
            up = next((sh for sh in order[k + 1 :] if sh[0] >= shape[0] and sh[1] >= shape[1]), None)
            if up is not None:
                groups[up] = groups[up] + rest
            elif self._droplast:
                dropped += len(rest)
            else:
                batches.append(rest)
        return batches, dropped

    def epoch_batches(self, epoch: int | None = None) -> list[list[int]]:
        """This rank's batches for ``epoch`` (default: the current one), cached."""
        epoch = self.epoch if epoch is None else int(epoch)
        key = (self.seed, epoch)
        if self._cache is not None and self._cache[0] == key:
            return self._cache[1]
        rng = _epoch_rng(self.seed, epoch)
        shards = self._shard(rng)
        per_rank, dropped = [], []
        for r, ids in enumerate(shards):
            if r != self.rank and not self.even_batches:
                per_rank.append(None)
                dropped.append(0)
                continue
            batches, d = self._batches_one(ids, _epoch_rng(self.seed * 7919 + r, epoch))
            if self.shuffle:
                _epoch_rng(self.seed * 104_729 + r, epoch).shuffle(batches)
            per_rank.append(batches)
            dropped.append(d)
        mine = per_rank[self.rank]
        n_drop = dropped[self.rank]
        if self.even_batches:
            n = min(len(b) for b in per_rank)
            n_drop += sum(len(b) for b in mine[n:])
            mine = mine[:n]
        if n_drop:
            logger.info("epoch %d rank %d: %d examples left out of this epoch's batches", epoch, self.rank, n_drop)
        self.num_dropped = n_drop
        self._cache = (key, mine)
        return mine


class ExampleBatchSampler(ResumableBatchSampler):
    """Batches of ``batch_size`` examples: the authors' batching where a batch size counts examples.

    The authors form these batches with a plain ``DataLoader(batch_size=...)``: UNITER's
    ``train_re.py`` / ``inf_re.py`` (over their ``DistributedSampler``, last batch kept),
    ``train_itm.py`` (``shuffle=True, drop_last=True``) and the validation loader of VILLA's
    ``train_vcr_adv.py`` (in order, last batch kept). Each epoch:

    1. order: index order, or with ``shuffle`` a permutation drawn from ``(seed, epoch)``; with
       ``groups`` the groups are permuted and each keeps its members together, in their order
       (examples in no group are groups of their own);
    2. shards: all ranks draw the same order and rank ``r`` keeps ``order[r::world_size]``; with
       ``even_shards`` (training) every rank gets as many examples: with ``drop_last`` the order is
       cut to a multiple of ``world_size``, else it is padded with its own first examples, as the
       authors' ``DistributedSampler`` pads (``num_padded`` counts them);
    3. batches: consecutive runs of ``batch_size`` examples of the shard; the last, shorter run is a
       batch too unless ``drop_last``.

    ``num_dropped`` counts the epoch's examples that no rank's batch holds (``drop_last`` only).
    ``state_dict`` / ``load_state_dict`` / ``set_epoch`` / ``start_batch`` work as in
    :class:`TokenBucketSampler`, so :class:`TokenBucketLoader` drives either and resumes either
    exactly.
    """

    def __init__(
        self,
        num_examples: int,
        batch_size: int,
        *,
        shuffle: bool = True,
        drop_last: bool = False,
        groups: Sequence[Sequence[int]] | None = None,
        seed: int = 0,
        epoch: int = 0,
        rank: int = 0,
        world_size: int = 1,
        even_shards: bool | None = None,
    ):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world_size {world_size}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
            raise ValueError(f"batch_size must be a positive number of examples, got {batch_size!r}")
        self._n = self._check_count(num_examples)
        self._batch_size = batch_size
        self._drop_last = bool(drop_last)
        self.seed = int(seed)
        self.epoch = int(epoch)
        self.rank, self.world_size = rank, world_size
        self.shuffle = bool(shuffle)
        self.even_shards = self.shuffle if even_shards is None else bool(even_shards)
        self._groups = None if groups is None else self._check_groups(groups, self._n)
        self.start_batch = 0
        self.num_dropped = 0
        self.num_padded = 0
        self._cache: tuple[tuple[int, int], list[list[int]]] | None = None

    @staticmethod
    def _check_count(n) -> int:
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"num_examples must be a count of examples, got {n!r}")
        return n

    @staticmethod
    def _check_groups(groups: Sequence[Sequence[int]], n: int) -> list[list[int]]:
        owner: dict[int, int] = {}
        out = []
        for g, members in enumerate(groups):
            members = list(members)
            for i in members:
                if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < n:
                    raise ValueError(f"groups[{g}] holds {i!r}, not an example index in [0, {n})")
                if i in owner:
                    raise ValueError(f"example {i} is in groups[{owner[i]}] and groups[{g}]: groups must not overlap")
                owner[i] = g
            if members:
                out.append(members)
        out.extend([i] for i in range(n) if i not in owner)
        return out

    # -- configuration -------------------------------------------------------------
    @property
    def batch_size(self) -> int:
        return self._batch_size

    def set_lens(self, lens: Sequence[int], pad_dims: Sequence[tuple[int, int]] | None = None) -> None:
        """Called by the loader after the dataset's ``set_epoch``; only the example count matters here."""
        if len(lens) != self._n:
            raise ValueError(f"the dataset now has {len(lens)} examples, the sampler was built for {self._n}")

    # -- batching --------------------------------------------------------------------
    def _order(self, epoch: int) -> list[int]:
        if not self.shuffle:
            return list(range(self._n))
        rng = _epoch_rng(self.seed, epoch)
        if self._groups is None:
            order = list(range(self._n))
            rng.shuffle(order)
            return order
        groups = list(self._groups)
        rng.shuffle(groups)
        return [i for g in groups for i in g]

    def epoch_batches(self, epoch: int | None = None) -> list[list[int]]:
        """This rank's batches for ``epoch`` (default: the current one), cached."""
        epoch = self.epoch if epoch is None else int(epoch)
        key = (self.seed, epoch)
        if self._cache is not None and self._cache[0] == key:
            return self._cache[1]
        order = self._order(epoch)
        world, size = self.world_size, self._batch_size
        n_drop = n_pad = 0
        if self.even_shards and world > 1 and order:
            if self._drop_last:
                keep = len(order) // world * world
                n_drop += len(order) - keep
                order = order[:keep]
            else:
                n_pad = -len(order) % world
                order = order + (order * (n_pad // len(order) + 1))[:n_pad]
        mine = order[self.rank :: world]
        if self._drop_last:
            # every rank leaves out the remainder of its shard
            n_drop += sum(len(range(r, len(order), world)) % size for r in range(world))
            full = len(mine) // size * size
            if full == 0 and self._n > 0:
                raise ValueError(
                    f"batch size {size} examples with drop_last: this process's share of the epoch is "
                    f"{len(mine)} of {self._n} examples, too few for one batch; lower the batch size"
                )
            mine = mine[:full]
        batches = [mine[s : s + size] for s in range(0, len(mine), size)]
        if n_drop:
            logger.info("epoch %d: %d examples left out of this epoch's batches (drop_last)", epoch, n_drop)
        self.num_dropped, self.num_padded = n_drop, n_pad
        self._cache = (key, batches)
        return batches


def move_to_device(batch, device: torch.device, non_blocking: bool = True):
    """Tensors (nested in dicts/lists/tuples) to ``device``; other values unchanged."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=non_blocking)
    if isinstance(batch, dict):
        return {k: move_to_device(v, device, non_blocking) for k, v in batch.items()}
    if isinstance(batch, list | tuple):
        return type(batch)(move_to_device(v, device, non_blocking) for v in batch)
    return batch


def _record_stream(batch, stream) -> None:
    if isinstance(batch, torch.Tensor):
        if batch.is_cuda:
            batch.record_stream(stream)
    elif isinstance(batch, dict):
        for v in batch.values():
            _record_stream(v, stream)
    elif isinstance(batch, list | tuple):
        for v in batch:
            _record_stream(v, stream)


class PrefetchLoader:
    """Copies the next batch to the GPU on a side stream while the current one is used."""

    def __init__(self, loader, device: torch.device):
        self.loader = loader
        self.device = torch.device(device)

    def __iter__(self):
        stream = torch.cuda.Stream(device=self.device)
        it = iter(self.loader)

        def preload():
            try:
                cpu = next(it)
            except StopIteration:
                return None
            with torch.cuda.stream(stream):
                return move_to_device(cpu, self.device)

        nxt = preload()
        while nxt is not None:
            cur_stream = torch.cuda.current_stream(self.device)
            cur_stream.wait_stream(stream)
            batch = nxt
            _record_stream(batch, cur_stream)
            nxt = preload()
            yield batch

    def __len__(self) -> int:
        return len(self.loader)


def fixed_batch_size(shape: tuple[int, int], budget: int, rows_per_example: int, size_multiple: int) -> int:
    """Examples per batch of padded shape ``(L_txt, N)`` under a token budget (a multiple of ``size_multiple``)."""
    return (budget // (rows_per_example * (shape[0] + shape[1]))) // size_multiple * size_multiple


class _PadCollate:
    """Picklable ``collate_fn`` followed by fixed-shape padding.

    With ``sizes`` (the token sampler's ``{padded shape: examples per batch}``) a batch of ``b`` examples is
    padded to the smallest shape that holds it among those whose batch size is ``b``: the shape it was formed
    for, also when it holds examples carried up from a smaller shape, so every shape keeps one batch size.
    Without it, to the smallest shape that holds the batch."""

    def __init__(self, collate_fn: Callable, pad_buckets: PadBuckets | None, sizes: dict | None = None):
        self.collate_fn = collate_fn
        self.pad_buckets = pad_buckets
        self.sizes = sizes

    def __call__(self, inputs):
        batch = self.collate_fn(inputs)
        pb = self.pad_buckets
        if pb is None:
            return batch
        if self.sizes:
            lt, n = batch["input_ids"].size(1), batch["img_feat"].size(1)
            for shape in pb.shapes():
                if shape[0] >= lt and shape[1] >= n and self.sizes.get(tuple(shape)) == len(inputs):
                    return pad_batch(batch, *shape)
        return pb(batch)


class TokenBucketLoader:
    """Iterates one epoch of collated batches per ``iter()``; tracks its position for exact resume.

    ``sampler`` is a :class:`TokenBucketSampler` (token-counted batches) or an
    :class:`ExampleBatchSampler` (example-counted batches); the loader is the same for both.

    ``state_dict()`` -> ``{"epoch", "batch_index", "seed"}`` where ``batch_index`` counts the
    batches already handed out in ``epoch``; after ``load_state_dict`` the next ``iter()``
    continues right after them.  At the end of an epoch ``epoch`` advances by one.
    """

    def __init__(
        self,
        dataset,
        collate_fn: Callable,
        sampler: TokenBucketSampler | ExampleBatchSampler,
        *,
        num_workers: int = 0,
        device: torch.device | str | None = None,
        pad_buckets: PadBuckets | None = None,
        prefetch_factor: int | None = None,
    ):
        self.dataset = dataset
        self.sampler = sampler
        self.num_workers = num_workers
        self.device = None if device is None else torch.device(device)
        self.pad_buckets = pad_buckets
        self.collate = _PadCollate(collate_fn, pad_buckets)
        self.prefetch_factor = prefetch_factor
        self.epoch = sampler.epoch
        self.batch_index = sampler.start_batch

    @property
    def seed(self) -> int:
        return self.sampler.seed

    def _prepare(self) -> None:
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(self.epoch, self.seed)
            if hasattr(self.dataset, "lens"):
                prices = getattr(self.dataset, "pad_prices", None)
                priced = prices is not None and isinstance(self.sampler, TokenBucketSampler)
                extra = {"pad_prices": prices} if priced else {}
                self.sampler.set_lens(self.dataset.lens, getattr(self.dataset, "pad_dims", None), **extra)
        self.sampler.set_epoch(self.epoch)
        self.sampler.start_batch = self.batch_index
        if self.pad_buckets is not None and isinstance(self.sampler, TokenBucketSampler):
            self.collate.sizes = self.sampler.shape_sizes()

    def __len__(self) -> int:
        self._prepare()
        return len(self.sampler)

    def __iter__(self):
        self._prepare()
        use_cuda = self.device is not None and self.device.type == "cuda"
        kwargs = {}
        if self.num_workers > 0 and self.prefetch_factor is not None:
            kwargs["prefetch_factor"] = self.prefetch_factor
        loader = DataLoader(
            self.dataset,
            batch_sampler=self.sampler,
            collate_fn=self.collate,
            num_workers=self.num_workers,
            pin_memory=use_cuda,
            **kwargs,
        )
        it = PrefetchLoader(loader, self.device) if use_cuda else loader
        for batch in it:
            if self.device is not None and not use_cuda:
                batch = move_to_device(batch, self.device, non_blocking=False)
            self.batch_index += 1
            yield batch
        self.epoch += 1
        self.batch_index = 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "batch_index": self.batch_index, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        self.epoch = int(state["epoch"])
        self.batch_index = int(state.get("batch_index", 0))
        self.sampler.seed = int(state.get("seed", self.sampler.seed))


def build_dataloader(
    dataset,
    collate_fn: Callable,
    *,
    batch_size_tokens: int,
    is_train: bool,
    seed: int = 0,
    epoch: int = 0,
    rank: int = 0,
    world_size: int = 1,
    num_workers: int = 0,
    pad_buckets: PadBuckets | None = None,
    device: torch.device | str | None = None,
    bucket_size: int = BUCKET_SIZE,
    size_multiple: int = 8,
) -> TokenBucketLoader:
    """A :class:`TokenBucketLoader` over ``dataset`` (which needs ``lens``; ``pad_dims`` for padding).

    Training shuffles and drops each bucket's remainder (counted, logged); evaluation keeps
    every example, in order.  ``device`` set to a CUDA device prefetches on a side stream.
    """
    sampler = TokenBucketSampler(
        dataset.lens,
        bucket_size=bucket_size,
        batch_size=batch_size_tokens,
        droplast=is_train,
        size_multiple=size_multiple,
        seed=seed,
        epoch=epoch,
        rank=rank,
        world_size=world_size,
        shuffle=is_train,
        pad_dims=getattr(dataset, "pad_dims", None),
        pad_buckets=pad_buckets,
        rows_per_example=getattr(dataset, "rows_per_example", 1),
        pad_prices=getattr(dataset, "pad_prices", None) if pad_buckets is not None else None,
    )
    return TokenBucketLoader(
        dataset, collate_fn, sampler, num_workers=num_workers, device=device, pad_buckets=pad_buckets
    )


def build_example_dataloader(
    dataset,
    collate_fn: Callable,
    *,
    batch_size: int,
    is_train: bool,
    drop_last: bool = False,
    groups: Sequence[Sequence[int]] | None = None,
    seed: int = 0,
    epoch: int = 0,
    rank: int = 0,
    world_size: int = 1,
    num_workers: int = 0,
    device: torch.device | str | None = None,
    pad_buckets: PadBuckets | None = None,
) -> TokenBucketLoader:
    """A :class:`TokenBucketLoader` over ``dataset`` in batches of ``batch_size`` examples (each padded up to
    the smallest of ``pad_buckets``' shapes that holds it, when given).

    Training shuffles (``groups`` kept together), gives every rank as many examples and drops the
    last, shorter batch only with ``drop_last``; evaluation keeps every example, in order, each rank
    its ``[rank::world_size]`` share (see :class:`ExampleBatchSampler`).
    """
    sampler = ExampleBatchSampler(
        len(dataset),
        batch_size,
        shuffle=is_train,
        drop_last=is_train and drop_last,
        groups=groups if is_train else None,
        seed=seed,
        epoch=epoch,
        rank=rank,
        world_size=world_size,
        even_shards=is_train,
    )
    return TokenBucketLoader(
        dataset, collate_fn, sampler, num_workers=num_workers, device=device, pad_buckets=pad_buckets
    )


def count_shapes(batches: Sequence[dict]) -> int:
    """Distinct (input_ids, img_feat, attn_masks) shapes among collated batches."""
    shapes = {(tuple(b["input_ids"].shape), tuple(b["img_feat"].shape), tuple(b["attn_masks"].shape)) for b in batches}
    return len(shapes)


__all__ += ["count_shapes"]
