"""Run configuration: one frozen dataclass, validated once at the edge.

Defaults are the seed notebook's (p = 113, a - b mod p, 30% train, AdamW lr 1e-3, wd 1.0,
betas (0.9, 0.98), 25,000 full-batch epochs). A run's identity, ``run_id``, is a hash of the
fields that change its result, so the same config always lands in the same run directory.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import reprlib
from dataclasses import dataclass, fields
from types import MappingProxyType
from typing import Any, Iterable, Mapping

from . import losses, optim
from .families import DATA_OPS, family_checks
from .tasks import S5_ORDER, TASKS, Task

# The tasks (grokhpc.tasks): binary operations over Z_p and over the 120 permutations of S5.
OPS = tuple(TASKS)
MODULAR_OPS = tuple(name for name, t in TASKS.items() if t.operands == "Z_p")
GROUP_OPS = tuple(name for name, t in TASKS.items() if t.operands == "S5")

OPTIMIZERS = tuple(optim.OPTIMIZERS)   # the optimiser registry's names
LR_SCHEDULES = ("constant", "cosine")
ACT_FNS = ("relu", "gelu")
NORMALIZATIONS = ("none", "LN")
MAX_LAYERS = 4
LOSS_DTYPES = ("float64", "float32")
CHECKPOINT_DTYPES = ("float32", "bfloat16", "float16")
MATMUL_PRECISIONS = ("highest", "high")
GRAD_FILTERS = ("none", "ema", "ma")   # Grokfast's low-pass filters of the gradient
LOSS_FNS = losses.LOSS_FNS
# Fields that say where or how fast a run goes, not what it computes: left out of run_id.
NON_IDENTITY_FIELDS = ("device",)
# Fields newer than the first run ids, with their defaults: left out of run_id at the default.
NEW_FIELD_DEFAULTS: dict[str, Any] = {
    "optimizer": "adamw", "momentum": 0.0, "warmup_epochs": 0, "lr_schedule": "constant",
    "batch_size": "full", "n_layers": 1, "act_fn": "relu", "normalization": "none",
    "init_scale": 1.0, "fixed_weight_norm": False, "label_noise": 0.0, "stop_after_grok": None,
    "checkpoint_dtype": "float32", "matmul_precision": "highest",
    "grad_filter": "none", "grokfast_alpha": 0.98, "grokfast_lamb": 2.0, "grokfast_window": 100,
    "loss_fn": "softmax",
    "model": "transformer", "depth": 3, "width": 200, "encoding": "onehot",
    "n_bits": 40, "k_bits": 3, "n_samples": 1000,
}


# The grokking threshold: a run has grokked at its first logged epoch with test accuracy
# at or above it (Power et al. 2022); stop_after_grok, the measures and the tables use it.
GROK_ACC = 0.99

# Fields that must be equal across a group. They fix tensor shapes (p and op the vocabulary
# and classes, the sizes, n_layers, act_fn and normalization the parameters and the forward),
# the commit schedule (n_epochs, checkpoint_every, eval_every), the loss's dtype, the kind of
# optimiser state that is stacked (optimizer: Adam moments or SGD momentum buffers) and the
# step schedule (batch_size: the number and size of minibatches per epoch) and the float32
# matmul precision (one setting of the process for the whole stacked computation), the
# gradient filter's kind and window (the shape of its state) and the loss, the model family and
# its sizes, and a dataset's input width. Everything else -- lr, weight_decay, betas, momentum,
# warmup_epochs, lr_schedule, init_scale, fixed_weight_norm, label_noise, seeds,
# stop_after_grok, grokfast_alpha, grokfast_lamb, train_frac, n_samples, k_bits -- may differ
# run by run (full-batch rows are padded to the group's longest).
SHAPE_FIELDS = ("p", "op", "n_heads", "d_model", "d_head", "d_mlp", "n_layers", "act_fn",
                "normalization", "n_epochs", "checkpoint_every", "eval_every", "loss_dtype",
                "optimizer", "batch_size", "matmul_precision", "grad_filter", "grokfast_window",
                "loss_fn", "model", "depth", "width", "encoding", "n_bits")
# With an integer batch_size, train_frac and n_samples too: the runs take their k-th minibatch
# in the same step, so each needs the same ceil(n_train / batch_size) steps of the same sizes.
MINIBATCH_SHAPE_FIELDS = ("train_frac", "n_samples")


def shape_fields(cfg: "RunConfig") -> tuple[str, ...]:
    """The fields a group of runs shaped like ``cfg`` must share."""
    return SHAPE_FIELDS + (() if cfg.full_batch else MINIBATCH_SHAPE_FIELDS)


class ConfigError(ValueError):
    """A bad value typed by the user; the message names the source, the field and what was expected."""


def is_prime(n: int) -> bool:
    if n < 2:
        return False
    if n % 2 == 0:
        return n == 2
    f = 3
    while f * f <= n:
        if n % f == 0:
            return False
        f += 2
    return True


def _task(op: Any) -> Task | None:
    """The task named ``op``, or None for a value that names none (validation refuses it)."""
    return TASKS.get(op) if isinstance(op, str) else None


@dataclass(frozen=True)
class RunConfig:
    """Everything one training run needs; the defaults reproduce the seed notebook."""

    # task
    p: int = 113
    op: str = "sub"
    train_frac: float = 0.3
    data_seed: int = 598
    # model (one layer, no LayerNorm, ReLU MLP, biases frozen at zero)
    model_seed: int = 999
    n_heads: int = 4
    d_model: int = 128
    d_head: int = 32
    d_mlp: int = 512
    # optimisation (full batch AdamW)
    lr: float = 1e-3
    weight_decay: float = 1.0
    betas: tuple[float, float] = (0.9, 0.98)
    n_epochs: int = 25_000
    loss_dtype: str = "float64"
    # bookkeeping
    checkpoint_every: int = 100
    eval_every: int = 10
    device: str = "auto"
    # Fields added after the first release. At its default each is left out of run_id
    # (``NEW_FIELD_DEFAULTS``), so every run id from before stays the same.
    optimizer: str = "adamw"
    momentum: float = 0.0
    warmup_epochs: int = 0
    lr_schedule: str = "constant"
    batch_size: int | str = "full"
    n_layers: int = 1
    act_fn: str = "relu"
    normalization: str = "none"
    init_scale: float = 1.0
    fixed_weight_norm: bool = False
    label_noise: float = 0.0
    stop_after_grok: int | None = None
    checkpoint_dtype: str = "float32"
    matmul_precision: str = "highest"
    grad_filter: str = "none"
    grokfast_alpha: float = 0.98
    grokfast_lamb: float = 2.0
    grokfast_window: int = 100
    loss_fn: str = "softmax"
    model: str = "transformer"
    depth: int = 3              # MLP: Linear layers (Omnigrok's depth 3, width 200)
    width: int = 200
    encoding: str = "onehot"    # MLP on a binary operation: onehot (2n inputs) or twohot (n)
    n_bits: int = 40            # sparse_parity: bits per row
    k_bits: int = 3             # sparse_parity: the relevant bits (the first k)
    n_samples: int = 1000       # sparse_parity: rows; digits, mnist: training images

    def __post_init__(self) -> None:
        validate(self)

    # ---- derived ---------------------------------------------------------------------------
    @property
    def n_classes(self) -> int:
        """Size of the operands' set: p residues, or the 120 permutations of S5 (p for an op
        that is no task: validation refuses it)."""
        task = _task(self.op)
        return task.n_classes(self.p) if task else self.p

    @property
    def n_pairs(self) -> int:
        """Rows of the dataset: every (a, b), less the task's excluded pairs (div: b = 0);
        sparse parity's ``n_samples``; an image dataset's training images and its test set."""
        task = _task(self.op)
        if task is None:
            return self.n_classes ** 2
        if task.kind == "sparse_parity":
            return self.n_samples
        if task.kind == "image":
            return self.n_samples + task.pool[1]
        return task.n_pairs(self.p)

    @property
    def n_train(self) -> int:
        """Training rows: the first ``int(n_pairs * train_frac)`` of the seeded permutation
        (an image dataset: its ``n_samples`` training images)."""
        task = _task(self.op)
        if task is not None and task.kind == "image":
            return self.n_samples
        return int(self.n_pairs * self.train_frac)

    @property
    def n_test(self) -> int:
        """Test rows: the rest of the pairs."""
        return self.n_pairs - self.n_train

    @property
    def d_vocab(self) -> int:
        """Input vocabulary: the operands plus the '=' token (id n_classes)."""
        return self.n_classes + 1

    @property
    def full_batch(self) -> bool:
        return self.batch_size == "full"

    @property
    def n_ctx(self) -> int:
        return 3

    def identity(self) -> dict[str, Any]:
        """The fields that determine the result, as plain JSON types."""
        d = to_dict(self)
        for k in NON_IDENTITY_FIELDS:
            d.pop(k)
        for k, default in NEW_FIELD_DEFAULTS.items():
            if d[k] == default and type(d[k]) is type(default):
                d.pop(k)
        return d

    @property
    def run_id(self) -> str:
        """Stable 12-hex-digit id: sha256 of the identity fields in canonical JSON."""
        blob = json.dumps(self.identity(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:12]

    def replace(self, **changes: Any) -> "RunConfig":
        return dataclasses.replace(self, **changes)


FIELD_TYPES: dict[str, type] = {
    "p": int, "op": str, "train_frac": float, "data_seed": int, "model_seed": int,
    "n_heads": int, "d_model": int, "d_head": int, "d_mlp": int, "lr": float,
    "weight_decay": float, "betas": tuple, "n_epochs": int, "loss_dtype": str,
    "checkpoint_every": int, "eval_every": int, "device": str,
    "optimizer": str, "momentum": float, "warmup_epochs": int, "lr_schedule": str,
    "batch_size": "batch", "n_layers": int, "act_fn": str, "normalization": str,
    "init_scale": float, "fixed_weight_norm": bool, "label_noise": float,
    "stop_after_grok": "optional_int", "checkpoint_dtype": str, "matmul_precision": str,
    "grad_filter": str, "grokfast_alpha": float, "grokfast_lamb": float, "grokfast_window": int,
    "loss_fn": str, "model": str, "depth": int, "width": int, "encoding": str,
    "n_bits": int, "k_bits": int, "n_samples": int,
}
assert set(FIELD_TYPES) == {f.name for f in fields(RunConfig)}
FIELD_DEFAULTS = MappingProxyType({f.name: f.default for f in fields(RunConfig)})  # read-only


def is_seed(field: str) -> bool:
    """Seeds are repeats: what statistics run over and figures never take as an axis
    (data_seed, model_seed, any ``*_seed``)."""
    return field.endswith("_seed")


# A value echoed in an error is cut beyond this many characters, so that one line stays one
# line (a YAML value of nested aliases can expand to millions of characters).
SHOWN_CHARS = 200


class _Shown(reprlib.Repr):
    """reprlib's bounded repr (it never builds the whole text of a big value), with strings cut
    at their end rather than in their middle."""

    def __init__(self) -> None:
        super().__init__()
        self.maxlevel, self.maxlist, self.maxtuple, self.maxdict = 4, 12, 12, 12
        self.maxset = self.maxfrozenset = self.maxdeque = 12
        self.maxstring = self.maxother = self.maxlong = SHOWN_CHARS

    def repr_str(self, x: str, level: int) -> str:
        return repr(x) if len(x) <= self.maxstring else repr(x[:self.maxstring]) + "..."


_SHOWN = _Shown()


def shown(value: Any, limit: int = SHOWN_CHARS) -> str:
    """``repr(value)`` for an error line, cut with an ellipsis beyond ``limit`` characters."""
    text = _SHOWN.repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def clip(text: str, limit: int = SHOWN_CHARS) -> str:
    """``text`` (a name or a line of a message) cut with an ellipsis beyond ``limit`` characters."""
    text = str(text)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _fail(source: str, key: str, expected: str, got: Any) -> ConfigError:
    return ConfigError(f"{source}: {clip(key)}: expected {expected}, got {shown(got)}")


# The largest memory a run may need: a big cluster node's RAM. Beyond it no machine can train
# or measure the run, so the value is refused before anything is submitted.
MAX_GRID_BYTES = 1 << 40


def grid_bytes(cfg: RunConfig) -> int:
    """A lower bound on the bytes a run needs for its p x p grid of pairs: tokens and labels
    (int64), the MLP activations at the last position (float32), and p logits per pair in
    float32 plus the float64 log-softmax of the loss."""
    p = cfg.n_classes
    return p * p * (4 * 8 + 4 * (2 * cfg.d_mlp + cfg.d_model) + (4 + 8 + 8) * p)


def _gib(n: int) -> str:
    return f"{n / 2**30:,.0f}" if n >= 2**30 else f"{n / 2**30:.2g}"


FLOAT_FIELDS = tuple(k for k, kind in FIELD_TYPES.items() if kind in (float, tuple))


def _is_finite_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _check_finite(cfg: RunConfig, source: str) -> None:
    """Every float field a finite number (inf and nan are refused before any other check)."""
    for key in FLOAT_FIELDS:
        v = getattr(cfg, key)
        if key == "betas":
            if not (isinstance(v, (list, tuple)) and all(_is_finite_number(b) for b in v)):
                raise _fail(source, key, "two finite numbers in [0, 1)", v)
        elif not _is_finite_number(v):
            raise _fail(source, key, "a finite number", v)


def validate(cfg: RunConfig, source: str = "run config") -> None:
    """Raise ConfigError on the first value that makes no sense."""
    _check_finite(cfg, source)
    if isinstance(cfg.p, int) and grid_bytes(cfg) > MAX_GRID_BYTES:
        raise _fail(source, "p", f"a prime whose p x p grid fits in memory (this one needs about "
                    f"{_gib(grid_bytes(cfg))} GiB; at most {_gib(MAX_GRID_BYTES)} GiB)", cfg.p)
    checks = _task_checks(cfg) + _model_checks(cfg) + _optim_checks(cfg) + _method_checks(cfg)
    checks += family_checks(cfg, FIELD_DEFAULTS)
    for ok, key, expected in checks:
        if not ok:
            raise _fail(source, key, expected, getattr(cfg, key, None) if "/" not in key else
                        (cfg.n_heads, cfg.d_model, cfg.d_head, cfg.d_mlp))
    if cfg.op in DATA_OPS and (cfg.n_train < 1 or cfg.n_test < 1):
        raise _fail(source, "n_samples", "a size leaving at least one training and one test "
                    "row", cfg.n_samples)
    if cfg.n_train < 1:
        raise _fail(source, "train_frac", "a fraction leaving at least one training pair",
                    cfg.train_frac)


def _task_checks(cfg: RunConfig) -> list[tuple[bool, str, str]]:
    return [
        (cfg.op in GROUP_OPS or (is_prime(cfg.p) and cfg.p >= 3), "p", "a prime >= 3"),
        (cfg.op in OPS, "op", f"one of {', '.join(OPS)}"),
        (0.0 < cfg.train_frac < 1.0, "train_frac", "a fraction in (0, 1)"),
        (0.0 <= cfg.label_noise < 1.0, "label_noise", "a fraction in [0, 1)"),
        (cfg.n_epochs >= 1, "n_epochs", "an integer >= 1"),
        (cfg.checkpoint_every >= 1, "checkpoint_every", "an integer >= 1"),
        (cfg.eval_every >= 1, "eval_every", "an integer >= 1"),
        (cfg.stop_after_grok is None or cfg.stop_after_grok >= 0, "stop_after_grok",
         "off (null) or a number of epochs >= 0"),
        (cfg.loss_dtype in LOSS_DTYPES, "loss_dtype", f"one of {', '.join(LOSS_DTYPES)}"),
        (cfg.checkpoint_dtype in CHECKPOINT_DTYPES, "checkpoint_dtype",
         f"one of {', '.join(CHECKPOINT_DTYPES)}"),
        (cfg.matmul_precision in MATMUL_PRECISIONS, "matmul_precision",
         f"one of {', '.join(MATMUL_PRECISIONS)}"),
        (cfg.device == "auto" or cfg.device == "cpu" or cfg.device.startswith("cuda")
         or cfg.device == "mps", "device", "auto, cpu, cuda or cuda:N"),
    ]


def _model_checks(cfg: RunConfig) -> list[tuple[bool, str, str]]:
    return [
        (cfg.n_heads >= 1 and cfg.d_head >= 1 and cfg.d_model >= 1 and cfg.d_mlp >= 1,
         "n_heads/d_model/d_head/d_mlp", "positive sizes"),
        (1 <= cfg.n_layers <= MAX_LAYERS, "n_layers", f"an integer in 1..{MAX_LAYERS}"),
        (cfg.act_fn in ACT_FNS, "act_fn", f"one of {', '.join(ACT_FNS)}"),
        (cfg.normalization in NORMALIZATIONS, "normalization",
         f"one of {', '.join(NORMALIZATIONS)}"),
        (cfg.init_scale > 0 and math.isfinite(cfg.init_scale), "init_scale",
         "a positive number"),
    ]


def _optim_checks(cfg: RunConfig) -> list[tuple[bool, str, str]]:
    n_train = cfg.n_train
    return [
        (cfg.optimizer in OPTIMIZERS, "optimizer", f"one of {', '.join(OPTIMIZERS)}"),
        (cfg.lr > 0, "lr", "a positive learning rate"),
        (cfg.weight_decay >= 0, "weight_decay", "a non-negative weight decay"),
        (len(cfg.betas) == 2 and all(0.0 <= b < 1.0 for b in cfg.betas), "betas",
         "two numbers in [0, 1)"),
        (0.0 <= cfg.momentum < 1.0, "momentum", "a number in [0, 1)"),
        (cfg.momentum == 0.0 or cfg.optimizer == "sgd", "momentum",
         "0 unless optimizer is sgd"),
        (cfg.warmup_epochs >= 0, "warmup_epochs", "an integer >= 0"),
        (cfg.lr_schedule in LR_SCHEDULES, "lr_schedule", f"one of {', '.join(LR_SCHEDULES)}"),
        (cfg.batch_size == "full" or (isinstance(cfg.batch_size, int)
                                      and 1 <= cfg.batch_size <= max(n_train, 1)),
         "batch_size", f"full or an integer in 1..{n_train} (the train set's size)"),
    ]


def _method_checks(cfg: RunConfig) -> list[tuple[bool, str, str]]:
    """Grokfast's filter and the loss; a filter parameter set away from its default where the
    run's filter does not read it is refused (it would change run_id and nothing else)."""
    d = NEW_FIELD_DEFAULTS
    return [
        (cfg.grad_filter in GRAD_FILTERS, "grad_filter", f"one of {', '.join(GRAD_FILTERS)}"),
        (0.0 <= cfg.grokfast_alpha < 1.0, "grokfast_alpha", "a number in [0, 1)"),
        (cfg.grokfast_alpha == d["grokfast_alpha"] or cfg.grad_filter == "ema",
         "grokfast_alpha", f"{d['grokfast_alpha']} unless grad_filter is ema"),
        (cfg.grokfast_lamb >= 0.0, "grokfast_lamb", "a non-negative number"),
        (cfg.grokfast_lamb == d["grokfast_lamb"] or cfg.grad_filter != "none",
         "grokfast_lamb", f"{d['grokfast_lamb']} unless grad_filter is ema or ma"),
        (cfg.grokfast_window >= 1, "grokfast_window", "an integer >= 1"),
        (cfg.grokfast_window == d["grokfast_window"] or cfg.grad_filter == "ma",
         "grokfast_window", f"{d['grokfast_window']} unless grad_filter is ma"),
        (cfg.loss_fn in LOSS_FNS, "loss_fn", f"one of {', '.join(LOSS_FNS)}"),
    ]


