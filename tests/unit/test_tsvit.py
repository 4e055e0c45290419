"""TSViT: shapes, parameter counts, the tsvit family and the methods' invariants on it."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import slimtune
from slimtune.families import resolve_modules
from slimtune.models.tsvit import PASTIS_NUM_PARAMS, TSViT, TSViTBlock, TSViTConfig

B, T = 2, 5


def tiny_tsvit(seed: int = 0, **overrides: object) -> TSViT:
    torch.manual_seed(seed)
    return TSViT(TSViTConfig.tiny(**overrides)).eval()


def inputs(seed: int = 1, t: int = T) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, t, 10, 8, 8, generator=g)
    doy = torch.randint(0, 366, (B, t), generator=g)
    return x, doy


def _formula(c: TSViTConfig) -> int:
    """Parameter count written out from the architecture."""
    d, p, inner = c.dim, c.patch_size, c.num_heads * c.head_dim
    block = (
        2 * 2 * d + 3 * d * inner + inner * d + d + d * c.mlp_dim + c.mlp_dim + c.mlp_dim * d + d
    )
    encoders = (c.temporal_depth + c.spatial_depth) * block + 2 * 2 * d
    return (
        (p * p * c.num_channels + 1) * d
        + (366 + 1) * d
        + c.num_classes * d
        + c.num_patches * d
        + 2 * d
        + (d + 1) * p * p
        + encoders
    )


def test_pastis_parameter_count() -> None:
    model = TSViT.pastis()
    assert sum(p.numel() for p in model.parameters()) == PASTIS_NUM_PARAMS == 1_657_476
    assert _formula(model.config) == PASTIS_NUM_PARAMS


@pytest.mark.parametrize("cfg", [TSViTConfig.small(), TSViTConfig.tiny()])
def test_parameter_formula(cfg: TSViTConfig) -> None:
    assert TSViT(cfg).num_parameters() == _formula(cfg)


def test_output_shape_and_t_independence() -> None:
    model = tiny_tsvit()
    for t in (1, 5, 12):
        x, doy = inputs(t=t)
        out = model(x, doy)
        assert out.shape == (B, 3, 8, 8)
        assert torch.isfinite(out).all()


def test_unpatchify_keeps_pixels_in_place() -> None:
    """Perturbing one patch of the input changes the logits only in that patch (no space mixing)."""
    model = tiny_tsvit(spatial_depth=1)
    # Without spatial attention mixing, a patch only affects itself: zero the spatial blocks.
    with torch.no_grad():
        for blk in model.space_encoder.layers:
            blk.attn.o.weight.zero_()
            blk.attn.o.bias.zero_()
    x, doy = inputs()
    base = model(x, doy)
    x2 = x.clone()
    x2[:, :, :, 2:4, 4:6] += 1.0  # patch row 1, column 2 (p = 2)
    diff = (model(x2, doy) - base).abs().sum(dim=(0, 1))
    assert diff[2:4, 4:6].min() > 0
    diff[2:4, 4:6] = 0
    assert diff.max() == 0


def test_config_validation_names_the_value() -> None:
    with pytest.raises(ValueError, match="multiple of patch_size"):
        TSViTConfig(img_size=25)
    with pytest.raises(ValueError, match="dim must be a positive integer, got 0"):
        TSViTConfig(dim=0)
    model = tiny_tsvit()
    x, doy = inputs()
    with pytest.raises(ValueError, match="0..365"):
        model(x, doy + 400)
    with pytest.raises(ValueError, match=r"\(B, T, C, H, W\)"):
        model(x[0], doy)


def test_adapt_classes() -> None:
    x, doy = inputs()
    lin = tiny_tsvit().adapt_classes(2, mode="linear")
    assert lin(x, doy).shape == (B, 2, 8, 8)
    assert lin.config.num_classes == 3 and lin.config.out_classes == 2
    tok = tiny_tsvit().adapt_classes(2, mode="tokens")
    assert tok(x, doy).shape == (B, 2, 8, 8)
    assert tok.temporal_token.shape == (1, 2, 16) and tok.config.num_classes == 2
    # A model rebuilt from the adapted config has the same parameter names and shapes.
    again = TSViT(lin.config)
    assert {n: p.shape for n, p in again.named_parameters()} == {
        n: p.shape for n, p in lin.named_parameters()
    }
    with pytest.raises(ValueError, match="'tokens' or 'linear'"):
        tiny_tsvit().adapt_classes(2, mode="bogus")


def test_family_detected_and_roles_resolve() -> None:
    model = tiny_tsvit(temporal_depth=2, spatial_depth=3)
    fam = slimtune.detect_family(model)
    assert fam.name == "tsvit"
    blocks = fam.block_names(model)
    assert blocks == [f"temporal_encoder.layers.{i}" for i in range(2)] + [
        f"space_encoder.layers.{i}" for i in range(3)
    ]
    for role in ("q", "k", "v", "o", "fc1", "fc2", "mlp_in", "mlp_out"):
        names = resolve_modules(model, fam, [role])
        assert len(names) == 5, role
        assert [next(b for b in blocks if n.startswith(b + ".")) for n in names] == blocks
    assert len(resolve_modules(model, fam, ["temporal"])) == 2 * 6
    assert len(resolve_modules(model, fam, ["spatial"])) == 3 * 6
    assert resolve_modules(model, fam, ["embed"]) == ["patch_embedding", "temporal_embedding"]
    assert resolve_modules(model, fam, ["head"]) == ["mlp_head"]
    assert len(resolve_modules(model, fam, ["norm"])) == 5 * 2 + 2
    spec = fam.block
    assert spec is not None
    blk = model.get_submodule(blocks[0])
    attn = blk.get_submodule(spec.attention)
    assert getattr(attn, spec.heads_attr[0]) == 2 and getattr(attn, str(spec.head_dim)) == 8
    assert blk.get_submodule(spec.fc1).out_features == 32
    assert int(getattr(model.config, str(fam.encoders[0].n_special))) == 3


def test_head_pruning_by_slicing() -> None:
    """Dropping a head = slicing q/k/v rows and o columns and lowering num_heads."""
    model = tiny_tsvit()
    x, doy = inputs()
    blk = model.temporal_encoder.layers[0]
    a = blk.attn
    keep = torch.arange(a.head_dim, 2 * a.head_dim)  # keep head 1 only
    with torch.no_grad():
        for name in ("q", "k", "v"):
            lin = getattr(a, name)
            new = nn.Linear(lin.in_features, len(keep), bias=False)
            new.weight.copy_(lin.weight[keep])
            setattr(a, name, new)
        o = nn.Linear(len(keep), a.o.out_features)
        o.weight.copy_(a.o.weight[:, keep])
        o.bias.copy_(a.o.bias)
        a.o = o
    a.num_heads = 1
    assert model(x, doy).shape == (B, 3, 8, 8)


def test_lora_leaves_outputs_unchanged() -> None:
    x, doy = inputs()
    ref = tiny_tsvit()(x, doy)
    model = slimtune.apply(
        tiny_tsvit(), [slimtune.LoRA(r=2, targets=["q", "k", "v", "o", "fc1", "fc2"])]
    )
    torch.testing.assert_close(model(x, doy), ref, rtol=0, atol=0)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert sum("lora" in n for n in trainable) == 2 * 6 * 2  # 2 blocks x 6 linears x (A, B)
    assert all("lora" in n or n.startswith("mlp_head") for n in trainable)


def test_parallel_adapter_leaves_outputs_unchanged() -> None:
    x, doy = inputs()
    ref = tiny_tsvit()(x, doy)
    model = slimtune.apply(tiny_tsvit(), [slimtune.Adapter(dim=4, placement="parallel")])
    torch.testing.assert_close(model(x, doy), ref, rtol=0, atol=0)
    plan = slimtune.get_state(model).plan
    assert [e.target for e in plan.entries] == [
        "temporal_encoder.layers.0.mlp",
        "space_encoder.layers.0.mlp",
    ]
    assert [e.settings["read"] for e in plan.entries] == [
        "temporal_encoder.layers.0.norm2",
        "space_encoder.layers.0.norm2",
    ]
    # A non-zero adapter changes the output (the branch is wired in).
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("up.weight"):
                p.fill_(0.1)
    assert not torch.allclose(model(x, doy), ref)


@pytest.mark.parametrize("deep", [False, True])
def test_prompts_go_after_class_tokens_and_are_stripped(deep: bool) -> None:
    x, doy = inputs()
    base = tiny_tsvit(temporal_depth=2, spatial_depth=2)
    seen: dict[str, int] = {}

    def record(name: str):
        def hook(module: TSViTBlock, args: tuple[torch.Tensor, ...]) -> None:
            seen[name] = args[0].shape[1]

        return hook

    model = slimtune.apply(base, [slimtune.Prompt(length=2, deep=deep)])
    for name, m in model.named_modules():
        if isinstance(m, TSViTBlock):
            m.register_forward_pre_hook(record(name.replace(".base_layer", "")))
    out = model(x, doy)
    assert out.shape == (B, 3, 8, 8)
    k, n = 3, 16
    assert seen == {
        "temporal_encoder.layers.0": k + 2 + T,
        "temporal_encoder.layers.1": k + 2 + T,
        "space_encoder.layers.0": 2 + n,
        "space_encoder.layers.1": 2 + n,
    }
    prompts = [p for name, p in model.named_parameters() if name.endswith("prompts")]
    assert len(prompts) == (4 if deep else 2)


def test_bitfit_and_class_token_tuning() -> None:
    model = slimtune.apply(
        tiny_tsvit(), [slimtune.BitFit(), slimtune.Full(targets=["param:temporal_token"])]
    )
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "temporal_token" in trainable
    assert "patch_embedding.bias" not in trainable  # embeddings stay frozen
    assert "temporal_encoder.layers.0.attn.o.bias" in trainable
    assert not any(n.endswith(("attn.q.weight", "fc1.weight")) for n in trainable)
