"""The state of a sweep's runs: ``python -m grokhpc.status SWEEP_DIR [--json] [--all]``.

Reads ``SWEEP_DIR/manifest.json`` and each run directory, and -- where the scheduler is at hand
(``squeue``/``sacct`` on PATH) -- the state of the SLURM jobs the manifest lists. A run is

  done       trained, measured and summarised (progress.json done, summary.json)
  running    its job runs now (or, locally, its job's process is alive)
  requeued   its job was requeued (preempted, timed out, ``scontrol requeue``) and waits to resume
  pending    queued, or not submitted yet
  failed     error.txt, or its job ended FAILED / TIMEOUT / OUT_OF_MEMORY / NODE_FAIL
  cancelled  its job was cancelled before the run finished (relaunch to resume it)

with the epochs done out of planned and, for failed runs, the last line of the error (from
error.txt, else from the job's submitit log). No torch import: this answers in a blink.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

from .store import RunDir, RunDirError, read_json

MANIFEST = "manifest.json"
STATES = ("done", "running", "requeued", "pending", "failed", "cancelled")
FAILED_STATES = {"FAILED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "BOOT_FAIL", "DEADLINE"}
QUEUED_STATES = {"PENDING", "CONFIGURING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED",
                 "SUSPENDED", "PREEMPTED"}
RUNNING_STATES = {"RUNNING", "COMPLETING", "SIGNALING", "STAGE_OUT", "RESIZING"}
_EXC_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Interrupt|Exit)\b.*")


@dataclass
class RunStatus:
    run_id: str
    state: str
    epoch: int | None
    n_epochs: int | None
    job_id: str | None = None
    job_state: str | None = None
    requeues: int = 0
    error: str | None = None
    grokked: bool | None = None
    grokking_epoch: int | None = None
    swept: dict[str, Any] = field(default_factory=dict)
    dir: str = ""


# ---- the scheduler -------------------------------------------------------------------------
def _run(cmd: list[str]) -> str:
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return ""
    return r.stdout if r.returncode == 0 else ""


def _expand_array_id(jid: str) -> list[str]:
    """``123_[0-3,7%2]`` -> 123_0 .. 123_3, 123_7; other ids unchanged."""
    m = re.fullmatch(r"(\d+)_\[([^\]]+)\]", jid)
    if not m:
        return [jid]
    base, spec = m.group(1), m.group(2).split("%")[0]
    out = []
    for part in spec.split(","):
        if "-" in part:
            a, b = part.split("-")
            out += [f"{base}_{i}" for i in range(int(a), int(b) + 1)]
        elif part.isdigit():
            out.append(f"{base}_{part}")
    return out


def scheduler_states(job_ids: Sequence[str]) -> dict[str, dict[str, Any]]:
    """{job id: {state, requeues, live}} from squeue (live jobs) and sacct (history).

    ``requeues`` counts sacct's REQUEUED/PREEMPTED records of the job (``--duplicates``)."""
    if not job_ids:
        return {}
    bases = sorted({j.split("_")[0] for j in job_ids})
    info: dict[str, dict[str, Any]] = {}
    if shutil.which("sacct"):
        out = _run(["sacct", "-n", "-P", "-X", "--duplicates", "-o", "JobID,State",
                    "-j", ",".join(bases)])
        for line in out.splitlines():
            parts = line.strip().split("|")
            if len(parts) < 2:
                continue
            state = parts[1].split()[0] if parts[1] else ""
            for jid in _expand_array_id(parts[0]):
                d = info.setdefault(jid, {"state": None, "requeues": 0, "live": False})
                if state in ("REQUEUED", "PREEMPTED"):
                    d["requeues"] += 1
                d["state"] = d["sacct"] = state   # oldest first: the last record is current
    if shutil.which("squeue"):
        out = _run(["squeue", "-h", "-r", "-o", "%i %T", "-j", ",".join(bases)])
        for line in out.splitlines():
            parts = line.split()
            if len(parts) == 2:
                d = info.setdefault(parts[0], {"state": None, "requeues": 0, "live": False})
                d["state"], d["live"] = parts[1], True
    return info


def _pid_alive(job_id: str) -> bool:
    try:
        pid = int(job_id)
        os.kill(pid, 0)
    except (ValueError, ProcessLookupError, PermissionError, OverflowError):
        return False
    return Path(f"/proc/{pid}").exists()


# ---- errors from logs -----------------------------------------------------------------------
def last_error_line(text: str) -> str | None:
    """The last exception line of a traceback-bearing text (or its last line)."""
    lines = [ln.rstrip() for ln in text.splitlines() if ln.strip()]
    for ln in reversed(lines):
        if _EXC_LINE.match(ln.strip()):
            return ln.strip()
    return lines[-1].strip() if lines else None


def log_error(sweep_dir: Path, job_id: str) -> str | None:
    """The last exception line in the job's submitit stderr log, if any."""
    d = sweep_dir / "jobs" / job_id
    for f in sorted(d.glob("*_log.err")) if d.is_dir() else []:
        try:
            text = f.read_text(errors="replace")
        except OSError:
            continue
        if "Traceback" in text:
            return last_error_line(text[text.rfind("Traceback"):])
    return None


# ---- the sweep ------------------------------------------------------------------------------
def load_manifest(sweep_dir: Path) -> dict:
    f = sweep_dir / MANIFEST
    if not f.exists():
        raise RunDirError(f"{sweep_dir}: not a sweep directory (no {MANIFEST}); "
                          "launch the sweep first")
    return read_json(f)


