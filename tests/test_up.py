"""`tracetape up` (the README's first command): collector and replayer in one process on one store."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path


def _post_json(url: str, body: dict[str, object]) -> tuple[int, dict[str, object]]:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                 headers={"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        return resp.status, json.loads(resp.read())


def test_up_records_and_replays_on_one_store_and_stops_on_sigterm(tmp_path: Path) -> None:
    up = subprocess.Popen(
        [sys.executable, "-m", "tracetape.cli", "up", "--data", str(tmp_path / "data"),
         "--http-port", "0", "--grpc-port", "0", "--port", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path,
    )
    try:
        assert up.stdout is not None
        collector_line, replayer_line = up.stdout.readline(), up.stdout.readline()
        endpoint = re.search(r"OTLP/HTTP (http://127\.0\.0\.1:\d+)/v1/traces", collector_line)
        replayer = re.search(r"listening on (http://127\.0\.0\.1:\d+)", replayer_line)
        assert endpoint and replayer, (collector_line, replayer_line)

        agent = tmp_path / "agent.py"
        agent.write_text("import tracetape\n\n@tracetape.tool\ndef add(a, b):\n    return a + b\n\nprint(add(2, 3))\n")
        done = subprocess.run([sys.executable, "-m", "tracetape.cli", "run", "--run-id", "up-1",
                               "--endpoint", endpoint.group(1), "--", sys.executable, str(agent)],
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0 and done.stdout.strip() == "5", done.stderr

        deadline = time.monotonic() + 20  # the run span arrives with the recorder's last flush
        while True:
            try:
                status, session = _post_json(f"{replayer.group(1)}/v1/replay/sessions",
                                             {"run_id": "up-1", "mode": "exact", "record": False})
                break
            except urllib.error.HTTPError as err:  # 409 while the run is still `running`
                assert err.code == 409 and time.monotonic() < deadline, err.read()
                time.sleep(0.2)
        assert status == 201 and session["recorded_steps"] == 1  # the replayer reads what the collector wrote
    finally:
        up.send_signal(signal.SIGTERM)
        code = up.wait(30)
    assert code == 0


def test_up_json_prints_json_only_on_stdout_with_the_replayer_url(tmp_path: Path) -> None:
    up = subprocess.Popen(
        [sys.executable, "-m", "tracetape.cli", "up", "--data", str(tmp_path / "data"),
         "--http-port", "0", "--grpc-port", "0", "--port", "0", "--json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path,
    )
    try:
        assert up.stdout is not None
        start = json.loads(up.stdout.readline())
        assert re.fullmatch(r"http://127\.0\.0\.1:\d+", start["replayer"]) and start["http"], start
        try:  # the URL is the replayer's: it answers its API (an unknown run is refused, not a 5xx)
            status = _post_json(f"{start['replayer']}/v1/replay/sessions", {"run_id": "nope", "mode": "exact"})[0]
        except urllib.error.HTTPError as err:
            status = err.code
        assert 400 <= status < 500, status
    finally:
        up.send_signal(signal.SIGTERM)
        rest, err_text = up.communicate(timeout=30)
    assert up.returncode == 0, err_text
    assert all(json.loads(line) is not None for line in rest.splitlines()), rest  # nothing but JSON on stdout
    assert "Traceback" not in err_text


def _up_stderr(tmp_path: Path, level: str) -> str:
    """`tracetape up` forwarding to a closed port, with `service.telemetry.logs.level: LEVEL`; one span sent."""
    from tests.support.spans import Agent, chat_request

    config = tmp_path / f"{level}.yaml"
    config.write_text(json.dumps({
        "receivers": {"otlp": {"protocols": {"http": {"endpoint": "127.0.0.1:0"}}}},
        "exporters": {"tracetape": {"path": str(tmp_path / level)},
                      "otlphttp/jaeger": {"endpoint": "http://127.0.0.1:9",
                                          "retry_on_failure": {"initial_interval": "50ms", "max_interval": "200ms"}}},
        "service": {"pipelines": {"traces": {"receivers": ["otlp"], "exporters": ["tracetape"]},
                                  "traces/fwd": {"receivers": ["otlp"], "exporters": ["otlphttp/jaeger"]}},
                    "telemetry": {"logs": {"level": level}}}}))
    up = subprocess.Popen([sys.executable, "-m", "tracetape.cli", "up", "--config", str(config), "--port", "0",
                           "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    try:
        assert up.stdout is not None
        start = json.loads(up.stdout.readline())
        agent = Agent(run_id=f"run-{level}", tenant="default", scope="default")
        agent.model_step(0, body=chat_request("hi"), response=b'{"id": "r"}')
        request = urllib.request.Request(start["http"][0], data=agent.request().SerializeToString(), method="POST",
                                         headers={"content-type": "application/x-protobuf"})
        with urllib.request.urlopen(request, timeout=30) as resp:
            assert resp.status == 200
        agent.shutdown()
        time.sleep(1.5)  # forwarding attempts fail meanwhile
    finally:
        up.send_signal(signal.SIGTERM)
        _, err_text = up.communicate(timeout=30)
    return err_text


def test_up_logs_at_the_configured_level(tmp_path: Path) -> None:
    """`service.telemetry.logs.level` governs `tracetape up` as it does `tracetape collector`."""
    assert "cannot deliver" in _up_stderr(tmp_path, "warn")
    quiet = _up_stderr(tmp_path, "error")
    assert "cannot deliver" not in quiet and "WARNING" not in quiet, quiet
