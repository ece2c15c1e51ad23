"""The datasets that are no binary operation: sparse parity and images (digits, MNIST-1k).

``python -m grokhpc.datasets fetch mnist`` downloads MNIST once (on a login node: compute
nodes often have no network) into the cache, ``$GROKHPC_DATA`` or ``~/.cache/grokhpc``.

Stage: model & data (``grokhpc.data.make_dataset`` builds each run's ``Dataset`` from the rows,
labels and split made here). Each returns ``(inputs, labels, train_idx, test_idx, gen)``:
float features (rows, n_in), long labels, the split, and the seeded generator that drew them
(label noise is drawn from it after the split, as for the binary operations).

* ``sparse_parity``: ``n_samples`` rows of ``n_bits`` uniform bits drawn from a generator
  seeded by ``data_seed``; the label is the parity of the FIRST ``k_bits`` bits (the others are
  noise); the inputs are the bits as +-1 floats. The split is the binary operations' (a seeded
  permutation of the rows from the same generator, the first ``int(n_samples * train_frac)``
  train).
* images, one code path: a source's pixels scaled to [0, 1] (as torchvision's ``ToTensor``
  for Omnigrok's MNIST), its own train pool and test set (``tasks.Task.pool``). The run trains
  on ``n_samples`` images of the train pool, drawn by a permutation seeded by ``data_seed``
  (Omnigrok takes MNIST's first 1,000), and is tested on the whole test set.
  - ``digits``: scikit-learn's 8x8 digits (1,797 images shipped with the package, 0..16 per
    pixel): the first 1,297 are the train pool, the last 500 the test set;
  - ``mnist``: OpenML's ``mnist_784`` through scikit-learn's ``fetch_openml`` (0..255 per
    pixel; its first 60,000 rows are MNIST's train set, the last 10,000 its test set).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np

from .config import ConfigError, RunConfig
from .tasks import TASKS, task

MNIST_FILE = "mnist.npz"


def cache_dir() -> Path:
    """Where fetched datasets live: ``$GROKHPC_DATA``, else ``~/.cache/grokhpc``."""
    env = os.environ.get("GROKHPC_DATA")
    return Path(env) if env else Path.home() / ".cache" / "grokhpc"


def split_indices(n: int, train_frac: float, data_seed: int, gen=None):
    """The seed's split of ``n`` rows, for every dataset: a seeded permutation (``gen``, else a
    generator seeded by ``data_seed``), the first ``int(n * train_frac)`` train."""
    import torch

    gen = gen if gen is not None else torch.Generator().manual_seed(data_seed)
    perm = torch.randperm(n, generator=gen)
    cut = int(n * train_frac)
    return perm[:cut], perm[cut:]


def sparse_parity(cfg: RunConfig):
    """Rows of +-1 bits, the parity of their first ``k_bits``, and the split (module doc)."""
    import torch

    gen = torch.Generator().manual_seed(cfg.data_seed)
    bits = torch.randint(0, 2, (cfg.n_samples, cfg.n_bits), generator=gen)
    labels = bits[:, :cfg.k_bits].sum(dim=1) % 2
    train_idx, test_idx = split_indices(cfg.n_samples, cfg.train_frac, cfg.data_seed, gen)
    return (2 * bits - 1).float(), labels, train_idx, test_idx, gen


def digits_source() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 8x8 digits: pixels (1797, 64) scaled to [0, 1], labels (1797,)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    return (d.data / 16.0).astype(np.float32), d.target.astype(np.int64)


def fetched(op: str) -> Path:
    """The cached file of dataset ``op``; a one-line ConfigError saying how to fetch it when it
    is not there."""
    f = cache_dir() / MNIST_FILE
    if not f.exists():
        raise ConfigError(f"op {op}: {f} not found; run once where the network is reachable "
                          f"(a login node): python -m grokhpc.datasets fetch {op}")
    return f


def require_fetched(ops) -> None:
    """Raise :func:`fetched`'s error for the first of ``ops`` that must be fetched and is not
    (the launcher asks before it submits any job)."""
    for op in sorted(set(ops) & set(FETCHERS)):
        fetched(op)


def mnist_source() -> tuple[np.ndarray, np.ndarray]:
    """MNIST from the cache: pixels (70000, 784) scaled to [0, 1], labels (70000,)."""
    with np.load(fetched("mnist")) as z:
        return (z["x"] / 255.0).astype(np.float32), z["y"].astype(np.int64)


SOURCES = {"digits": digits_source, "mnist": mnist_source}


def images(cfg: RunConfig):
    """``n_samples`` training images drawn from the source's train pool (a permutation seeded
    by ``data_seed``), then its whole test set; rows in that order (module doc)."""
    import torch

    pool_train, pool_test = task(cfg.op).pool
    x, y = SOURCES[cfg.op]()
    gen = torch.Generator().manual_seed(cfg.data_seed)
    chosen = torch.randperm(pool_train, generator=gen)[:cfg.n_samples]
    rows = torch.cat([chosen, torch.arange(pool_train, pool_train + pool_test)])
    inputs, labels = torch.from_numpy(x)[rows], torch.from_numpy(y)[rows]
    n = cfg.n_samples
    return inputs, labels, torch.arange(n), torch.arange(n, n + pool_test), gen


def fetch_mnist() -> Path:
    """Download MNIST (OpenML's mnist_784) through scikit-learn into the cache; the path."""
    from sklearn.datasets import fetch_openml

    out = cache_dir()
    out.mkdir(parents=True, exist_ok=True)
    x, y = fetch_openml("mnist_784", version=1, as_frame=False, return_X_y=True,
                        data_home=str(out / "openml"), parser="auto")
    tmp = out / (MNIST_FILE + ".tmp.npz")
    np.savez_compressed(tmp, x=x.astype(np.uint8), y=y.astype(np.int64))
    tmp.replace(out / MNIST_FILE)
    return out / MNIST_FILE


FETCHERS = {"mnist": fetch_mnist}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m grokhpc.datasets",
                                 description="Fetch a dataset into the cache ($GROKHPC_DATA "
                                             "or ~/.cache/grokhpc), once, where the network is "
                                             "reachable.")
    ap.add_argument("action", choices=["fetch"])
    ap.add_argument("name", choices=sorted(FETCHERS))
    args = ap.parse_args(argv)
    try:
        path = FETCHERS[args.name]()
    except OSError as e:   # URLError, a refused connection, no space
        print(f"error: fetch {args.name}: {e}; is the network reachable from this node?",
              file=sys.stderr)
        return 2
    print(f"{args.name}: {path}")
    return 0


assert set(SOURCES) | {"sparse_parity"} == {n for n, t in TASKS.items() if t.kind != "binary_op"}

if __name__ == "__main__":
    sys.exit(main())
