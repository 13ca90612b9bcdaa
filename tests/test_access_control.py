"""Access control (issue 5, item 6): API keys → tenants, over real sockets, enforced at the store-key level.

- ingest (OTLP/HTTP and OTLP/gRPC) without a valid key: 401 / UNAUTHENTICATED, nothing stored; with a key,
  spans are stored under the key's tenant whatever they claim;
- the replayer: a key of tenant A can neither open a replay of B's run nor read or delete B's session
  (403), replays A's own runs, and the replay it records lands in A;
- `TenantStore`: every read of another tenant's data returns nothing, and every key it reads starts with
  its own tenant;
- keys never appear in a response body, a log record or the store; services bind 127.0.0.1 by default.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import logging
import os
import secrets
import sys
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest
from google.rpc import code_pb2, status_pb2
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans

from tests.support.collector import grpc_endpoint, http_url, run, running_collector
from tests.support.spans import RESPONSE, Agent, chat_request
from tracetape.collector import auth, ingest, keys
from tracetape.collector import config as cfg
from tracetape.collector.config import ConfigError
from tracetape.collector.service import CollectorService
from tracetape.collector.store import Store
from tracetape.collector.tenant_store import TenantStore
from tracetape.errors import CliError
from tracetape.instrumentation import contract as c
from tracetape.cli import main
from tracetape.instrumentation.config import RecorderConfig
from tracetape.replayer import service as replayer_service
from tracetape.replayer.service import ReplayerService

ROOT = Path(__file__).resolve().parent.parent
KEY_A = "ttk-alpha-" + secrets.token_hex(16)
KEY_B = "ttk-bravo-" + secrets.token_hex(16)
KEY_A_PROD = "ttk-alpha-prod-" + secrets.token_hex(16)
WRONG = "ttk-wrong-" + secrets.token_hex(16)
ALL_KEYS = (KEY_A, KEY_B, KEY_A_PROD, WRONG)
PB = {"Content-Type": "application/x-protobuf"}


def keys_list() -> list[dict[str, Any]]:
    return [
        {"sha256": auth.hash_key(KEY_A), "tenant": "A"},
        {"sha256": auth.hash_key(KEY_B), "tenant": "B"},
        {"sha256": auth.hash_key(KEY_A_PROD), "tenant": "A", "scopes": ["prod"]},
    ]


def auth_doc(data: Path, **extension: Any) -> dict[str, Any]:
    """A collector config with API keys on both protocols, on free 127.0.0.1 ports."""
    return {
        "receivers": {"otlp": {"protocols": {
            "grpc": {"endpoint": "127.0.0.1:0", "auth": {"authenticator": "tracetape_auth"}},
            "http": {"endpoint": "127.0.0.1:0", "auth": {"authenticator": "tracetape_auth"}},
        }}},
        "exporters": {"tracetape": {"path": str(data)}},
        "extensions": {"tracetape_auth": extension or {"keys": keys_list()}},
        "service": {"extensions": ["tracetape_auth"],
                    "pipelines": {"traces": {"receivers": ["otlp"], "exporters": ["tracetape"]}}},
    }


def agent_request(run_id: str, tenant: str, scope: str = "prod", steps: int = 2) -> ExportTraceServiceRequest:
    agent = Agent(run_id=run_id, tenant=tenant, scope=scope)
    for i in range(1, steps + 1):
        agent.model_step(i)
    agent.run_span()
    req = agent.request()
    agent.shutdown()
    return req


def stored_tenants(store: Store) -> set[str]:
    """The tenants of every key in every tenant-scoped table."""
    found = set()
    for table, key, _ in store.dump():
        if table in ("runs", "steps", "envelopes", "blobs", "spans"):
            found.add(key.split(keys.SEP, 1)[0].decode())
    return found


def assert_no_key_in(blob: bytes | str, where: str) -> None:
    data = blob.encode() if isinstance(blob, str) else blob
    for key in ALL_KEYS:
        assert key.encode() not in data, f"an API key leaked into {where}"
        assert auth.hash_key(key).encode() not in data, f"an API key's digest leaked into {where}"


async def post(url: str, body: bytes, headers: dict[str, str]) -> tuple[int, dict[str, str], bytes]:
    async with aiohttp.ClientSession() as session:
        async with session.post(url, data=body, headers=headers) as resp:
            return resp.status, dict(resp.headers), await resp.read()


# --- ingest -------------------------------------------------------------------------------------------------


def test_http_ingest_needs_a_valid_key_and_stores_under_its_tenant(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    bodies: list[bytes] = []

    async def scenario() -> None:
        async with running_collector(cfg.parse(auth_doc(tmp_path / "data"))) as svc:
            url = http_url(svc)
            raw = agent_request("run-claims-b", tenant="B").SerializeToString()
            for headers in ({}, {"x-api-key": WRONG}, {"Authorization": f"Bearer {WRONG}"},
                            {"Authorization": KEY_A}, {"x-api-key": ""}):
                status, resp_headers, body = await post(url, raw, {**PB, **headers})
                bodies.append(body)
                assert status == 401, headers
                assert resp_headers["WWW-Authenticate"].startswith("Bearer")
                assert status_pb2.Status.FromString(body).code == code_pb2.UNAUTHENTICATED
            status, _, body = await post(url, b"{}", {"Content-Type": "application/json", "x-api-key": WRONG})
            bodies.append(body)
            assert status == 401 and json.loads(body)["code"] == code_pb2.UNAUTHENTICATED  # JSON in, JSON out
            assert svc.store.stats()["spans"] == 0 and svc.store.runs() == []  # nothing stored

            status, _, body = await post(url, raw, {**PB, "x-api-key": KEY_A})
            bodies.append(body)
            assert status == 200
            assert ExportTraceServiceResponse.FromString(body).partial_success.rejected_spans == 0
            assert [r.run_id for r in svc.store.runs("A")] == ["run-claims-b"]
            assert svc.store.runs("B") == []  # what the spans claimed does not matter
            assert stored_tenants(svc.store) == {"A"}
            for stored in svc.store.spans("A", "prod", "run-claims-b"):
                for ss in ResourceSpans.FromString(stored).scope_spans:
                    for span in ss.spans:
                        tenant = [kv.value.string_value for kv in span.attributes if kv.key == c.TENANT]
                        assert tenant == ["A"]

            status, _, _ = await post(url, agent_request("run-b", tenant="whatever").SerializeToString(),
                                      {**PB, "Authorization": f"Bearer {KEY_B}"})
            assert status == 200 and [r.run_id for r in svc.store.runs("B")] == ["run-b"]

            # a key limited to scope prod: spans of other scopes are rejected, the rest stored
            mixed = agent_request("run-dev", tenant="A", scope="dev")
            mixed.resource_spans.extend(agent_request("run-prod", tenant="A", scope="prod").resource_spans)
            status, _, body = await post(url, mixed.SerializeToString(), {**PB, "x-api-key": KEY_A_PROD})
            bodies.append(body)
            partial = ExportTraceServiceResponse.FromString(body).partial_success
            assert status == 200 and partial.rejected_spans == 3 and "not one this API key may write" in partial.error_message
            assert [r.run_id for r in svc.store.runs("A", "dev")] == []
            assert {r.run_id for r in svc.store.runs("A", "prod")} == {"run-claims-b", "run-prod"}

            # /metrics needs a key; /healthz says only "ok" without one
            async with aiohttp.ClientSession() as session:
                base = url.rsplit("/v1/traces", 1)[0]
                async with session.get(f"{base}/metrics") as resp:
                    assert resp.status == 401
                    bodies.append(await resp.read())
                async with session.get(f"{base}/metrics", headers={"x-api-key": KEY_B}) as resp:
                    assert resp.status == 200
                async with session.get(f"{base}/healthz") as resp:
                    assert await resp.json() == {"status": "ok"}
                async with session.get(f"{base}/healthz", headers={"x-api-key": KEY_A}) as resp:
                    assert "store" in await resp.json()
            for table, key, value in svc.store.dump():
                assert_no_key_in(key + value, f"the store ({table})")

    run(scenario())
    for body in bodies:
        assert_no_key_in(body, "a response body")
    assert_no_key_in(caplog.text, "the logs")


def test_grpc_ingest_needs_a_valid_key_and_stores_under_its_tenant(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    method = "/opentelemetry.proto.collector.trace.v1.TraceService/Export"

    async def scenario() -> None:
        async with running_collector(cfg.parse(auth_doc(tmp_path / "data"))) as svc:
            async with grpc.aio.insecure_channel(grpc_endpoint(svc)) as channel:
                export = channel.unary_unary(method, request_serializer=ExportTraceServiceRequest.SerializeToString,
                                             response_deserializer=ExportTraceServiceResponse.FromString)
                req = agent_request("run-grpc", tenant="B")
                for metadata in ((), (("x-api-key", WRONG),), (("authorization", f"Bearer {WRONG}"),)):
                    with pytest.raises(grpc.aio.AioRpcError) as info:
                        await export(req, metadata=metadata, timeout=10)
                    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
                    assert_no_key_in(info.value.details() or "", "a gRPC status message")
                assert svc.store.stats()["spans"] == 0
                resp = await export(req, metadata=(("x-api-key", KEY_A),), timeout=10)
                assert resp.partial_success.rejected_spans == 0
                resp = await export(agent_request("run-grpc-2", tenant="A"),
                                    metadata=(("authorization", f"Bearer {KEY_B}"),), timeout=10)
                assert resp.partial_success.rejected_spans == 0
            assert [r.run_id for r in svc.store.runs("A")] == ["run-grpc"]
            assert [r.run_id for r in svc.store.runs("B")] == ["run-grpc-2"]
            for table, key, value in svc.store.dump():
                assert_no_key_in(key + value, f"the store ({table})")

    run(scenario())
    assert_no_key_in(caplog.text, "the logs")


def test_tracetape_run_sends_TRACETAPE_API_KEY(tmp_path: Path) -> None:
    """`tracetape run` with TRACETAPE_API_KEY: the collector stores the run under the key's tenant."""

    async def scenario() -> None:
        async with running_collector(cfg.parse(auth_doc(tmp_path / "data"))) as svc:
            endpoint = http_url(svc).rsplit("/v1/traces", 1)[0]
            env = {k: v for k, v in os.environ.items() if not k.startswith(("TRACETAPE_", "OTEL_"))}
            env.update(PYTHONPATH=str(ROOT), TRACETAPE_ENDPOINT=endpoint, TRACETAPE_API_KEY=KEY_B,
                       TRACETAPE_TENANT="A", TRACETAPE_SCOPE="prod")
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "tracetape.cli", "run", "--run-id", "run-wrapped", "--",
                sys.executable, "-c", "pass", env=env,
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
            out, err = await proc.communicate()
            assert proc.returncode == 0, err.decode()
            assert_no_key_in(out + err, "tracetape run's output")
            assert [r.run_id for r in svc.store.runs("B")] == ["run-wrapped"]
            assert svc.store.runs("A") == []
            for table, key, value in svc.store.dump():
                assert_no_key_in(key + value, f"the store ({table})")

    run(scenario())
    assert KEY_A not in repr(RecorderConfig(run_id="r", api_key=KEY_A))
    assert RecorderConfig.from_env({"TRACETAPE_API_KEY": f" {KEY_A} "}).api_key == KEY_A


