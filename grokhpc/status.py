"""The state of a sweep's runs: ``python -m grokhpc.status SWEEP_DIR [--json] [--hide-done]``.

Reads ``SWEEP_DIR/manifest.json`` and each run directory, and -- where the scheduler is at hand
(``squeue``/``sacct`` on PATH) -- the state of the SLURM jobs the manifest lists. Each run is
pending, running, requeued, cancelled, failed, corrupt or done (the table of what each means is
in grokhpc.scheduler), with the epochs done out of planned, whether it grokked and, for failed
runs, the last line of the error (from error.txt, else from the job's submitit log). A done
run's last checkpoint row is checked against its checksum (``--verify``: every row). A last
line gives the state of the sweep's aggregation job, where launch submitted one (``--json``: a
last object with ``aggregation_job``, its ``state``, the jobs it waits for and that line). No
torch import: this answers in a blink.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

from . import scheduler as sched
from .scheduler import MANIFEST, RUN_STATES, JobInfo
from .store import RunDir, RunDirError

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
    d = sweep_dir / sched.JOBS_DIR / job_id
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
    manifest = sched.read_manifest(sweep_dir)
    if manifest is None:
        what = ("a run directory; open it with grokhpc.open_run" if RunDir(sweep_dir).exists()
                else "launch the sweep first")
        raise RunDirError(f"{sweep_dir}: not a sweep directory (no {MANIFEST}); {what}")
    return manifest


def job_of(job: dict | None, jobs: dict[str, JobInfo]) -> JobInfo:
    """What is known of a run's latest job (``job``: its manifest entry, None if it has none);
    ``jobs``: the scheduler's answers for the SLURM jobs (empty: not asked)."""
    if job is None:
        return sched.NO_JOB
    if job["executor"] == "slurm":
        return jobs.get(job["job_id"], sched.UNKNOWN_JOB)
    if job["executor"] == "local" and sched.pid_alive(job["job_id"]):
        return JobInfo(state="RUNNING", live=True)
    return sched.NO_JOB           # a local or debug job whose process is gone


def run_status(sweep_dir: Path, entry: dict, job: dict | None, info: JobInfo,
               verify_all: bool = False) -> RunStatus:
    """One run's RunStatus from its directory and its latest job (``verify_all``: check every
    checkpoint row of a done run, not only the last)."""
    run = RunDir(sweep_dir / entry["dir"])   # relative to the sweep (an absolute one stays)
    found = sched.read_dir(run, verify_all)
    prog = found.progress or {}
    st = RunStatus(run_id=entry["run_id"], state=found.state, epoch=prog.get("epoch"),
                   n_epochs=prog.get("n_epochs"), swept=entry.get("swept", {}), dir=str(run.path),
                   job_id=job["job_id"] if job else None, job_state=info.state,
                   requeues=info.requeues)
    if st.n_epochs is None and run.exists():
        try:
            st.n_epochs = run.read_config().get("n_epochs")
        except (RunDirError, ValueError):
            pass
    log_err = None
    if job is not None and info.ended and info.state not in sched.CANCELLED_JOB_STATES \
            and found.state not in (sched.DONE, sched.CORRUPT):
        log_err = log_error(sweep_dir, job["job_id"])
    st.state = sched.run_state(found.state, info, log_err)
    if st.state == sched.DONE:
        st.grokked = (found.summary or {}).get("grokked")
        st.grokking_epoch = (found.summary or {}).get("grokking_epoch")
    elif st.state == sched.CORRUPT:
        st.error = found.error
    elif st.state == sched.FAILED:
        st.error = (last_error_line(found.error) if found.error else None) or log_err \
            or sched.job_failure(info) or "job failed"
    return st


