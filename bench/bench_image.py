"""Image measurement and build cost against the cost of hashing the same bytes once.

Measuring an EIF must hash every kernel and ramdisk byte twice (PCR0 and PCR1 or PCR2)
plus a CRC, exactly as nitro-cli does; the goal is that our streaming reader stays within
2.5x of a single plain SHA-384 pass over the file (the floor any verifier pays), and that
building the echo example image takes under 2 s. The peer and the reader are timed in
alternating rounds (``interleaved_p50``), so load on a shared machine hits both alike.
"""

from __future__ import annotations

import hashlib
import os
import struct
import tempfile
import time
import zlib
from pathlib import Path

from bench.report import Goal, interleaved_p50, print_goals, print_table
from hermetic.image import build_image, measure_file

EIF_MIB = 32
ECHO = Path(__file__).resolve().parents[1] / "examples" / "echo"


def _write_eif(path: Path) -> None:
    """A version-4 EIF with a 4 MiB kernel and two ramdisks (layout per nitro.md section 5)."""
    rng = os.urandom
    sections = [
        (1, rng(4 << 20)),
        (2, b"console=ttyS0"),
        (3, rng(4 << 20)),
        (3, rng((EIF_MIB - 8) << 20)),
    ]
    offsets, sizes, position = [], [], 548
    for _, data in sections:
        offsets.append(position)
        sizes.append(len(data))
        position += 12 + len(data)
    pad = [0] * (32 - len(sections))
    header = (
        b".eif"
        + struct.pack(">HHQQHH", 4, 0, 512 << 20, 2, 0, len(sections))
        + struct.pack(">32Q", *offsets, *pad)
        + struct.pack(">32Q", *sizes, *pad)
        + bytes(4)
    )
    body = b"".join(struct.pack(">HHQ", t, 0, len(d)) + d for t, d in sections)
    path.write_bytes(header + struct.pack(">I", zlib.crc32(header + body)) + body)


def main() -> list[Goal]:
    with tempfile.TemporaryDirectory() as tmp:
        eif = Path(tmp) / "bench.eif"
        _write_eif(eif)
        data = eif.read_bytes()
        timed = interleaved_p50(
            {"peer": lambda: hashlib.sha384(data).digest(), "measure": lambda: measure_file(eif)},
            rounds=12,
            seconds=0.1,
            min_calls=1,
        )
        plain, measure = timed["peer"], timed["measure"]
        start = time.perf_counter()
        build_image(ECHO, Path(tmp) / "echo.img")
        build = time.perf_counter() - start
    ratio = measure / plain
    rows = [
        [f"sha384 one pass, {EIF_MIB} MiB (peer)", plain * 1000, ""],
        [f"measure_file EIF, {EIF_MIB} MiB", measure * 1000, f"{ratio:.2f}x peer"],
        ["build_image examples/echo", build * 1000, ""],
    ]
    print_table(["operation", "p50 ms", "relative"], rows)
    goals = [
        Goal(f"measure_file EIF / one SHA-384 pass, {EIF_MIB} MiB", ratio, "<=", 2.5),
        Goal("build_image examples/echo", build * 1000, "<=", 2000.0, "ms"),
    ]
    print_goals(goals)
    return goals
