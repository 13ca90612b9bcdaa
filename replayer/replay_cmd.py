"""`tracetape replay RUN [options] [-- CMD ...]`.

- Without CMD: prints the run's recorded final output (the last successful model answer's text), marked
  `from_replay: true` with the original run id: an exact replay of the result, nothing executed.
- With CMD: uses the replayer at `--replayer URL`, or starts one in this process (read-only store, any free
  port), creates a session with `record: false` (CMD's own instrumentation records the replay run), runs
  `tracetape run --run-id NEW -- CMD` with `OPENAI_BASE_URL`, `ANTHROPIC_BASE_URL`, `TRACETAPE_MODE=replay`,
  `TRACETAPE_REPLAY_URL`, `TRACETAPE_REPLAY_OF`, `TRACETAPE_REPLAY_MODE`, `TRACETAPE_REPLAY_FORCED`,
  `TRACETAPE_LINEAGE_DEPTH`, `TRACETAPE_ALLOW_MUTATIONS`, then prints the outcome and the session report.
  The exit status is CMD's.
- `--verify-envelope FILE` (a JSON envelope, or `{"envelope": {...}}`) says whether it hashes to a recorded
  step's envelope before anything else; a mismatch names the closest step and the differing JSON paths and
  exits 1.
- A run that is running, incomplete or invalidated is refused (exit 3) unless `--force`.
- The store is read directly (file-system access is the operator's), so no API key is needed for that. A
  replayer that requires keys (`--replayer URL`) is sent `--api-key` or `TRACETAPE_API_KEY` as `x-api-key`
  when the session is created and deleted; CMD inherits `TRACETAPE_API_KEY` for its own recording.
"""

from __future__ import annotations

import argparse
import difflib
import json
import os
import signal
import subprocess
import sys
from typing import Any

from tracetape.collector import keys
from tracetape.collector.records import RunRecord
from tracetape.collector.store import Store
from tracetape.errors import CliError
from tracetape.instrumentation import contract
from tracetape.replayer import responses
from tracetape.replayer.envelopes import envelope_diff, recorded_envelope
from tracetape.replayer.runref import add_store_arguments, open_store, resolve_run
from tracetape.replayer.session import MODES, new_replay_run_id, refusal_reason

EXIT_REFUSED = 3


def _options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--mode", choices=MODES, default="exact")
    parser.add_argument("--until-step", type=int, default=None, metavar="N")
    parser.add_argument("--pace", type=float, default=0.0, help="0 = instant (default), 1 = recorded timing")
    parser.add_argument("--force", action="store_true", help="replay a running/incomplete/invalidated run anyway")
    parser.add_argument("--allow-mutations", default="", metavar="A,B", help="mutating tools allowed to run")
    parser.add_argument("--on-exhausted", choices=("error", "repeat_last"), default="error")
    parser.add_argument("--verify-envelope", default=None, metavar="FILE")
    parser.add_argument("--replayer", default=None, metavar="URL", help="use this replayer instead of starting one")
    parser.add_argument("--api-key", default=None, metavar="KEY",
                        help="the replayer's API key (default: $TRACETAPE_API_KEY; prefer the variable, "
                             "a command line is visible to other users)")
    parser.add_argument("--upstream", action="append", default=[], metavar="NAME=URL",
                        help="upstream profile for live calls of the in-process replayer (step/live modes)")
    add_store_arguments(parser)
    parser.add_argument("--json", action="store_true")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_id", metavar="RUN")
    _options(parser)
    parser.add_argument("cmd", nargs=argparse.REMAINDER, metavar="-- CMD", help="a command to run against the replay")


def _split_command(args: argparse.Namespace) -> list[str]:
    """argparse's REMAINDER also takes the options written after RUN: parse those, return CMD (after `--`)."""
    rest = list(args.cmd or [])
    command = getattr(args, "after_dashdash", None)
    if command is not None:  # the dispatcher saw `--`: REMAINDER ends with exactly these tokens
        before = rest[: len(rest) - len(command)]
        if before and before[-1] == "--":
            before = before[:-1]
    elif "--" in rest:
        cut = rest.index("--")
        before, command = rest[:cut], rest[cut + 1:]
    else:
        before, command = rest, []
    if before:
        sub = argparse.ArgumentParser(prog="tracetape replay RUN", add_help=False)
        _options(sub)
        defaults = sub.parse_args([])
        parsed = sub.parse_args(before)
        for key, value in vars(parsed).items():
            if value != getattr(defaults, key):
                setattr(args, key, value)
    return command


