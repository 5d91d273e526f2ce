"""Loss curves as a PNG without a plotting library: lines on a grid, written with zlib.

Small on purpose (no fonts beyond digits): y ticks are labelled, each series has a fixed colour, and the
caller names the colours wherever it reports the file. Used for `pretrain` and the `run` report.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Sequence
from pathlib import Path

from pipelines.core.files import atomic_write_bytes

COLOURS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75)]
COLOUR_NAMES = ["blue", "orange", "green", "red", "purple", "brown"]

# 3x5 bitmaps for tick labels, one string of 15 bits per glyph (rows top to bottom).
_GLYPHS = {
    "0": "111101101101111", "1": "010110010010111", "2": "111001111100111", "3": "111001111001111",
    "4": "101101111001001", "5": "111100111001111", "6": "111100111101111", "7": "111001001001001",
    "8": "111101111101111", "9": "111101111001111", ".": "000000000000010", "-": "000000111000000",
}  # fmt: skip


def line_chart(
    path: Path, series: Sequence[Sequence[tuple[float, float]]], width: int = 720, height: int = 420
) -> Path:
    """Draw each series of (x, y) points as a line, colour i for series i, and write a PNG atomically."""
    pixels = bytearray(b"\xff" * (width * height * 3))
    left, right, top, bottom = 60, width - 20, 20, height - 30
    points = [pt for s in series for pt in s]
    if points:
        x0, x1 = min(p[0] for p in points), max(p[0] for p in points)
        y0, y1 = min(p[1] for p in points), max(p[1] for p in points)
    else:
        x0 = y0 = 0.0
        x1 = y1 = 1.0
    x1, y1 = (x1 if x1 > x0 else x0 + 1), (y1 if y1 > y0 else y0 + 1)

    def to_px(x: float, y: float) -> tuple[int, int]:
        return (
            round(left + (x - x0) / (x1 - x0) * (right - left)),
            round(bottom - (y - y0) / (y1 - y0) * (bottom - top)),
        )

    def put(x: int, y: int, colour: tuple[int, int, int]) -> None:
        if 0 <= x < width and 0 <= y < height:
            i = (y * width + x) * 3
            pixels[i : i + 3] = bytes(colour)

    def line(a: tuple[int, int], b: tuple[int, int], colour, thick: int = 1) -> None:
        steps = max(abs(b[0] - a[0]), abs(b[1] - a[1]), 1)
        for t in range(steps + 1):
            x = round(a[0] + (b[0] - a[0]) * t / steps)
            y = round(a[1] + (b[1] - a[1]) * t / steps)
            for dx in range(thick):
                for dy in range(thick):
                    put(x + dx, y + dy, colour)

    def text(x: int, y: int, label: str, colour=(0, 0, 0)) -> None:
        for ch in label:
            bits = _GLYPHS.get(ch)
            if bits:
                for i, bit in enumerate(bits):
                    if bit == "1":
                        for s in range(4):  # 2x scale
                            put(x + (i % 3) * 2 + s % 2, y + (i // 3) * 2 + s // 2, colour)
            x += 8

    for i in range(5):  # horizontal grid with y labels
        y_value = y0 + (y1 - y0) * i / 4
        _, py = to_px(x0, y_value)
        line((left, py), (right, py), (225, 225, 225))
        text(4, py - 5, f"{y_value:.3g}"[:6])
    line((left, top), (left, bottom), (0, 0, 0))
    line((left, bottom), (right, bottom), (0, 0, 0))
    text(left, bottom + 10, f"{x0:.0f}")
    text(right - 8 * len(f"{x1:.0f}"), bottom + 10, f"{x1:.0f}")
    for index, s in enumerate(series):
        colour = COLOURS[index % len(COLOURS)]
        pts = [to_px(x, y) for x, y in s]
        for a, b in zip(pts, pts[1:], strict=False):
            line(a, b, colour, thick=2)
        if len(pts) == 1:
            line(pts[0], pts[0], colour, thick=3)

    raw = b"".join(b"\x00" + bytes(pixels[y * width * 3 : (y + 1) * width * 3]) for y in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    png = (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(raw, 6))
        + chunk(b"IEND", b"")
    )
    atomic_write_bytes(path, png)
    return path