def collect(sweep_dir: str | os.PathLike, use_scheduler: bool = True,
            verify_all: bool = False) -> list[RunStatus]:
    """One RunStatus per run of the manifest, in manifest order."""
    sweep_dir = Path(sweep_dir)
    manifest = load_manifest(sweep_dir)
    jobs = sched.latest_jobs(manifest)
    slurm_ids = [j["job_id"] for j in jobs.values() if j["executor"] == "slurm"]
    infos = sched.query_jobs(slurm_ids) if use_scheduler else {}
    out = []
    for entry in manifest.get("runs", []):
        job = jobs.get(entry["run_id"])
        out.append(run_status(sweep_dir, entry, job, job_of(job, infos), verify_all))
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
    counts = {s: sum(r.state == s for r in rows) for s in RUN_STATES}
    grokked = sum(bool(r.grokked) for r in rows)
    parts = [f"{n} {s}" for s, n in counts.items() if n]
    return f"{len(rows)} runs: " + ", ".join(parts) + f"; {grokked} grokked"


def aggregation_status(sweep_dir: Path, manifest: dict, use_scheduler: bool = True
                       ) -> dict | None:
    """The sweep's aggregation job (grokhpc.launch submits it on SLURM) as ``status --json``
    gives it: its id, state, the jobs it waits for and ``aggregation_line``; None when there is
    none."""
    job = sched.latest_aggregation(manifest)
    if job is None:
        return None
    jid = str(job["job_id"])
    info = sched.query_jobs([jid]).get(jid, sched.UNKNOWN_JOB) if use_scheduler \
        else sched.UNKNOWN_JOB
    state = sched.job_outcome(info)
    return {"aggregation_job": jid, "state": state, "after": list(job.get("after", [])),
            "line": _aggregation_line(sweep_dir, job, jid, info, state, use_scheduler)}


def aggregation_line(sweep_dir: Path, manifest: dict, use_scheduler: bool = True) -> str | None:
    """One line on the sweep's aggregation job: its state and, once it has ended, where the
    tables are or why it failed; None when there is none."""
    agg = aggregation_status(sweep_dir, manifest, use_scheduler)
    return agg and agg["line"]


def _aggregation_line(sweep_dir: Path, job: dict, jid: str, info: JobInfo, state: str,
                      use_scheduler: bool) -> str:
    line = f"aggregation job {jid} {state}"
    if state == sched.DONE:
        return line + f": tables and figures in {sweep_dir / 'aggregate'}"
    if state == sched.FAILED:
        why = log_error(sweep_dir, jid) or sched.job_failure(info) or "job failed"
        return line + f": {why}; rerun: python -m grokhpc.aggregate {sweep_dir}"
    if state in (sched.PENDING, sched.REQUEUED):
        return line + f", after job(s) {', '.join(job.get('after', []))}"
    if state == "unknown":
        why = "the scheduler has no record of it" if use_scheduler else "--no-scheduler"
        return f"aggregation job {jid}: state unknown ({why})"
    return line


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m grokhpc.status",
                                 description="State of a sweep's runs (and their SLURM jobs).")
    ap.add_argument("sweep_dir", help="the sweep's output directory (holds manifest.json)")
    ap.add_argument("--json", action="store_true", help="one JSON object per run")
    ap.add_argument("--hide-done", action="store_true", help="leave finished runs out")
    ap.add_argument("--no-scheduler", action="store_true", help="do not ask squeue/sacct")
    ap.add_argument("--verify", action="store_true",
                    help="check every checkpoint row of finished runs against its checksum "
                         "(default: the last row only)")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        rows = collect(args.sweep_dir, use_scheduler=not args.no_scheduler,
                       verify_all=args.verify)
        manifest = load_manifest(Path(args.sweep_dir))
    except RunDirError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    agg = aggregation_status(Path(args.sweep_dir), manifest, use_scheduler=not args.no_scheduler)
    if args.json:
        for r in rows:
            print(json.dumps(asdict(r)))
        if agg:
            print(json.dumps(agg))
        return 0
    print(format_table(rows, manifest.get("axes", []), show_done=not args.hide_done))
    print(summary_line(rows))
    if agg:
        print(agg["line"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
