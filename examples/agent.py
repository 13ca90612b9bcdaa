"""An ordinary agent script: OpenAI and Anthropic calls (sync, async, streaming), a local tool, an MCP tool.

Nothing in it knows about recording except the `@tracetape.tool` decorator on its local tool. Run it under
`tracetape run -- python examples/agent.py`; point the SDKs at a provider with the usual variables
(`OPENAI_BASE_URL`, `OPENAI_API_KEY`, `ANTHROPIC_BASE_URL`, `ANTHROPIC_API_KEY`). `MCP_URL` (a streamable
HTTP MCP server offering `add`) adds an MCP tool call. `AGENT_TOPIC` changes the prompts. It prints one JSON
object with everything the models and tools answered.

Test knobs: `AGENT_PID_FILE` (write the pid there after the first call, then wait `AGENT_HANG_S` seconds).
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time

import anthropic
import openai

import tracetape

TOPIC = os.environ.get("AGENT_TOPIC", "the tides")
OPENAI_MODEL = os.environ.get("AGENT_OPENAI_MODEL", "gpt-4o-mini")
ANTHROPIC_MODEL = os.environ.get("AGENT_ANTHROPIC_MODEL", "claude-sonnet-5")


@tracetape.tool(mutating=False)
def lookup_fact(subject: str, detail: str = "short") -> dict[str, str]:
    """A local tool: a lookup the model asked for."""
    return {"subject": subject, "fact": f"{subject} follow the moon", "detail": detail}


@tracetape.tool(mutating=True)
def save_note(text: str) -> str:
    """A local tool that changes the world (appends to a file when AGENT_NOTES is set)."""
    path = os.environ.get("AGENT_NOTES")
    if path:
        with open(path, "a", encoding="utf-8") as f:
            f.write(text + "\n")
    return "saved"


def openai_sync(out: dict[str, object]) -> None:
    client = openai.OpenAI()
    done = client.chat.completions.create(
        model=OPENAI_MODEL, messages=[{"role": "user", "content": f"Explain {TOPIC} in one line."}]
    )
    out["openai.sync"] = done.choices[0].message.content
    _checkpoint()
    stream = client.chat.completions.create(
        model=OPENAI_MODEL,
        messages=[{"role": "user", "content": f"Stream a haiku about {TOPIC}."}],
        stream=True,
        stream_options={"include_usage": True},
    )
    out["openai.stream"] = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)


async def openai_async(out: dict[str, object]) -> None:
    client = openai.AsyncOpenAI()
    done = await client.chat.completions.create(
        model=OPENAI_MODEL, messages=[{"role": "user", "content": f"One fact about {TOPIC}, async."}]
    )
    out["openai.async"] = done.choices[0].message.content
    stream = await client.chat.completions.create(
        model=OPENAI_MODEL,
        messages=[{"role": "user", "content": f"Stream two facts about {TOPIC}, async."}],
        stream=True,
    )
    parts = [c.choices[0].delta.content or "" async for c in stream if c.choices]
    out["openai.async_stream"] = "".join(parts)
    await client.close()


def anthropic_calls(out: dict[str, object]) -> None:
    client = anthropic.Anthropic()
    msg = client.messages.create(
        model=ANTHROPIC_MODEL, max_tokens=200, messages=[{"role": "user", "content": f"Summarise {TOPIC}."}]
    )
    out["anthropic.create"] = msg.content[0].text
    events = client.messages.create(
        model=ANTHROPIC_MODEL, max_tokens=200, stream=True,
        messages=[{"role": "user", "content": f"Stream a summary of {TOPIC}."}],
    )
    out["anthropic.stream_true"] = "".join(
        e.delta.text for e in events if e.type == "content_block_delta" and e.delta.type == "text_delta"
    )
    with client.messages.stream(
        model=ANTHROPIC_MODEL, max_tokens=200, messages=[{"role": "user", "content": f"A title for {TOPIC}."}]
    ) as stream:
        out["anthropic.messages_stream"] = stream.get_final_text()


async def mcp_call(out: dict[str, object]) -> None:
    url = os.environ.get("MCP_URL")
    if not url:
        return
    from mcp import ClientSession
    from mcp.client.streamable_http import streamable_http_client

    async with streamable_http_client(url) as (read, write, *_):
        async with ClientSession(read, write) as session:
            await session.initialize()
            result = await session.call_tool("add", {"a": 20, "b": 22})
            out["mcp.add"] = result.content[0].text if result.content else None


def _checkpoint() -> None:
    pid_file = os.environ.get("AGENT_PID_FILE")
    if pid_file:
        with open(pid_file, "w", encoding="utf-8") as f:
            f.write(str(os.getpid()))
        time.sleep(float(os.environ.get("AGENT_HANG_S", "60")))


def main() -> int:
    out: dict[str, object] = {}
    openai_sync(out)
    asyncio.run(openai_async(out))
    anthropic_calls(out)
    out["tool.lookup_fact"] = lookup_fact(TOPIC)
    out["tool.save_note"] = save_note(f"notes on {TOPIC}")
    asyncio.run(mcp_call(out))
    print(json.dumps(out, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
