"""The adapter manifest's compact layout (format 3): grouped plan entries and tensor entries,
stacked float tensors, derived code ranges; exact round trips and clear errors."""

from __future__ import annotations

import json

import pytest
import torch
from adapter_files import without_digests
from safetensors.torch import load_file, save_file
from tiny_models import bert_inputs, logits, perturb, tiny_bert

import slimtune
from slimtune import Adapter, BitFit, LoRA
from slimtune.io import tensor_descriptions
from slimtune.io.manifest import group_tensors as _group_tensors
from slimtune.plan import Plan, PlanEntry, index_template, template_index

# ------------------------------------------------------------------------------- plan


def test_index_template_finds_the_one_integer_that_differs():
    assert index_template("blocks.3.mlp", "blocks.12.mlp") == ("blocks.{}.mlp", 3, 12)
    assert index_template("a.9.x", "a.19.x") == ("a.{}.x", 9, 19)
    assert index_template("l.10.y.10", "l.11.y.10") == ("l.{}.y.10", 10, 11)
    assert index_template("a.1", "a.01") is None  # no leading zeros: the name would change
    assert index_template("a.1.b", "a.2.c") is None
    assert index_template("a.{}.1", "a.{}.2") is None
    assert template_index("blocks.{}.mlp", "blocks.12.mlp") == 12
    assert template_index("blocks.{}.mlp", "blocks.x.mlp") is None
    assert template_index("blocks.{}.mlp", "blocks.012.mlp") is None


def _entries() -> list[PlanEntry]:
    entries = [
        PlanEntry("adapter", f"enc.layer.{i}.ffn", {"dim": 8, "read": f"enc.layer.{i}.norm2"})
        for i in range(4)
    ]
    entries.append(PlanEntry("head", "classifier", {"bits": 1}))
    entries += [
        PlanEntry("sparse", f"enc.layer.{i}.q", {"params": {"weight": f"sparse/enc.layer.{i}.q"}})
        for i in (0, 1, 5)
    ]
    entries.append(PlanEntry("sparse", "enc.layer.6.q", {"params": {"weight": "sparse/x.7"}}))
    entries.append(PlanEntry("lora", "enc.layer.0.v", {"r": 2, "bias": True}))
    entries.append(PlanEntry("lora", "enc.layer.1.v", {"r": 2, "bias": 1}))  # 1 is not True
    entries.append(PlanEntry("lora", "odd.{}.7", {"r": 2}))
    entries.append(PlanEntry("lora", "odd.{}.8", {"r": 2}))
    return entries


def test_compact_plan_groups_entries_and_reads_back_identically():
    plan = Plan(entries=_entries(), head=["classifier"], family="bert")
    d = plan.to_dict(compact=True)
    assert d["version"] == 2
    groups = [e for e in d["entries"] if "targets" in e]
    assert groups[0] == {
        "method": "adapter",
        "targets": "enc.layer.{}.ffn",
        "each": [0, 1, 2, 3],
        "settings": {"dim": 8, "read": "enc.layer.{}.norm2"},
    }
    assert groups[1]["each"] == [0, 1, 5]
    assert groups[1]["settings"] == {"params": {"weight": "sparse/enc.layer.{}.q"}}
    assert len(groups) == 2  # the other entries do not fit a group
    back = Plan.from_dict(json.loads(json.dumps(d)))
    assert back.entries == plan.entries
    assert [type(e.settings.get("bias")) for e in back.entries[-4:-2]] == [bool, int]
    # Without compact, and for plans with nothing to group, the plain version-1 form.
    assert plan.to_dict()["version"] == 1 and len(plan.to_dict()["entries"]) == len(plan.entries)
    single = Plan(entries=_entries()[4:5])
    assert single.to_dict(compact=True) == single.to_dict()


