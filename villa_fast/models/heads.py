"""Task models: UNITER plus a head, each with ``forward(batch, compute_loss=False)`` and ``loss(logits, batch)``.

Batches are dicts with the keys of the authors' UNITER data modules (``input_ids``,
``position_ids``, ``img_feat``, ``img_pos_feat``, ``attn_masks``, ``gather_index``, ``targets``,
and per task ``txt_type_ids``, ``img_type_ids``, ``txt_labels``, ``img_masks``, ``img_mask_tgt``,
``feat_targets``, ``label_targets``, ``ot_inputs``, ``obj_masks``, ``txt_lens``, ``sample_size``).
Head parameter names follow the official checkpoints so fine-tuned weights load unchanged.

``loss`` returns the mean-reduced task loss the authors' training scripts use; it is computed in
fp32 whatever the logits' dtype.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import UniterConfig, as_config
from .layers import activation, init_weights, make_layer_norm
from .ot import optimal_transport_dist
from .uniter import UniterModel

VCR_SPECIAL_TOKENS = 81  # person tags [PERSON_0] .. appended to the vocabulary
MRC_LABEL_DIM = 1601  # Visual Genome detector classes incl. background
OT_WEIGHT = 0.1


def _rows(t: Tensor | None, n: int) -> Tensor | None:
    """A text or image shared by every row (first dim 1, as retrieval batches send it) -> n rows (a view)."""
    if t is not None and t.size(0) == 1 and n > 1:
        return t.expand(n, *t.shape[1:])
    return t


def _run_uniter(uniter: UniterModel, batch: Mapping[str, Any], **extra: Any) -> Tensor:
    n = batch["attn_masks"].size(0)
    return uniter(
        _rows(batch.get("input_ids"), n),
        batch.get("position_ids"),
        _rows(batch.get("img_feat"), n),
        _rows(batch.get("img_pos_feat"), n),
        batch["attn_masks"],
        batch.get("gather_index"),
        txt_type_ids=extra.get("txt_type_ids", batch.get("txt_type_ids")),
        img_type_ids=extra.get("img_type_ids", batch.get("img_type_ids")),
        img_masks=extra.get("img_masks"),
    )


def _fp32(t: torch.Tensor) -> torch.Tensor:
    """Losses are computed in float32, or float64 when the model runs in float64."""
    return t if t.dtype == torch.float64 else t.float()


class _TaskModel(nn.Module):
    """Common plumbing: ``.uniter``, init, ``forward(batch, compute_loss)``."""

    #: {embedding name: {new_row: source_row}}: how rows a task adds are filled from the checkpoint's rows
    expand_rules: dict[str, dict[int, int]] = {}

    def __init__(self, config: UniterConfig | dict | str):
        super().__init__()
        self.uniter = UniterModel(as_config(config))

    @property
    def config(self) -> UniterConfig:
        return self.uniter.config

    def _init_head(self) -> None:
        std = self.config.initializer_range
        for name, child in self.named_children():
            if name != "uniter":
                child.apply(lambda m: init_weights(m, std))

    def logits(self, batch: Mapping[str, Any]) -> Tensor:
        raise NotImplementedError

    def loss(self, logits: Any, batch: Mapping[str, Any]) -> Tensor:
        raise NotImplementedError

    def forward(self, batch: Mapping[str, Any], compute_loss: bool = False) -> Any:
        out = self.logits(batch)
        return self.loss(out, batch) if compute_loss else out


def _mlp_head(h: int, out: int, act: nn.Module, config: UniterConfig) -> nn.Sequential:
    """Linear(H, 2H) - act - LN - Linear(2H, out): keys .0, .2, .3 as in the official heads."""
    return nn.Sequential(
        nn.Linear(h, 2 * h),
        act,
        make_layer_norm(2 * h, 1e-12, config.layer_norm_impl),
        nn.Linear(2 * h, out),
    )


# -- VQA / VE ------------------------------------------------------------------------------------
class UniterForVqa(_TaskModel):
    """VQA (3129 answers) and SNLI-VE (``num_answer=3``): soft-target BCE on the pooled output.

    forward -> logits [B, num_answer]; loss = BCE-with-logits(mean) * num_answer vs ``targets`` [B, A].
    """

    def __init__(self, config: UniterConfig | dict | str, num_answer: int = 3129):
        super().__init__(config)
        self.num_answer = num_answer
        self.vqa_output = _mlp_head(self.config.hidden_size, num_answer, nn.GELU(), self.config)
        self._init_head()

    def logits(self, batch: Mapping[str, Any]) -> Tensor:
        return self.vqa_output(self.uniter.pooler(_run_uniter(self.uniter, batch)))

    def loss(self, logits: Tensor, batch: Mapping[str, Any]) -> Tensor:
        logits = _fp32(logits)
        targets = batch["targets"].to(logits.dtype)
        return F.binary_cross_entropy_with_logits(logits, targets) * targets.size(1)


# -- NLVR2 ---------------------------------------------------------------------------------------
class _Nlvr2Base(_TaskModel):
    """NLVR2 models: image type ids 1 (left image) and 2 (right image).

    The type embedding gets a third row, a copy of row 1 (the image type), as the authors'
    ``init_type_embedding`` does for every NLVR2 model.
    """

    expand_rules = {"token_type_embeddings": {2: 1}}

    def __init__(self, config: UniterConfig | dict | str):
        super().__init__(config)
        if self.config.type_vocab_size < 3:
            self.uniter.resize_embedding("token_type_embeddings", 3, {2: 1})

    def loss(self, logits: Tensor, batch: Mapping[str, Any]) -> Tensor:
        return F.cross_entropy(_fp32(logits), batch["targets"].reshape(-1).long())


class UniterForNlvr2Paired(_Nlvr2Base):
    """NLVR2 "paired": two rows per example (the sentence with the left, then the right image); the two
    pooled outputs concatenated -> Linear(2H, 2). logits [n_pairs, 2]."""

    def __init__(self, config: UniterConfig | dict | str):
        super().__init__(config)
        self.nlvr2_output = nn.Linear(2 * self.config.hidden_size, 2)
        self._init_head()

    def logits(self, batch: Mapping[str, Any]) -> Tensor:
        pooled = self.uniter.pooler(_run_uniter(self.uniter, batch))
        return self.nlvr2_output(pooled.reshape(pooled.size(0) // 2, -1))


class UniterForNlvr2Triplet(_Nlvr2Base):
    """NLVR2 "triplet": one row per example holding the sentence and both images' regions (image type
    ids 1 and 2 tell the images apart); the pooled output -> Linear(H, 2).

    logits [B, 2]; loss cross-entropy (mean) vs ``targets`` [B].
    """

    def __init__(self, config: UniterConfig | dict | str):
        super().__init__(config)
        self.nlvr2_output = nn.Linear(self.config.hidden_size, 2)
        self._init_head()

    def logits(self, batch: Mapping[str, Any]) -> Tensor:
        return self.nlvr2_output(self.uniter.pooler(_run_uniter(self.uniter, batch)))


class AttentionPool(nn.Module):
    """softmax(ReLU(Linear(h)) - 1e4 * pad) weighted sum over positions."""

    def __init__(self, hidden_size: int, drop: float = 0.0):
        super().__init__()
        self.fc = nn.Sequential(nn.Linear(hidden_size, 1), nn.ReLU())
        self.dropout = nn.Dropout(drop)

    def forward(self, x: Tensor, pad: Tensor | None = None) -> Tensor:
        """x [B, T, D]; pad [B, T] bool (True = padding) -> [B, D]."""
        score = self.fc(x).squeeze(-1)
        if pad is not None:
            score = score + pad.to(score.dtype) * -1e4
        weights = self.dropout(score.softmax(dim=-1))
        return torch.bmm(weights.unsqueeze(1), x).squeeze(1)


class UniterForNlvr2PairedAttn(_Nlvr2Base):
    """NLVR2 "paired-attn": cross-attention between the two rows' sequences, attention pooling,
    Linear(2H, 2). logits [n_pairs, 2]; loss cross-entropy (mean) vs ``targets`` [n_pairs]."""

    def __init__(self, config: UniterConfig | dict | str):
        super().__init__(config)
        c = self.config
        h = c.hidden_size
        self.attn1 = nn.MultiheadAttention(h, c.num_attention_heads, dropout=c.attention_probs_dropout_prob)
        self.attn2 = nn.MultiheadAttention(h, c.num_attention_heads, dropout=c.attention_probs_dropout_prob)
        self.fc = nn.Sequential(nn.Linear(2 * h, h), nn.ReLU(), nn.Dropout(c.hidden_dropout_prob))
        self.attn_pool = AttentionPool(h, c.attention_probs_dropout_prob)
        self.nlvr2_output = nn.Linear(2 * h, 2)
        # the official init touches Linear/LayerNorm modules only; MHA keeps its own in_proj init
        self._init_head()

    def logits(self, batch: Mapping[str, Any]) -> Tensor:
        seq = _run_uniter(self.uniter, batch)
        bs, tl, d = seq.shape
        left, right = seq.reshape(bs // 2, 2 * tl, d).chunk(2, dim=1)
        pad = batch["attn_masks"] == 0
        left_pad, right_pad = pad.reshape(bs // 2, 2 * tl).chunk(2, dim=1)
        left_t, right_t = left.transpose(0, 1), right.transpose(0, 1)  # [T, B, D] for nn.MultiheadAttention
        l2r, _ = self.attn1(left_t, right_t, right_t, key_padding_mask=right_pad, need_weights=False)
        r2l, _ = self.attn2(right_t, left_t, left_t, key_padding_mask=left_pad, need_weights=False)
        left = self.fc(torch.cat([l2r, left_t], dim=-1)).transpose(0, 1)
        right = self.fc(torch.cat([r2l, right_t], dim=-1)).transpose(0, 1)
        pooled = torch.cat([self.attn_pool(left, left_pad), self.attn_pool(right, right_pad)], dim=-1)
        return self.nlvr2_output(pooled)


# -- VCR -----------------------------------------------------------------------------------------
class UniterForVcr(_TaskModel):
    """VCR: four rows per question (one per candidate), text type ids 0 question / 2 answer /
    3 rationale, 81 person-tag tokens appended to the vocabulary.

    logits [4B, 2] (column 1 = "this candidate is right"); loss cross-entropy (mean) vs ``targets``
    [4B] or [4B, 1].
    """

    expand_rules = {"token_type_embeddings": {2: 0, 3: 0}}

    def __init__(self, config: UniterConfig | dict | str, num_special_tokens: int = VCR_SPECIAL_TOKENS):
        super().__init__(config)
        #: the encoder config as given, before the VCR rows are added: what rebuilding this model takes (the
        #: trainer writes it as log/model.json, as the authors' scripts write the base config there)
        self.source_config = self.uniter.config
        if self.config.type_vocab_size < 4:
            self.uniter.resize_embedding("token_type_embeddings", 4, {2: 0, 3: 0})
        if num_special_tokens:
            self.uniter.resize_embedding("word_embeddings", self.config.vocab_size + num_special_tokens)
        self.vcr_output = _mlp_head(self.config.hidden_size, 2, nn.ReLU(), self.config)
        self._init_head()

    def logits(self, batch: Mapping[str, Any]) -> Tensor:
        return self.vcr_output(self.uniter.pooler(_run_uniter(self.uniter, batch)))

    def loss(self, logits: Tensor, batch: Mapping[str, Any]) -> Tensor:
        return F.cross_entropy(_fp32(logits), batch["targets"].reshape(-1).long())


# -- image-text retrieval ------------------------------------------------------------------------
class UniterForImageTextRetrieval(_TaskModel):
    """Image-text retrieval / ITM fine-tuning: a rank score per (text, image) row.

    Rows come in groups of ``sample_size``: the positive pair first, then its negatives.
    forward -> rank scores [B, 1]; loss = mean over groups and negatives of
    max(0, margin + sigmoid(neg) - sigmoid(pos)).

    With ``hard_size`` (31 for the released hard-negative recipe), ``hard_negative_batch`` scores a
    group of sampled negatives without gradient in eval mode and keeps the top ``hard_size``.
    """

    def __init__(self, config: UniterConfig | dict | str, margin: float = 0.2, hard_size: int | None = None):
        super().__init__(config)
        h = self.config.hidden_size
        self.itm_output = nn.Linear(h, 2)
        self.rank_output = nn.Linear(h, 1)
        self.margin = margin
        self.hard_size = hard_size
        self._init_head()

    @torch.no_grad()
    def init_rank_from_itm(self) -> None:
        """rank_output := the "match" row of itm_output (after loading a pre-trained checkpoint)."""
        self.rank_output.weight.copy_(self.itm_output.weight[1:])
        self.rank_output.bias.copy_(self.itm_output.bias[1:])

    def logits(self, batch: Mapping[str, Any]) -> Tensor:
        return self.rank_output(self.uniter.pooler(_run_uniter(self.uniter, batch)))

    def loss(self, logits: Tensor, batch: Mapping[str, Any]) -> Tensor:
        size = int(batch.get("sample_size") or logits.size(0))
        scores = torch.sigmoid(_fp32(logits)).reshape(-1, size)
        return torch.clamp(self.margin + scores[:, 1:] - scores[:, :1], min=0.0).mean()

    @torch.no_grad()
    def hard_negative_batch(self, batch: Mapping[str, Any], hard_size: int | None = None) -> dict[str, Any]:
        """Keep, in each group of ``sample_size`` rows (row 0 positive, then negatives; the whole
        batch is one group when ``sample_size`` is absent), the positive and its ``hard_size``
        highest-scoring negatives, scored in eval mode without gradient. Tensors whose first dim is
        1 (a text or image shared by every row) are kept as they are (forward broadcasts them)."""
        k = hard_size or self.hard_size
        if not k:
            raise ValueError("hard_negative_batch needs hard_size (constructor or argument)")
        rows = batch["attn_masks"].size(0)
        size = int(batch.get("sample_size") or rows)
        if rows % size:
            raise ValueError(f"{rows} rows are not whole groups of sample_size={size}")
        if size - 1 <= k:
            return dict(batch, sample_size=size)
        was_training = self.training
        self.eval()
        try:
            scores = self.logits(batch).reshape(rows // size, size)
        finally:
            self.train(was_training)
        top = scores[:, 1:].topk(k, dim=1, sorted=False).indices + 1  # [G, k]
        first = torch.arange(0, rows, size, device=top.device).unsqueeze(1)
        keep = (first + torch.cat([torch.zeros_like(top[:, :1]), top], dim=1)).reshape(-1)
        out: dict[str, Any] = {}
        for key, v in batch.items():
            if isinstance(v, Tensor) and v.dim() > 0 and v.size(0) == rows and key != "position_ids":
                out[key] = v.index_select(0, keep.to(v.device))
            elif isinstance(v, (list, tuple)) and len(v) == rows:
                # per-row lists (txt_lens, num_bbs) follow the rows they describe
                out[key] = [v[i] for i in keep.tolist()]
            else:
                out[key] = v
        out["sample_size"] = k + 1
        return out


# -- referring expressions -----------------------------------------------------------------------
class UniterForReferringExpression(_TaskModel):
    """Referring expression comprehension: a score per region of the image part.

    forward -> scores [B, max_bb], -1e4 at padded regions (``obj_masks`` [B, max_bb], True or 1 = padding;
    bool or any integer dtype, as ``re_collate`` emits uint8);
    loss cross-entropy vs ``targets`` [B] (index of the referred region), summed over the batch as the
    authors' ``train_re.py`` sums it (their per-example losses, ``loss.sum()``).
    Needs ``txt_lens`` (list or [B] tensor) to find each row's regions; derived from
    ``gather_index`` when absent.
    """

    def __init__(self, config: UniterConfig | dict | str, mlp: int = 1):
        super().__init__(config)
        h = self.config.hidden_size
        if mlp == 1:
            self.re_output = nn.Linear(h, 1)
        elif mlp == 2:
            self.re_output = nn.Sequential(
                nn.Linear(h, h), nn.GELU(), make_layer_norm(h, 1e-12, self.config.layer_norm_impl), nn.Linear(h, 1)
            )
        else:
            raise ValueError(f"mlp must be 1 or 2, got {mlp}")
        self._init_head()

    @staticmethod
    def _txt_lens(batch: Mapping[str, Any], device: torch.device) -> Tensor:
        lens = batch.get("txt_lens")
        if lens is not None:
            return torch.as_tensor(lens, device=device, dtype=torch.long)
        gi = batch.get("gather_index")
        lt = batch["input_ids"].size(1)
        if gi is None:
            return torch.full((batch["attn_masks"].size(0),), lt, device=device, dtype=torch.long)
        # the first packed position that reads from the image block
        return (gi >= lt).long().argmax(dim=1)

    @staticmethod
    def _obj_masks(batch: Mapping[str, Any]) -> Tensor:
        """``obj_masks`` as a bool tensor (True = padding), whatever dtype the batch holds."""
        m = batch["obj_masks"]
        return m if m.dtype == torch.bool else m != 0

    def image_hidden(self, seq: Tensor, batch: Mapping[str, Any]) -> Tensor:
        """seq [B, L, H] -> [B, max_bb, H]: each row's region outputs, zero at padding."""
        obj_masks = self._obj_masks(batch).to(seq.device)
        nbb = obj_masks.size(1)
        start = self._txt_lens(batch, seq.device)
        idx = (start.unsqueeze(1) + torch.arange(nbb, device=seq.device)).clamp(max=seq.size(1) - 1)
        hid = torch.gather(seq, 1, idx.unsqueeze(-1).expand(-1, -1, seq.size(-1)))
        return hid.masked_fill(obj_masks.unsqueeze(-1), 0.0)

    def logits(self, batch: Mapping[str, Any]) -> Tensor:
        hid = self.image_hidden(_run_uniter(self.uniter, batch), batch)
        return self.re_output(hid).squeeze(-1).masked_fill(self._obj_masks(batch).to(hid.device), -1e4)

    def loss(self, logits: Tensor, batch: Mapping[str, Any]) -> Tensor:
        return F.cross_entropy(_fp32(logits), batch["targets"].reshape(-1).long(), reduction="sum")


