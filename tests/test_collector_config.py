"""The collector's otel-config.yaml: the OpenTelemetry Collector's shape, precise errors, overrides."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from tests.support.collector import collector_config, run, running_collector
from tracetape import cli
from tracetape.collector import config as cfg
from tracetape.collector.config import ConfigError
from tracetape.collector.service import CollectorService
from tracetape.errors import CliError

REPO = Path(__file__).resolve().parent.parent


def minimal(**extra: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "receivers": {"otlp": None},
        "exporters": {"tracetape": {"path": "/tmp/x"}},
        "service": {"pipelines": {"traces": {"receivers": ["otlp"], "exporters": ["tracetape"]}}},
    }
    for section, body in extra.items():
        if section == "pipelines":
            doc["service"]["pipelines"].update(body)
        else:
            doc.setdefault(section, {}).update(body)
    return doc


def error_of(doc: Any, **kw: Any) -> str:
    with pytest.raises(ConfigError) as info:
        cfg.parse(doc, **kw)
    return str(info.value)


# --- the shipped file and the defaults --------------------------------------------------------------


def test_shipped_config_parses_with_storage_and_forwarding_pipelines() -> None:
    conf = cfg.load(REPO / "otel-config.yaml", environ={})
    (receiver,) = conf.storing_receivers
    assert receiver.grpc == cfg.GrpcProtocol("127.0.0.1:4317", 64)
    assert receiver.http == cfg.HttpProtocol("127.0.0.1:4318", 67108864)
    assert conf.store.path == ".tracetape/data"
    assert conf.store.map_size == 8 * 1024**3
    (route,) = conf.forward_routes
    assert route.exporter.id == "otlphttp/jaeger"
    assert route.exporter.protocol == "http"
    assert route.exporter.url == "http://127.0.0.1:14318/v1/traces"
    assert route.exporter.timeout == 10.0
    assert route.slim.max_attribute_bytes == 16384
    assert isinstance(conf.exporters["otlp/jaeger"], cfg.OtlpExporter)
    assert conf.exporters["otlp/jaeger"].insecure is True


def test_shipped_config_takes_paths_from_the_environment() -> None:
    conf = cfg.load(REPO / "otel-config.yaml",
                    environ={"TRACETAPE_DATA": "/srv/tape", "JAEGER_OTLP_HTTP": "http://jaeger:4318"})
    assert conf.store.path == "/srv/tape"
    assert conf.forward_routes[0].exporter.url == "http://jaeger:4318/v1/traces"


def test_defaults_without_a_file() -> None:
    conf = cfg.default_config()
    (receiver,) = conf.storing_receivers
    assert (receiver.grpc.endpoint, receiver.grpc.max_recv_msg_size) == ("127.0.0.1:4317", 64 * 1024 * 1024)
    assert (receiver.http.endpoint, receiver.http.max_request_body_size) == ("127.0.0.1:4318", 67108864)
    assert conf.forward_routes == ()
    assert cfg.SlimProcessor().max_attribute_bytes == 16384


def test_the_store_is_tracetape_data_unless_the_config_names_one() -> None:
    """The same default as `runs`, `show` and `replay`: `$TRACETAPE_DATA`, else `.tracetape/data`."""
    assert cfg.parse({}, environ={}).store.path == ".tracetape/data"
    assert cfg.parse({}, environ={"TRACETAPE_DATA": "/srv/tape"}).store.path == "/srv/tape"
    named = {"receivers": {"otlp": None}, "exporters": {"tracetape": {"path": "/named"}},
             "service": {"pipelines": {"traces": {"receivers": ["otlp"], "exporters": ["tracetape"]}}}}
    assert cfg.parse(named, environ={"TRACETAPE_DATA": "/srv/tape"}).store.path == "/named"


def test_protocols_left_out_are_disabled_and_empty_ones_take_defaults() -> None:
    conf = cfg.parse(minimal(receivers={"otlp": {"protocols": {"http": None}}}))
    (receiver,) = conf.storing_receivers
    assert receiver.grpc is None
    assert receiver.http == cfg.HttpProtocol()


def test_component_ids_with_names() -> None:
    doc = minimal(
        exporters={"otlphttp/a": {"endpoint": "http://127.0.0.1:1"},
                   "otlp/b": {"endpoint": "127.0.0.1:2", "tls": {"insecure": True}, "compression": "none"}},
        processors={"tracetape_slim/small": {"max_attribute_bytes": "4KiB"}},
        pipelines={"traces/a": {"receivers": ["otlp"], "processors": ["tracetape_slim/small"], "exporters": ["otlphttp/a"]},
                   "traces/b": {"receivers": ["otlp"], "exporters": ["otlp/b"]}},
    )
    routes = {r.exporter.id: r for r in cfg.parse(doc).forward_routes}
    assert routes["otlphttp/a"].slim.max_attribute_bytes == 4096
    assert routes["otlp/b"].slim == cfg.SlimProcessor()  # no processor listed: the default cap
    assert routes["otlp/b"].exporter.protocol == "grpc"
    assert routes["otlp/b"].exporter.url == "127.0.0.1:2"
    assert routes["otlp/b"].exporter.compression == "none"


def test_exporter_options() -> None:
    doc = minimal(exporters={"otlphttp/j": {
        "traces_endpoint": "https://jaeger.example/otlp/v1/traces", "timeout": "2500ms",
        "headers": {"x-scope-orgid": "team-a"},
        "retry_on_failure": {"initial_interval": "100ms", "max_interval": "1m", "max_elapsed_time": "1h30m"},
        "sending_queue": {"batch": {"max_size": 100, "max_bytes": "1MiB"}},
    }}, pipelines={"traces/j": {"receivers": ["otlp"], "exporters": ["otlphttp/j"]}})
    exp = cfg.parse(doc).forward_routes[0].exporter
    assert exp.url == "https://jaeger.example/otlp/v1/traces"
    assert exp.insecure is False
    assert exp.timeout == 2.5
    assert exp.headers == (("x-scope-orgid", "team-a"),)
    assert (exp.retry.initial_interval, exp.retry.max_interval, exp.retry.max_elapsed_time) == (0.1, 60.0, 5400.0)
    assert (exp.max_batch_spans, exp.max_batch_bytes) == (100, 1024 * 1024)


@pytest.mark.parametrize(("text", "expected"), [
    ("1GiB", 1024**3), ("64MiB", 64 * 1024**2), ("500MB", 500 * 10**6), ("4096", 4096), (1048576, 1048576),
    ("1.5KiB", 1536), ("2 GiB", 2 * 1024**3),
])
def test_sizes(text: Any, expected: int) -> None:
    assert cfg.parse_size(text) == expected


@pytest.mark.parametrize(("text", "expected"), [("10s", 10.0), ("500ms", 0.5), ("1m30s", 90.0), (5, 5.0), ("2h", 7200.0)])
def test_durations(text: Any, expected: float) -> None:
    assert cfg.parse_duration(text) == expected


# --- errors name what is wrong -------------------------------------------------------------------------


def test_unknown_key_in_an_exporter_is_named() -> None:
    doc = minimal(exporters={"otlphttp/jaeger": {"endpointt": "http://127.0.0.1:14318"}})
    message = error_of(doc)
    assert message.startswith("exporters.otlphttp/jaeger: unknown key 'endpointt'")
    assert "did you mean 'endpoint'" in message


@pytest.mark.parametrize(("doc", "expected"), [
    (minimal(receivers={"otlp": {"protocols": {"http": {"endpont": "127.0.0.1:1"}}}}),
     "receivers.otlp.protocols.http: unknown key 'endpont'"),
    (minimal(receivers={"otlp": {"protocols": {"grpc": {"max_recv_msg_size": 4}}}}),
     "receivers.otlp.protocols.grpc: unknown key 'max_recv_msg_size'"),
    (minimal(receivers={"otlp": {"protocols": {"thrift": None}}}), "receivers.otlp.protocols: unknown key 'thrift'"),
    (minimal(processors={"tracetape_slim": {"max_attribute_byte": 10}}),
     "processors.tracetape_slim: unknown key 'max_attribute_byte'"),
    (minimal(exporters={"tracetape": {"path": "/x", "mapsize": "1GiB"}}), "exporters.tracetape: unknown key 'mapsize'"),
    (minimal(exporters={"otlp/j": {"endpoint": "h:1", "tls": {"insecure_skip_verify": True}}}),
     "exporters.otlp/j.tls: unknown key 'insecure_skip_verify'"),
    ({**minimal(), "servce": {}}, "unknown key 'servce' (did you mean 'service'?)"),
    (minimal(pipelines={"traces": {"receivers": ["otlp"], "exporter": ["tracetape"]}}),
     "service.pipelines.traces: unknown key 'exporter'"),
])
def test_unknown_keys_are_named_with_their_path(doc: dict[str, Any], expected: str) -> None:
    assert expected in error_of(doc)


@pytest.mark.parametrize(("doc", "expected"), [
    (minimal(receivers={"zipkin": None}), "receivers.zipkin: unknown receiver type 'zipkin'"),
    (minimal(processors={"batch": None}), "processors.batch: unknown processor type 'batch'"),
    (minimal(exporters={"kafka/x": None}), "exporters.kafka/x: unknown exporter type 'kafka'"),
    (minimal(extensions={"health_check": None}), "extensions.health_check: unknown extension type 'health_check'"),
    (minimal(receivers={"otlp/": None}), "receivers: invalid component id 'otlp/'"),
])
def test_unknown_component_types_are_named(doc: dict[str, Any], expected: str) -> None:
    assert expected in error_of(doc)


def test_pipeline_naming_an_undefined_component_is_named() -> None:
    doc = minimal(exporters={"otlphttp/jaeger": {"endpoint": "http://127.0.0.1:1"}},
                  pipelines={"traces/jaeger": {"receivers": ["otlp"], "exporters": ["otlphttp/jaegr"]}})
    message = error_of(doc)
    assert message.startswith("service.pipelines.traces/jaeger.exporters: 'otlphttp/jaegr' is not defined under exporters:")
    assert "did you mean 'otlphttp/jaeger'" in message
    doc = minimal(pipelines={"traces": {"receivers": ["otlp/2"], "exporters": ["tracetape"]}})
    assert "service.pipelines.traces.receivers: 'otlp/2' is not defined under receivers:" in error_of(doc)
    doc = minimal(pipelines={"traces/x": {"receivers": ["otlp"], "processors": ["tracetape_slim"], "exporters": ["tracetape"]}})
    assert "service.pipelines.traces/x.processors: 'tracetape_slim' is not defined under processors:" in error_of(doc)


@pytest.mark.parametrize(("doc", "expected"), [
    (minimal(pipelines={"metrics": {"receivers": ["otlp"], "exporters": ["tracetape"]}}),
     "service.pipelines.metrics: unsupported signal 'metrics'"),
    ({"receivers": {"otlp": None}, "exporters": {"otlphttp/j": {"endpoint": "http://h:1"}},
      "service": {"pipelines": {"traces": {"receivers": ["otlp"], "exporters": ["otlphttp/j"]}}}},
     "no pipeline exports to 'tracetape'"),
    (minimal(processors={"tracetape_slim": None},
             pipelines={"traces": {"receivers": ["otlp"], "processors": ["tracetape_slim"], "exporters": ["tracetape"]}}),
     "service.pipelines.traces.processors: a pipeline exporting to the store takes no processors"),
    (minimal(exporters={"otlphttp/j": {"endpoint": "http://h:1"}},
             pipelines={"traces": {"receivers": ["otlp"], "exporters": ["tracetape", "otlphttp/j"]}}),
     "service.pipelines.traces.exporters: 'otlphttp/j' cannot share a pipeline with the store"),
    (minimal(receivers={"otlp/other": None}, exporters={"otlphttp/j": {"endpoint": "http://h:1"}},
             pipelines={"traces/j": {"receivers": ["otlp/other"], "exporters": ["otlphttp/j"]}}),
     "service.pipelines.traces/j.receivers: 'otlp/other' does not feed the store"),
    (minimal(exporters={"otlphttp/j": {}}), "exporters.otlphttp/j: 'endpoint' is required"),
    (minimal(exporters={"otlphttp/j": {"endpoint": "127.0.0.1:4318"}}),
     "exporters.otlphttp/j.endpoint: expected an http:// or https:// URL"),
    (minimal(exporters={"otlp/j": {"endpoint": "nohost"}}), "exporters.otlp/j.endpoint: expected host:port"),
    (minimal(receivers={"otlp": {"protocols": {"grpc": {"endpoint": "127.0.0.1:99999"}}}}),
     "receivers.otlp.protocols.grpc.endpoint: port 99999 is out of range"),
    (minimal(receivers={"otlp": {"protocols": {"http": {"max_request_body_size": "lots"}}}}),
     "receivers.otlp.protocols.http.max_request_body_size: expected a size"),
    (minimal(exporters={"tracetape": {"path": "/x", "map_size": "1 gigabyte"}}), "exporters.tracetape.map_size: expected a size"),
    (minimal(exporters={"otlphttp/j": {"endpoint": "http://h:1", "timeout": "soon"}}),
     "exporters.otlphttp/j.timeout: expected a duration"),
    (minimal(exporters={"otlphttp/j": {"endpoint": "http://h:1", "compression": "br"}}),
     "exporters.otlphttp/j.compression: unsupported 'br'"),
    (minimal(receivers={"otlp": {"protocols": {"grpc": {"max_recv_msg_size_mib": "many"}}}}),
     "receivers.otlp.protocols.grpc.max_recv_msg_size_mib: expected an integer"),
    ({"receivers": ["otlp"]}, "receivers: expected a mapping, got a list"),
    (minimal(pipelines={"traces": {"receivers": "otlp", "exporters": ["tracetape"]}}),
     "service.pipelines.traces.receivers: expected a list of component ids"),
    (minimal(service={"extensions": ["health_check"]}), "service.extensions[0]: extension 'health_check' is not defined"),
    (minimal(service={"telemetry": {"logs": {"level": "loud"}}}), "service.telemetry.logs.level: unknown level 'loud'"),
])
def test_invalid_configs_are_explained(doc: dict[str, Any], expected: str) -> None:
    assert expected in error_of(doc)


# --- environment substitution -------------------------------------------------------------------------


def test_environment_substitution() -> None:
    doc = minimal(exporters={"tracetape": {"path": "${env:DATA_DIR}/tape", "map_size": "${env:MAP:-2GiB}"},
                             "otlphttp/j": {"endpoint": "${JAEGER}", "headers": {"authorization": "Bearer $${not_env}"}}},
                  pipelines={"traces/j": {"receivers": ["otlp"], "exporters": ["otlphttp/j"]}},
                  receivers={"otlp": {"protocols": {"http": {"endpoint": "127.0.0.1:${env:PORT}"}}}})
    conf = cfg.parse(doc, environ={"DATA_DIR": "/var/lib", "JAEGER": "http://j:4318", "PORT": "5318"})
    assert conf.store.path == "/var/lib/tape"
    assert conf.store.map_size == 2 * 1024**3
    assert conf.forward_routes[0].exporter.url == "http://j:4318/v1/traces"
    assert conf.forward_routes[0].exporter.headers == (("authorization", "Bearer ${not_env}"),)
    assert conf.storing_receivers[0].http.port == 5318


def test_missing_environment_variable_is_named_with_its_place() -> None:
    doc = minimal(exporters={"tracetape": {"path": "${env:NOPE_DIR}"}})
    message = error_of(doc, environ={})
    assert message.startswith("exporters.tracetape.path: environment variable NOPE_DIR is not set")
    doc = minimal(exporters={"tracetape": {"path": "${file:/etc/x}"}})
    assert "exporters.tracetape.path: unsupported config provider 'file'" in error_of(doc, environ={})


# --- CLI overrides -------------------------------------------------------------------------------------


def test_overrides_apply_on_top_of_the_file() -> None:
    conf = cfg.parse(minimal(receivers={"otlp": {"protocols": {"http": {"endpoint": "127.0.0.1:9000"}}}}))
    over = conf.with_overrides(data="/data/here", host="127.0.0.2", http_port=9100, grpc_port=9200)
    (receiver,) = over.storing_receivers
    assert over.store.path == "/data/here"
    assert receiver.http.endpoint == "127.0.0.2:9100"
    assert receiver.grpc is not None and receiver.grpc.endpoint == "127.0.0.2:9200"  # enabled by --grpc-port
    assert conf.store.path == "/tmp/x"  # the original is frozen and unchanged
    with pytest.raises(AttributeError):
        conf.store.path = "/elsewhere"  # type: ignore[misc]


def test_overrides_keep_ipv6_hosts_bracketed() -> None:
    conf = cfg.default_config().with_overrides(host="::1", http_port=0)
    assert conf.storing_receivers[0].http.endpoint == "[::1]:0"
    assert conf.storing_receivers[0].http.host == "::1"


# --- from the command line ----------------------------------------------------------------------------


def test_cli_reports_a_bad_config_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "otel-config.yaml"
    path.write_text(textwrap.dedent("""
        receivers:
          otlp:
        exporters:
          tracetape:
          otlphttp/jaeger:
            endpointt: http://127.0.0.1:14318
        service:
          pipelines:
            traces: {receivers: [otlp], exporters: [tracetape]}
    """))
    assert cli.main(["collector", "--config", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("tracetape collector: exporters.otlphttp/jaeger: unknown key 'endpointt'")
    assert "\n" not in err


def test_cli_reports_yaml_errors_and_missing_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("receivers:\n  otlp: [\n")
    assert cli.main(["collector", "--config", str(bad), "--json"]) == 2
    out = capsys.readouterr().out
    assert '"error"' in out and "line" in out
    assert cli.main(["collector", "--config", str(tmp_path / "missing.yaml")]) == 2
    assert "not found" in capsys.readouterr().err


def cli_error_line(*args: str, cwd: Path) -> str:
    """The one line `tracetape ARGS` prints on stderr when it refuses (exit 2, never a traceback)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRACETAPE_")}
    done = subprocess.run([sys.executable, "-m", "tracetape.cli", *args], cwd=cwd, env=env, stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, errors="replace", timeout=60)
    assert "Traceback" not in done.stderr, done.stderr
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    return lines[0]


