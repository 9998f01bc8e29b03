"""What a batch size counts, per task, as in the authors' scripts.

Tokens (the token-bucket sampler) for VQA, SNLI-VE, NLVR2, VCR training and pre-training; examples
(fixed-size batches) for referring expressions (UNITER's train_re.py / inf_re.py), VCR validation
(VILLA's train_vcr_adv.py) and retrieval training with sampled negatives (UNITER's train_itm.py).
Covers the example sampler (sizes, last batch, shuffling by group, rank shards, resume), the tasks'
loaders, every shipped config's batch sizes, and RE training from the released config's 128.
"""

from __future__ import annotations

import itertools
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch.utils.data import BatchSampler, SequentialSampler

from tests.test_tasks_re_gt import N_GT, _gt_name, _write_img_db
from tests.test_train_fixtures import META, task_config, tiny_model_config
from villa_fast.data import TokenBucketSampler, TxtDbWriter, re_det_img_name
from villa_fast.data.codec import DataFormatError
from villa_fast.data.sampler import ExampleBatchSampler, TokenBucketLoader, build_example_dataloader
from villa_fast.tasks import EXAMPLES, TOKENS, DataContext, build_task
from villa_fast.tasks.re import GT_NUM_BB, ReTask
from villa_fast.train.config import TASK_BATCH_DEFAULTS, TASKS, resolve_config
from villa_fast.train.trainer import LoaderSource, Trainer

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parent.parent
REFCOCO = ROOT / "configs" / "train-refcoco-base-1gpu.json"
TRAIN_CONFIGS = sorted(p for p in (ROOT / "configs").glob("*.json") if not p.name.startswith("uniter"))


# -- the example sampler ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n, size", [(10, 3), (12, 4), (5, 8), (1, 1)])
@pytest.mark.parametrize("drop_last", [False, True])
def test_batches_hold_batch_size_examples_and_the_last_as_the_authors(n, size, drop_last):
    if drop_last and n < size:
        with pytest.raises(ValueError, match=rf"batch size {size} examples with drop_last.*{n} of {n} examples"):
            ExampleBatchSampler(n, size, shuffle=False, drop_last=True).epoch_batches()
        return
    s = ExampleBatchSampler(n, size, shuffle=False, drop_last=drop_last)
    # unshuffled: exactly torch's DataLoader(batch_size=size, drop_last=drop_last) over the dataset
    assert list(s) == list(BatchSampler(SequentialSampler(range(n)), size, drop_last))
    assert len(s) == len(s.epoch_batches())
    batches = s.epoch_batches()
    assert all(len(b) == size for b in batches[:-1])
    assert len(batches[-1]) == (size if drop_last or n % size == 0 else n % size)
    assert s.num_dropped == (n % size if drop_last else 0)


def test_shuffled_epochs_are_permutations_drawn_from_seed_and_epoch():
    mk = lambda seed, epoch: ExampleBatchSampler(103, 10, seed=seed, epoch=epoch)  # noqa: E731
    first = mk(0, 0).epoch_batches()
    assert [len(b) for b in first] == [10] * 10 + [3]  # the last, shorter batch kept (no drop_last)
    assert sorted(i for b in first for i in b) == list(range(103))
    assert first != [list(range(k, min(k + 10, 103))) for k in range(0, 103, 10)]
    assert mk(0, 0).epoch_batches() == first
    assert mk(0, 1).epoch_batches() != first and mk(1, 0).epoch_batches() != first
    s = mk(0, 0)
    s.set_epoch(1)
    assert list(s) == mk(0, 1).epoch_batches()
    dropped = ExampleBatchSampler(103, 10, drop_last=True).epoch_batches()
    assert [len(b) for b in dropped] == [10] * 10


def test_groups_stay_together_in_their_order_and_are_shuffled():
    groups = [[7, 3, 5], [0, 1], [9], [2, 8, 4]]  # index 6 is in no group: a group of its own
    orders = set()
    for epoch in range(6):
        flat = [i for b in ExampleBatchSampler(10, 4, groups=groups, epoch=epoch, seed=3) for i in b]
        assert sorted(flat) == list(range(10))
        for g in groups:
            at = flat.index(g[0])
            assert flat[at : at + len(g)] == g
        orders.add(tuple(flat))
    assert len(orders) > 1
    # evaluation (no shuffle) keeps index order whatever the groups
    assert [i for b in ExampleBatchSampler(10, 4, shuffle=False, groups=groups) for i in b] == list(range(10))