def _coerce_special(kind: str, value: Any, bad: ConfigError) -> Any:
    """The fields whose type is a choice: batch_size ('full' or int), an optional int."""
    if kind == "batch":
        if value == "full":
            return value
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise bad
    if value is None or (isinstance(value, str) and value.lower() in ("off", "none", "null")):
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    raise bad


_KIND_NAMES = {tuple: "a pair of numbers", bool: "true or false",
               "batch": "full or an integer", "optional_int": "an integer or off"}


def coerce(key: str, value: Any, source: str = "run config") -> Any:
    """Turn a YAML/JSON/command-line value into the field's type, or raise ConfigError."""
    if key not in FIELD_TYPES:
        known = ", ".join(sorted(FIELD_TYPES))
        raise ConfigError(f"{source}: {clip(key)}: unknown field (known: {known})")
    kind = FIELD_TYPES[key]
    bad = _fail(source, key, _KIND_NAMES.get(kind) or kind.__name__, value)
    if isinstance(kind, str):
        return _coerce_special(kind, value, bad)
    if kind is bool:
        if isinstance(value, bool):
            return value
        raise bad
    if isinstance(value, bool):
        raise bad
    if kind is int:
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise bad
    if kind is float:
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):  # YAML reads '1e-3' as a string
            try:
                return float(value)
            except ValueError:
                raise bad from None
        raise bad
    if kind is str:
        if isinstance(value, str):
            return value
        raise bad
    if isinstance(value, (list, tuple)) and len(value) == 2:
        try:
            return tuple(float(v) for v in value)
        except (TypeError, ValueError):
            raise bad from None
    raise bad


