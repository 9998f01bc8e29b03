"""UNITER encoder: configuration, packing, masks, attention paths, perturbation hook points."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from villa_fast.models import UniterConfig, UniterModel
from villa_fast.models import layers as layers_mod

pytestmark = pytest.mark.usefixtures("one_thread")


# -- shared helpers (also imported by the other test_models_* files) --------------------------------


def tiny_config(**kw) -> UniterConfig:
    values = dict(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        vocab_size=100,
        img_dim=16,
        max_position_embeddings=64,
    )
    values.update(kw)
    return UniterConfig(**values)


def make_batch(
    cfg: UniterConfig,
    txt_lens: list[int],
    nbbs: list[int],
    *,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> dict:
    """A batch laid out like the authors' collate functions: text padded to max_tl, regions to
    max_nbb, each packed row [txt_i, regions_i, padding] described by gather_index/attn_masks."""
    g = torch.Generator().manual_seed(seed)
    b = len(txt_lens)
    max_tl, max_nbb = max(txt_lens), max(nbbs)
    total = max(t + n for t, n in zip(txt_lens, nbbs, strict=True))
    input_ids = torch.zeros(b, max_tl, dtype=torch.long)
    img_feat = torch.zeros(b, max_nbb, cfg.img_dim, dtype=dtype)
    img_pos_feat = torch.zeros(b, max_nbb, cfg.pos_dim, dtype=dtype)
    attn_masks = torch.zeros(b, total, dtype=torch.long)
    gather_index = torch.arange(total).unsqueeze(0).repeat(b, 1)
    for i, (tl, nbb) in enumerate(zip(txt_lens, nbbs, strict=True)):
        input_ids[i, :tl] = torch.randint(3, cfg.vocab_size, (tl,), generator=g)
        input_ids[i, 0] = 1
        img_feat[i, :nbb] = torch.rand(nbb, cfg.img_dim, generator=g, dtype=dtype) * 2
        img_pos_feat[i, :nbb] = torch.rand(nbb, cfg.pos_dim, generator=g, dtype=dtype)
        attn_masks[i, : tl + nbb] = 1
        gather_index[i, tl : tl + nbb] = torch.arange(max_tl, max_tl + nbb)
    return {
        "input_ids": input_ids,
        "position_ids": torch.arange(max_tl).unsqueeze(0),
        "img_feat": img_feat,
        "img_pos_feat": img_pos_feat,
        "attn_masks": attn_masks,
        "gather_index": gather_index,
        "txt_lens": list(txt_lens),
        "num_bbs": list(nbbs),
    }


def run_encoder(model: UniterModel, batch: dict, **kw) -> torch.Tensor:
    return model(
        batch["input_ids"],
        batch["position_ids"],
        batch["img_feat"],
        batch["img_pos_feat"],
        batch["attn_masks"],
        batch["gather_index"],
        **kw,
    )


def row_of(batch: dict, i: int) -> dict:
    """Example i alone, without padding."""
    tl, nbb = batch["txt_lens"][i], batch["num_bbs"][i]
    return make_batch_from(batch, i, tl, nbb)


def make_batch_from(batch: dict, i: int, tl: int, nbb: int) -> dict:
    return {
        "input_ids": batch["input_ids"][i : i + 1, :tl],
        "position_ids": batch["position_ids"][:, :tl],
        "img_feat": batch["img_feat"][i : i + 1, :nbb],
        "img_pos_feat": batch["img_pos_feat"][i : i + 1, :nbb],
        "attn_masks": torch.ones(1, tl + nbb, dtype=torch.long),
        "gather_index": torch.arange(tl + nbb).unsqueeze(0),
        "txt_lens": [tl],
        "num_bbs": [nbb],
    }


# -- configuration ------------------------------------------------------------------------------

OFFICIAL_BASE = {
    "attention_probs_dropout_prob": 0.1,
    "hidden_act": "gelu",
    "hidden_dropout_prob": 0.1,
    "hidden_size": 768,
    "initializer_range": 0.02,
    "intermediate_size": 3072,
    "max_position_embeddings": 512,
    "num_attention_heads": 12,
    "num_hidden_layers": 12,
    "type_vocab_size": 2,
    "vocab_size": 28996,
}


def test_config_reads_official_json(tmp_path):
    p = tmp_path / "uniter-base.json"
    p.write_text(json.dumps(OFFICIAL_BASE))
    cfg = UniterConfig.from_json_file(p)
    assert cfg == UniterConfig.base()
    assert (cfg.img_dim, cfg.pos_dim, cfg.layer_norm_eps) == (2048, 7, 1e-12)
    large = UniterConfig.large()
    assert (large.hidden_size, large.num_hidden_layers, large.num_attention_heads, large.intermediate_size) == (
        1024,
        24,
        16,
        4096,
    )


def test_config_unknown_key_is_named():
    with pytest.raises(ValueError, match="hiden_size"):
        UniterConfig.from_dict({**OFFICIAL_BASE, "hiden_size": 768})
    # harmless keys of Hugging Face BERT configs are accepted
    cfg = UniterConfig.from_dict({**OFFICIAL_BASE, "architectures": ["BertModel"], "model_type": "bert"})
    assert cfg.hidden_size == 768
    with pytest.raises(ValueError, match="position_embedding_type"):
        UniterConfig.from_dict({**OFFICIAL_BASE, "position_embedding_type": "relative_key"})
    with pytest.raises(ValueError, match="not a multiple"):
        UniterConfig(hidden_size=30, num_attention_heads=4)


# -- packing, masks --------------------------------------------------------------------------------


def test_gather_packs_each_row_text_then_regions():
    torch.manual_seed(0)
    cfg = tiny_config()
    model = UniterModel(cfg).eval()
    batch = make_batch(cfg, [5, 3, 7], [4, 6, 2])
    with torch.no_grad():
        x = model.joint_embeddings(
            batch["input_ids"], batch["position_ids"], batch["img_feat"], batch["img_pos_feat"], batch["gather_index"]
        )
        txt = model.txt_embeddings(batch["input_ids"], batch["position_ids"])
        img = model.img_embeddings_of(batch["img_feat"], batch["img_pos_feat"])
    for i, (tl, nbb) in enumerate(zip(batch["txt_lens"], batch["num_bbs"], strict=True)):
        torch.testing.assert_close(x[i, :tl], txt[i, :tl], rtol=0, atol=0)
        torch.testing.assert_close(x[i, tl : tl + nbb], img[i, :nbb], rtol=0, atol=0)


def test_each_row_output_sees_its_own_regions():
    """The CLS output of every row depends on each of its regions (features and boxes) and on no
    other row's; padded regions get no gradient and img_linear / pos_linear get a gradient."""
    torch.manual_seed(0)
    cfg = tiny_config()
    model = UniterModel(cfg).eval()
    batch = make_batch(cfg, [5, 3, 7], [4, 6, 2])
    feat = batch["img_feat"].clone().requires_grad_(True)
    pos = batch["img_pos_feat"].clone().requires_grad_(True)
    for i, (tl, nbb) in enumerate(zip(batch["txt_lens"], batch["num_bbs"], strict=True)):
        model.zero_grad()
        out = model(batch["input_ids"], batch["position_ids"], feat, pos, batch["attn_masks"], batch["gather_index"])
        assert batch["attn_masks"][i, tl : tl + nbb].eq(1).all()
        g_feat, g_pos = torch.autograd.grad(out[i, 0].square().sum(), [feat, pos])
        for g in (g_feat, g_pos):
            assert (g[i, :nbb].abs().sum(-1) > 0).all(), "a region of the row does not reach its CLS output"
            assert g[i, nbb:].abs().sum() == 0, "a padded region reaches the CLS output"
            assert g[torch.arange(3) != i].abs().sum() == 0, "another row's regions reach this row"
    out = model(batch["input_ids"], batch["position_ids"], feat, pos, batch["attn_masks"], batch["gather_index"])
    out[:, 0].square().sum().backward()
    emb = model.img_embeddings
    assert emb.img_linear.weight.grad.abs().sum() > 0 and emb.pos_linear.weight.grad.abs().sum() > 0
    # another image changes the output of the row, not the text positions' embeddings
    with torch.no_grad():
        other = dict(batch, img_feat=batch["img_feat"].flip(-1))
        a, b = run_encoder(model, batch), run_encoder(model, other)
    assert not torch.allclose(a[:, 0], b[:, 0], rtol=0, atol=1e-6)