# --- replay -------------------------------------------------------------------------------------------------


async def api(session: aiohttp.ClientSession, method: str, url: str, key: str | None = None,
              body: Any = None, sink: list[bytes] | None = None) -> tuple[int, Any]:
    headers = {"x-api-key": key} if key else {}
    async with session.request(method, url, json=body, headers=headers) as resp:
        raw = await resp.read()
        if sink is not None:
            sink.append(raw)
        return resp.status, json.loads(raw) if raw else None


def test_replay_is_limited_to_the_keys_tenant(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    bodies: list[bytes] = []

    async def scenario() -> None:
        runs = (("run-a", KEY_A), ("run-b", KEY_B), ("run-twin", KEY_B), ("run-twin", KEY_A))
        async with keyed_collector_and_replayer(tmp_path / "data", runs) as (svc, replayer):
            await replay_checks(replayer.url, svc, bodies)
            await replayer.stop()
            for table, key, value in svc.store.dump():
                assert_no_key_in(key + value, f"the store ({table})")

    run(scenario())
    for body in bodies:
        assert_no_key_in(body, "a response body")
    assert_no_key_in(caplog.text, "the logs")


@contextlib.asynccontextmanager
async def keyed_collector_and_replayer(
        data: Path, runs: Sequence[tuple[str, str]], **replayer_options: Any,
) -> AsyncIterator[tuple[CollectorService, ReplayerService]]:
    """A collector requiring keys with each `(run id, key)` of `runs` recorded through it, and a replayer on its
    store exporting replays to it (stopped on exit, if the caller has not stopped it)."""
    config = cfg.parse(auth_doc(data))
    async with running_collector(config) as svc:
        url = http_url(svc)
        for run_id, key in runs:
            status, _, _ = await post(url, agent_request(run_id, tenant="x").SerializeToString(),
                                      {**PB, "x-api-key": key})
            assert status == 200
        replayer = ReplayerService(store=svc.store, port=0, authenticator=config.authenticator,
                                   collector=url.rsplit("/v1/traces", 1)[0], **replayer_options)
        await replayer.start()
        try:
            yield svc, replayer
        finally:
            await replayer.stop()


async def replay_checks(base: str, svc: CollectorService, bodies: list[bytes]) -> None:
    sessions = f"{base}/v1/replay/sessions"
    async with aiohttp.ClientSession() as http:
        for key in (None, WRONG):
            status, body = await api(http, "POST", sessions, key, {"run_id": "run-a"}, bodies)
            assert (status, body["error"]) == (401, "unauthenticated")
            assert (await api(http, "GET", sessions, key, sink=bodies))[0] == 401

        # B's run, absent runs and naming tenant B: the same 403, which never says whether the run exists
        foreign = await api(http, "POST", sessions, KEY_A, {"run_id": "run-b", "force": True}, bodies)
        absent = await api(http, "POST", sessions, KEY_A, {"run_id": "run-nowhere", "force": True}, bodies)
        named = await api(http, "POST", sessions, KEY_A, {"run_id": "run-b", "tenant": "B", "scope": "prod"}, bodies)
        assert foreign[0] == absent[0] == named[0] == 403
        assert foreign[1]["error"] == "forbidden"
        assert {k: v for k, v in foreign[1].items() if k != "run"} == \
               {k: (v.replace("run-nowhere", "run-b") if isinstance(v, str) else v)
                for k, v in absent[1].items() if k != "run"}
        assert (await api(http, "POST", sessions, KEY_A_PROD, {"run_id": "run-b"}, bodies))[0] == 403
        # an id both tenants recorded is A's own for A's key: B's copy is neither used nor mentioned
        status, twin = await api(http, "POST", sessions, KEY_A, {"run_id": "run-twin", "record": False}, bodies)
        assert status == 201 and (twin["tenant"], twin["scope"]) == ("A", "prod")
        assert (await api(http, "DELETE", f"{sessions}/{twin['session_id']}", KEY_A, sink=bodies))[0] == 200

        # A's own run replays: a request answered from the tape
        status, created = await api(http, "POST", sessions, KEY_A, {"run_id": "run-a"}, bodies)
        assert status == 201, created
        assert created["tenant"] == "A"
        sid = created["session_id"]
        proxy = f"{created['base_urls']['openai']}/chat/completions"
        async with http.post(proxy, data=chat_request("question 1"),
                             headers={"content-type": "application/json", "x-api-key": "sk-provider-key-not-ours"}) as resp:
            assert resp.status == 200, await resp.text()
            assert await resp.read() == RESPONSE

        # B can neither read, list nor delete A's session
        assert await api(http, "GET", f"{sessions}/{sid}", KEY_B, sink=bodies) == \
               (403, {"error": "forbidden", "message": "this replay session belongs to another tenant"})
        assert (await api(http, "DELETE", f"{sessions}/{sid}", KEY_B, sink=bodies))[0] == 403
        assert (await api(http, "GET", sessions, KEY_B, sink=bodies))[1] == {"sessions": []}
        status, listed = await api(http, "GET", sessions, KEY_A, sink=bodies)
        assert [s["session_id"] for s in listed["sessions"]] == [sid]
        async with http.get(f"{base}/v1/replay/health") as resp:
            assert await resp.json() == {"status": "ok"}
        status, report = await api(http, "GET", f"{sessions}/{sid}", KEY_A, sink=bodies)
        assert status == 200 and report["counts"]["tape"] == 1
        status, report = await api(http, "DELETE", f"{sessions}/{sid}", KEY_A, sink=bodies)
        assert status == 200 and report["replay_run_id"]

    # the replay the replayer recorded went with A's key: it is stored under A, next to the original
    for _ in range(100):
        replays = [r for r in svc.store.runs("A") if r.replay_of == "run-a"]
        if replays and replays[0].status != "running":
            break
        await asyncio.sleep(0.05)
    assert [r.run_id for r in replays] == [report["replay_run_id"]]
    assert stored_tenants(svc.store) == {"A", "B"}
    assert not [r for r in svc.store.runs("B") if r.replay_of]


def test_two_tenants_replays_under_one_replay_run_id_stay_apart(tmp_path: Path) -> None:
    """Tenants A and B each record a replay as `nightly-replay`: each replay goes with its own key and is stored
    under its own tenant (spans are routed to keys by tenant, scope and run id, not by run id alone)."""

    async def scenario() -> None:
        async with keyed_collector_and_replayer(tmp_path / "data", (("run-a", KEY_A), ("run-b", KEY_B))) as (
                svc, replayer):
            sessions = f"{replayer.url}/v1/replay/sessions"
            async with aiohttp.ClientSession() as http:
                opened = {}
                for key, run_id in ((KEY_A, "run-a"), (KEY_B, "run-b")):
                    status, opened[key] = await api(http, "POST", sessions, key,
                                                    {"run_id": run_id, "replay_run_id": "nightly-replay"})
                    assert status == 201, opened[key]
                proxy = f"{opened[KEY_A]['base_urls']['openai']}/chat/completions"
                async with http.post(proxy, data=chat_request("question 1"),
                                     headers={"content-type": "application/json"}) as resp:
                    assert resp.status == 200 and await resp.read() == RESPONSE
                for key in (KEY_A, KEY_B):  # A's run ends first: B's key binding must outlive it
                    status, _ = await api(http, "DELETE", f"{sessions}/{opened[key]['session_id']}", key)
                    assert status == 200
            await replayer.stop()
            for tenant, original, steps in (("A", "run-a", 1), ("B", "run-b", 0)):
                replay = svc.store.run(tenant, "prod", "nightly-replay")
                assert replay is not None and replay.replay_of == original, (tenant, replay)
                assert (replay.step_count, replay.status) == (steps, c.OUTCOME_COMPLETED), (tenant, replay)

    run(scenario())


def test_one_tenant_cannot_take_every_replay_session(tmp_path: Path) -> None:
    """With API keys, a tenant holds at most `max_sessions_per_tenant` sessions (a quarter of all by default):
    past it, 429 `tenant_session_quota`, and another tenant still gets sessions."""

    async def scenario() -> None:
        async with keyed_collector_and_replayer(tmp_path / "data", (("run-a", KEY_A), ("run-b", KEY_B)),
                                                max_sessions=8) as (_, replayer):
            sessions = f"{replayer.url}/v1/replay/sessions"
            async with aiohttp.ClientSession() as http:
                opened = [await api(http, "POST", sessions, KEY_A, {"run_id": "run-a", "record": False})
                          for _ in range(2)]
                assert [status for status, _ in opened] == [201, 201]
                status, body = await api(http, "POST", sessions, KEY_A, {"run_id": "run-a", "record": False})
                assert (status, body["error"]) == (429, "tenant_session_quota")
                assert (await api(http, "POST", sessions, KEY_B, {"run_id": "run-b", "record": False}))[0] == 201
                sid = opened[0][1]["session_id"]
                assert (await api(http, "DELETE", f"{sessions}/{sid}", KEY_A))[0] == 200
                assert (await api(http, "POST", sessions, KEY_A, {"run_id": "run-a", "record": False}))[0] == 201

    run(scenario())


# --- TenantStore: enforcement at the key level ----------------------------------------------------------------


@pytest.fixture
def two_tenants(tmp_path: Path) -> Store:
    store = Store(tmp_path / "store", map_size=16 << 20)
    for run_id, tenant in (("run-b", "B"), ("run-a", "A"), ("run-ab", "AB")):  # "A" is a prefix of "AB"
        agent = Agent(run_id=run_id, tenant=tenant, scope="prod")  # distinct payloads: blobs are per content
        agent.model_step(1, body=chat_request(f"{tenant}'s question"), response=RESPONSE.replace(b"hello", tenant.encode()))
        agent.run_span()
        batch = ingest.prepare(agent.request(), store)
        assert batch.rejected == 0
        store.apply([batch])
        agent.shutdown()
    yield store
    store.close()


def reads(view: TenantStore, store: Store, tenant: str) -> dict[str, Any]:
    """Every TenantStore read, aimed at `tenant`'s run-b data (ids, digests and hashes taken from the store)."""
    run_id = "run-b" if tenant == "B" else "run-a"
    (step,) = store.steps(tenant, "prod", run_id)
    attempt = step.attempts[0]
    return {
        "runs": view.runs(), "runs(prod)": view.runs("prod"),
        "find_run": view.find_run(run_id), "find_run(prod)": view.find_run(run_id, "prod"),
        "run": view.run("prod", run_id), "steps": view.steps("prod", run_id),
        "step": view.step("prod", run_id, step.started_ns, step.step_id),
        "blob": view.blob("prod", attempt.response_body.digest),
        "envelope_occurrence": view.envelope_occurrence("prod", attempt.envelope_hash, run_id, 0),
        "envelope_count": view.envelope_count("prod", attempt.envelope_hash, run_id),
        "spans": view.spans("prod", run_id),
    }


def test_tenant_store_reads_nothing_of_another_tenant(two_tenants: Store) -> None:
    store = two_tenants
    own = reads(TenantStore(store, "B"), store, "B")
    assert all(own.values()), own  # the same calls do find B's data through B's view
    seen: list[bytes] = []
    get, scan, find_run = store.get, store.scan, store.find_run
    store.get = lambda table, key: seen.append(key) or get(table, key)  # type: ignore[method-assign]
    store.scan = lambda table, prefix, **kw: seen.append(prefix) or scan(table, prefix, **kw)  # type: ignore[method-assign]
    store.find_run = lambda run_id, tenant=None, scope=None: (  # type: ignore[method-assign]
        seen.append((tenant or "").encode() + b"\x00") or find_run(run_id, tenant, scope))  # its seek's prefix
    view_a = TenantStore(store, "A")
    foreign = reads(view_a, store, "B")
    for name, value in foreign.items():
        if name.startswith("runs"):
            assert [r.run_id for r in value] == ["run-a"], name  # A's own run only
        else:
            assert not value, f"{name} read tenant B's data through tenant A's view"
    assert seen and all(key.startswith(b"A\x00") for key in seen)  # every key it built is A's
    # ids that would reach outside a key component read as absent
    seen.clear()
    assert view_a.run("prod\x00B", "run-b") is None
    assert view_a.steps("prod", "run-a\x00") == [] and view_a.runs("x\x00") == []
    assert all(key.startswith(b"A\x00") for key in seen)


def test_tenant_store_finds_a_run_in_each_allowed_scope_by_seeking(tmp_path: Path) -> None:
    """`find_run` without a scope: one point read per scope of the tenant (scopes that prefix each other, other
    tenants around, scopes the key is not given), the same runs in the same order as filtering `runs()`."""
    store = Store(tmp_path / "store", map_size=16 << 20)
    try:
        places = [("A", "p"), ("A", "p-x"), ("A", "px"), ("A", "q"), ("AB", "p"), ("B", "p"), ("A", "r")]
        for n, (tenant, scope) in enumerate(places):
            for run_id in ("run-1", "run-2", f"other-{n}"):
                agent = Agent(run_id=run_id, tenant=tenant, scope=scope)
                agent.model_step(1, body=chat_request(f"{tenant} {scope} {run_id}"),
                                 started_ns=1_700_000_000_000_000_000 + n * 1_000_000_000)
                agent.run_span()
                batch = ingest.prepare(agent.request(), store)
                assert batch.rejected == 0
                store.apply([batch])
                agent.shutdown()
        for scopes in (None, frozenset({"p", "px", "r"}), frozenset({"nope"})):
            view = TenantStore(store, "A", scopes)
            for run_id in ("run-1", "run-2", "other-2", "missing", "bad\x00id"):
                found = view.find_run(run_id)
                assert found == [r for r in view.runs() if r.run_id == run_id], (scopes, run_id)
                assert all(r.tenant == "A" and (scopes is None or r.scope in scopes) for r in found)
            expected = {"p", "p-x", "px", "q", "r"} if scopes is None else scopes & {"p", "px", "r"}
            assert {r.scope for r in view.find_run("run-1")} == expected
    finally:
        store.close()


def test_tenant_store_limits_scopes(two_tenants: Store) -> None:
    view = TenantStore(two_tenants, "A", frozenset({"dev"}))
    assert view.runs() == [] and view.run("prod", "run-a") is None and view.steps("prod", "run-a") == []
    assert [r.run_id for r in TenantStore(two_tenants, "A", frozenset({"prod"})).runs()] == ["run-a"]
    with pytest.raises(keys.InvalidId):
        TenantStore(two_tenants, "A\x00B")


# --- configuration ---------------------------------------------------------------------------------------------


def test_auth_extension_config(tmp_path: Path) -> None:
    file = tmp_path / "keys.yaml"
    file.write_text(f"keys:\n  - sha256: {auth.hash_key(KEY_B)}  -\n    tenant: B\n")
    conf = cfg.parse(auth_doc(tmp_path, keys=[{"sha256": auth.hash_key(KEY_A).upper(), "tenant": "A"}],
                              keys_file=str(file)))
    authn = conf.authenticator
    assert authn is not None and len(authn) == 2
    assert authn.authenticate(KEY_A) == auth.Principal("A") and authn.authenticate(KEY_B) == auth.Principal("B")
    assert authn.authenticate(WRONG) is None and authn.authenticate("") is None and authn.authenticate(None) is None
    assert conf.storing_receivers[0].http.authenticator == "tracetape_auth"
    assert KEY_A not in repr(conf) and auth.hash_key(KEY_A) not in repr(conf)
    # a protocol the CLI adds is keyed too
    doc = auth_doc(tmp_path)
    del doc["receivers"]["otlp"]["protocols"]["grpc"]
    assert cfg.parse(doc).with_overrides(grpc_port=0).storing_receivers[0].grpc.authenticator == "tracetape_auth"
    # without the extension: nothing changes
    assert cfg.default_config().authenticator is None


def _without_auth(doc: dict[str, Any], protocol: str) -> dict[str, Any]:
    del doc["receivers"]["otlp"]["protocols"][protocol]["auth"]
    return doc


@pytest.mark.parametrize(("mutate", "expected"), [
    (lambda d: _without_auth(d, "grpc"),
     "receivers.otlp.protocols.grpc: tracetape_auth is enabled, so this protocol needs auth: {authenticator: tracetape_auth}"),
    (lambda d: d["service"].pop("extensions"), "extensions.tracetape_auth: defined but not enabled"),
    (lambda d: d["receivers"]["otlp"]["protocols"]["http"]["auth"].update(authenticator="tracetape_auth/x"),
     "receivers.otlp.protocols.http.auth.authenticator: 'tracetape_auth/x' is not an enabled tracetape_auth extension"),
    (lambda d: d["receivers"]["otlp"]["protocols"]["http"]["auth"].update(authenticatr="x"),
     "receivers.otlp.protocols.http.auth: unknown key 'authenticatr' (did you mean 'authenticator'?)"),
    (lambda d: d["extensions"]["tracetape_auth"].update(key_file="k"),
     "extensions.tracetape_auth: unknown key 'key_file'"),
    (lambda d: d["extensions"]["tracetape_auth"]["keys"].append({"key": KEY_A, "tenant": "A"}),
     "extensions.tracetape_auth.keys[3].key: keys are never configured in plaintext"),
    (lambda d: d["extensions"]["tracetape_auth"]["keys"].append({"sha256": KEY_A, "tenant": "A"}),
     f"extensions.tracetape_auth.keys[3].sha256: expected 64 hex digits (the sha256 hex digest of the key: "
     f"printf %s KEY | sha256sum), got {len(KEY_A)} characters"),
    (lambda d: d["extensions"]["tracetape_auth"]["keys"].append({"sha256": auth.hash_key(KEY_A), "tenant": "Z"}),
     "extensions.tracetape_auth.keys[3].sha256: the same key is already configured at extensions.tracetape_auth.keys[0]"),
    (lambda d: d["extensions"]["tracetape_auth"]["keys"].append({"sha256": hashlib.sha256(b"").hexdigest(), "tenant": "Z"}),
     "keys[3].sha256: this is the sha256 of an empty key"),
    (lambda d: d["extensions"]["tracetape_auth"]["keys"].append({"sha256": auth.hash_key("x" * 20), "tenant": "a b"}),
     "extensions.tracetape_auth.keys[3].tenant: invalid tenant 'a b'"),
    (lambda d: d["extensions"]["tracetape_auth"]["keys"].append({"sha256": auth.hash_key("y" * 20), "tenant": "A", "scopes": []}),
     "extensions.tracetape_auth.keys[3].scopes: expected a non-empty list"),
    (lambda d: d["extensions"]["tracetape_auth"].update(keys=[]), "extensions.tracetape_auth: no keys configured"),
    (lambda d: d["extensions"]["tracetape_auth"].update(keys_file="/nonexistent/keys.yaml"),
     "extensions.tracetape_auth.keys_file: cannot read '/nonexistent/keys.yaml'"),
    (lambda d: d["extensions"]["tracetape_auth"].update(keys_file="/tmp/keys\0.yaml"),
     "extensions.tracetape_auth.keys_file: cannot read '/tmp/keys\\x00.yaml': the path contains a NUL byte"),
    (lambda d: d["service"]["extensions"].append("tracetape_auth"), "service.extensions: listed more than once"),
])
def test_auth_config_errors_are_precise(tmp_path: Path, mutate: Any, expected: str) -> None:
    doc = auth_doc(tmp_path)
    mutate(doc)
    with pytest.raises(ConfigError) as info:
        cfg.parse(doc)
    assert expected in str(info.value)
    assert KEY_A not in str(info.value)  # a key pasted where a digest belongs is never quoted


def test_replayer_api_keys_file(tmp_path: Path) -> None:
    good = tmp_path / "keys.json"
    good.write_text(json.dumps({"keys": keys_list()}))
    parser = argparse.ArgumentParser()
    replayer_service.add_arguments(parser)
    svc = replayer_service.service_from_args(parser.parse_args(["--api-keys", str(good), "--port", "0"]))
    assert svc.state.authenticator is not None and svc.state.authenticator.authenticate(KEY_B) == auth.Principal("B")
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"keys:\n  - {{sha256: {KEY_A}, tenant: A}}\n")
    with pytest.raises(CliError) as info:
        replayer_service.service_from_args(parser.parse_args(["--api-keys", str(bad)]))
    assert "sha256: expected 64 hex digits" in str(info.value) and KEY_A not in str(info.value)
    assert main(["replayer", "--api-keys", str(tmp_path / "missing.yaml")]) == 2