# -- pre-training --------------------------------------------------------------------------------
class MlmHead(nn.Module):
    """BERT's MLM head (``cls.predictions``): transform, then the word embeddings (tied) plus a bias."""

    def __init__(self, config: UniterConfig, word_embeddings: nn.Embedding):
        super().__init__()
        self.transform = nn.Module()
        self.transform.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.transform.LayerNorm = make_layer_norm(config.hidden_size, config.layer_norm_eps, config.layer_norm_impl)
        self.act = activation(config.hidden_act)
        self.bias = nn.Parameter(torch.zeros(word_embeddings.num_embeddings))
        # a plain attribute, not a submodule: the weight stays owned (and saved) by the encoder
        self.__dict__["_words"] = word_embeddings

    def forward(self, h: Tensor) -> Tensor:
        h = self.transform.LayerNorm(self.act(self.transform.dense(h)))
        return F.linear(h, self._words.weight) + self.bias


class MlmPredictions(nn.Module):
    def __init__(self, config: UniterConfig, word_embeddings: nn.Embedding):
        super().__init__()
        self.predictions = MlmHead(config, word_embeddings)

    def forward(self, h: Tensor) -> Tensor:
        return self.predictions(h)


class RegionFeatureRegression(nn.Module):
    """MRFR: Linear-GELU-LN, then the image linear layer transposed (tied) plus a bias -> img_dim."""

    def __init__(self, config: UniterConfig, img_linear: nn.Linear):
        super().__init__()
        h = config.hidden_size
        self.net = nn.Sequential(nn.Linear(h, h), nn.GELU(), make_layer_norm(h, 1e-12, config.layer_norm_impl))
        self.bias = nn.Parameter(torch.zeros(config.img_dim))
        self.__dict__["_img_linear"] = img_linear

    def forward(self, h: Tensor) -> Tensor:
        return F.linear(self.net(h), self._img_linear.weight.t(), self.bias)


