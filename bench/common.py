"""Shared helpers: the run context, machine facts, statistics, the table, subprocess helpers."""

from __future__ import annotations

import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"
DEPS = Path(os.environ.get("TRACETAPE_BENCH_DEPS", "/work/bench-deps"))
"""Where the peers live (installed with `pip install --target`, so they never enter the project's venv)."""


@dataclass
class Ctx:
    quick: bool
    workdir: Path
    notes: list[str] = field(default_factory=list)

    def note(self, text: str) -> None:
        print(f"  note: {text}", flush=True)
        self.notes.append(text)


def row(bench: str, case: str, metric: str, value: float | None, unit: str, *,
        ratio: float | None = None, ratio_of: str = "", target: str = "", met: bool | None = None,
        **extra: Any) -> dict[str, Any]:
    return {"bench": bench, "case": case, "metric": metric, "value": value, "unit": unit, "ratio": ratio,
            "ratio_of": ratio_of, "target": target, "met": met, **extra}


def machine() -> dict[str, Any]:
    model = ""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
    except OSError:
        pass
    mem = ""
    try:
        with open("/proc/meminfo") as f:
            mem = f.readline().split(":", 1)[1].strip()
    except OSError:
        pass
    return {"nproc": os.cpu_count(), "cpu": model, "memory": mem, "python": platform.python_version(),
            "platform": platform.platform(), "date": time.strftime("%Y-%m-%d %H:%M:%S")}


def pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    k = min(len(s) - 1, max(0, int(round(p / 100 * (len(s) - 1)))))
    return s[k]


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def proc_status_kib(pid: int, field: str) -> int | None:
    """A `/proc/PID/status` size field (`VmRSS`, `VmHWM`, ...) of a live process, in KiB; None when gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def vm_hwm_kib(pid: int) -> int | None:
    """Peak resident set size (VmHWM) of a live process, in KiB."""
    return proc_status_kib(pid, "VmHWM")


def process_tree(pid: int) -> list[int]:
    """`pid` and its live descendants (e.g. a collector and its ingest workers)."""
    from tests.support.reliability import descendants

    return [pid, *descendants(pid)]


def tree_status_kib(pid: int, field: str) -> int | None:
    """A `/proc/PID/status` size field summed over `pid` and its live descendants; None when `pid` is gone."""
    if proc_status_kib(pid, field) is None:
        return None
    return sum(proc_status_kib(p, field) or 0 for p in process_tree(pid))


def tree_cpu_seconds(pids: list[int]) -> float:
    """User + system CPU seconds used so far by these processes (those still alive)."""
    from tests.support.reliability import stat_fields

    ticks = 0
    for p in pids:
        fields = stat_fields(p)
        if fields is not None:
            ticks += int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


def python_env(extra_path: list[Path] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    paths = [str(p) for p in (extra_path or [])]
    if paths:
        env["PYTHONPATH"] = os.pathsep.join(paths + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    return env


def run_json_subprocess(module: str, args: list[str], *, env: dict[str, str] | None = None,
                        timeout: float = 600) -> Any:
    """Run `python -m module args...` from the repository root; its last stdout line is JSON."""
    proc = subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=env or dict(os.environ),
                          capture_output=True, text=True, timeout=timeout, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{module} {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if v != v:
            return "nan"
        if abs(v) >= 1000:
            return f"{v:,.0f}"
        if abs(v) >= 10:
            return f"{v:.1f}"
        return f"{v:.3g}"
    return str(v)


def table(rows: list[dict[str, Any]]) -> str:
    head = ["bench", "case", "metric", "value", "unit", "ratio", "vs", "target", "met"]
    body = [[r["bench"], r["case"], r["metric"], fmt(r["value"]), r["unit"],
             fmt(r["ratio"]), r.get("ratio_of", ""), r.get("target", ""),
             {True: "yes", False: "NO", None: ""}[r.get("met")]] for r in rows]
    widths = [max(len(str(x)) for x in col) for col in zip(head, *body)]
    lines = ["  ".join(str(x).ljust(w) for x, w in zip(head, widths))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(str(x).ljust(w) for x, w in zip(line, widths)) for line in body]
    return "\n".join(lines)
