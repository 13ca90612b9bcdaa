"""A full disk: back-pressure and a clear error, never a 500, never a corrupt store (issue 5, item 3).

The collector runs in a private mount namespace (`unshare -m`) whose data directory is a 3 MiB tmpfs, so
the disk really fills (the LMDB map cap is far above it). The same namespace then reopens the store after
the collector is SIGKILLed, and lists the runs it holds.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

from tests.support.spans import Agent

pytestmark = pytest.mark.skipif(
    shutil.which("unshare") is None or os.geteuid() != 0, reason="needs unshare and root to mount a small tmpfs"
)

VERIFY = textwrap.dedent("""
    import json, sys
    from tracetape.collector.store import Store
    store = Store(sys.argv[1])              # opens (and would recover) the store as the collector does
    runs = sorted(r.run_id for r in store.runs())
    spans = sum(len(store.spans(r.tenant, r.scope, r.run_id)) for r in store.runs())
    blobs_ok = all(store.blob(r.tenant, r.scope, a.request_body.digest) is not None
                   for r in store.runs() for s in store.steps(r.tenant, r.scope, r.run_id)
                   for a in s.attempts if a.request_body)
    print(json.dumps({"runs": runs, "spans": spans, "blobs_ok": blobs_ok}))
""")


def _post(url: str, body: bytes) -> tuple[int, dict[str, str], bytes]:
    req = urllib.request.Request(url, data=body, method="POST",
                                 headers={"Content-Type": "application/x-protobuf"})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers), err.read()


def test_a_full_disk_is_503_with_retry_after_and_the_store_reopens_clean(tmp_path: Path) -> None:
    mnt, ctrl = tmp_path / "disk", tmp_path / "ctrl"
    mnt.mkdir()
    ctrl.mkdir()
    (ctrl / "verify.py").write_text(VERIFY)
    config = tmp_path / "otel-config.yaml"
    config.write_text(yaml.safe_dump({
        "receivers": {"otlp": {"protocols": {"http": {"endpoint": "127.0.0.1:0"}}}},
        "exporters": {"tracetape": {"path": str(mnt / "data"), "map_size": "1GiB"}},
        "service": {"pipelines": {"traces": {"receivers": ["otlp"], "exporters": ["tracetape"]}}},
    }))
    py = sys.executable
    script = f"""
        set -e
        mount -t tmpfs -o size=3m tmpfs {mnt}
        {py} -m tracetape.cli collector --config {config} --json &
        echo $! > {ctrl}/collector.pid
        wait || true
        {py} {ctrl}/verify.py {mnt}/data > {ctrl}/verify.json
    """
    proc = subprocess.Popen(["unshare", "-m", "--propagation", "private", "bash", "-c", script],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    try:
        assert proc.stdout is not None
        start = json.loads(proc.stdout.readline())
        url = start["http"][0]
        acked: list[str] = []
        statuses: list[int] = []
        refusal: tuple[dict[str, str], bytes] | None = None
        for i in range(200):  # 200 x 256 KB of incompressible payload: ~17 times the disk
            agent = Agent(run_id=f"run-{i}")
            agent.model_step(1, body=os.urandom(64 * 1024).hex().encode(), response=os.urandom(128 * 1024))
            status, headers, body = _post(url, agent.request().SerializeToString())
            statuses.append(status)
            if status == 200:
                acked.append(f"run-{i}")
            elif refusal is None:
                refusal = (headers, body)
            if statuses[-3:] == [503, 503, 503]:
                break
        assert 500 not in statuses and set(statuses) <= {200, 503}, statuses
        assert acked and refusal is not None, statuses
        headers, body = refusal
        assert int(headers["Retry-After"]) >= 1 and b"cannot write" in body
        health = urllib.request.urlopen(url.replace("/v1/traces", "/healthz"), timeout=10)
        assert health.status == 200  # the collector still answers while the disk is full
        os.kill(int((ctrl / "collector.pid").read_text()), signal.SIGKILL)
        proc.wait(60)
    finally:  # on a failed assertion too: the collector inside the namespace must not outlive the test
        pid_file = ctrl / "collector.pid"
        if pid_file.exists() and pid_file.read_text().strip():
            try:
                os.kill(int(pid_file.read_text()), signal.SIGKILL)
            except ProcessLookupError:
                pass
        if proc.poll() is None:
            proc.kill()
        proc.wait(60)
    verified = json.loads((ctrl / "verify.json").read_text())
    assert verified["blobs_ok"] and set(acked) <= set(verified["runs"]), (acked, verified)
    assert verified["spans"] >= len(acked)