def latest_jobs(manifest: dict) -> dict[str, dict]:
    latest: dict[str, dict] = {}
    for launch in manifest.get("launches", []):
        for job in launch.get("jobs", []):
            for rid in job.get("runs", []):
                latest[rid] = {"job_id": str(job["job_id"]), "executor": launch.get("executor")}
    return latest


def collect(sweep_dir: str | os.PathLike, use_scheduler: bool = True) -> list[RunStatus]:
    """One RunStatus per run of the manifest, in manifest order."""
    sweep_dir = Path(sweep_dir)
    manifest = load_manifest(sweep_dir)
    jobs = latest_jobs(manifest)
    slurm_ids = [j["job_id"] for j in jobs.values() if j["executor"] == "slurm"]
    sched = scheduler_states(slurm_ids) if use_scheduler else {}
    out = []
    for r in manifest.get("runs", []):
        rid = r["run_id"]
        run = RunDir(sweep_dir / r["dir"])  # relative to the sweep (an absolute one stays)
        try:
            prog = run.read_progress()
        except RunDirError:
            prog = None
        epoch = prog.get("epoch") if prog else None
        n_epochs = prog.get("n_epochs") if prog else None
        job = jobs.get(rid)
        st = RunStatus(run_id=rid, state="pending", epoch=epoch, n_epochs=n_epochs,
                       swept=r.get("swept", {}), dir=str(sweep_dir / r["dir"]))
        if n_epochs is None:
            try:
                st.n_epochs = run.read_config().get("n_epochs") if run.exists() else None
            except RunDirError:
                pass
        js: dict[str, Any] = {}
        if job:
            st.job_id = job["job_id"]
            if job["executor"] == "slurm":
                js = sched.get(job["job_id"], {})
                st.job_state, st.requeues = js.get("state"), js.get("requeues", 0)
            elif job["executor"] == "local" and _pid_alive(job["job_id"]):
                js = {"state": "RUNNING", "live": True}
                st.job_state = "RUNNING"
        try:
            complete = run.is_complete()
            error = run.read_error()
        except (RunDirError, OSError):
            complete, error = False, None
        job_state = js.get("state") or ""
        if complete:
            st.state = "done"
            summary = run.read_summary() or {}
            st.grokked, st.grokking_epoch = summary.get("grokked"), summary.get("grokking_epoch")
        elif js.get("live") and job_state == "COMPLETING" and js.get("sacct") == "REQUEUED":
            st.state = "requeued"     # being stopped, to be started again
        elif js.get("live") and job_state in RUNNING_STATES:
            st.state = "running"
        elif js.get("live") and job_state in QUEUED_STATES:
            st.state = "requeued" if st.requeues > 0 else "pending"
        elif error:
            st.state, st.error = "failed", last_error_line(error)
        elif job_state in FAILED_STATES:
            st.state = "failed"
            st.error = (log_error(sweep_dir, job["job_id"]) if job else None) or \
                f"job {job_state.lower()}"
        elif job_state.startswith("CANCELLED"):
            st.state = "cancelled"
        elif job_state == "COMPLETED" or (job and job["executor"] != "slurm"):
            # the job ended without finishing the run: its log says why
            err = log_error(sweep_dir, job["job_id"]) if job else None
            if err:
                st.state, st.error = "failed", err
        out.append(st)
    return out


def format_table(rows: list[RunStatus], axes: Sequence[str], show_done: bool = True) -> str:
    head = ["run_id", *axes, "state", "epochs", "job", "requeues", "grok@", "error"]
    body = []
    for r in rows:
        if r.state == "done" and not show_done:
            continue
        epochs = "-" if r.epoch is None else f"{r.epoch}/{r.n_epochs}"
        grok = "-" if not r.grokked else str(r.grokking_epoch)
        body.append([r.run_id, *[_fmt(r.swept.get(a)) for a in axes], r.state, epochs,
                     r.job_id or "-", str(r.requeues) if r.requeues else "-", grok,
                     (r.error or "")[:100]])
    widths = [max(len(x) for x in col) for col in zip(head, *body)] if body else \
        [len(h) for h in head]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa
    return "\n".join([line(head)] + [line(b) for b in body])


def _fmt(v: Any) -> str:
    return f"{v:g}" if isinstance(v, float) else ("-" if v is None else str(v))


def summary_line(rows: list[RunStatus]) -> str:
    counts = {s: sum(r.state == s for r in rows) for s in STATES}
    grokked = sum(bool(r.grokked) for r in rows)
    parts = [f"{n} {s}" for s, n in counts.items() if n]
    return f"{len(rows)} runs: " + ", ".join(parts) + f"; {grokked} grokked"


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m grokhpc.status",
                                 description="State of a sweep's runs (and their SLURM jobs).")
    ap.add_argument("sweep_dir", help="the sweep's output directory (holds manifest.json)")
    ap.add_argument("--json", action="store_true", help="one JSON object per run")
    ap.add_argument("--hide-done", action="store_true", help="leave finished runs out")
    ap.add_argument("--no-scheduler", action="store_true", help="do not ask squeue/sacct")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        rows = collect(args.sweep_dir, use_scheduler=not args.no_scheduler)
        manifest = load_manifest(Path(args.sweep_dir))
    except RunDirError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        for r in rows:
            print(json.dumps(asdict(r)))
        return 0
    print(format_table(rows, manifest.get("axes", []), show_done=not args.hide_done))
    print(summary_line(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
