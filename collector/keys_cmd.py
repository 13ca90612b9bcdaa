"""`tracetape keys hash`: the sha256 digest to configure for an API key, without the key in argv.

The key is read from standard input (one line; a trailing newline is not part of the key), or prompted
for without echo at a terminal, so it never lands in shell history or the process list. Prints the digest and a ready `keys:` entry for
`extensions.tracetape_auth` (or `--json`). The key itself is never printed.
"""

from __future__ import annotations

import argparse
import getpass
import json
import sys

from tracetape.collector.auth import hash_key
from tracetape.collector.keys import DEFAULT_TENANT, InvalidId, check_id
from tracetape.errors import CliError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=("hash",), help="hash: read a key on stdin, print its sha256")
    parser.add_argument("--tenant", default=DEFAULT_TENANT, help="the tenant the key belongs to (for the entry)")
    parser.add_argument("--json", action="store_true")


def run(args: argparse.Namespace) -> int:
    try:
        tenant = check_id(args.tenant, "tenant")
    except InvalidId as err:
        raise CliError(str(err)) from None
    # at a terminal: prompt without echo; piped: one line of stdin
    not_text = CliError("the key is not UTF-8 text: an API key must be text")  # the key itself is never shown
    try:
        key = getpass.getpass("API key: ") if sys.stdin.isatty() else sys.stdin.readline().rstrip("\r\n")
    except UnicodeDecodeError:  # stdin decoded strictly
        raise not_text from None
    if not key:
        raise CliError("no key on standard input (e.g. `printenv TRACETAPE_API_KEY | tracetape keys hash`)")
    try:
        key.encode("utf-8")
    except UnicodeEncodeError:  # a byte that is not UTF-8, kept by stdin's surrogateescape as a lone surrogate
        raise not_text from None
    digest = hash_key(key)
    if args.json:
        print(json.dumps({"sha256": digest, "tenant": tenant}))
    else:
        print(digest)
        print(f"# extensions.tracetape_auth.keys entry:\n- {{sha256: {digest}, tenant: {tenant}}}")
    return 0