def test_a_keys_file_that_is_not_utf8_is_a_one_line_error(tmp_path: Path) -> None:
    import subprocess

    good = f"keys: [{{sha256: {auth.hash_key(KEY_A)}, tenant: A}}]\n".encode()
    (tmp_path / "keys.yaml").write_bytes(good + b"\xff")
    (tmp_path / "otel-config.yaml").write_text(json.dumps(auth_doc(tmp_path / "data", keys_file="keys.yaml")))
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRACETAPE_")}
    for args, where in ((["collector", "--config", "otel-config.yaml"], "extensions.tracetape_auth.keys_file"),
                        (["replayer", "--api-keys", "keys.yaml", "--port", "0"], "--api-keys")):
        done = subprocess.run([sys.executable, "-m", "tracetape.cli", *args], cwd=tmp_path, env=env,
                              stdin=subprocess.DEVNULL, capture_output=True, text=True, errors="replace", timeout=60)
        assert "Traceback" not in done.stderr and done.returncode == 2, done.stderr
        assert done.stderr.strip().splitlines() == [
            f"tracetape {args[0]}: {where}: keys.yaml is not UTF-8 text (invalid byte at offset {len(good)})"], done.stderr
    assert not (tmp_path / "data").exists()


def test_a_recording_process_masks_its_own_key(monkeypatch: pytest.MonkeyPatch) -> None:
    from tracetape.instrumentation import redaction

    monkeypatch.setenv("TRACETAPE_API_KEY", KEY_A)
    saved = redaction._RULES
    try:
        redaction._RULES = redaction._compile(redaction._rules_from_env())
        masked = redaction.redact_text(f"echo {KEY_A}!")
        assert KEY_A not in masked and len(masked) == len(f"echo {KEY_A}!")
        assert KEY_A.encode() not in redaction.redact_body(json.dumps({"k": KEY_A}).encode())
    finally:
        redaction._RULES = saved