def _load_envelope(path: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as fh:
            data = json.loads(fh.read())
    except OSError as err:
        raise CliError(f"cannot read {path}: {err.strerror}") from None
    except (ValueError, RecursionError):
        raise CliError(f"{path} is not JSON") from None
    if isinstance(data, dict) and isinstance(data.get("envelope"), dict):
        data = data["envelope"]
    if not isinstance(data, dict) or data.get("v") != 1 or data.get("kind") not in ("http", "tool"):
        raise CliError(f"{path} is not a request envelope ({{\"v\": 1, \"kind\": \"http\"|\"tool\", ...}})")
    return data


def verify_envelope(store: Store, run: RunRecord, path: str) -> dict[str, Any]:
    """Whether the envelope in `path` is one the run recorded; the closest step and the diff when not."""
    envelope = _load_envelope(path)
    digest = contract.envelope_hash(envelope)
    steps = store.steps(run.tenant, run.scope, run.run_id)
    for i, step in enumerate(steps):
        if any(a.envelope_hash == digest for a in step.attempts):
            return {"verified": True, "envelope_hash": digest, "step": {"index": i, "name": step.name}}
    best: tuple[int, tuple[int, float], list[Any]] | None = None
    for i, step in enumerate(steps):
        a = step.attempts[0] if step.attempts else None
        if a is None:
            continue
        if step.kind == contract.STEP_KIND_TOOL:
            raw = store.blob(run.tenant, run.scope, a.tool_arguments.digest) if a.tool_arguments else b"null"
            expected = contract.tool_envelope(step.tool_name, responses.body_value(raw or b""))
        else:
            body = store.blob(run.tenant, run.scope, a.request_body.digest) if a.request_body else b""
            expected = recorded_envelope(a, body or b"")
        changes = envelope_diff(expected, envelope)
        score = (len(changes), -sum(difflib.SequenceMatcher(None, str(ch.expected), str(ch.received)).ratio()
                                    for ch in changes[:20]))
        if best is None or score < best[1]:
            best = (i, score, changes)
    out: dict[str, Any] = {"verified": False, "envelope_hash": digest}
    if best is not None:
        i, _, changes = best
        out["closest_step"] = {"index": i, "name": steps[i].name, "envelope_hash": steps[i].envelope_hash}
        out["diff"] = [ch.to_json(200) for ch in changes[:20]]
    return out


def _print(args: argparse.Namespace, obj: dict[str, Any], text: str) -> None:
    print(json.dumps(obj, indent=None if args.json else 2) if args.json else text, flush=True)


def run(args: argparse.Namespace) -> int:
    command = _split_command(args)
    if args.pace < 0:
        raise CliError("--pace must be >= 0")
    if args.mode == "step" and args.until_step is None:
        raise CliError("--mode step needs --until-step N")
    store = open_store(args.data)
    try:
        run_rec = resolve_run(store, args.run_id, args.tenant, args.scope)
        if args.verify_envelope:
            verdict = verify_envelope(store, run_rec, args.verify_envelope)
            if args.json and not command:
                print(json.dumps(verdict))
            elif verdict["verified"]:
                print(f"envelope {verdict['envelope_hash'][:16]} matches recorded step {verdict['step']['index']} "
                      f"({verdict['step']['name']})", file=sys.stderr if args.json else sys.stdout)
            else:
                lines = [f"envelope {verdict['envelope_hash'][:16]} was NOT recorded in run {run_rec.run_id}"]
                if "closest_step" in verdict:
                    lines.append(f"closest: step {verdict['closest_step']['index']} ({verdict['closest_step']['name']})")
                    lines += [f"  {d['path']}: {json.dumps(d.get('expected'))} -> {json.dumps(d.get('received'))}"
                              for d in verdict.get("diff", [])]
                print("\n".join(lines), file=sys.stderr if args.json else sys.stdout)
            if not verdict["verified"]:
                return 1
            if not command and args.json:
                return 0
        reason = refusal_reason(run_rec)
        if reason is not None and not args.force:
            raise CliError(f"run {run_rec.run_id} is not replayable: {reason} (use --force to replay it anyway)",
                           EXIT_REFUSED)
        if not command:
            return _print_final_output(args, store, run_rec, forced=reason is not None)
    finally:
        if not command:
            store.close()
    store.close()
    return _replay_command(args, run_rec, command)


def _print_final_output(args: argparse.Namespace, store: Store, run_rec: RunRecord, *, forced: bool) -> int:
    steps = store.steps(run_rec.tenant, run_rec.scope, run_rec.run_id)
    found = responses.final_step(steps)
    out: dict[str, Any] = {"from_replay": True, "run_id": run_rec.run_id, "status": run_rec.status,
                           "exit_code": run_rec.exit_code, "forced": forced, "final_output": None}
    if found is not None:
        index, step, attempt = found
        body = store.blob(run_rec.tenant, run_rec.scope, attempt.response_body.digest) if attempt.response_body else b""
        value = responses.body_value(body or b"", attempt.content_encoding, attempt.streamed)
        out["final_output"] = responses.assistant_text(value)
        out["final_step"] = {"index": index, "name": step.name}
    text = (f"{out['final_output'] or ''}\n-- from_replay: true, run {run_rec.run_id} ({run_rec.status}"
            f"{', exit ' + str(run_rec.exit_code) if run_rec.exit_code is not None else ''})")
    _print(args, out, text)
    return 0


def _api(url: str, method: str, body: Any = None, api_key: str | None = None) -> tuple[int, Any]:
    """(status, JSON answer) of a replayer API call; CliError (exit 2) when the URL is malformed, the
    replayer cannot be reached, or it answers 2xx with something that is not JSON."""
    import http.client
    import urllib.error
    import urllib.request

    replayer = url.split("/v1/")[0]
    data = json.dumps(body).encode() if body is not None else None
    headers = {"content-type": "application/json", **({"x-api-key": api_key} if api_key else {})}
    try:
        req = urllib.request.Request(url, data=data, method=method, headers=headers)
        with urllib.request.urlopen(req, timeout=60) as resp:
            status, raw = resp.status, resp.read()
    except urllib.error.HTTPError as err:
        try:
            return err.code, json.loads(err.read() or b"null")
        except (ValueError, RecursionError, OSError, http.client.HTTPException):
            return err.code, {"error": f"HTTP {err.code}"}
    except UnicodeError:  # not shown: it would quote a character of the API key
        raise CliError("the API key and the replayer URL must be ASCII text") from None
    except (ValueError, http.client.InvalidURL) as err:  # a malformed URL: `notaurl`, `http://[x`, `http://h:abc`
        raise CliError(f"invalid replayer URL {replayer!r}: {err}") from None
    except (urllib.error.URLError, OSError, http.client.HTTPException) as err:
        raise CliError(f"cannot reach the replayer at {replayer}: {type(err).__name__}") from None
    try:
        return status, json.loads(raw or b"null")
    except (ValueError, RecursionError):
        raise CliError(f"the replayer at {replayer} answered HTTP {status} with something that is not JSON") from None


def _run_wrapper(argv: list[str], env: dict[str, str], stdout: Any) -> int:
    """Run the `tracetape run` wrapper to its end and return its exit status (a shell's 128 + N for a death by
    signal N). Ctrl-C does not cut this short: the terminal sends SIGINT to the whole foreground process group,
    so the wrapper has it too and handles it (passes it on to CMD, records the run `cancelled`), and CMD's own
    cleanup may take a while; killing the wrapper would leave the replay run `running` forever. So SIGINT is
    held off (a no-op handler, which the child does not inherit, unlike SIG_IGN) while the wrapper runs."""
    installed = False
    try:
        previous = signal.signal(signal.SIGINT, _ignore_signal)
        installed = True
    except (ValueError, OSError):  # not the main thread: KeyboardInterrupt cannot reach us here anyway
        previous = None
    try:
        proc = subprocess.Popen(argv, env=env, stdout=stdout)
        while True:
            try:
                returncode = proc.wait()
                break
            except KeyboardInterrupt:  # a SIGINT that arrived before the handler was set up
                continue
    finally:
        if installed:
            signal.signal(signal.SIGINT, previous if previous is not None else signal.SIG_DFL)
    return 128 - returncode if returncode < 0 else returncode


def _ignore_signal(signum: int, frame: Any) -> None:
    return None


def _replay_command(args: argparse.Namespace, run_rec: RunRecord, command: list[str]) -> int:
    thread = None
    base = args.replayer
    if base is None:
        from tracetape.replayer.profiles import build_profiles
        from tracetape.replayer.service import ReplayerThread

        thread = ReplayerThread(data=args.data, port=0, record=False, profiles=build_profiles(args.upstream)).start()
        base = thread.url
    base = base.rstrip("/")
    new_run = new_replay_run_id(run_rec.run_id)
    allow = [a.strip() for a in args.allow_mutations.split(",") if a.strip()]
    api_key = (getattr(args, "api_key", None) or os.environ.get("TRACETAPE_API_KEY") or "").strip() or None
    try:
        status, session = _api(f"{base}/v1/replay/sessions", "POST", api_key=api_key, body={
            "run_id": run_rec.run_id, "tenant": run_rec.tenant, "scope": run_rec.scope, "mode": args.mode,
            "until_step": args.until_step, "pace": args.pace, "force": args.force, "record": False,
            "on_exhausted": args.on_exhausted, "allow_mutations": allow, "replay_run_id": new_run})
        if status != 201:
            code = EXIT_REFUSED if isinstance(session, dict) and session.get("error") == "not_replayable" else 2
            raise CliError(f"the replayer refused the session: {json.dumps(session)}", code)
        env = dict(os.environ)
        urls = session["base_urls"]
        env.update({
            "OPENAI_BASE_URL": urls.get("openai", ""), "ANTHROPIC_BASE_URL": urls.get("anthropic", ""),
            "TRACETAPE_MODE": "replay", "TRACETAPE_REPLAY_URL": session["replay_base_url"],
            "TRACETAPE_REPLAY_PATHS": json.dumps(session.get("upstream_paths", {})),
            "TRACETAPE_REPLAY_OF": run_rec.run_id, "TRACETAPE_REPLAY_MODE": args.mode,
            "TRACETAPE_REPLAY_FORCED": "1" if session.get("forced") else "0",
            "TRACETAPE_LINEAGE_DEPTH": str(run_rec.lineage_depth + 1),
            "TRACETAPE_ALLOW_MUTATIONS": ",".join(allow),
            "TRACETAPE_TENANT": run_rec.tenant, "TRACETAPE_SCOPE": run_rec.scope,
            **({"TRACETAPE_API_KEY": api_key} if api_key else {}),
        })
        keys.check_id(new_run, "run id")
        argv = [sys.executable, "-m", "tracetape.cli", "run", "--run-id", new_run, "--", *command]
        code = _run_wrapper(argv, env, stdout=sys.stderr if args.json else None)
        _, report = _api(f"{base}/v1/replay/sessions/{session['session_id']}", "DELETE", api_key=api_key)
    finally:
        if thread is not None:
            thread.stop()
    counts = report.get("counts", {}) if isinstance(report, dict) else {}
    out = {"replay_of": run_rec.run_id, "replay_run_id": new_run, "mode": args.mode, "exit_code": code,
           "forced": bool(session.get("forced")), "report": report}
    text = (f"replay of {run_rec.run_id} as {new_run} ({args.mode}): exit {code}; from tape {counts.get('tape', 0)}, "
            f"live {counts.get('live', 0)}, misses {counts.get('misses', 0)}, divergences {counts.get('divergences', 0)}, "
            f"tools answered {counts.get('tools_answered', 0)}, suppressed mutations "
            f"{counts.get('suppressed_mutations', 0)}, unused recorded steps {len(report.get('unused_steps', []))}")
    for m in (report.get("misses") or [])[:5]:
        exp = m.get("expected_step") or {}
        text += f"\n  miss: expected step {exp.get('index')} ({exp.get('name')}); " + ", ".join(
            d["path"] for d in m.get("diff", [])[:5])
    print(json.dumps(out) if args.json else text, file=sys.stdout if args.json else sys.stderr, flush=True)
    return code