def test_entries_taken_in_turn_form_one_group():
    """LoRA on q and v: q0, v0, q1, v1, ... is one group with two target templates."""
    entries = [
        PlanEntry("lora", f"l.{i}.{m}", {"r": r, "src": f"l.{i}.ln"})
        for i in range(5)
        for m, r in (("q", 2), ("k", 2), ("v", 4))
    ]
    entries.append(PlanEntry("lora", "l.5.q", {"r": 2, "src": "l.5.ln"}))  # an incomplete block
    plan = Plan(entries=entries)
    d = plan.to_dict(compact=True)
    assert d["entries"][0] == {
        "method": "lora",
        "targets": ["l.{}.q", "l.{}.k", "l.{}.v"],
        "each": [0, 1, 2, 3, 4],
        "settings": [{"r": r, "src": "l.{}.ln"} for r in (2, 2, 4)],
    }
    assert d["entries"][1] == {
        "method": "lora",
        "target": "l.5.q",
        "settings": entries[-1].settings,
    }
    assert Plan.from_dict(json.loads(json.dumps(d))).entries == entries


@pytest.mark.parametrize(
    ("group", "word"),
    [
        ({"method": "lora", "targets": "a.b", "each": [0], "settings": {}}, "'{}'"),
        ({"method": "lora", "targets": "a.{}", "each": ["0"], "settings": {}}, "each"),
        ({"method": "lora", "targets": "a.{}", "each": [0], "settings": []}, "settings"),
        ({"method": "lora", "targets": ["a.{}", "b"], "each": [0], "settings": {}}, "targets"),
        ({"method": "lora", "targets": ["a.{}"], "each": [0], "settings": [{}, {}]}, "one per"),
        ({"method": "lora", "targets": "a.{}", "each": [0]}, "exactly"),
        ("lora", "object"),
    ],
)
def test_malformed_plan_groups_raise_plan_errors(group, word):
    with pytest.raises(slimtune.PlanError, match=word):
        Plan.from_dict({"version": 2, "entries": [group]})


# ---------------------------------------------------------------------------- tensors


def test_tensor_groups_pick_the_shared_index_and_avoid_name_clashes():
    info = {"method": "lora", "shape": [2, 4], "dtype": "float32"}
    infos = {f"s.{s}.b.{b}.w": dict(info) for s in range(2) for b in range(3)}
    infos["s.1.b.2.w"]["shape"] = [2, 5]  # not like the others
    groups = _group_tensors(infos, reserved=set())
    names = [(e["name"], e.get("each")) for e, _ in groups]
    assert names == [("s.0.b.{}.w", [0, 1, 2]), ("s.1.b.{}.w", [0, 1]), ("s.1.b.2.w", None)]
    # A float group's template names its stacked tensor: it must not clash with another.
    clash = {"x.0.w": dict(info), "x.1.w": dict(info), "x.{}.w": dict(info)}
    groups = _group_tensors(clash, reserved=set())
    assert [e["name"] for e, _ in groups] == ["x.0.w", "x.1.w", "x.{}.w"]
    groups = _group_tensors({k: clash[k] for k in ("x.0.w", "x.1.w")}, reserved={"x.{}.w"})
    assert [e["name"] for e, _ in groups] == ["x.0.w", "x.1.w"]
    # Quantized groups have no stored tensor of their own.
    q = {k: {**info, "bits": 1, "criterion": "l1"} for k in ("x.0.w", "x.1.w")}
    assert [e["name"] for e, _ in _group_tensors(q, reserved={"x.{}.w"})] == ["x.{}.w"]


def _mixed(tmp_path):
    model = tiny_bert()
    slimtune.apply(model, [LoRA(r=2, bits=2), Adapter.adaptformer(dim=4), BitFit()], head_bits=1)
    perturb(model)
    return model, slimtune.save(model, tmp_path / "ad")