# --- binding ---------------------------------------------------------------------------------------------------


def test_what_counts_as_loopback() -> None:
    from tracetape.collector.service import is_loopback

    assert all(is_loopback(h) for h in ("127.0.0.1", "127.3.4.5", "::1", "[::1]", "localhost"))
    assert not any(is_loopback(h) for h in ("", "0.0.0.0", "::", "10.0.0.1", "example.com"))


def listening(port: int) -> set[str]:
    """Local addresses with a socket listening on `port` (Linux /proc/net/tcp and tcp6)."""
    found = set()
    for name in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(name).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            addr, hexport = fields[1].rsplit(":", 1)
            if int(hexport, 16) == port and fields[3] == "0A":  # LISTEN
                found.add(addr)
    return found


LOOPBACK = {"0100007F", "00000000000000000000000001000000", "0000000000000000FFFF00000100007F"}
"""127.0.0.1, ::1 and ::ffff:127.0.0.1 (gRPC binds 127.0.0.1 on a dual-stack socket) as /proc writes them."""


@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="reads /proc/net/tcp")
def test_services_bind_loopback_by_default(tmp_path: Path) -> None:
    async def scenario() -> None:
        conf = cfg.default_config().with_overrides(data=str(tmp_path / "d"), http_port=0, grpc_port=0)
        async with running_collector(conf) as svc:
            ports = [int(a.rsplit(":", 1)[1].split("/")[0]) for a in svc.addresses["http"] + svc.addresses["grpc"]]
            assert len(ports) == 2
            for port in ports:
                assert listening(port) and listening(port) <= LOOPBACK, (port, listening(port))
        replayer = ReplayerService(data=tmp_path / "d", port=0, record=False)
        await replayer.start()
        try:
            assert listening(replayer.port) and listening(replayer.port) <= LOOPBACK
        finally:
            await replayer.stop()

    run(scenario())


