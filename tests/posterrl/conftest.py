import struct
import zlib
from pathlib import Path

import pytest


@pytest.fixture
def bomb_png():
    """Write a small PNG whose header claims side x side pixels (by default 10^10: PIL refuses to open it)."""

    def write(path: Path, side: int = 100_000) -> Path:
        def chunk(kind: bytes, data: bytes) -> bytes:
            return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

        header = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)  # 8-bit RGB
        path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 4))
                         + chunk(b"IEND", b""))
        return path

    return write