def from_dict(d: Mapping[str, Any], source: str = "run config",
              base: RunConfig | None = None) -> RunConfig:
    """Build a validated RunConfig from plain data; unknown keys and bad types are errors."""
    if not isinstance(d, Mapping):
        raise ConfigError(f"{source}: expected a mapping of run fields, got {type(d).__name__}")
    values = {k: coerce(k, v, source) for k, v in d.items()}
    op = values.get("op", (base or RunConfig()).op)
    if op in GROUP_OPS and values.get("p", RunConfig.p) != RunConfig.p:
        raise ConfigError(f"{source}: p: does not apply to op {op} (the {S5_ORDER} permutations "
                          f"of S5); leave p out, got {shown(values['p'])}")
    if op in DATA_OPS and values.get("p", RunConfig.p) != RunConfig.p:
        raise ConfigError(f"{source}: p: does not apply to op {op} (a dataset, not a binary "
                          f"operation); leave p out, got {shown(values['p'])}")
    try:
        return dataclasses.replace(base or RunConfig(), **values)
    except ConfigError as e:
        msg = str(e)
        raise ConfigError(msg.replace("run config:", f"{source}:", 1)) from None


def to_dict(cfg: RunConfig) -> dict[str, Any]:
    """Plain JSON types; ``p`` is left out for the S5 tasks and the datasets, where it does
    not apply."""
    d = dataclasses.asdict(cfg)
    d["betas"] = list(d["betas"])
    if cfg.op in GROUP_OPS or cfg.op in DATA_OPS:
        d.pop("p")
    return d