def test_the_commented_auth_example_in_otel_config_yaml_works(tmp_path: Path) -> None:
    """Uncommenting what otel-config.yaml says to uncomment gives a config that requires keys."""
    text = (ROOT / "otel-config.yaml").read_text()
    assert cfg.load(ROOT / "otel-config.yaml", environ={}).auth is None  # off by default
    keys_file = tmp_path / "keys.yaml"
    keys_file.write_text(f"keys: [{{sha256: {auth.hash_key(KEY_B)}, tenant: B}}]\n")
    text = (text.replace("extensions: {}\n#  ", "extensions:\n  ").replace("\n#    ", "\n    ")
            .replace("\n#      ", "\n      ").replace("\n#        ", "\n        ")
            .replace("  # extensions: [tracetape_auth]", "  extensions: [tracetape_auth]")
            .replace("        # auth:\n        #   authenticator", "        auth:\n          authenticator")
            .replace("/etc/tracetape/keys.yaml", str(keys_file)))
    (tmp_path / "otel-config.yaml").write_text(text)
    conf = cfg.load(tmp_path / "otel-config.yaml", environ={
        "TRACETAPE_KEY_ACME_SHA256": auth.hash_key(KEY_A), "TRACETAPE_KEY_CI_SHA256": auth.hash_key(KEY_A_PROD)})
    assert conf.authenticator is not None
    assert conf.authenticator.authenticate(KEY_A) == auth.Principal("acme")
    assert conf.authenticator.authenticate(KEY_A_PROD) == auth.Principal("acme", frozenset({"ci"}))
    assert conf.authenticator.authenticate(KEY_B) == auth.Principal("B")
    assert {p.authenticator for r in conf.storing_receivers for p in (r.grpc, r.http)} == {"tracetape_auth"}


