"""loss.png without a plotting library: training loss (blue) and eval loss (red) against the step,
and for the preference tasks the eval preference accuracy (green: rm's accuracy, dpo's
rewards/accuracies, in [0, 1] on the same axis), drawn into an RGB buffer and written as a PNG
with zlib. Axis ends are labelled with a 3x5 font."""
import struct
import zlib

from llama.files import atomic_write_bytes

WIDTH, HEIGHT, MARGIN = 640, 400, 40
_GLYPHS = {  # 3x5 bitmaps, rows top to bottom
    "0": "111101101101111", "1": "010110010010111", "2": "111001111100111", "3": "111001111001111",
    "4": "101101111001001", "5": "111100111001111", "6": "111100111101111", "7": "111001001001001",
    "8": "111101111101111", "9": "111101111001111", ".": "000000000000010", "-": "000000111000000",
    "e": "000111111100111", " ": "000000000000000",
}


def _png(pixels: bytearray) -> bytes:
    raw = b"".join(b"\x00" + bytes(pixels[y * WIDTH * 3:(y + 1) * WIDTH * 3]) for y in range(HEIGHT))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", WIDTH, HEIGHT, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b"")


def _put(pixels: bytearray, x: int, y: int, rgb) -> None:
    if 0 <= x < WIDTH and 0 <= y < HEIGHT:
        i = (y * WIDTH + x) * 3
        pixels[i:i + 3] = bytes(rgb)


def _line(pixels, x0, y0, x1, y1, rgb) -> None:
    n = max(abs(x1 - x0), abs(y1 - y0), 1)
    for k in range(n + 1):
        _put(pixels, round(x0 + (x1 - x0) * k / n), round(y0 + (y1 - y0) * k / n), rgb)


def _text(pixels, x: int, y: int, text: str, scale: int = 2) -> None:
    for c in text:
        bits = _GLYPHS.get(c, _GLYPHS[" "])
        for i, bit in enumerate(bits):
            if bit == "1":
                for dx in range(scale):
                    for dy in range(scale):
                        _put(pixels, x + (i % 3) * scale + dx, y + (i // 3) * scale + dy, (0, 0, 0))
        x += 4 * scale


def plot_losses(path, train: list[tuple[int, float]], evals: list[tuple[int, float]],
                accuracies: list[tuple[int, float]] = ()) -> None:
    """Write a PNG of (step, value) series to path, atomically."""
    pixels = bytearray(b"\xff" * (WIDTH * HEIGHT * 3))
    accuracies = list(accuracies)
    points = train + evals + accuracies
    if points:
        steps = [s for s, _ in points]
        losses = [v for _, v in points]
        s0, s1 = min(steps), max(max(steps), min(steps) + 1)
        lo, hi = min(losses), max(losses)
        hi = hi if hi > lo else lo + 1.0

        def xy(step, loss):
            x = MARGIN + (step - s0) / (s1 - s0) * (WIDTH - 2 * MARGIN)
            y = HEIGHT - MARGIN - (loss - lo) / (hi - lo) * (HEIGHT - 2 * MARGIN)
            return round(x), round(y)

        _line(pixels, MARGIN, HEIGHT - MARGIN, WIDTH - MARGIN, HEIGHT - MARGIN, (0, 0, 0))
        _line(pixels, MARGIN, MARGIN, MARGIN, HEIGHT - MARGIN, (0, 0, 0))
        for series, rgb in ((train, (31, 119, 180)), (evals, (214, 39, 40)), (accuracies, (44, 160, 44))):
            for (a, b) in zip(series, series[1:]):
                _line(pixels, *xy(*a), *xy(*b), rgb)
            for p in series:
                x, y = xy(*p)
                for dx in (-1, 0, 1):
                    for dy in (-1, 0, 1):
                        _put(pixels, x + dx, y + dy, rgb)
        _text(pixels, 2, MARGIN - 12, f"{hi:.3g}")
        _text(pixels, 2, HEIGHT - MARGIN - 4, f"{lo:.3g}")
        _text(pixels, MARGIN, HEIGHT - MARGIN + 8, f"{s0}")
        _text(pixels, WIDTH - MARGIN - 4 * 2 * len(str(s1)), HEIGHT - MARGIN + 8, f"{s1}")
    atomic_write_bytes(path, _png(pixels))