def parse_overrides(items: Iterable[str], source: str = "--set") -> dict[str, Any]:
    """Parse ``key=value`` strings; values are read as YAML scalars (``1e-3``, ``[0.9, 0.98]``).
    A field given twice is refused (the last one would otherwise win without a word)."""
    import yaml  # only the command line needs it

    out: dict[str, Any] = {}
    given: dict[str, str] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"{source}: {shown(item)}: expected key=value")
        key, raw = item.split("=", 1)
        key = key.strip()
        if key in given:
            raise ConfigError(f"{source}: {clip(key)}: given twice ({shown(given[key], 80)} and "
                              f"{shown(item, 80)}); give each field once")
        given[key] = item
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError:
            value = raw
        if isinstance(value, str):  # YAML 1.1 reads '3e-3' as text
            try:
                value = float(value)
            except ValueError:
                pass
        out[key] = value
    return out


def from_run_dict(d: Mapping[str, Any], source: str = "config.json") -> RunConfig:
    """A run directory's config (its fields plus ``run_id``) back into a RunConfig.

    The stored ``run_id`` must be the hash of the stored fields: a config edited by hand, or
    written by a version of grokhpc that hashed differently, is refused rather than trained
    into the wrong directory."""
    if not isinstance(d, Mapping):
        raise ConfigError(f"{source}: expected a mapping of run fields, got {type(d).__name__}")
    fields_only = {k: v for k, v in d.items() if k != "run_id"}
    cfg = from_dict(fields_only, source=source)
    stored = d.get("run_id")
    if stored is not None and stored != cfg.run_id:
        raise ConfigError(f"{source}: run_id: expected {cfg.run_id} (the hash of its fields), "
                          f"got {shown(stored)}")
    return cfg


def load_json(path) -> RunConfig:
    """Read a run directory's config.json back into a RunConfig (see ``from_run_dict``)."""
    try:
        with open(path, "rb") as f:
            d = json.loads(f.read().decode("utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    return from_run_dict(d, source=str(path))


__all__ = ["RunConfig", "ConfigError", "from_dict", "from_run_dict", "to_dict",
           "parse_overrides", "load_json", "shown", "clip",
           "is_prime", "OPS"]
