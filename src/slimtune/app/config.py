"""Run configuration: one YAML file per run plus ``key=value`` overrides.

Unknown keys are errors that name the key and the closest valid one; wrong types or values are
errors that say what is valid.
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from ..errors import PlanError, finite
from ..methods import build_method, config_methods, method_spec
from ..passes.lightpeft import LightPEFTConfig
from ..passes.spt import SPTConfig
from ..qbase.spec import BaseQuant

__all__ = [
    "RunConfig",
    "TrainConfig",
    "DataConfig",
    "ConfigError",
    "load_config",
    "build_methods",
    "method_names",
    "pass_config",
]


class ConfigError(PlanError):
    """A run configuration is invalid."""


def _closest(key: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.4)
    return f" (did you mean {close[0]!r}?)" if close else f" (valid: {', '.join(sorted(valid))})"


def _finite(where: str, value: float, *, low: float | None = None, above: bool = False) -> float:
    """A finite number (``.inf``/``.nan`` in YAML are refused) naming the key."""
    try:
        return finite(where, value, low=low, above=above)
    except PlanError as exc:
        raise ConfigError(str(exc)) from exc


def _check_type(where: str, value: Any, kind: type | tuple[type, ...]) -> Any:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if float in kinds and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if float in kinds and isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        names = " or ".join(k.__name__ for k in kinds)
        raise ConfigError(f"{where} must be {names}, got {value!r} ({type(value).__name__})")
    return value


@dataclass
class TrainConfig:
    """Optimisation settings.

    Attributes:
        epochs: passes over the training set.
        batch_size: training batch size (per process).
        eval_batch_size: evaluation batch size.
        lr: peak learning rate of AdamW.
        weight_decay: AdamW weight decay (never applied to biases and norms).
        warmup: warm-up length as a fraction of all steps.
        grad_clip: max gradient norm (0 = off).
        seed: seed of everything random in the run.
        max_steps: stop after this many optimizer steps in total (``None`` = all epochs).
    """

    epochs: int = 3
    batch_size: int = 32
    eval_batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 1e-4
    warmup: float = 0.1
    grad_clip: float = 1.0
    seed: int = 0
    max_steps: int | None = None

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "eval_batch_size"):
            if _check_type(f"train.{name}", getattr(self, name), int) < 1:
                raise ConfigError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        self.lr = _finite("train.lr", _check_type("train.lr", self.lr, float), low=0.0, above=True)
        self.weight_decay = _finite(
            "train.weight_decay",
            _check_type("train.weight_decay", self.weight_decay, float),
            low=0.0,
        )
        self.warmup = _check_type("train.warmup", self.warmup, float)
        if not 0 <= self.warmup < 1:
            raise ConfigError(
                f"train.warmup is a fraction of the steps in [0, 1), got {self.warmup}"
            )
        self.grad_clip = _finite(
            "train.grad_clip", _check_type("train.grad_clip", self.grad_clip, float), low=0.0
        )
        _check_type("train.seed", self.seed, int)
        if self.max_steps is not None and _check_type("train.max_steps", self.max_steps, int) < 1:
            raise ConfigError(f"train.max_steps must be >= 1 or null, got {self.max_steps}")


@dataclass
class DataConfig:
    """Data settings.

    Attributes:
        image_size: images are resized to this many pixels (56 or 112 on CPU).
        max_length: text is truncated to this many tokens (causal-LM runs: prompt + response;
            the prompt is cut from the left).
        pack: causal-LM runs: pack the training examples into full rows of ``max_length``
            tokens instead of padding each batch (evaluation never packs).
        n_train: training examples (VTAB-1k: 800).
        n_val: validation examples (VTAB-1k: 200).
        n_test: cap on test examples (``None`` = the whole test split).
    """

    image_size: int = 56
    max_length: int = 128
    n_train: int = 800
    n_val: int = 200
    n_test: int | None = None
    pack: bool = False

    def __post_init__(self) -> None:
        _check_type("data.pack", self.pack, bool)
        for name in ("image_size", "max_length", "n_train", "n_val"):
            if _check_type(f"data.{name}", getattr(self, name), int) < 1:
                raise ConfigError(f"data.{name} must be >= 1, got {getattr(self, name)}")
        if self.n_test is not None and _check_type("data.n_test", self.n_test, int) < 1:
            raise ConfigError(f"data.n_test must be >= 1 or null, got {self.n_test}")


OBJECTIVES = ("classify", "causal-lm")
"""What a run trains: a classifier, or a causal language model on prompt/response pairs."""

LINEAR = "linear"
"""The run-config name of "no method": only the task head is trained (a linear probe)."""


def method_names() -> list[str]:
    """Method names a run config's ``methods`` list accepts: the registry's and ``linear``."""
    return [*config_methods(), LINEAR]


_DEFAULT_METHODS: list[dict[str, Any]] = [{"name": "lora"}]


@dataclass
class RunConfig:
    """A whole run.

    Attributes:
        name: run name (used in reports).
        objective: ``classify`` (a classification head on the task's classes) or
            ``causal-lm`` (a decoder trained on the task's prompt/response pairs, loss on the
            responses only, scored by label-word likelihood or exact-match generation; tasks
            ``movie-sentiment``, ``mmlu``, ``chat-qa``).
        model: built-in model name (``minilm``, ``dinov2-s``, ``tiny-vit``, ...), HF id or folder.
        task: built-in task name (``amazon-reviews``, ``fashion-mnist``, ...).
        methods: list of method settings, each with ``name`` (lora, adapter, bitfit, prompt,
            full, linear) and that method's fields. With ``pruning`` the early phase's LoRA is
            set there instead (``methods`` left out, or that same LoRA).
        head: roles/regexes of the task head (default: the family's).
        model_dropout: probability of every dropout module of the model (its hidden-state and,
            in BERT-like models, attention dropout); ``None`` keeps the checkpoint's own.
        fast_dropout: on CPU, draw the model's dropout masks from 16 random bits per position
            (the same distribution, ``p`` rounded to a multiple of ``2**-16``) instead of
            torch's one-generator-call-per-element ``bernoulli_``, and run attention with
            dropout without falling back to torch's unfused math path
            (:mod:`slimtune.dropout`); evaluation is unchanged. ``false``: torch's own dropout.
        head_bits: precision of the head's weights (32 = float; 1, 2, 4 or 8 = Bi-Head: the
            head's linears trained and stored quantized, without bias).
        base_bits: quantize the frozen base's block linears to 4 or 8 bits before anything
            else (QLoRA-style, :func:`slimtune.quantize_base`); ``None`` keeps them float.
        base_kind: ``nf4`` (default for 4 bits), ``fp4`` or ``int8`` (8 bits).
        data: :class:`DataConfig`.
        train: :class:`TrainConfig`.
        allocation: SPT allocation settings (:class:`~slimtune.passes.spt.SPTConfig`; in YAML
            ``{method: spt, budget: ..., structured: lora}``), or ``None``. Replaces
            ``methods`` (leave them out).
        pruning: Light-PEFT settings (:class:`~slimtune.passes.lightpeft.LightPEFTConfig`; in
            YAML ``{method: light-peft, early_steps: ...}``), or ``None``. With
            ``allocation`` too, the run composes the passes: prune (the early phase's LoRA is
            dropped after pruning, its head kept), then allocate on the pruned model, then
            ``bits``.
        bits: precision of what the allocation chose (1 to 8: its LoRA/adapter matrices trained
            and stored quantized; :attr:`SPTConfig.bits <slimtune.passes.spt.SPTConfig>`);
            needs ``allocation``. ``None``: the allocation's own ``bits`` (32 = float).
        warm_start: the composition (``pruning`` and ``allocation``): LoRA modules the
            allocation places where the early phase trained LoRA start from those matrices
            (:func:`slimtune.passes.compose.warm_start`; slimtune's, beyond the papers);
            ``false``: from scratch.
        compare: variants run by ``slimtune demo`` (``[{name, methods, overrides}, ...]``);
            ignored by train.
    """

    name: str = "run"
    objective: str = "classify"
    model: str = "minilm"
    task: str = "amazon-reviews"
    methods: list[dict[str, Any]] = field(
        default_factory=lambda: [dict(m) for m in _DEFAULT_METHODS]
    )
    head: list[str] | None = None
    model_dropout: float | None = None
    fast_dropout: bool = True
    head_bits: int = 32
    base_bits: int | None = None
    base_kind: str | None = None
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    allocation: SPTConfig | None = None
    pruning: LightPEFTConfig | None = None
    bits: int | None = None
    warm_start: bool = True
    compare: list[dict[str, Any]] | None = None

    def __post_init__(self) -> None:
        _check_type("name", self.name, str)
        if self.objective not in OBJECTIVES:
            raise ConfigError(
                f"objective must be one of {', '.join(OBJECTIVES)}, got {self.objective!r}"
            )
        _check_type("model", self.model, str)
        _check_type("task", self.task, str)
        if self.model_dropout is not None:
            p = self.model_dropout
            if isinstance(p, bool) or not isinstance(p, int | float) or not 0 <= p < 1:
                raise ConfigError(f"model_dropout must be a number in [0, 1) or null, got {p!r}")
            self.model_dropout = float(p)
        _check_type("fast_dropout", self.fast_dropout, bool)
        _check_type("warm_start", self.warm_start, bool)
        if _check_type("head_bits", self.head_bits, int) not in (1, 2, 4, 8, 32):
            raise ConfigError(f"head_bits must be one of 1, 2, 4, 8, 32, got {self.head_bits}")
        if self.base_bits is not None or self.base_kind is not None:
            if self.base_bits is None:
                raise ConfigError("base_kind needs base_bits (4 or 8)")
            _check_type("base_bits", self.base_bits, int)
            try:
                self.base_quant()
            except PlanError as exc:
                raise ConfigError(str(exc)) from exc
        for section, cls in (("data", DataConfig), ("train", TrainConfig)):
            value = getattr(self, section)
            if isinstance(value, dict):
                setattr(self, section, cls(**_known(section, value, cls)))
            elif not isinstance(value, cls):
                raise ConfigError(
                    f"{section} must be a mapping of {section} settings, got {value!r} "
                    f"({type(value).__name__})"
                )
        if self.head is not None and (
            not isinstance(self.head, list) or not all(isinstance(h, str) for h in self.head)
        ):
            raise ConfigError(
                f"head must be a list of roles or regular expressions, got {self.head!r}"
            )
        _check_type("methods", self.methods, list)
        names = method_names()
        for i, m in enumerate(self.methods):
            if not isinstance(m, dict) or "name" not in m:
                raise ConfigError(
                    f"methods[{i}] must be a mapping with a 'name' ({', '.join(names)}), got {m!r}"
                )
            if m["name"] not in names:
                raise ConfigError(
                    f"methods[{i}].name {m['name']!r} is unknown{_closest(str(m['name']), names)}"
                )
        build_methods(self.methods)  # validates every method's fields
        if self.allocation is not None:
            self.allocation = pass_config("allocation", self.allocation, SPTConfig, "spt")
            if self.methods not in (_DEFAULT_METHODS, []):
                raise ConfigError(
                    f"allocation (SPT) decides the methods: leave methods out, got {self.methods}"
                )
        self._check_bits()
        if self.pruning is not None:
            self.pruning = pass_config("pruning", self.pruning, LightPEFTConfig, "light-peft")
            lora = self.pruning.lora()
            if (
                self.allocation is None
                and self.methods != _DEFAULT_METHODS
                and build_methods(self.methods) != [lora]
            ):
                raise ConfigError(
                    "with pruning (Light-PEFT) the early phase's LoRA is set by pruning.r, "
                    "pruning.alpha, pruning.dropout and pruning.targets; leave methods out or "
                    f"give that same LoRA ({lora}), got methods {self.methods}"
                )

    def _check_bits(self) -> None:
        """``bits`` is the third stage: it needs an allocation to quantize, and one value."""
        if self.bits is None:
            return
        if isinstance(self.bits, bool) or not isinstance(self.bits, int):
            raise ConfigError(f"bits must be an integer 1 to 8 or 32, got {self.bits!r}")
        if self.allocation is None:
            raise ConfigError(
                "bits applies to what an allocation chose; without allocation set bits on the "
                "method itself (methods: [{name: adapter, bits: 1}])"
            )
        given = self.allocation.bits
        if given not in (32, self.bits):
            raise ConfigError(f"bits is {self.bits} but allocation.bits is {given}: give one")
        try:
            self.allocation = dataclasses.replace(self.allocation, bits=self.bits)
        except PlanError as exc:
            raise ConfigError(f"bits: {exc}") from exc

    @property
    def composed(self) -> bool:
        """Pruning and allocation in one run (prune -> allocate -> bits)."""
        return self.pruning is not None and self.allocation is not None

    def base_quant(self) -> BaseQuant | None:
        """The base's quantization (``base_bits``/``base_kind``), or ``None``."""
        if self.base_bits is None:
            return None
        return BaseQuant.of(self.base_bits, self.base_kind)

    @property
    def method_label(self) -> str:
        """The run's method as reports name it (``lora+bitfit``, ``spt-lora``, ``light-peft``)."""
        if self.allocation is not None:
            bits = self.allocation.bits
            label = f"spt-{self.allocation.structured}" + (f"-{bits}bit" if bits < 32 else "")
            return f"light-peft+{label}" if self.pruning is not None else label
        if self.pruning is not None:
            return "light-peft"
        return "+".join(m["name"] for m in self.methods) or LINEAR

    def to_dict(self) -> dict[str, Any]:
        """Plain data for ``config.yaml`` (pass sections with their ``method`` key first)."""
        out = asdict(self)
        if self.allocation is not None:
            out["allocation"] = {"method": "spt", **out["allocation"]}
        return _plain(out)


def _plain(value: Any) -> Any:
    """Tuples as lists, recursively (YAML's safe dumper writes no tuples)."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def pass_config(section: str, spec: Any, cls: type[Any], method: str) -> Any:
    """A run config's pass section (``allocation``, ``pruning``) as the pass's typed config.

    ``spec`` is the YAML mapping (its ``method`` key must be ``method``) or already a ``cls``.
    Errors name the key (``pruning.head_ratio``) and what is valid.
    """
    if isinstance(spec, cls):
        return spec
    if not isinstance(spec, dict):
        raise ConfigError(f"{section} must be a mapping, got {spec!r} ({type(spec).__name__})")
    spec = dict(spec)
    given = spec.get("method", method)
    if given != method:
        raise ConfigError(f"{section}.method must be {method!r}, got {given!r}")
    valid = [f.name for f in fields(cls)]
    if "method" not in valid:
        spec.pop("method", None)
    for key in spec:
        if key not in valid:
            raise ConfigError(f"unknown config key {section}.{key}{_closest(key, valid)}")
    try:
        return cls(**spec)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{section}: {exc}") from exc


def _known(section: str, values: dict[str, Any], cls: type) -> dict[str, Any]:
    valid = [f.name for f in fields(cls)]
    for key in values:
        if key not in valid:
            raise ConfigError(
                f"unknown config key {section + '.' if section else ''}{key}{_closest(key, valid)}"
            )
    return values


def build_methods(specs: list[dict[str, Any]]) -> list[Any]:
    """Turn ``[{name: lora, r: 8}, ...]`` into method configurations (``linear`` adds none)."""
    out = []
    for i, spec in enumerate(specs):
        name = spec["name"]
        if name == LINEAR:
            continue
        if name not in config_methods():
            raise ConfigError(f"methods[{i}]: method {name!r} cannot be built from a config")
        cls = method_spec(name).config
        args = {k: v for k, v in spec.items() if k != "name"}
        _known(f"methods[{i}]", args, cls)
        try:
            out.append(build_method(name, args))
        except PlanError as exc:
            raise ConfigError(f"methods[{i}] ({name}): {exc.__cause__ or exc}") from exc
    return out


def _parse_value(text: str, key: str = "") -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ConfigError(f"override {key}={text}: not a YAML value ({first})") from exc


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b=value`` overrides (values parsed as YAML) to a nested dict."""
    top = [f.name for f in fields(RunConfig)]
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key=value (e.g. train.lr=3e-4)")
        key, value = item.split("=", 1)
        parts = key.split(".")
        if parts[0] not in top:
            raise ConfigError(f"unknown config key {key!r}{_closest(parts[0], top)}")
        node: Any = data
        for depth, p in enumerate(parts):
            where = ".".join(parts[: depth + 1])
            if isinstance(node, list):
                if not p.isdigit() or int(p) >= len(node):
                    raise ConfigError(
                        f"override {key}: {where} is not an index of the {len(node)} items there"
                    )
            elif not isinstance(node, dict):
                raise ConfigError(
                    f"override {key}: {'.'.join(parts[:depth])} is a {type(node).__name__}, "
                    "not a section with keys"
                )
            if depth == len(parts) - 1:
                if isinstance(node, list):
                    node[int(p)] = _parse_value(value, key)
                else:
                    node[p] = _parse_value(value, key)
            elif isinstance(node, list):
                node = node[int(p)]
            else:
                if node.get(p) is None:  # a section left null (allocation: null) is created
                    node[p] = {}
                node = node[p]
    return data


def load_config(
    path: str | Path | None, overrides: list[str] | None = None, *, saved: bool = False
) -> RunConfig:
    """Read a YAML run config, apply overrides, validate.

    ``saved``: ``path`` is a run directory's own ``config.yaml`` (resume, evaluation): keys
    added since the run was written take the value that reproduces it (``fast_dropout`` absent
    means the run trained with torch's dropout), not today's default.
    """
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {p} does not exist")
        loaded = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(
                f"{p}: a run config must be a YAML mapping, got {type(loaded).__name__}"
            )
        data = loaded
        if saved:
            data.setdefault("fast_dropout", False)
    data = apply_overrides(data, list(overrides or []))
    _known("", data, RunConfig)
    try:
        return RunConfig(**data)
    except TypeError as exc:
        raise ConfigError(str(exc)) from exc
