"""Content-Encoding decoding with a hard cap on the decoded size: gzip (all members), deflate (zlib-wrapped or
raw), zstd, identity, and comma lists of them (applied in reverse order, as HTTP says).

Used wherever tracetape inflates bytes it did not produce: OTLP request bodies (collector), replay proxy
request bodies (replayer), and compressed response bodies scanned for secrets (recorder). Decoding never
holds more than `max_size` + one chunk of output, so a compression bomb costs nothing.
"""

from __future__ import annotations

import io
import zlib

_CHUNK = 1 << 20


class EncodingError(ValueError):
    """The body cannot be decoded as its Content-Encoding says."""


class UnknownEncoding(EncodingError):
    """A content coding this module does not decode (e.g. br)."""


class CorruptEncoding(EncodingError):
    """The bytes are not valid in their coding, or are truncated."""


class InflatesTooLarge(EncodingError):
    """Decoding would exceed the size cap."""


def decode(body: bytes, content_encoding: str | None, max_size: int, *, partial: bool = False) -> bytes:
    """`body` decoded per `content_encoding`, never more than `max_size` bytes (`InflatesTooLarge`).

    `partial`: a truncated or corrupt gzip/deflate/zstd stream gives what decodes before the break instead of
    `CorruptEncoding` (a response the application stopped reading is a prefix of a stream)."""
    codings = [c.strip().lower() for c in (content_encoding or "").split(",") if c.strip()]
    data = body
    for coding in reversed(codings):
        if coding == "identity":
            continue
        if coding in ("gzip", "x-gzip"):
            data = _inflate(data, zlib.MAX_WBITS | 16, max_size, coding, partial)
        elif coding == "deflate":
            # RFC 9110 deflate is zlib-wrapped; some clients send raw DEFLATE. Tell them apart by the header.
            zlib_header = len(data) >= 2 and (data[0] & 0x0F) == 8 and ((data[0] << 8) | data[1]) % 31 == 0
            data = _inflate(data, zlib.MAX_WBITS if zlib_header else -zlib.MAX_WBITS, max_size, coding, partial)
        elif coding == "zstd":
            data = _unzstd(data, max_size, partial)
        else:
            raise UnknownEncoding(f"unsupported content encoding {coding[:50]!r}: use gzip, deflate, zstd or identity")
    if len(data) > max_size:
        raise InflatesTooLarge(f"body is over the {max_size}-byte limit")
    return data


def _inflate(data: bytes, wbits: int, max_size: int, coding: str, partial: bool = False) -> bytes:
    """Streaming zlib inflation with a hard output cap; concatenated gzip members are all decoded. `partial`:
    a truncated or corrupt stream gives what inflated before the break."""
    out = bytearray()
    remaining = data
    while True:
        d = zlib.decompressobj(wbits)
        pending = remaining
        try:
            while pending:
                out += d.decompress(pending, max_size + 1 - len(out))
                if len(out) > max_size:
                    raise InflatesTooLarge(f"body inflates to more than the {max_size}-byte limit")
                pending = d.unconsumed_tail
                if d.eof:
                    break
            if not d.eof:
                # Flush whatever is buffered; a stream that still has not ended is truncated.
                out += d.flush()
                if len(out) > max_size:
                    raise InflatesTooLarge(f"body inflates to more than the {max_size}-byte limit")
                if not d.eof:
                    if partial:
                        return bytes(out)
                    raise CorruptEncoding(f"{coding} body is truncated")
        except zlib.error:
            if partial:
                return bytes(out)
            raise CorruptEncoding(f"{coding} body is corrupt") from None
        remaining = d.unused_data
        if not remaining or wbits != zlib.MAX_WBITS | 16 or remaining.strip(b"\x00") == b"":
            return bytes(out)


def _unzstd(data: bytes, max_size: int, partial: bool = False) -> bytes:
    import zstandard

    out = bytearray()
    try:
        with zstandard.ZstdDecompressor().stream_reader(io.BytesIO(data), read_across_frames=True) as reader:
            while True:
                chunk = reader.read(min(_CHUNK, max_size + 1 - len(out)))
                if not chunk:
                    break
                out += chunk
                if len(out) > max_size:
                    raise InflatesTooLarge(f"body inflates to more than the {max_size}-byte limit")
    except zstandard.ZstdError:
        if partial:
            return bytes(out)
        raise CorruptEncoding("zstd body is corrupt") from None
    return bytes(out)