@pytest.mark.parametrize(
    "groups, words",
    [([[0, 1], [1, 2]], "example 1 is in groups[0] and groups[1]"), ([[0, 10]], "groups[0] holds 10")],
)
def test_bad_groups_are_named(groups, words):
    with pytest.raises(ValueError, match=words.replace("[", r"\[").replace("]", r"\]")):
        ExampleBatchSampler(10, 4, groups=groups)


@pytest.mark.parametrize("bad", [0, -3, 2.5, True])
def test_bad_batch_size_is_named(bad):
    with pytest.raises(ValueError, match="batch_size must be a positive number of examples"):
        ExampleBatchSampler(10, bad)


def _authors_distributed(n: int, world: int, rank: int) -> list[int]:
    """UNITER's data/sampler.py DistributedSampler(shuffle=False): pad with the first indices, then stride."""
    per = -(-n // world)
    idx = list(range(n))
    idx += idx[: per * world - n]
    return idx[rank : per * world : world]


@pytest.mark.parametrize("world", [2, 3, 4])
@pytest.mark.parametrize("n", [17, 24, 2])
def test_training_shards_as_the_authors_distributed_sampler(world, n):
    size = 4
    shards = []
    for r in range(world):
        # unshuffled training shards are the authors' (RE) shards exactly, then cut into batches
        s = ExampleBatchSampler(n, size, shuffle=False, rank=r, world_size=world, even_shards=True)
        want = _authors_distributed(n, world, r)
        assert s.epoch_batches() == [want[k : k + size] for k in range(0, len(want), size)]
        assert s.num_padded == -n % world
        shuffled = ExampleBatchSampler(n, size, rank=r, world_size=world, seed=5)
        shards.append([i for b in shuffled for i in b])
    # shuffled: every rank the same count, together every example, repeats only the padding
    assert len({len(x) for x in shards}) == 1
    flat = [i for x in shards for i in x]
    assert set(flat) == set(range(n)) and len(flat) == n + (-n % world)


@pytest.mark.parametrize("world", [2, 3])
def test_drop_last_shards_are_disjoint_with_equal_batch_counts(world):
    n, size = 53, 4
    shards = [ExampleBatchSampler(n, size, drop_last=True, rank=r, world_size=world, seed=2) for r in range(world)]
    batches = [s.epoch_batches() for s in shards]
    assert len({len(b) for b in batches}) == 1 and all(len(x) == size for b in batches for x in b)
    flat = [i for b in batches for x in b for i in x]
    assert len(set(flat)) == len(flat)
    assert len(flat) + shards[0].num_dropped == n


@pytest.mark.parametrize("world", [2, 3])
def test_evaluation_shards_keep_every_example_once(world):
    n = 22
    shards = [
        [i for b in ExampleBatchSampler(n, 4, shuffle=False, rank=r, world_size=world) for i in b] for r in range(world)
    ]
    assert sorted(i for x in shards for i in x) == list(range(n))
    assert shards[0] == list(range(0, n, world))


class _Items:
    """A dataset of its own indices (with ``lens`` and ``set_epoch``, as the real datasets)."""

    def __init__(self, n: int):
        self.lens = [1] * n
        self.epochs: list[tuple[int, int]] = []

    def __len__(self) -> int:
        return len(self.lens)

    def __getitem__(self, i: int) -> int:
        return i

    def set_epoch(self, epoch: int, seed: int | None = None) -> None:
        self.epochs.append((epoch, seed))


def _take(loader, k: int) -> list[list[int]]:
    """The next ``k`` batches, over epochs, as the trainer draws them."""
    return list(itertools.islice(LoaderSource(loader).batches(), k))


@pytest.mark.parametrize("stop", [1, 3, 4, 6, 9])
@pytest.mark.parametrize("world_rank", [(1, 0), (2, 1)])
def test_loader_resume_mid_epoch_is_exact(stop, world_rank):
    world, rank = world_rank
    kw = dict(batch_size=5, is_train=True, seed=11, rank=rank, world_size=world, groups=[[3, 4, 5], [10, 1]])
    ref = build_example_dataloader(_Items(23), list, **kw)
    want = _take(ref, 12)  # several epochs
    run = build_example_dataloader(_Items(23), list, **kw)
    head = _take(run, stop)
    state = json.loads(json.dumps(run.state_dict()))  # what a checkpoint keeps
    again = build_example_dataloader(_Items(23), list, **kw)
    again.load_state_dict(state)
    assert head + _take(again, 12 - stop) == want
    assert isinstance(again, TokenBucketLoader) and isinstance(again.sampler, ExampleBatchSampler)


def test_loader_counts_batches_and_moves_epochs():
    ds = _Items(23)
    loader = build_example_dataloader(ds, list, batch_size=5, is_train=False)
    assert len(loader) == 5
    assert [len(b) for b in loader] == [5, 5, 5, 5, 3] and loader.epoch == 1
    assert [b for b in loader] == [list(range(k, min(k + 5, 23))) for k in range(0, 23, 5)]
    assert ds.epochs[-1] == (1, 0)


# -- the tasks declare what their batch sizes count --------------------------------------------------------------

UNITS = {
    "vqa": (TOKENS, TOKENS),
    "ve": (TOKENS, TOKENS),
    "nlvr2": (TOKENS, TOKENS),
    "vcr": (TOKENS, EXAMPLES),
    "retrieval": (EXAMPLES, None),
    "re": (EXAMPLES, EXAMPLES),
    "pretrain": (TOKENS, TOKENS),
}


@pytest.mark.parametrize("name", TASKS)
def test_units_follow_the_authors_scripts(name):
    task = build_task(resolve_config(None, {"task": name}))
    assert (task.batch_unit("train"), task.batch_unit("val")) == UNITS[name]
    if name == "retrieval":
        hard = build_task(resolve_config(None, {"task": name, "hard_neg_size": 2, "negative_size": 4}))
        assert hard.batch_unit("train") is None  # a micro-batch is one mined item
        assert task.train_drop_last is True  # train_itm.py: drop_last=True
    if name == "re":
        assert task.train_drop_last is False  # train_re.py: the DataLoader's default


def test_vqa_keeps_token_batches(tmp_path):
    task = build_task(resolve_config(None, task_config(tmp_path, "vqa")))
    for loader in (task.train_loader(DataContext()), task.eval_loader(DataContext())):
        assert isinstance(loader.sampler, TokenBucketSampler)


def test_vcr_validates_in_batches_of_questions(tmp_path):
    shipped = resolve_config(ROOT / "configs" / "train-vcr-base-4gpu-adv.json")["val_batch_size"]
    assert shipped == 10  # a token budget of 10 could not hold one row
    cfg = resolve_config(None, task_config(tmp_path, "vcr", val_batch_size=shipped, num_train_steps=2))
    trainer = Trainer(cfg, quiet=True)
    loader = trainer.eval_loader("val")
    assert isinstance(loader.sampler, ExampleBatchSampler)
    sizes = [len(b["qids"]) for b in loader]
    assert sizes == [10, 10, 4]  # 24 questions, in order, the last batch shorter
    assert isinstance(trainer.task.train_loader(trainer.ctx).sampler, TokenBucketSampler)
    history = trainer.train()
    assert [e["val/n"] for e in history if "val/n" in e] == [24]


def test_retrieval_with_sampled_negatives_trains_on_batches_of_texts(tmp_path):
    cfg = task_config(tmp_path, "retrieval", hard_neg_size=0, negative_size=1, train_batch_size=5)
    loader = build_task(resolve_config(None, cfg)).train_loader(DataContext())
    batches = list(loader)
    assert len(batches) == 9 and loader.sampler.num_dropped == 3  # 48 texts: 9 batches of 5, 3 left out
    for b in batches:
        assert b["sample_size"] == 3 and b["attn_masks"].size(0) == 5 * 3  # [pos, neg image, neg text] per text


# -- every shipped config forms batches ---------------------------------------------------------------------------

#: the token sampler grows a batch by this many examples: a budget must hold that many
SIZE_MULTIPLE = 8
#: tokens of a short text (a question, caption or referring expression), CLS/SEP left out as the lengths do
SHORT_TEXT = 8
#: an example-counted batch size above this is a token budget given to the wrong task
MAX_EXAMPLES = 1024


def _typical_example_tokens(cfg: dict) -> int:
    """One example's length as the token sampler counts it, for a short text: its text plus its regions (the
    fixed count where conf_th is -1, else the fewest an image keeps); NLVR2 has two images (paired: two texts)."""
    regions = cfg["num_bb"] if cfg["conf_th"] == -1 else cfg["min_bb"]
    if cfg["task"] == "nlvr2":
        return (1 if cfg["model"] == "triplet" else 2) * SHORT_TEXT + 2 * regions
    return SHORT_TEXT + regions


def _check_batch_size(cfg: dict, unit: str | None, key: str) -> None:
    value = cfg[key]
    if unit == TOKENS:
        need = SIZE_MULTIPLE * _typical_example_tokens(cfg)
        assert value >= need, f"{key}={value} tokens cannot hold {SIZE_MULTIPLE} examples of ~{need // 8} tokens"
        # the sampler forms batches of such examples
        batches = TokenBucketSampler([_typical_example_tokens(cfg)] * 64, batch_size=value).epoch_batches()
        assert batches and all(len(b) >= SIZE_MULTIPLE for b in batches)
    elif unit == EXAMPLES:
        assert 1 <= value <= MAX_EXAMPLES, f"{key}={value} is not an example count"
        batches = ExampleBatchSampler(3 * value + 1, value).epoch_batches()
        assert [len(b) for b in batches] == [value] * 3 + [1]


@pytest.mark.parametrize("path", TRAIN_CONFIGS, ids=lambda p: p.name)
def test_shipped_batch_sizes_suit_what_their_task_counts(path):
    cfg = resolve_config(path)
    task = build_task(cfg)
    for split, key in (("train", "train_batch_size"), ("val", "val_batch_size")):
        unit = task.batch_unit(split)
        assert unit in (TOKENS, EXAMPLES, None)
        _check_batch_size(cfg, unit, key)
    if cfg["task"] == "retrieval":  # evaluation forwards
        assert cfg["inf_minibatch_size"] >= 1


def test_refcoco_batch_size_is_examples_a_token_budget_could_not_batch():
    cfg = resolve_config(REFCOCO)
    assert (cfg["task"], cfg["train_batch_size"], cfg["val_batch_size"]) == ("re", 128, 128)
    # read as tokens, 128 does not hold the sampler's first 8 examples (the reported failure)
    with pytest.raises(ValueError, match="token budget 128 cannot hold 8 examples"):
        TokenBucketSampler([_typical_example_tokens(cfg)] * 64, batch_size=128).epoch_batches()


@pytest.mark.parametrize("name", TASKS)
def test_defaults_suit_what_the_task_counts(name):
    cfg = resolve_config(None, {"task": name})
    task = build_task(cfg)
    for split, key in (("train", "train_batch_size"), ("val", "val_batch_size")):
        if task.batch_unit(split) == EXAMPLES:
            assert key in TASK_BATCH_DEFAULTS[name]
        _check_batch_size(cfg, task.batch_unit(split), key)
    # a value given anywhere wins over the task's default
    assert resolve_config(None, {"task": name, "train_batch_size": 77})["train_batch_size"] == 77


# -- referring expressions: the released config's batch size on the synthetic databases ---------------------------

# 300 training sentences under refs: batches of 128, 128 and 44; the loose ones are under no ref, so no example
N_REFS, PER_REF, N_LOOSE = 100, 3, 6


def _write_re_txt_db(path: Path, rng, n_refs: int, per_ref: int, n_loose: int) -> list[list[str]]:
    """Sentences under refs (``refs.json``), written in a shuffled order, plus ``n_loose`` under no ref;
    the first ref also lists a sentence the database lacks. Returns each ref's sentence ids."""
    images = [
        {"id": k, "ann_ids": [100 * k + j for j in range(n)], "width": 640, "height": 480} for k, n in enumerate(N_GT)
    ]
    refs, records, sent = [], [], 0
    for r in range(n_refs):
        k = r % len(N_GT)
        ann = 100 * k + int(rng.integers(N_GT[k]))
        ids = list(range(sent, sent + per_ref))
        sent += per_ref
        extra = [10**6] if r == 0 else []
        refs.append({"ref_id": 5000 + r, "image_id": k, "ann_id": ann, "sent_ids": ids + extra})
        records += [(i, k, ann) for i in ids]
    records += [(sent + i, 0, 0) for i in range(n_loose)]
    with TxtDbWriter(path, META) as w:
        for j in rng.permutation(len(records)):
            i, k, ann = records[j]
            ids = [int(x) for x in rng.integers(META["v_range"][0], META["vocab_size"], 5)]
            rec = {"input_ids": ids, "img_fname": _gt_name(k), "image_id": k, "ann_id": ann, "bbox": [10, 20, 90, 70]}
            w.add(str(i), rec)
        w.extra_json["images.json"] = images
        w.extra_json["refs.json"] = refs
    return [[str(s) for s in ref["sent_ids"] if s < sent] for ref in refs]


@pytest.fixture(scope="module")
def re_dbs(tmp_path_factory):
    root = tmp_path_factory.mktemp("re_batching")
    rng = np.random.default_rng(3)
    gt_names = [_gt_name(k) for k in range(len(N_GT))]
    _write_img_db(root / "re_coco_gt", gt_names, N_GT, rng, conf_th=-1, num_bb=GT_NUM_BB)
    _write_img_db(root / "re_coco_det", [re_det_img_name(n) for n in gt_names], [10] * 3, rng, conf_th=-1, num_bb=4)
    refs = _write_re_txt_db(root / "txt_train", rng, N_REFS, PER_REF, N_LOOSE)
    _write_re_txt_db(root / "txt_val", rng, 5, 2, 1)
    return root, refs


def _re_cfg(root: Path, out: Path, **changes) -> dict:
    shipped = resolve_config(REFCOCO)
    cfg = task_config(out, "re")
    cfg.update(
        model_config=tiny_model_config(out / "model.json"),
        train_txt_db=str(root / "txt_train"),
        train_img_db=str(root / "re_coco_gt"),
        val_txt_db=str(root / "txt_val"),
        val_img_db=str(root / "re_coco_det"),
        conf_th=shipped["conf_th"],
        num_bb=4,
        compressed_db=False,
        train_batch_size=shipped["train_batch_size"],
        val_batch_size=shipped["val_batch_size"],
    )
    cfg.update(changes)
    return resolve_config(None, cfg)


def test_re_batches_are_128_sentences_grouped_by_ref(re_dbs, tmp_path):
    root, refs = re_dbs
    task = ReTask(_re_cfg(root, tmp_path))
    loader = task.train_loader(DataContext())
    ds = loader.dataset
    assert isinstance(loader.sampler, ExampleBatchSampler) and len(ds) == N_REFS * PER_REF
    assert ds.ids == [s for sents in refs for s in sents]  # the authors' order: refs.json, not id2len.json
    seen = []
    for epoch in range(2):
        batches = loader.sampler.epoch_batches(epoch)
        assert [len(b) for b in batches] == [128, 128, 44]  # the last, shorter batch kept, as train_re.py
        flat = [ds.ids[i] for b in batches for i in b]
        assert sorted(flat) == sorted(ds.ids)
        for sents in refs:  # each ref's sentences together, in refs.json order
            at = flat.index(sents[0])
            assert flat[at : at + len(sents)] == sents
        seen.append(flat)
    assert seen[0] != seen[1]  # reshuffled every epoch
    rows = [b["targets"].size(0) for b in loader]
    assert rows == [128, 128, 44] and loader.epoch == 1
    # evaluation: the dataset's (refs.json) order, batches of val_batch_size, nothing left out
    ev = task.eval_loader(DataContext())
    assert [i for b in ev.sampler for i in b] == list(range(len(ev.dataset))) and len(ev.dataset) == 10


@pytest.mark.parametrize("world", [2, 7])  # 300 sentences: 7 ranks pad the epoch with one
def test_re_ranks_share_the_epoch_as_the_authors_distributed_sampler(re_dbs, tmp_path, world):
    root, refs = re_dbs
    task = ReTask(_re_cfg(root, tmp_path))
    train = [task.train_loader(DataContext(seed=7, rank=r, world_size=world)) for r in range(world)]
    batches = [t.sampler.epoch_batches() for t in train]
    n = len(train[0].dataset)
    per = -(-n // world)  # the epoch padded to a multiple of the ranks, as their DistributedSampler pads
    want = [128] * (per // 128) + ([per % 128] if per % 128 else [])
    assert all([len(b) for b in bs] == want for bs in batches)
    flat = [i for bs in batches for b in bs for i in b]
    assert set(flat) == set(range(n)) and len(flat) == per * world
    # the ranks take turns along one shuffled order, which keeps each ref's sentences together
    order = [None] * (per * world)
    for r, bs in enumerate(batches):
        order[r::world] = [i for b in bs for i in b]
    ids = [train[0].dataset.ids[i] for i in order]
    for sents in refs:
        at = ids.index(sents[0])
        assert ids[at : at + len(sents)] == sents
    # evaluation: each sentence on one rank, none repeated
    ev = [task.eval_loader(DataContext(rank=r, world_size=world)) for r in range(world)]
    got = sorted(i for e in ev for b in e.sampler for i in b)
    assert got == list(range(len(ev[0].dataset)))


def test_re_trains_from_the_released_batch_size(re_dbs, tmp_path):
    root, _ = re_dbs
    cfg = _re_cfg(root, tmp_path, num_train_steps=4, valid_steps=4, log_steps=1)
    trainer = Trainer(cfg, quiet=True)
    sizes = []
    n_examples = trainer.task.n_examples
    trainer.task.n_examples = lambda b: sizes.append(n_examples(b)) or sizes[-1]
    history = trainer.train()
    assert sizes[:3] == [128, 128, 44] and sizes[3] == 128  # one epoch, then the next one's first batch
    losses = [e["loss"] for e in history if "loss" in e]
    assert len(losses) == 4 and all(np.isfinite(losses))
    [val] = [e for e in history if "val/n" in e]
    assert val["val/n"] == 10 and val["val/n_iou"] == 10  # 5 refs of 2 sentences; the loose one is no example


def test_re_refs_naming_a_sentence_twice_is_an_error(re_dbs, tmp_path):
    root, _ = re_dbs
    bad = tmp_path / "txt_bad"
    shutil.copytree(root / "txt_train", bad)
    refs = json.loads((bad / "refs.json").read_text())
    refs[1]["sent_ids"].append(refs[0]["sent_ids"][0])
    (bad / "refs.json").write_text(json.dumps(refs))
    task = ReTask(_re_cfg(root, tmp_path, train_txt_db=str(bad)))
    with pytest.raises(DataFormatError, match=r"txt_bad/refs.json: sentence 0 is under refs 5000 and 5001"):
        task.train_loader(DataContext())
    refs[1] = {"ref_id": 5001}
    (bad / "refs.json").write_text(json.dumps(refs))
    with pytest.raises(DataFormatError, match=r"refs.json: entry 1 needs a 'sent_ids' list"):
        task.train_loader(DataContext())


def test_re_resume_mid_epoch_is_bitwise_exact(re_dbs, tmp_path):
    root, _ = re_dbs
    common = dict(num_train_steps=5, valid_steps=100, save_steps=2, keep_checkpoints=0, log_steps=1, dropout=0.1)
    ref = Trainer(_re_cfg(root, tmp_path / "ref", **common), quiet=True)
    ref_hist = ref.train()
    state = torch.load(tmp_path / "ref" / "out" / "ckpt" / "step_2" / "train_state.pt", weights_only=True)
    assert state["data"] == {"epoch": 0, "batch_index": 2, "seed": 7}  # mid-epoch: 2 of 3 batches done
    # a run that stopped after step 2: its checkpoint, then resumed to the end (crossing an epoch)
    run_dir = tmp_path / "run" / "out"
    (run_dir / "ckpt").mkdir(parents=True)
    shutil.copytree(tmp_path / "ref" / "out" / "ckpt" / "step_2", run_dir / "ckpt" / "step_2")
    run = Trainer(_re_cfg(root, tmp_path / "run", **common), quiet=True, resume=True)
    run_hist = run.train()
    assert run.global_step == 5
    a = load_file(str(tmp_path / "ref" / "out" / "ckpt" / "model_final.safetensors"))
    b = load_file(str(run_dir / "ckpt" / "model_final.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [e.get("loss") for e in run_hist] == [e.get("loss") for e in ref_hist]