class RegionClassification(nn.Module):
    """MRC / MRC-kl: Linear-GELU-LN-Linear -> detector classes."""

    def __init__(self, config: UniterConfig, label_dim: int):
        super().__init__()
        h = config.hidden_size
        self.net = nn.Sequential(
            nn.Linear(h, h), nn.GELU(), make_layer_norm(h, 1e-12, config.layer_norm_impl), nn.Linear(h, label_dim)
        )

    def forward(self, h: Tensor) -> Tensor:
        return self.net(h)


_PRETRAIN_TASKS = ("mlm", "mrfr", "mrc", "mrckl", "itm")


def _masked_rows(hidden: Tensor, mask: Tensor) -> Tensor:
    """hidden [B, L, H], mask [B, L] bool -> [n_true, H] (row-major order)."""
    return hidden[mask.bool()]


class UniterForPretraining(_TaskModel):
    """UNITER pre-training heads: MLM, MRFR, MRC, MRC-kl and ITM (with the OT alignment term).

    The task is ``batch["task"]`` (or the ``task`` argument): one of ``mlm``, ``mrfr``, ``mrc``,
    ``mrckl`` (``mrc-kl`` accepted), ``itm``. forward returns a dict with ``task`` and ``logits``:
      mlm   [n_masked_tokens, vocab]   (rows where ``txt_labels`` != -1); with ``mlm_index`` in the batch
            (padded for a fixed shape, :func:`villa_fast.data.mlm_rows`) [len(mlm_index), vocab], the rows it
            names, whose targets are ``mlm_labels`` (-1 on the padding rows)
      mrfr  [n_masked_regions, img_dim] (rows where ``img_mask_tgt``)
      mrc*  [n_masked_regions, 1601]
      itm   [B, 2], plus ``ot_dist`` [B] when ``ot_inputs`` is in the batch.
    loss: mlm CE mean (over the real rows); mrfr MSE mean; mrc CE (argmax of the soft label over classes 1..,
    background never a target) mean; mrckl KL(soft label || prediction) mean over all elements;
    itm CE mean + 0.1 * (sum OT over positives - sum over negatives) / B.

    ``vcr=True``: the second-stage pre-training on VCR (UNITER's ``UniterForPretrainingForVCR``): 4 text
    types (2 and 3, answer and rationale, start as copies of type 0) and the 81 person-tag tokens appended
    to the vocabulary, the MLM head predicting them too. Loading a checkpoint without those tokens (a
    first-stage one) leaves the MLM head as initialised (``LoadReport.reinitialised``), as the authors'
    ``init_word_embedding`` replaces it with a new head; a checkpoint with them loads it.
    """

    def __init__(
        self,
        config: UniterConfig | dict | str,
        img_label_dim: int = MRC_LABEL_DIM,
        ot_weight: float = OT_WEIGHT,
        vcr: bool = False,
    ):
        super().__init__(config)
        self.vcr = vcr
        if vcr:
            self.source_config = self.uniter.config  # what rebuilding this model takes (log/model.json)
            self.expand_rules = {"token_type_embeddings": {2: 0, 3: 0}}
            self.fresh_on_word_growth = ("cls.",)
            if self.config.type_vocab_size < 4:
                self.uniter.resize_embedding("token_type_embeddings", 4, {2: 0, 3: 0})
            self.uniter.resize_embedding("word_embeddings", self.config.vocab_size + VCR_SPECIAL_TOKENS)
        c = self.config
        self.cls = MlmPredictions(c, self.uniter.embeddings.word_embeddings)
        self.feat_regress = RegionFeatureRegression(c, self.uniter.img_embeddings.img_linear)
        self.region_classifier = RegionClassification(c, img_label_dim)
        self.itm_output = nn.Linear(c.hidden_size, 2)
        self.ot_weight = ot_weight
        self._init_head()
        if vcr:  # the authors' new MLM head is not BERT-initialised: its dense layer keeps nn.Linear's own init
            self.cls.predictions.transform.dense.reset_parameters()

    @staticmethod
    def _task(batch: Mapping[str, Any], task: str | None) -> str:
        task = task or batch.get("task")
        if task is None:
            raise ValueError("UniterForPretraining needs batch['task'] or task=... (mlm, mrfr, mrc, mrckl, itm)")
        task = task.replace("-", "").replace("_", "")
        if task not in _PRETRAIN_TASKS:
            raise ValueError(f"unknown pre-training task {task!r}; expected one of {_PRETRAIN_TASKS}")
        return task

    def logits(self, batch: Mapping[str, Any], task: str | None = None) -> dict[str, Any]:
        task = self._task(batch, task)
        if task == "mlm":
            seq = _run_uniter(self.uniter, batch)
            lt = batch["input_ids"].size(1)
            index = batch.get("mlm_index")
            if index is not None:  # fixed row count: flat positions into [B, L_txt]
                # index_select (backward: index_add) keeps the rows' gather free of host syncs in a CUDA graph
                rows = (index // lt) * seq.size(1) + index % lt
                return {"task": task, "logits": self.cls(seq.reshape(-1, seq.size(-1)).index_select(0, rows))}
            txt = seq[:, :lt]
            return {"task": task, "logits": self.cls(_masked_rows(txt, batch["txt_labels"] != -1))}
        if task in ("mrfr", "mrc", "mrckl"):
            seq = _run_uniter(self.uniter, batch, img_masks=batch["img_masks"])
            hid = _masked_rows(seq, batch["img_mask_tgt"])
            head = self.feat_regress if task == "mrfr" else self.region_classifier
            return {"task": task, "logits": head(hid)}
        seq = _run_uniter(self.uniter, batch)
        out: dict[str, Any] = {"task": task, "logits": self.itm_output(self.uniter.pooler(seq)), "ot_dist": None}
        ot_inputs = batch.get("ot_inputs")
        if ot_inputs is not None:
            out["ot_dist"] = self._ot_dist(seq, batch, ot_inputs)
        return out

    def _ot_dist(self, seq: Tensor, batch: Mapping[str, Any], ot_inputs: Mapping[str, Tensor]) -> Tensor:
        b, seq_len, h = seq.shape
        tl = batch["input_ids"].size(1)
        il = batch["img_feat"].size(1)
        # scatter the packed rows back to [text block (tl) | image block]; indices never exceed
        # tl + seq_len - 1, so that size needs no host read of the maximum
        ctx = seq.new_zeros(b, max(tl + seq_len, tl + il), h)
        idx = ot_inputs["ot_scatter"].unsqueeze(-1).expand(-1, -1, h)
        ctx = ctx.scatter(1, idx, seq)
        with torch.autocast(seq.device.type, enabled=False):
            dist = optimal_transport_dist(
                ctx[:, :tl].float(),
                ctx[:, tl : tl + il].float(),
                ot_inputs["txt_pad"].bool(),
                ot_inputs["img_pad"].bool(),
            )
        return dist

    def forward(self, batch: Mapping[str, Any], compute_loss: bool = False, task: str | None = None) -> Any:
        out = self.logits(batch, task)
        return self.loss(out, batch) if compute_loss else out

    def loss(self, logits: Mapping[str, Any], batch: Mapping[str, Any]) -> Tensor:
        task = logits["task"]
        z = logits["logits"].float()
        if task == "mlm":
            if "mlm_labels" in batch:
                return F.cross_entropy(z, batch["mlm_labels"], ignore_index=-1)
            labels = batch["txt_labels"]
            return F.cross_entropy(z, labels[labels != -1])
        if task == "mrfr":
            return F.mse_loss(z, batch["feat_targets"].float())  # the db's dtype (float16): widened here
        if task == "mrc":
            target = batch["label_targets"][:, 1:].argmax(dim=-1) + 1
            return F.cross_entropy(z, target, ignore_index=0)
        if task == "mrckl":
            return F.kl_div(F.log_softmax(z, dim=-1), batch["label_targets"].float(), reduction="none").mean()
        targets = batch["targets"].reshape(-1).long()
        loss = F.cross_entropy(z, targets)
        ot = logits.get("ot_dist")
        if ot is not None and self.ot_weight:
            sign = torch.where(targets == 1, 1.0, torch.where(targets == 0, -1.0, 0.0))
            loss = loss + self.ot_weight * (ot.float() * sign).sum() / targets.numel()
        return loss


# -- factory -------------------------------------------------------------------------------------
_TASKS = {
    "vqa": (UniterForVqa, {"num_answer": 3129}),
    "ve": (UniterForVqa, {"num_answer": 3}),
    "nlvr2": (UniterForNlvr2PairedAttn, {}),
    "nlvr2_paired": (UniterForNlvr2Paired, {}),
    "nlvr2_triplet": (UniterForNlvr2Triplet, {}),
    "vcr": (UniterForVcr, {}),
    "itm": (UniterForImageTextRetrieval, {"margin": 0.2}),
    "retrieval": (UniterForImageTextRetrieval, {"margin": 0.2, "hard_size": 31}),
    "re": (UniterForReferringExpression, {}),
    "pretrain": (UniterForPretraining, {}),
    "pretrain_vcr": (UniterForPretraining, {"vcr": True}),
}


def build_model(task: str, config: UniterConfig | dict | str = "base", **kw: Any) -> nn.Module:
    """The task model for ``task`` in {vqa, ve, nlvr2, nlvr2_paired, nlvr2_triplet, vcr, itm, retrieval, re,
    pretrain, pretrain_vcr}.

    ``config``: a UniterConfig, a dict with the official keys, a JSON path, or "base" / "large".
    ``kw`` overrides the task's defaults (e.g. ``num_answer``, ``margin``, ``hard_size``).
    """
    try:
        cls, defaults = _TASKS[task]
    except KeyError:
        raise ValueError(f"unknown task {task!r}; expected one of {sorted(_TASKS)}") from None
    return cls(as_config(config), **{**defaults, **kw})
