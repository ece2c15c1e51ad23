"""checkpoint_dtype: rows stored as float32, float16 or bfloat16, rounded exactly as torch rounds,
read back as float32, checked by checksum, refused when config.json and the file disagree, and a
16-bit run resumed bit for bit."""

from __future__ import annotations

import io
import json
import os
import zlib

import numpy as np
import pytest
import torch

from conftest import TINY_RUN
from grokhpc.api import Run
from grokhpc.config import CHECKPOINT_DTYPES, from_dict
from grokhpc.checkpoints import (CHECKPOINT_STORAGE, NPY_HEADER_BYTES, CheckpointRows,
                                 append_checkpoint_row)
from grokhpc.loop import fit_stack
from grokhpc.stack import Stack
from grokhpc.store import CHECKPOINTS, RunDir, RunDirError
from grokhpc.train import Trainer, run_training

TORCH = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
N_COLS, K = 4096, 4


def torch_stored(rows: np.ndarray, dtype: str) -> np.ndarray:
    """What torch makes of float32 rows in ``dtype``, as numpy can hold it (bfloat16: its bits)."""
    t = torch.from_numpy(rows).to(TORCH[dtype])
    return t.view(torch.int16).numpy().view(np.uint16) if dtype == "bfloat16" else t.numpy()


def torch_read(rows: np.ndarray, dtype: str) -> np.ndarray:
    """The float32 values of float32 rows after a trip through torch's ``dtype``."""
    return torch.from_numpy(rows).to(TORCH[dtype]).float().numpy()


def bits(a) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)


def sample_rows(dtype: str) -> np.ndarray:
    """K x N_COLS float32s: random bit patterns over the exponents ``dtype`` can hold (float16:
    its subnormals to its largest binade), with ties to even and signed zeros in row 0."""
    rng = np.random.default_rng(7)
    low, high = (1, 254) if dtype != "float16" else (102, 141)
    exp = rng.integers(low, high + 1, size=K * N_COLS).astype(np.uint32)
    mant = rng.integers(0, 2 ** 23, size=K * N_COLS).astype(np.uint32)
    sign = rng.integers(0, 2, size=K * N_COLS).astype(np.uint32)
    x = ((sign << 31) | (exp << 23) | mant).view(np.float32).reshape(K, N_COLS)
    ties = [0.0, -0.0, 1 + 2 ** -8, 1 + 3 * 2 ** -8, -(1 + 2 ** -8), 1 + 2 ** -11,
            1 + 3 * 2 ** -11, 2 ** -25, 3 * 2 ** -25, 1 + 2 ** -9, 1 + 2 ** -8 + 2 ** -20]
    x[0, :len(ties)] = np.array(ties, np.float32)
    return x


