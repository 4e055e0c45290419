"""The low-bit benchmark: its variants, size targets and reuse of finished runs."""

from __future__ import annotations

import pytest
from tiny_models import dinov2_like, perturb

import slimtune
import slimtune.app.config


@pytest.mark.parametrize("variant", ["1bit", "fp32", "1bit-bihead", "lora-1bit"])
def test_benchmark_adapters_are_within_the_size_target(variant, tmp_path):
    """The benchmark's adapters (12 blocks of dinov2-s's width, a 10-class head) fit
    ``1.03 x bound + 2 KiB`` with the manifest and safetensors' header counted."""
    from benchmarks import lowbit

    v = lowbit.VARIANTS[variant]
    model = dinov2_like(384, 12)
    methods = slimtune.app.config.build_methods([dict(m) for m in v["methods"]])
    slimtune.apply(model, methods, head_bits=v["head_bits"])
    perturb(model)
    d = slimtune.save(model, tmp_path / variant)
    sizes = lowbit.adapter_sizes(d)
    assert sizes["bytes"] == sum(f.stat().st_size for f in d.iterdir())
    if variant == "1bit":  # the quick benchmark's bound for fashion-mnist
        assert sizes["bound_bytes"] == 12 * 2 * (384 * 32 // 8 + 8) + (768 * 10 + 10) * 4
    assert sizes["bytes"] <= lowbit.size_limit(sizes["bound_bytes"]), sizes
    # Manifest + safetensors header: a few groups, not one description per matrix.
    assert sizes["header_bytes"] < 2048, sizes


def test_benchmark_variants_build_valid_run_configs():
    from benchmarks import lowbit

    assert sorted(lowbit.VARIANTS) == sorted(
        [
            "fp32",
            "8bit",
            "4bit",
            "2bit",
            "1bit",
            "1bit-bihead",
            "lora-1bit",
        ]
    )
    bits = {"fp32": 32, "8bit": 8, "4bit": 4, "2bit": 2, "1bit": 1, "1bit-bihead": 1}
    bits["lora-1bit"] = 1
    for variant in lowbit.VARIANTS:
        cfg = lowbit._config(lowbit.QUICK, "digits", variant, 0)
        assert cfg.model == "dinov2-s"
        methods = slimtune.app.config.build_methods(cfg.methods)
        assert methods[0].bits == bits[variant]
        assert cfg.head_bits == (1 if variant == "1bit-bihead" else 32)
    assert len(lowbit.QUICK["tasks"]) == 2 and lowbit.QUICK["variants"] == ["fp32", "1bit"]
    with pytest.raises(ValueError, match="variant"):
        lowbit.run(quick=True, variants=["3bit"], out="/dev/null")


def test_benchmark_reuses_runs_made_with_the_same_training_settings():
    from benchmarks import lowbit

    def settings(**kw):
        s = {**lowbit.QUICK, **kw}
        s["variant_methods"] = {v: lowbit.VARIANTS[v] for v in s["variants"]}
        return s

    old = {
        "settings": settings(),
        "runs": {
            f"{t}/{v}/0": {"task": t, "variant": v, "seed": 0}
            for t in lowbit.QUICK["tasks"]
            for v in lowbit.QUICK["variants"]
        },
    }
    more = settings(variants=list(lowbit.VARIANTS))
    assert set(lowbit._reusable(old, more)) == set(old["runs"])
    assert lowbit._reusable(old, settings(epochs=3)) == {}
    fewer = settings(tasks=lowbit.QUICK["tasks"][:1], variants=["1bit"])
    assert list(lowbit._reusable(old, fewer)) == [f"{lowbit.QUICK['tasks'][0]}/1bit/0"]
