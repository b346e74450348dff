"""Decoding stays within what server/inference/decode_cost.py reserves for it: the peak resident memory of
preprocessing an image of each kind, measured in a fresh process, is at most the estimate; and a 16-bit image
no longer goes through float64 arrays (~26 bytes per pixel before, 3 now for a greyscale model).

Run as ``python -m tests.inference.test_decode_memory`` it prints the measurements (Linux: it resets the
process's peak RSS through /proc/self/clear_refs before each case).
"""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from server.core.manifest import InputSpec
from server.core.types import RawTensor
from server.inference.decode_cost import decode_bytes, image_bytes_per_pixel, may_rotate
from server.inference.preprocess import open_input, preprocess

REPO = Path(__file__).resolve().parents[2]

SIDE = 3000
SPECS = {"L": InputSpec(color="L"), "RGB": InputSpec(), "RGBA": InputSpec(color="RGBA", fill_alpha=True),
         "RGB-none": InputSpec(crop="none")}
CASES = [  # (format, mode, save options, model)
    ("PNG", "I;16", {}, "L"), ("PNG", "I;16", {}, "RGB"), ("PNG", "RGB", {}, "RGB"), ("PNG", "P", {}, "RGB"),
    ("PNG", "RGBA", {}, "RGBA"), ("JPEG", "RGB", {"exif": 6}, "RGB-none"), ("JPEG", "RGB", {"progressive": True}, "L"),
    ("JPEG", "CMYK", {}, "L"), ("TIFF", "F", {}, "L"), ("TIFF", "I", {}, "RGB"),
    ("TIFF", "RGB", {"compression": "tiff_deflate"}, "RGB"), ("WEBP", "RGB", {"quality": 80}, "RGB"),
    ("tensor", "float32", {}, "L"), ("tensor", "uint8", {}, "RGBA"),
]


def sample(fmt: str, mode: str, options: dict[str, object]) -> bytes | RawTensor:
    """A ``SIDE x SIDE`` input of ``mode`` (patterned, so that it compresses)."""
    y, x = np.mgrid[0:SIDE, 0:SIDE]
    base = ((x * 3 + y * 5) % 251).astype(np.uint8)
    if fmt == "tensor":
        values = np.stack([base] * 3, axis=2)
        array = values.astype(np.float32) / 255 if mode == "float32" else values
        return RawTensor(mode, array.shape, array.tobytes())
    images = {"I;16": lambda: Image.fromarray(base.astype(np.uint16) * 257),
              "I": lambda: Image.fromarray(base.astype(np.int32) * 100_000),
              "F": lambda: Image.fromarray(base.astype(np.float32) / 255),
              "RGBA": lambda: Image.fromarray(np.stack([base, base.T, base[::-1], base], axis=2))}
    image = images[mode]() if mode in images else Image.fromarray(np.stack([base, base.T, base[::-1]], axis=2))
    image = image.convert(mode) if image.mode != mode else image
    options = dict(options)
    if "exif" in options:
        exif = Image.Exif()
        exif[0x0112] = options["exif"]
        options["exif"] = exif.tobytes()
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def _status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def measure() -> list[dict[str, object]]:
    """Each case's peak RSS growth while preprocessing, and the reservation decode_cost makes for it."""
    results = []
    for fmt, mode, options, model in CASES:
        payload, spec = sample(fmt, mode, options), SPECS[model]
        estimate = decode_bytes(open_input(payload), payload, spec)
        Path("/proc/self/clear_refs").write_text("5")  # the peak so far is forgotten
        before = _status("VmRSS")
        preprocess(payload, spec)
        results.append({"case": f"{fmt} {mode} {options} -> {model}", "peak": _status("VmHWM") - before,
                        "estimate": estimate, "pixels": SIDE * SIDE})
    return results


@pytest.fixture(scope="module")
def measured() -> list[dict[str, object]]:
    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("measures the peak RSS through /proc/self/clear_refs (Linux)")
    # fixed malloc thresholds: freed memory goes back to the system and is not reused unseen by the next case
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072",
           "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "protos")])}
    done = subprocess.run([sys.executable, "-m", "tests.inference.test_decode_memory", "--json"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=240, check=True)
    return json.loads(done.stdout)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_preprocessing_peaks_within_its_reservation(measured: list[dict[str, object]]) -> None:
    over = [r for r in measured if int(r["peak"]) > int(r["estimate"])]  # type: ignore[call-overload]
    assert not over, f"preprocessing used more memory than decode_cost reserves: {over}"


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_16_bit_image_takes_3_bytes_per_pixel_for_a_grey_model(measured: list[dict[str, object]]) -> None:
    grey = next(r for r in measured if r["case"].startswith("PNG I;16 {} -> L"))  # type: ignore[union-attr]
    assert int(grey["peak"]) < 3.5 * SIDE * SIDE  # type: ignore[call-overload] # was ~26 (float64 temporaries)
    assert image_bytes_per_pixel("I;16", SPECS["L"]) == 3  # the 16-bit image, and its 8-bit conversion


if __name__ == "__main__":
    rows = measure()
    if "--json" in sys.argv:
        print(json.dumps(rows))
    else:
        for row in rows:
            pixels = int(row["pixels"])  # type: ignore[call-overload]
            print(f"{row['case']:50} peak {int(row['peak']) / pixels:5.2f}  "  # type: ignore[call-overload]
                  f"reserved {int(row['estimate']) / pixels:5.2f} bytes per pixel")  # type: ignore[call-overload]


def test_the_table_in_production_md_is_what_decode_cost_reserves() -> None:
    text = (REPO / "docs" / "production.md").read_text(encoding="utf-8")
    table = text.split("## Decode memory", 1)[1].split("| image mode | L model | RGB model | RGBA model |", 1)[1]
    rows = [line for line in table.split("\n\n", 1)[0].splitlines() if line.startswith("| `")]
    assert len(rows) >= 8
    for row in rows:
        label, *cells = [cell.strip() for cell in row.strip("|").split("|")]
        alpha = "transparent" in label
        for mode in re.findall(r"`([^`]+)`", label):
            for model, cell in zip(("L", "RGB", "RGBA"), cells, strict=True):
                plain, _, turned = cell.partition(" ")  # "5 (8)": 8 with an EXIF orientation
                spec = SPECS[model]
                assert image_bytes_per_pixel(mode, spec, alpha=alpha) == int(plain), (mode, model)
                assert image_bytes_per_pixel(mode, spec, alpha=alpha, rotates=True) == int(turned.strip("()") or plain)


@pytest.mark.parametrize("fmt", ["JPEG", "TIFF", "WEBP", "PNG"])
def test_an_exif_orientation_is_known_before_decoding(fmt: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys.modules[__name__], "SIDE", 64)
    turned, upright, plain = (sample(fmt, "RGB", options) for options in ({"exif": 6}, {"exif": 1}, {}))
    assert may_rotate(open_input(turned), turned)  # type: ignore[arg-type]
    assert not may_rotate(open_input(plain), plain)  # type: ignore[arg-type]
    # a PNG's EXIF may follow its pixels, where Pillow reads it only with them: any EXIF counts
    assert may_rotate(open_input(upright), upright) is (fmt == "PNG")  # type: ignore[arg-type]
    image = open_input(turned)
    assert isinstance(image, Image.Image) and image._im is None  # no pixel decoded yet (Pillow allocates on load)