def test_cli_reports_a_config_file_that_is_not_utf8(tmp_path: Path) -> None:
    (tmp_path / "bad.yaml").write_bytes(b"receivers:\n  otlp: {}\n# caf\xe9\n\xff\xfe")
    line = cli_error_line("collector", "--config", "bad.yaml", cwd=tmp_path)
    assert line == "tracetape collector: config file 'bad.yaml' is not UTF-8 text (invalid byte at offset 27)"


def test_grpc_message_limit_must_fit_grpcs_int(tmp_path: Path) -> None:
    # gRPC takes the limit in bytes as a signed 32-bit int: 2047 MiB is the most that fits
    doc = minimal(receivers={"otlp": {"protocols": {"grpc": {"max_recv_msg_size_mib": 2048}}}})
    assert error_of(doc) == "receivers.otlp.protocols.grpc.max_recv_msg_size_mib: must be between 1 and 2047, got 2048"
    doc = minimal(receivers={"otlp": {"protocols": {"grpc": {"max_recv_msg_size_mib": 0}}}})
    assert "max_recv_msg_size_mib: must be between 1 and 2047, got 0" in error_of(doc)

    async def scenario() -> None:  # the largest value accepted is one gRPC takes
        async with running_collector(collector_config(tmp_path / "data", max_grpc_mib=2047)) as service:
            assert service.addresses["grpc"]

    run(scenario())
    (tmp_path / "big.yaml").write_text(textwrap.dedent(f"""
        receivers:
          otlp:
            protocols:
              grpc: {{endpoint: "127.0.0.1:0", max_recv_msg_size_mib: 100000}}
        exporters:
          tracetape: {{path: {tmp_path / "data2"}}}
        service:
          pipelines:
            traces: {{receivers: [otlp], exporters: [tracetape]}}
    """))
    line = cli_error_line("collector", "--config", "big.yaml", cwd=tmp_path)
    assert line == ("tracetape collector: receivers.otlp.protocols.grpc.max_recv_msg_size_mib: "
                    "must be between 1 and 2047, got 100000")
    assert not (tmp_path / "data2").exists()  # refused before anything started


def test_a_store_path_with_a_nul_byte_is_refused(tmp_path: Path) -> None:
    assert error_of(minimal(exporters={"tracetape": {"path": "/tmp/a\0b"}})) == (
        "exporters.tracetape.path: must not contain a NUL byte")
    (tmp_path / "nul.yaml").write_text(textwrap.dedent("""
        receivers:
          otlp:
            protocols:
              http: {endpoint: "127.0.0.1:0"}
        exporters:
          tracetape: {path: "data\\0x"}
        service:
          pipelines:
            traces: {receivers: [otlp], exporters: [tracetape]}
    """))
    line = cli_error_line("collector", "--config", "nul.yaml", cwd=tmp_path)
    assert line == "tracetape collector: exporters.tracetape.path: must not contain a NUL byte"
    assert list(tmp_path.iterdir()) == [tmp_path / "nul.yaml"]
    # a path that reaches the service unchecked (an override) stops it with a CliError, not a ValueError
    conf = cfg.default_config().with_overrides(data=str(tmp_path / "d\0x"), http_port=0, grpc_port=0)
    with pytest.raises(CliError) as info:
        run(CollectorService(conf).start())
    assert "cannot open the store at" in str(info.value) and "embedded null byte" in str(info.value)