def test_replay_command_sends_its_key_to_the_replayer(tmp_path: Path) -> None:
    from tracetape.replayer.replay_cmd import _api
    from tracetape.replayer.service import ReplayerThread

    store = Store(tmp_path / "store", map_size=16 << 20)
    try:
        store.apply([ingest.prepare(agent_request("run-a", tenant="x"), store, tenant="A")])
        thread = ReplayerThread(store=store, port=0, record=False,
                                authenticator=auth.Authenticator(auth.parse_keys(keys_list(), "keys"))).start()
        try:
            url = f"{thread.url}/v1/replay/sessions"
            assert _api(url, "POST", {"run_id": "run-a"})[0] == 401
            assert _api(url, "POST", {"run_id": "run-a"}, api_key=KEY_B)[0] == 403
            status, session = _api(url, "POST", {"run_id": "run-a"}, api_key=KEY_A)
            assert status == 201
            assert _api(f"{url}/{session['session_id']}", "DELETE", api_key=KEY_A)[0] == 200
        finally:
            thread.stop()
    finally:
        store.close()


def test_keys_hash_reads_the_key_on_stdin_and_never_prints_it() -> None:
    import hashlib
    import subprocess
    import sys

    key = "tt-live-0123456789abcdefghijklmnop"
    out = subprocess.run([sys.executable, "-m", "tracetape.cli", "keys", "hash", "--tenant", "acme", "--json"],
                         input=key + "\n", capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == {"sha256": hashlib.sha256(key.encode()).hexdigest(), "tenant": "acme"}
    assert key not in out.stdout + out.stderr
    entry = subprocess.run([sys.executable, "-m", "tracetape.cli", "keys", "hash"], input=key, capture_output=True,
                           text=True, timeout=60)
    assert f"- {{sha256: {hashlib.sha256(key.encode()).hexdigest()}, tenant: default}}" in entry.stdout
    empty = subprocess.run([sys.executable, "-m", "tracetape.cli", "keys", "hash"], input="", capture_output=True,
                           text=True, timeout=60)
    assert empty.returncode == 2 and "no key on standard input" in empty.stderr


def test_keys_hash_refuses_a_key_that_is_not_utf8_text_in_one_line() -> None:
    import subprocess
    import sys

    for extra, env in (([], {}), (["--json"], {}), ([], {"PYTHONIOENCODING": "utf-8:strict"})):
        out = subprocess.run([sys.executable, "-m", "tracetape.cli", "keys", "hash", *extra],
                             input=b"tt-secret-\xff-0123456789\n", capture_output=True, timeout=60,
                             env={**os.environ, **env})
        assert out.returncode == 2 and b"Traceback" not in out.stderr, out.stderr
        message = json.loads(out.stdout)["error"] if extra else out.stderr.decode()
        assert "not UTF-8 text" in message and len(message.splitlines()) == 1, (out.stdout, out.stderr)
        assert not extra or not out.stderr
        assert b"tt-secret" not in out.stdout + out.stderr and b"\xff" not in out.stdout + out.stderr
