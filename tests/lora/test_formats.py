"""Each format's delta equals its math, recomputed here from the file's own tensors.

The expected values are written independently of studio.lora.formats: scale applied after
the product, Tucker rebuilt with A1111's einsum, LoKr with LyCORIS's 4-D kron, DoRA with
LyCORIS's and peft's own norm expressions (and peft's real merge for peft DoRA).
"""

from __future__ import annotations

import json
import sys
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
import lora_fixtures as fx  # noqa: E402

from studio.lora.reader import read_lora  # noqa: E402

TOL = {"rtol": 2e-6, "atol": 1e-7}  # fp32, a handful of ulps of reordered sums


def read(tmp_path: Path, tensors: dict, metadata: dict | None = None, name: str = "x"):
    path = fx.write(tmp_path / f"{name}.safetensors", tensors, metadata)
    lora = read_lora(path, fx.index())
    assert lora.unmatched_keys == []
    return lora, load_file(str(path))


def patches_by_module(lora):
    return {(p.component, p.module): p for p in lora.patches}


def flat2(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(t.shape[0], -1)


def check_factors(patch, base):
    up, down = patch.factors()
    assert up.dtype == down.dtype == torch.float32
    assert torch.equal(up @ down, patch.delta(base).reshape(up.shape[0], -1))


# --- kohya LoRA / LoCon ---------------------------------------------------------------------

@pytest.mark.parametrize("sgm", [True, False], ids=["sgm-names", "diffusers-names"])
def test_kohya_per_module_rank_and_alpha(tmp_path, sgm):
    """Dynamic-resize files: each module its own rank and alpha (None and 0 mean alpha = rank)."""
    ix, g, tensors, prefixes = fx.index(), fx.gen(1), {}, {}
    alphas = [None, 1.0, 3.5, 16.0, 0.0]
    for n, info in enumerate(fx.samples()):
        prefix = ix.kohya_key(info, sgm=sgm)
        tensors |= fx.with_prefix(prefix, fx.kohya_layer(info, g, rank=2 + n % 4, alpha=alphas[n % 5]))
        prefixes[(info.component, info.path)] = (prefix, info)
    lora, stored = read(tmp_path, tensors)
    assert lora.format == "locon" and len(lora.patches) == len(prefixes)
    for key, patch in patches_by_module(lora).items():
        prefix, info = prefixes[key]
        up, down = stored[f"{prefix}.lora_up.weight"], stored[f"{prefix}.lora_down.weight"]
        alpha = stored.get(f"{prefix}.alpha")
        rank = down.shape[0]
        scale = 1.0 if alpha is None or float(alpha) == 0 else float(alpha) / rank
        expected = (flat2(up) @ flat2(down)).reshape(info.shape) * scale
        base = fx.base_weight(info)
        torch.testing.assert_close(patch.delta(base), expected, **TOL)
        check_factors(patch, base)
        assert not patch.depends_on_base


def test_kohya_linear_only_is_labelled_kohya(tmp_path):
    ix, g = fx.index(), fx.gen(2)
    tensors = {}
    for info in fx.samples(convs=False):
        tensors |= fx.with_prefix(ix.kohya_key(info), fx.kohya_layer(info, g, 4, 2.0))
    lora, _ = read(tmp_path, tensors)
    assert lora.format == "kohya"


def test_locon_tucker_mid_is_folded_into_down(tmp_path):
    ix, g = fx.index(), fx.gen(3)
    convs = [i for i in fx.samples() if i.is_conv and i.shape[-1] == 3]
    tensors = {}
    for info in convs:
        tensors |= fx.with_prefix(ix.kohya_key(info), fx.kohya_layer(info, g, rank=3, alpha=6.0, tucker=True))
    lora, stored = read(tmp_path, tensors)
    for patch in lora.patches:
        info = fx.index().get(patch.component, patch.module)
        p = ix.kohya_key(info)
        up, down, mid = stored[f"{p}.lora_up.weight"], stored[f"{p}.lora_down.weight"], stored[f"{p}.lora_mid.weight"]
        # A1111 lyco_helpers.rebuild_cp_decomposition
        expected = torch.einsum("n m k l, i n, m j -> i j k l", mid, flat2(up), flat2(down)) * (6.0 / 3)
        torch.testing.assert_close(patch.delta(fx.base_weight(info)), expected, **TOL)
        check_factors(patch, fx.base_weight(info))
        assert patch.factors()[1].shape == (3, info.shape[1] * 9)


@settings(max_examples=20, deadline=None)
@given(rank=st.integers(1, 8), alpha=st.one_of(st.none(), st.floats(0.0, 64.0, width=32)))
def test_kohya_scale_rule(tmp_path_factory, rank, alpha):
    info = fx.samples()[0]
    layer = fx.kohya_layer(info, fx.gen(rank), rank, alpha)
    lora, stored = read(tmp_path_factory.mktemp("h"), fx.with_prefix(fx.index().kohya_key(info), layer))
    scale = rank if alpha is None or alpha == 0 else alpha
    expected = (layer["lora_up.weight"] @ layer["lora_down.weight"]) * (scale / rank)
    torch.testing.assert_close(lora.patches[0].delta(fx.base_weight(info)), expected, **TOL)


# --- diffusers / peft -----------------------------------------------------------------------

def _peft_file(g, rank=4):
    tensors, infos = {}, {}
    for info in fx.samples():
        tensors |= fx.with_prefix(fx.peft_prefix(info), fx.peft_layer(info, g, rank))
        infos[(info.component, info.path)] = info
    return tensors, infos


def test_peft_alpha_from_diffusers_metadata(tmp_path):
    """`pipe.save_lora_weights` metadata: per-component lora_alpha, alpha_pattern beating it."""
    tensors, infos = _peft_file(fx.gen(4))
    meta = {"unet.r": 4, "unet.lora_alpha": 8, "unet.alpha_pattern": {"attn1.to_q": 2},
            "text_encoder.r": 4, "text_encoder.lora_alpha": 1,
            "text_encoder_2.r": 4, "text_encoder_2.lora_alpha": 4, "text_encoder_2.use_rslora": True}
    lora, stored = read(tmp_path, tensors, {"format": "pt", "lora_adapter_metadata": json.dumps(meta)})
    assert lora.format == "peft"
    for (component, path), patch in patches_by_module(lora).items():
        info, prefix = infos[(component, path)], f"{component}.{path}"
        if component == "unet":
            scale = (2 if path.endswith("attn1.to_q") else 8) / 4
        else:
            scale = 1 / 4 if component == "text_encoder" else 4 / 4 ** 0.5
        b, a = stored[f"{prefix}.lora_B.weight"], stored[f"{prefix}.lora_A.weight"]
        expected = (flat2(b) @ flat2(a)).reshape(info.shape) * scale
        torch.testing.assert_close(patch.delta(fx.base_weight(info)), expected, **TOL)
        check_factors(patch, fx.base_weight(info))


def test_peft_without_metadata_is_scale_one_and_te1_with_text_model(tmp_path):
    g, tensors = fx.gen(5), {}
    info = fx.index().get("text_encoder", "encoder.layers.0.self_attn.q_proj")
    layer = fx.peft_layer(info, g, 2)
    tensors |= fx.with_prefix("text_encoder.text_model.encoder.layers.0.self_attn.q_proj", layer)
    lora, _ = read(tmp_path, tensors)
    (patch,) = lora.patches
    assert (patch.component, patch.module) == ("text_encoder", "encoder.layers.0.self_attn.q_proj")
    assert torch.equal(patch.delta(fx.base_weight(info)), layer["lora_B.weight"] @ layer["lora_A.weight"])


def test_peft_unprefixed_metadata_and_old_diffusers_spellings(tmp_path):
    """`unet.save_lora_adapter` metadata; `.lora.down`, `lora_linear_layer`, attn-proc `to_out_lora`."""
    ix, g = fx.index(), fx.gen(6)
    q = ix.get("unet", "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q")
    out = ix.get("unet", "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_out.0")
    te = ix.get("text_encoder_2", "text_model.encoder.layers.1.self_attn.v_proj")
    tensors = {}
    lq, lo, lt = fx.peft_layer(q, g, 2), fx.peft_layer(out, g, 2), fx.peft_layer(te, g, 2)
    tensors[f"unet.{q.path}.lora.down.weight"] = lq["lora_A.weight"]
    tensors[f"unet.{q.path}.lora.up.weight"] = lq["lora_B.weight"]
    attn = "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.processor.to_out_lora"
    tensors[f"{attn}.down.weight"], tensors[f"{attn}.up.weight"] = lo["lora_A.weight"], lo["lora_B.weight"]
    tep = f"text_encoder_2.{te.path}.lora_linear_layer"
    tensors[f"{tep}.down.weight"], tensors[f"{tep}.up.weight"] = lt["lora_A.weight"], lt["lora_B.weight"]
    lora, _ = read(tmp_path, tensors, {"lora_adapter_metadata": json.dumps({"r": 2, "lora_alpha": 3})})
    got = patches_by_module(lora)
    assert set(got) == {("unet", q.path), ("unet", out.path), ("text_encoder_2", te.path)}
    for info, layer in ((q, lq), (out, lo), (te, lt)):
        expected = layer["lora_B.weight"] @ layer["lora_A.weight"] * 1.5
        torch.testing.assert_close(got[(info.component, info.path)].delta(fx.base_weight(info)), expected, **TOL)


# --- LoHa -------------------------------------------------------------------------------------

@pytest.mark.parametrize("tucker", [False, True], ids=["plain", "tucker"])
def test_loha(tmp_path, tucker):
    ix, g, tensors = fx.index(), fx.gen(7), {}
    infos = [i for i in fx.samples() if not tucker or (i.is_conv and i.shape[-1] == 3)]
    for info in infos:
        tensors |= fx.with_prefix(ix.kohya_key(info), fx.loha_layer(info, g, rank=3, alpha=4.5, tucker=tucker))
    lora, s = read(tmp_path, tensors)
    assert lora.format == "loha" and len(lora.patches) == len(infos)
    for patch in lora.patches:
        info = ix.get(patch.component, patch.module)
        p = ix.kohya_key(info)
        halves = []
        for n in (1, 2):
            a, b = s[f"{p}.hada_w{n}_a"], s[f"{p}.hada_w{n}_b"]
            if tucker:  # A1111 lyco_helpers.make_weight_cp
                halves.append(torch.einsum("i j k l, j r, i p -> p r k l", s[f"{p}.hada_t{n}"], b, a))
            else:
                halves.append((a @ b).reshape(info.shape))
        expected = halves[0] * halves[1] * (4.5 / 3)
        torch.testing.assert_close(patch.delta(fx.base_weight(info)), expected, **TOL)
        assert patch.factors() is None and not patch.depends_on_base


# --- LoKr -------------------------------------------------------------------------------------

LOKR_CASES = [("full", "full"), ("lowrank", "full"), ("full", "lowrank"), ("lowrank", "lowrank"), ("full", "tucker")]


@pytest.mark.parametrize("w1,w2", LOKR_CASES)
def test_lokr(tmp_path, w1, w2):
    ix, g, tensors = fx.index(), fx.gen(8), {}
    infos = [i for i in fx.samples() if w2 != "tucker" or (i.is_conv and i.shape[-1] == 3)]
    for info in infos:
        tensors |= fx.with_prefix(ix.kohya_key(info), fx.lokr_layer(info, g, w1, w2, rank=2, alpha=7.0))
    lora, s = read(tmp_path, tensors)
    assert lora.format == "lokr"
    for patch in lora.patches:
        info = ix.get(patch.component, patch.module)
        p = ix.kohya_key(info)
        kw = info.shape[2:]
        m1 = s[f"{p}.lokr_w1"] if w1 == "full" else s[f"{p}.lokr_w1_a"] @ s[f"{p}.lokr_w1_b"]
        if w2 == "full":
            m2 = s[f"{p}.lokr_w2"]
        elif w2 == "tucker":
            t2, w2a, w2b = s[f"{p}.lokr_t2"], s[f"{p}.lokr_w2_a"], s[f"{p}.lokr_w2_b"]
            m2 = torch.einsum("i j k l, j r, i p -> p r k l", t2, w2b, w2a)
        else:
            m2 = (s[f"{p}.lokr_w2_a"] @ s[f"{p}.lokr_w2_b"]).reshape(-1, info.shape[1] // m1.shape[1], *kw)
        if m2.dim() == 4:  # LyCORIS make_kron: w1 gets the kernel axes
            m1 = m1[:, :, None, None]
        rank_scale = 1.0 if (w1, w2) == ("full", "full") else 7.0 / 2  # both full: LyCORIS forces scale 1
        expected = torch.kron(m1.contiguous(), m2.contiguous()).reshape(info.shape) * rank_scale
        torch.testing.assert_close(patch.delta(fx.base_weight(info)), expected, **TOL)
        assert patch.factors() is None


# --- DoRA -------------------------------------------------------------------------------------

def lycoris_dora(w, diff, scale, on_out):
    """LyCORIS functional.general._weight_decompose at multiplier 1, minus the base."""
    merged = w + diff
    nd = merged.dim() - 1
    if on_out:
        norm = merged.reshape(merged.shape[0], -1).norm(dim=1).reshape(merged.shape[0], *[1] * nd)
    else:
        norm = (merged.transpose(0, 1).reshape(merged.shape[1], -1).norm(dim=1, keepdim=True)
                .reshape(merged.shape[1], *[1] * nd).transpose(0, 1))
    return merged * (scale / (norm + torch.finfo(torch.float32).eps)) - w


@pytest.mark.parametrize("on_out", [False, True], ids=["per-input-column", "per-output-row"])
def test_kohya_dora_scale(tmp_path, on_out):
    ix, g, tensors = fx.index(), fx.gen(9), {}
    for info in fx.samples():
        layer = fx.kohya_layer(info, g, 4, 2.0)
        rest = [1] * (len(info.shape) - 2)
        shape = (info.shape[0], 1, *rest) if on_out else (1, info.shape[1], *rest)
        layer["dora_scale"] = fx.rand(g, *shape).abs() + 1.0
        tensors |= fx.with_prefix(ix.kohya_key(info), layer)
    lora, s = read(tmp_path, tensors)
    assert lora.format == "dora"
    for patch in lora.patches:
        info = ix.get(patch.component, patch.module)
        p, w = ix.kohya_key(info), fx.base_weight(info)
        diff = (flat2(s[f"{p}.lora_up.weight"]) @ flat2(s[f"{p}.lora_down.weight"])).reshape(info.shape) * 0.5
        torch.testing.assert_close(patch.delta(w), lycoris_dora(w, diff, s[f"{p}.dora_scale"], on_out), **TOL)
        assert patch.depends_on_base and patch.factors() is None
        assert not torch.equal(patch.delta(w), patch.delta(w * 1.5))  # really reads the base


def peft_merge_delta(w, a, b, alpha, magnitude):
    """What peft itself merges into a layer with this adapter (use_dora=True)."""
    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict
    if w.dim() == 4:
        layer = nn.Conv2d(w.shape[1], w.shape[0], tuple(w.shape[2:]), bias=False)
    else:
        layer = nn.Linear(w.shape[1], w.shape[0], bias=False)
    layer.weight.data.copy_(w)
    model = inject_adapter_in_model(LoraConfig(r=a.shape[0], lora_alpha=alpha, target_modules=["layer"], use_dora=True),
                                    nn.Sequential(OrderedDict(layer=layer)))
    set_peft_model_state_dict(model, {"layer.lora_A.weight": a, "layer.lora_B.weight": b,
                                      "layer.lora_magnitude_vector": magnitude})
    model.layer.merge()
    return model.layer.base_layer.weight.detach() - w


def test_peft_dora_matches_peft_merge(tmp_path):
    g, tensors, infos = fx.gen(10), {}, {}
    for info in fx.samples():
        layer = fx.peft_layer(info, g, 2)
        mag_shape = (1, info.shape[0], 1, 1) if info.is_conv else (info.shape[0],)  # as peft saves it
        layer["lora_magnitude_vector"] = fx.rand(g, *mag_shape).abs() + 1.0
        tensors |= fx.with_prefix(fx.peft_prefix(info), layer)
        infos[(info.component, info.path)] = info
    alphas = {f"{c}.lora_alpha": 6 for c in ("unet", "text_encoder", "text_encoder_2")}
    meta = {"lora_adapter_metadata": json.dumps(alphas)}
    lora, s = read(tmp_path, tensors, meta)
    assert lora.format == "dora"
    for key, patch in patches_by_module(lora).items():
        info, p = infos[key], f"{key[0]}.{key[1]}"
        w = fx.base_weight(info)
        a, b, mag = s[f"{p}.lora_A.weight"], s[f"{p}.lora_B.weight"], s[f"{p}.lora_magnitude_vector"]
        expected = peft_merge_delta(w, a, b, 6, mag)
        torch.testing.assert_close(patch.delta(w), expected, rtol=1e-5, atol=1e-6)


# --- full diff --------------------------------------------------------------------------------

def test_full_diff_and_bias(tmp_path):
    ix, g, tensors = fx.index(), fx.gen(11), {}
    for n, info in enumerate(fx.samples()):
        tensors |= fx.with_prefix(ix.kohya_key(info), fx.full_layer(info, g, bias=n % 2 == 0))
    lora, s = read(tmp_path, tensors)
    assert lora.format == "full"
    for n, patch in enumerate(lora.patches):
        info = ix.get(patch.component, patch.module)
        p = ix.kohya_key(info)
        assert torch.equal(patch.delta(fx.base_weight(info)), s[f"{p}.diff"])
        if f"{p}.diff_b" in s:
            assert torch.equal(patch.bias_delta, s[f"{p}.diff_b"])
        else:
            assert patch.bias_delta is None
        assert patch.factors() is None


def test_half_precision_files_give_float32_deltas(tmp_path):
    ix, info = fx.index(), fx.samples()[0]
    layer = {k: v.to(torch.bfloat16) for k, v in fx.kohya_layer(info, fx.gen(12), 4, 8.0).items()}
    lora, _ = read(tmp_path, fx.with_prefix(ix.kohya_key(info), layer))
    delta = lora.patches[0].delta(fx.base_weight(info))
    assert delta.dtype == torch.float32
    expected = layer["lora_up.weight"].float() @ layer["lora_down.weight"].float() * 2.0
    torch.testing.assert_close(delta, expected, **TOL)
    assert lora.nbytes == sum(t.numel() * 2 for k, t in layer.items() if k != "alpha")