def run_with_rows(path, rows: np.ndarray, dtype: str | None, written_as: str | None = None):
    """A run directory whose config.json says ``dtype`` (None: a run from before the field) and
    whose checkpoints.npy holds ``rows`` written as ``written_as`` (default: ``dtype``)."""
    run = RunDir(path)
    run.create({"run_id": "abc123", "p": 11, **({"checkpoint_dtype": dtype} if dtype else {})})
    as_ = written_as or dtype or "float32"
    crcs = [append_checkpoint_row(run.file(CHECKPOINTS), r, i, as_) for i, r in enumerate(rows)]
    run.write_progress({"run_id": "abc123", "epoch": 10 * (len(rows) - 1),
                        "n_epochs": 10 * (len(rows) - 1),
                        "checkpoint_epochs": [10 * i for i in range(len(rows))],
                        "checkpoint_crc32": crcs, "layout": [["w", [64, rows.shape[1] // 64]]],
                        "done": True})
    run.file("summary.json").write_text("{}")
    return run, crcs


def test_every_checkpoint_dtype_of_the_config_has_a_storage():
    assert tuple(CHECKPOINT_STORAGE) == CHECKPOINT_DTYPES


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_rows_are_stored_as_torch_rounds_them_and_read_back_as_float32(tmp_path, dtype):
    rows = sample_rows(dtype)
    run, crcs = run_with_rows(tmp_path / "run", rows, dtype)
    f = run.file(CHECKPOINTS)
    stored = torch_stored(rows, dtype)
    npy = io.BytesIO()
    np.save(npy, stored)                      # numpy's own writer of the same values
    assert f.read_bytes() == npy.getvalue()
    assert f.stat().st_size == NPY_HEADER_BYTES + K * N_COLS * BYTES[dtype]
    assert crcs == [zlib.crc32(r.tobytes()) for r in stored]   # over the stored bytes
    loaded = np.load(f)                       # a valid .npy: float16 rows load as float16
    assert loaded.dtype == stored.dtype and np.array_equal(bits(loaded.astype(np.float32)),
                                                           bits(stored.astype(np.float32)))
    want = torch_read(rows, dtype)
    epochs, w = run.checkpoints()
    assert epochs == [0, 10, 20, 30] and w.shape == (K, N_COLS) and w.dtype == np.float32
    assert isinstance(w, np.memmap if dtype == "float32" else CheckpointRows)
    assert np.array_equal(bits(w[2]), bits(want[2]))
    assert np.array_equal(bits(w[1:3]), bits(want[1:3]))
    assert np.array_equal(bits(np.array(w)), bits(want))
    _, whole = run.checkpoints(mmap=False)
    assert type(whole) is np.ndarray and np.array_equal(bits(whole), bits(want))


def test_bfloat16_keeps_a_nan_a_nan(tmp_path):
    row = np.array([np.nan, -np.nan, 1.0, np.inf], np.float32)
    append_checkpoint_row(tmp_path / "c.npy", row, 0, "bfloat16")
    back = np.load(tmp_path / "c.npy")[0].astype(np.uint32) << 16
    assert np.isnan(back.view(np.float32)[:2]).all()
    assert back.view(np.float32)[2:].tolist() == [1.0, np.inf]


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_a_damaged_16_bit_row_is_named_in_one_line(tmp_path, dtype):
    run, _ = run_with_rows(tmp_path / "run", sample_rows(dtype), dtype)
    f, row = run.file(CHECKPOINTS), N_COLS * 2
    with open(f, "r+b") as fh:
        fh.seek(NPY_HEADER_BYTES + 2 * row + 5)
        b = fh.read(1)
        fh.seek(NPY_HEADER_BYTES + 2 * row + 5)
        fh.write(bytes([b[0] ^ 0x01]))
    with pytest.raises(RunDirError) as e:
        run.checkpoints()
    assert str(e.value) == (f"{f}: row 2 of 4 damaged (their checksums differ from those "
                            "written at commit); restore the file from a copy, or delete the "
                            "run directory to train the run again")


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_a_truncated_16_bit_file_is_detected(tmp_path, dtype):
    run, _ = run_with_rows(tmp_path / "run", sample_rows(dtype), dtype)
    f = run.file(CHECKPOINTS)
    assert run.is_complete()
    cut = NPY_HEADER_BYTES + N_COLS * 2 + 1     # row 0 whole, one byte of row 1
    os.truncate(f, cut)
    assert not run.is_complete()
    with pytest.raises(RunDirError) as e:
        run.verify_checkpoints()
    need = NPY_HEADER_BYTES + K * N_COLS * 2
    assert str(e.value).startswith(f"{f}: rows 1-3 of 4 damaged (the file ends at {cut} of "
                                   f"{need} bytes)")
    assert "\n" not in str(e.value)


def test_a_run_from_before_the_field_reads_as_float32_as_before(tmp_path):
    rows = sample_rows("float32")
    run, crcs = run_with_rows(tmp_path / "run", rows, None)
    assert "checkpoint_dtype" not in run.read_config()
    assert run.checkpoint_dtype() == "float32"
    assert crcs == [zlib.crc32(r.astype("<f4").tobytes()) for r in rows]
    epochs, w = run.checkpoints()
    assert isinstance(w, np.memmap) and np.array_equal(bits(w), bits(rows))


@pytest.mark.parametrize("config, file", [("bfloat16", "float16"), ("float16", "bfloat16"),
                                          (None, "bfloat16"), ("bfloat16", "float32")])
def test_config_and_file_that_disagree_are_refused_in_one_line(tmp_path, config, file):
    run, _ = run_with_rows(tmp_path / "run", sample_rows("float16"), config, written_as=file)
    f = run.file(CHECKPOINTS)
    line = (f"{f}: holds {file} rows ('{CHECKPOINT_STORAGE[file]}') but config.json says "
            f"checkpoint_dtype {config or 'float32'}; the file is not this run's")
    for read in (run.checkpoints, lambda: run.checkpoints(verify=False), run.verify_checkpoints):
        with pytest.raises(RunDirError) as e:
            read()
        assert str(e.value) == line


def test_an_unknown_checkpoint_dtype_in_config_json_is_named(tmp_path):
    run, _ = run_with_rows(tmp_path / "run", sample_rows("float32"), "float32")
    run.file("config.json").write_text(json.dumps({**run.read_config(),
                                                   "checkpoint_dtype": "float8"}))
    with pytest.raises(RunDirError) as e:
        run.checkpoints()
    assert str(e.value) == (f"{run.file('config.json')}: checkpoint_dtype: expected one of "
                            "float32, bfloat16, float16, got 'float8'")


# ---- training ---------------------------------------------------------------------------------
def _train(cfg, out) -> RunDir:
    run_training(cfg, out, progress_bar=False, log=lambda *_: None)
    return RunDir(out)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The tiny run trained uninterrupted with float32 and with bfloat16 rows."""
    base = tmp_path_factory.mktemp("ckdtype")
    cfg = {**TINY_RUN, "device": "cpu"}
    return {d: _train(from_dict({**cfg, "checkpoint_dtype": d}), base / d)
            for d in ("float32", "bfloat16")}


def test_bfloat16_rows_are_the_float32_runs_rows_rounded(trained):
    f32, bf = trained["float32"], trained["bfloat16"]
    assert bf.read_config()["checkpoint_dtype"] == "bfloat16"
    assert bf.read_config()["run_id"] != f32.read_config()["run_id"]
    e32, w32 = f32.checkpoints(mmap=False)
    ebf, wbf = bf.checkpoints(mmap=False)
    assert e32 == ebf and np.array_equal(bits(wbf), bits(torch_read(w32, "bfloat16")))
    assert f32.read_curves().equals(bf.read_curves())      # training is float32 either way
    size32 = f32.file(CHECKPOINTS).stat().st_size - NPY_HEADER_BYTES
    assert bf.file(CHECKPOINTS).stat().st_size - NPY_HEADER_BYTES == size32 // 2
    weights = Run(bf.path).weights()                        # readers get float32 arrays
    assert weights["embed.W_E"].dtype == np.float32
    assert np.array_equal(bits(weights["embed.W_E"].reshape(-1)),
                          bits(np.array(bf.unflatten(wbf[-1])["embed.W_E"]).reshape(-1)))
    assert bf.read_summary()["grokking_epoch"] == f32.read_summary()["grokking_epoch"]


def test_bfloat16_run_resumed_after_an_interruption_is_bit_identical(tmp_path, trained):
    cfg = from_dict({**TINY_RUN, "device": "cpu", "checkpoint_dtype": "bfloat16"})
    out = tmp_path / "cut"
    t = Trainer.open(cfg, out, torch.device("cpu"))
    t.fit(progress_bar=False, until=40)          # state.pt at 40 (where fit stops)
    fit_stack(Stack([t], torch.device("cpu"), exact=True), 60)   # row 60, past the state
    assert t.checkpoint_epochs[-1] == 60 and t.committed_epoch == 40
    n_cols = t.n_cols
    t.close()
    # a kill while appending the next row leaves a 16-bit tail past that
    append_checkpoint_row(out / CHECKPOINTS, np.full(n_cols, 7.0, np.float32), 4, "bfloat16")
    cut = _train(cfg, out)
    ref = trained["bfloat16"]
    assert cut.read_progress()["attempts"][-1]["epoch"] == 40
    assert cut.file(CHECKPOINTS).read_bytes() == ref.file(CHECKPOINTS).read_bytes()
    assert cut.read_progress()["checkpoint_crc32"] == ref.read_progress()["checkpoint_crc32"]
    assert cut.read_curves().equals(ref.read_curves())
    s1 = torch.load(cut.file("state.pt"), weights_only=True)["model"]
    s2 = torch.load(ref.file("state.pt"), weights_only=True)["model"]
    assert all(torch.equal(s1[k], s2[k]) for k in s2)
