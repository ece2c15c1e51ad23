"""Run configuration: one frozen dataclass, validated once at the edge.

Defaults are the seed notebook's (p = 113, a - b mod p, 30% train, AdamW lr 1e-3, wd 1.0,
betas (0.9, 0.98), 25,000 full-batch epochs). A run's identity, ``run_id``, is a hash of the
fields that change its result, so the same config always lands in the same run directory.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, fields
from typing import Any, Iterable, Mapping

OPS = ("sub", "add", "mul", "div")
LOSS_DTYPES = ("float64", "float32")
# Fields that say where or how fast a run goes, not what it computes: left out of run_id.
NON_IDENTITY_FIELDS = ("device",)


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

    def __post_init__(self) -> None:
        validate(self)

    # ---- derived ---------------------------------------------------------------------------
    @property
    def d_vocab(self) -> int:
        """Input vocabulary: the p residues plus the '=' token (id p)."""
        return self.p + 1

    @property
    def n_ctx(self) -> int:
        return 3

    def identity(self) -> dict[str, Any]:
        """The fields that determine the result, as plain JSON types."""
        d = to_dict(self)
        for k in NON_IDENTITY_FIELDS:
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
}
assert set(FIELD_TYPES) == {f.name for f in fields(RunConfig)}


def _fail(source: str, key: str, expected: str, got: Any) -> ConfigError:
    return ConfigError(f"{source}: {key}: expected {expected}, got {got!r}")


# The largest memory a run may need: a big cluster node's RAM. Beyond it no machine can train
# or measure the run, so the value is refused before anything is submitted.
MAX_GRID_BYTES = 1 << 40


def grid_bytes(cfg: RunConfig) -> int:
    """A lower bound on the bytes a run needs for its p x p grid of pairs: tokens and labels
    (int64), the MLP activations at the last position (float32), and p logits per pair in
    float32 plus the float64 log-softmax of the loss."""
    p = cfg.p
    return p * p * (4 * 8 + 4 * (2 * cfg.d_mlp + cfg.d_model) + (4 + 8 + 8) * p)


def _gib(n: int) -> str:
    return f"{n / 2**30:,.0f}" if n >= 2**30 else f"{n / 2**30:.2g}"


def validate(cfg: RunConfig, source: str = "run config") -> None:
    """Raise ConfigError on the first value that makes no sense."""
    if isinstance(cfg.p, int) and grid_bytes(cfg) > MAX_GRID_BYTES:
        raise _fail(source, "p", f"a prime whose p x p grid fits in memory (this one needs about "
                    f"{_gib(grid_bytes(cfg))} GiB; at most {_gib(MAX_GRID_BYTES)} GiB)", cfg.p)
    checks: list[tuple[bool, str, str]] = [
        (is_prime(cfg.p) and cfg.p >= 3, "p", "a prime >= 3"),
        (cfg.op in OPS, "op", f"one of {', '.join(OPS)}"),
        (0.0 < cfg.train_frac < 1.0, "train_frac", "a fraction in (0, 1)"),
        (cfg.lr > 0, "lr", "a positive learning rate"),
        (cfg.weight_decay >= 0, "weight_decay", "a non-negative weight decay"),
        (len(cfg.betas) == 2 and all(0.0 <= b < 1.0 for b in cfg.betas), "betas",
         "two numbers in [0, 1)"),
        (cfg.n_epochs >= 1, "n_epochs", "an integer >= 1"),
        (cfg.checkpoint_every >= 1, "checkpoint_every", "an integer >= 1"),
        (cfg.eval_every >= 1, "eval_every", "an integer >= 1"),
        (cfg.n_heads >= 1 and cfg.d_head >= 1 and cfg.d_model >= 1 and cfg.d_mlp >= 1,
         "n_heads/d_model/d_head/d_mlp", "positive sizes"),
        (cfg.loss_dtype in LOSS_DTYPES, "loss_dtype", f"one of {', '.join(LOSS_DTYPES)}"),
        (cfg.device == "auto" or cfg.device == "cpu" or cfg.device.startswith("cuda")
         or cfg.device == "mps", "device", "auto, cpu, cuda or cuda:N"),
    ]
    for ok, key, expected in checks:
        if not ok:
            raise _fail(source, key, expected, getattr(cfg, key, None) if "/" not in key else
                        (cfg.n_heads, cfg.d_model, cfg.d_head, cfg.d_mlp))
    n_train = int(cfg.p * (cfg.p - (1 if cfg.op == "div" else 0)) * cfg.train_frac)
    if n_train < 1:
        raise _fail(source, "train_frac", "a fraction leaving at least one training pair",
                    cfg.train_frac)


def coerce(key: str, value: Any, source: str = "run config") -> Any:
    """Turn a YAML/JSON/command-line value into the field's type, or raise ConfigError."""
    if key not in FIELD_TYPES:
        known = ", ".join(sorted(FIELD_TYPES))
        raise ConfigError(f"{source}: {key}: unknown field (known: {known})")
    kind = FIELD_TYPES[key]
    bad = _fail(source, key, kind.__name__ if kind is not tuple else "a pair of numbers", value)
    if kind is bool or isinstance(value, bool):
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
    if kind is tuple:
        if isinstance(value, (list, tuple)) and len(value) == 2:
            try:
                return tuple(float(v) for v in value)
            except (TypeError, ValueError):
                raise bad from None
        raise bad
    raise bad  # pragma: no cover


def from_dict(d: Mapping[str, Any], source: str = "run config",
              base: RunConfig | None = None) -> RunConfig:
    """Build a validated RunConfig from plain data; unknown keys and bad types are errors."""
    if not isinstance(d, Mapping):
        raise ConfigError(f"{source}: expected a mapping of run fields, got {type(d).__name__}")
    values = {k: coerce(k, v, source) for k, v in d.items()}
    try:
        return dataclasses.replace(base or RunConfig(), **values)
    except ConfigError as e:
        msg = str(e)
        raise ConfigError(msg.replace("run config:", f"{source}:", 1)) from None


def to_dict(cfg: RunConfig) -> dict[str, Any]:
    d = dataclasses.asdict(cfg)
    d["betas"] = list(d["betas"])
    return d


def parse_overrides(items: Iterable[str], source: str = "--set") -> dict[str, Any]:
    """Parse ``key=value`` strings; values are read as YAML scalars (``1e-3``, ``[0.9, 0.98]``)."""
    import yaml  # only the command line needs it

    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"{source}: {item!r}: expected key=value")
        key, raw = item.split("=", 1)
        key = key.strip()
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
                          f"got {stored!r}")
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
           "parse_overrides", "load_json",
           "is_prime", "OPS"]