def test_format_3_round_trip_is_exact_and_saves_again_byte_for_byte(tmp_path):
    model, d = _mixed(tmp_path)
    manifest = json.loads((d / "slimtune.json").read_text())
    assert manifest["format_version"] == 3
    entries = manifest["tensors"]
    assert all("each" in e for e in entries if e["method"] in ("lora", "adapter"))
    stored = load_file(str(d / "adapter.safetensors"))
    floats = [e for e in entries if "bits" not in e]
    assert set(stored) == {
        "quant/codes",
        "quant/scales",
        "digest/manifest_sha256",  # slimtune.io.digests
        *(e["name"] for e in floats),
    }
    for e in floats:
        assert (
            list(stored[e["name"]].shape) == ([len(e["each"])] if "each" in e else []) + e["shape"]
        )
    n_quantized = sum(len(e.get("each", [0])) for e in entries if "bits" in e)
    assert stored["quant/scales"].shape == (n_quantized, 2)

    x = bert_inputs()
    fresh = slimtune.load(tiny_bert(), d)
    assert torch.equal(logits(model, x), logits(fresh, x))
    params = dict(model.named_parameters())
    described = tensor_descriptions(d)
    for name, p in fresh.named_parameters():
        if name in described and "bits" not in described[name]:
            assert torch.equal(p, params[name]), name
    again = slimtune.save(fresh, tmp_path / "again")
    for f in ("slimtune.json", "adapter.safetensors"):
        assert (again / f).read_bytes() == (d / f).read_bytes(), f


def _short_stack(d):
    f = d / "adapter.safetensors"
    tensors = load_file(str(f))
    key = next(k for k in tensors if "{}" in k and k.endswith("up.weight"))
    tensors[key] = tensors[key][:-1].clone()
    save_file(tensors, str(f))
    return key


def _edit_manifest(change):
    def corrupt(d):
        f = d / "slimtune.json"
        manifest = json.loads(f.read_text())
        word = change(manifest)
        f.write_text(json.dumps(manifest))
        return word

    return corrupt


def _bad_each(m):
    next(e for e in m["tensors"] if "each" in e)["each"] = "0-1"
    return "'each'"


def _duplicate(m):
    e = next(e for e in m["tensors"] if "each" in e)
    e["each"] = [0, 0]
    return "described twice"


def _bad_shape(m):
    m["tensors"][0]["shape"] = "2x4"
    return "'shape'"


def _bad_plan_group(m):
    next(e for e in m["plan"]["entries"] if "targets" in e)["targets"] = "no-slot"
    return "invalid plan"


def _not_a_list(m):
    m["tensors"] = {}
    return "list of tensor entries"


@pytest.mark.parametrize(
    "corrupt",
    [
        _short_stack,
        _edit_manifest(_bad_each),
        _edit_manifest(_duplicate),
        _edit_manifest(_bad_shape),
        _edit_manifest(_bad_plan_group),
        _edit_manifest(_not_a_list),
    ],
    ids=["short-stack", "each", "duplicate", "shape", "plan-group", "not-a-list"],
)
def test_corrupted_format_3_files_are_refused_clearly(corrupt, tmp_path):
    _, d = _mixed(tmp_path)
    without_digests(d)  # the structural checks, behind the digests
    word = corrupt(d)
    base = tiny_bert()
    state = {k: v.clone() for k, v in base.state_dict().items()}
    with pytest.raises(slimtune.LoadError) as err:
        slimtune.load(base, d)
    msg = str(err.value)
    assert word in msg and str(d) in msg, msg
    if corrupt is _short_stack:
        assert "has shape" in msg and "adapter.safetensors" in msg, msg
    assert not hasattr(base, "_slimtune")
    assert all(torch.equal(base.state_dict()[k], v) for k, v in state.items())


def test_storage_report_needs_only_the_groups(tmp_path):
    model, d = _mixed(tmp_path)
    rep = slimtune.storage_report(d)
    weights = {n: p for n, p in model.named_parameters() if n in tensor_descriptions(d)}
    described = tensor_descriptions(d)
    want = sum(
        p.numel() * described[n]["bits"] / 8 + 8 if "bits" in described[n] else p.numel() * 4
        for n, p in weights.items()
    )
    assert rep["bound_bytes"] == round(want)
    assert rep["header_bytes"] == rep["total_disk_bytes"] - sum(rep["parts"].values())