@pytest.mark.parametrize("attn_impl", ["sdpa", "plain"])
def test_padding_does_not_change_a_row(attn_impl):
    torch.manual_seed(0)
    cfg = tiny_config(attn_impl=attn_impl)
    model = UniterModel(cfg).double().eval()
    batch = make_batch(cfg, [5, 3, 7], [4, 6, 1], dtype=torch.float64)
    with torch.no_grad():
        out = run_encoder(model, batch)
        for i in range(3):
            n = batch["txt_lens"][i] + batch["num_bbs"][i]
            alone = run_encoder(model, row_of(batch, i))
            torch.testing.assert_close(out[i, :n], alone[0], rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize(
    ("dtype", "atol", "rtol"),
    [(torch.float64, 1e-10, 1e-10), (torch.float32, 2e-5, 1e-5)],
)
@pytest.mark.parametrize(("hidden", "heads"), [(32, 4), (36, 3)])
def test_sdpa_matches_plain(dtype, atol, rtol, hidden, heads):
    torch.manual_seed(1)
    cfg_s = tiny_config(hidden_size=hidden, num_attention_heads=heads, attn_impl="sdpa")
    cfg_p = cfg_s.replace(attn_impl="plain")
    sdpa = UniterModel(cfg_s).to(dtype).eval()
    plain = UniterModel(cfg_p).to(dtype).eval()
    plain.load_state_dict(sdpa.state_dict())
    batch = make_batch(cfg_s, [7, 2, 5], [3, 11, 1], dtype=dtype, seed=3)
    # a non-contiguous feature tensor
    batch["img_feat"] = batch["img_feat"].transpose(1, 2).contiguous().transpose(1, 2)
    assert not batch["img_feat"].is_contiguous()
    out_s = run_encoder(sdpa, batch)
    out_p = run_encoder(plain, batch)
    torch.testing.assert_close(out_s, out_p, atol=atol, rtol=rtol)
    proj = torch.randn_like(out_s)  # a loss that LayerNorm does not make constant
    (out_s * proj).sum().backward()
    (out_p * proj).sum().backward()
    for (name, a), (_, b) in zip(sdpa.named_parameters(), plain.named_parameters(), strict=True):
        if a.grad is None:
            assert b.grad is None, name
            continue
        torch.testing.assert_close(a.grad, b.grad, atol=atol * 10, rtol=rtol * 10, msg=name)


def test_fully_padded_row_stays_finite():
    torch.manual_seed(0)
    cfg = tiny_config()
    model = UniterModel(cfg).eval()
    batch = make_batch(cfg, [4, 3], [2, 2])
    batch["attn_masks"][1] = 0
    with torch.no_grad():
        assert torch.isfinite(run_encoder(model, batch)).all()


def test_text_only_and_image_only():
    torch.manual_seed(0)
    cfg = tiny_config()
    model = UniterModel(cfg).eval()
    batch = make_batch(cfg, [5, 5], [3, 3])
    out = model(batch["input_ids"], batch["position_ids"], None, None, torch.ones(2, 5, dtype=torch.long))
    assert out.shape == (2, 5, cfg.hidden_size)
    out = model(None, None, batch["img_feat"], batch["img_pos_feat"], torch.ones(2, 3, dtype=torch.long))
    assert out.shape == (2, 3, cfg.hidden_size)
    with pytest.raises(ValueError, match="attn_masks"):
        model(batch["input_ids"], batch["position_ids"], None, None, torch.ones(2, 4, dtype=torch.long))


# -- perturbation hook points --------------------------------------------------------------------


def test_hooks_see_the_documented_tensors():
    torch.manual_seed(0)
    cfg = tiny_config()
    model = UniterModel(cfg).double().eval()
    batch = make_batch(cfg, [5, 3], [4, 6], dtype=torch.float64)
    b, lt = batch["input_ids"].shape
    n = batch["img_feat"].size(1)
    d_txt = (torch.randn(b, lt, cfg.hidden_size, dtype=torch.float64) * 1e-2).requires_grad_()
    d_img = (torch.randn(b, n, cfg.img_dim, dtype=torch.float64) * 1e-2).requires_grad_()
    img_masks = torch.zeros(b, n, dtype=torch.bool)
    img_masks[0, 1] = True
    seen = {}

    def txt_hook(mod, inputs, output):
        return output + d_txt

    def img_hook(mod, inputs):
        seen["img_in"] = inputs[0].detach().clone()
        return (inputs[0] + d_img,)

    def ln_hook(mod, inputs):
        seen["ln_in"] = inputs[0].detach().clone()

    h1 = model.embeddings.word_embeddings.register_forward_hook(txt_hook)
    h2 = model.img_embeddings.img_linear.register_forward_pre_hook(img_hook)
    h3 = model.embeddings.LayerNorm.register_forward_pre_hook(ln_hook)
    out = run_encoder(model, batch, img_masks=img_masks)
    for h in (h1, h2, h3):
        h.remove()
    emb = model.embeddings
    pos = emb.position_embeddings(batch["position_ids"])
    expect_ln_in = emb.word_embeddings(batch["input_ids"]) + d_txt + pos + emb.token_type_embeddings.weight[0]
    torch.testing.assert_close(seen["ln_in"], expect_ln_in.detach())
    mask_row = model.img_embeddings.mask_embedding.weight[1].detach()
    expect_img_in = batch["img_feat"] + img_masks.unsqueeze(-1).double() * mask_row
    torch.testing.assert_close(seen["img_in"], expect_img_in)
    # gradients reach the deltas at valid positions only (padding is dropped or masked)
    (out[:, 0] * torch.randn_like(out[:, 0])).sum().backward()
    for i, (tl, nbb) in enumerate(zip(batch["txt_lens"], batch["num_bbs"], strict=True)):
        assert d_txt.grad[i, :tl].abs().sum() > 0
        assert d_txt.grad[i, tl:].abs().sum() == 0
        assert d_img.grad[i, :nbb].abs().sum() > 0
        assert d_img.grad[i, nbb:].abs().sum() == 0


def test_fp32_embeddings_keep_tiny_image_perturbation_under_autocast():
    torch.manual_seed(0)
    cfg = tiny_config(img_dim=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = UniterModel(cfg).eval()
    batch = make_batch(cfg, [4], [5])
    feat, pos = batch["img_feat"] + 1.0, batch["img_pos_feat"]
    delta = torch.randn_like(feat) * 1e-5  # far below bf16 spacing at 1.0
    with torch.no_grad():
        exact = model.img_embeddings_of(feat + delta, pos) - model.img_embeddings_of(feat, pos)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = model.img_embeddings_of(feat + delta, pos) - model.img_embeddings_of(feat, pos)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, exact, atol=1e-6, rtol=1e-3)


# -- layer norm choice, resizing ---------------------------------------------------------------


def test_layer_norm_apex_only_on_request(monkeypatch):
    """apex's FusedLayerNorm computes and returns half precision under autocast (the residual stream then is
    half): only when asked for; "auto" keeps torch's float32 LayerNorm even where apex is installed."""
    monkeypatch.delenv("VILLA_FAST_LAYERNORM", raising=False)
    monkeypatch.setattr(layers_mod, "_apex_fused_layer_norm", lambda: None)
    assert type(layers_mod.make_layer_norm(8, 1e-12, "auto")) is nn.LayerNorm
    with pytest.raises(RuntimeError, match="apex"):
        layers_mod.make_layer_norm(8, 1e-12, "apex")

    class FakeFused(nn.LayerNorm):
        pass

    monkeypatch.setattr(layers_mod, "_apex_fused_layer_norm", lambda: FakeFused)
    assert type(layers_mod.make_layer_norm(8, 1e-12, "apex")) is FakeFused
    assert type(layers_mod.make_layer_norm(8, 1e-12, "auto")) is nn.LayerNorm
    assert type(layers_mod.make_layer_norm(8, 1e-12, "torch")) is nn.LayerNorm


def test_resize_embedding_keeps_module_and_hooks():
    torch.manual_seed(0)
    model = UniterModel(tiny_config())
    emb = model.embeddings.word_embeddings
    calls = []
    emb.register_forward_hook(lambda m, i, o: calls.append(o.shape))
    old = emb.weight.detach().clone()
    model.resize_embedding("word_embeddings", 110)
    assert model.embeddings.word_embeddings is emb
    assert emb.weight.shape == (110, 32) and model.config.vocab_size == 110
    torch.testing.assert_close(emb.weight[:100].detach(), old)
    emb(torch.tensor([[105]]))
    assert calls
    with pytest.raises(ValueError, match="shrink"):
        model.resize_embedding("word_embeddings", 50)


# -- package boundaries ------------------------------------------------------------------------------


def test_models_import_nothing_upstream():
    """models know no storage format, no loop, no trainer (imports flow one way)."""
    import ast
    from pathlib import Path

    import villa_fast.models as pkg

    banned = ("villa_fast.data", "villa_fast.train", "villa_fast.adversarial", "villa_fast.tasks", "villa_fast.cli")
    for path in Path(pkg.__file__).parent.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            for name in names:
                assert not name.startswith(banned), f"{path.name} imports {name}"


def test_build_model_accepts_config_forms(tmp_path):
    from villa_fast.models import build_model

    d = tiny_config().to_dict()
    p = tmp_path / "cfg.json"
    p.write_text(json.dumps(d))
    for spec in (tiny_config(), d, str(p)):
        m = build_model("ve", spec)
        assert m.uniter.config.hidden_size == 32 and m.vqa_output[3].out_features == 3
