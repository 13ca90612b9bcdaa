"""Upstream profiles: how a proxied path maps to the path the SDK would have sent, and where live calls go.

A profile is a name (`openai`, `anthropic`, or any configured name), the real upstream base URL, and the
base path that the SDK's base URL carried. An SDK configured with base URL `.../s/{sid}/{profile}` sends
`.../s/{sid}/{profile}/{tail}`; the request it would have sent upstream has path `{base_path}/{tail}`
(that path is what the recording hashed), and a live call goes to `{upstream}/{tail}`.

Defaults: `openai` → `https://api.openai.com/v1` (base path `/v1`), `anthropic` →
`https://api.anthropic.com` (base path ``). `--upstream NAME=URL` or a profiles file (JSON or YAML:
`{"profiles": {NAME: URL | {"upstream": URL, "base_path": P}}}` or the inner mapping alone) add or
replace profiles; the base path defaults to the URL's path.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from tracetape.errors import CliError
from tracetape.instrumentation import contract

_NAME = re.compile(r"[a-z0-9][a-z0-9_\-]{0,63}")


@dataclass(frozen=True)
class Profile:
    """One upstream: `name`, real base URL `upstream` (no trailing slash), and the SDK's `base_path`."""

    name: str
    upstream: str
    base_path: str

    def envelope_path(self, tail: str) -> str:
        """The (normalised) path the SDK would have sent upstream for this proxied tail."""
        return contract.normalize_path(f"{self.base_path}/{tail}")

    def upstream_url(self, tail: str, query: str = "") -> str:
        """Where a live call for this tail goes."""
        url = f"{self.upstream}/{tail.lstrip('/')}" if tail else self.upstream
        return f"{url}?{query}" if query else url


def make_profile(name: str, upstream: str, base_path: str | None = None) -> Profile:
    """A validated profile (CliError on a bad name or URL)."""
    if not _NAME.fullmatch(name) or name.startswith("_"):
        raise CliError(f"invalid profile name {name!r}: use lower-case letters, digits, - and _")
    try:
        parts = urlsplit(upstream)
        parts.port  # noqa: B018 - raises ValueError on a port that is not a number or out of range
    except ValueError:  # `http://[x`, `http://h:abc`
        parts = None
    if parts is None or parts.scheme not in ("http", "https") or not parts.netloc:
        raise CliError(f"invalid upstream URL for profile {name!r}: {upstream!r} (use http(s)://host[:port][/path])")
    upstream = upstream.rstrip("/")
    path = urlsplit(upstream).path if base_path is None else base_path
    path = "" if path in ("", "/") else contract.normalize_path("/" + path.strip("/"))
    return Profile(name, upstream, path)


DEFAULT_PROFILES: dict[str, Profile] = {
    "openai": make_profile("openai", "https://api.openai.com/v1"),
    "anthropic": make_profile("anthropic", "https://api.anthropic.com"),
}


def parse_upstream(spec: str) -> Profile:
    """`NAME=URL` → Profile."""
    name, sep, url = spec.partition("=")
    if not sep:
        raise CliError(f"--upstream takes NAME=URL, got {spec!r}")
    return make_profile(name.strip(), url.strip())


def load_profiles_file(path: str | os.PathLike[str]) -> list[Profile]:
    """Profiles from a JSON or YAML file (see module doc)."""
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
    except OSError as err:
        raise CliError(f"cannot read profiles file {os.fspath(path)!r}: {err.strerror}") from err
    try:
        data: Any = json.loads(text)
    except ValueError:
        import yaml

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as err:
            raise CliError(f"profiles file {os.fspath(path)!r} is neither JSON nor YAML") from err
    if isinstance(data, Mapping) and isinstance(data.get("profiles"), Mapping):
        data = data["profiles"]
    if not isinstance(data, Mapping):
        raise CliError(f"profiles file {os.fspath(path)!r} must map profile names to upstream URLs")
    out = []
    for name, value in data.items():
        if isinstance(value, str):
            out.append(make_profile(str(name), value))
        elif isinstance(value, Mapping) and isinstance(value.get("upstream"), str):
            base = value.get("base_path")
            out.append(make_profile(str(name), value["upstream"], base if isinstance(base, str) else None))
        else:
            raise CliError(f"profile {name!r}: give an upstream URL or {{upstream: URL, base_path: P}}")
    return out


def build_profiles(upstreams: Iterable[str] = (), profiles_file: str | None = None) -> dict[str, Profile]:
    """Defaults, then the file's profiles, then each `--upstream` (later ones win)."""
    out = dict(DEFAULT_PROFILES)
    if profiles_file:
        out.update({p.name: p for p in load_profiles_file(profiles_file)})
    for spec in upstreams:
        p = parse_upstream(spec)
        out[p.name] = p
    return out
