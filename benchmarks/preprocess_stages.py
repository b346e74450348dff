"""Pre-processing stage by stage, the path before issue 16 against the served one, in one run.

For 640x480 and 4000x3000 JPEGs (seeded synthetic photos: smooth gradients plus noise, Pillow quality 90), the
default input (shorter side to 256, centre crop 224, bilinear), stage by stage: decode, resize + crop + to-array,
and the whole call. "before" decodes every pixel, scales the whole image and crops it (the path before issue 16,
rebuilt here); "served" is ``server.inference.preprocess.preprocess`` as it runs now: a large JPEG decoded at
1/2, 1/4 or 1/8 scale by libjpeg (``draft_jpeg``) and only the centre crop's pixels resampled (``CROP_BOX_FILTERS``).
With simplejpeg importable, its decode (and the copy into a Pillow image the resize needs) is timed beside Pillow's.
Rounds are interleaved (each round times every stage of both paths once) and the medians are printed side by side
with their ratio: compare figures within one run only, the CPU under these machines changes between sessions. The
Pillow build is printed with them: run it with pillow-simd first on ``PYTHONPATH`` to measure that one.

Then the pixel difference of the draft path against the full decode, per size, interpolation and ``DRAFT_MARGIN``
(1, 2 and the served value), over several photos: mean absolute difference and 99th percentile, in 0..255 levels.

    python -m benchmarks.preprocess_stages --rounds 3 --photos 2 --no-parity    # smoke run, seconds
    python -m benchmarks.preprocess_stages --rounds 40 --photos 6 --markdown docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import io
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import PIL
from PIL import Image

from benchmarks.support import emit, facts_block, fmt, markdown_table, run_facts
from server.core.manifest import InputSpec
from server.inference import preprocess as pre

try:  # optional: measured beside Pillow's decoder when installed, never a dependency (docs/benchmarks.md)
    import simplejpeg
except ImportError:
    simplejpeg = None

SPEC = InputSpec()
PARITY_SIZES = ((2048, 1536), (2736, 2048), (4000, 3000), (8000, 6000))
"""Photos whose 1/2 (or 1/4) decode is exactly or just over DRAFT_MARGIN times the resize target: the worst case."""


def photo(width: int, height: int, seed: int) -> bytes:
    """A synthetic photo as a quality-90 JPEG: gradients plus Gaussian noise (sigma 4..20 by seed)."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack([x * 255 / (width - 1), y * 255 / (height - 1), (x + y) * 3 % 256], axis=-1)
    rng = np.random.default_rng(seed)
    base += rng.normal(0, 4 + 16 * (seed % 2), base.shape).astype(np.float32)
    out = io.BytesIO()
    Image.fromarray(np.clip(base, 0, 255).astype(np.uint8), "RGB").save(out, "JPEG", quality=90)
    return out.getvalue()


def decoded(data: bytes, draft: bool) -> Image.Image:
    image = pre.open_input(data)
    assert isinstance(image, Image.Image)
    if draft:
        pre.draft_jpeg(image, SPEC)
    return pre.decode_image(image)


def resized(image: Image.Image) -> Image.Image:
    return image.resize(pre.scaled_size(image.width, image.height, SPEC), Image.Resampling.BILINEAR,
                        reducing_gap=pre.RESIZE_GAP)


def cropped(image: Image.Image) -> Image.Image:
    left, top = pre.crop_origin(image.width, image.height, SPEC)
    return image.crop((left, top, left + SPEC.width, top + SPEC.height))


def before(image: Image.Image) -> np.ndarray:
    """Resize, crop and to-array as before issue 16: the whole image scaled, then cropped."""
    return np.asarray(cropped(resized(image)))


def stages(data: bytes, served: bool) -> dict[str, Callable[[], Any]]:
    """Each stage as a call on inputs prepared beforehand (so one stage's time excludes the others')."""
    image = decoded(data, served)
    fit = (lambda: pre.fit(image, SPEC)) if served else (lambda: before(image))
    whole = (lambda: pre.preprocess(data, SPEC)) if served else (lambda: before(decoded(data, False)))
    calls = {"decode": lambda: decoded(data, served), "resize + crop + to-array": fit, "preprocess()": whole}
    if simplejpeg is not None:
        calls["decode (simplejpeg)"] = lambda: simplejpeg.decode_jpeg(data, colorspace="RGB")
        calls["simplejpeg + fromarray"] = lambda: Image.fromarray(simplejpeg.decode_jpeg(data, colorspace="RGB"))
    return calls


def time_stages(datas: list[bytes], rounds: int) -> dict[tuple[str, str], float]:
    """Median ms per image of each (stage, path), rounds interleaved."""
    calls = {path: [stages(data, path == "served") for data in datas] for path in ("before", "served")}
    samples: dict[tuple[str, str], list[float]] = {}
    for _ in range(rounds):
        for stage in calls["before"][0]:
            for path, per_image in calls.items():
                start = time.perf_counter()
                for table in per_image:
                    table[stage]()
                samples.setdefault((stage, path), []).append((time.perf_counter() - start) * 1000 / len(datas))
    return {key: statistics.median(values) for key, values in samples.items()}


def parity(datas: list[bytes], margin: int, spec: InputSpec = SPEC) -> tuple[float, float, float, str]:
    """Mean, 99th percentile and maximum absolute difference of the draft path at ``margin`` against a full
    decode for ``spec``, and the decoded size."""
    served = pre.DRAFT_MARGIN
    pre.DRAFT_MARGIN = margin  # a measurement knob, restored below
    try:
        diffs, size = [], ""
        for data in datas:
            full = pre.fit(pre.load_source(data, spec), spec).astype(np.int16)
            diffs.append(np.abs(pre.preprocess(data, spec).astype(np.int16) - full).ravel())
            size = "x".join(map(str, decoded(data, True).size))
    finally:
        pre.DRAFT_MARGIN = served
    values = np.concatenate(diffs)
    return float(values.mean()), float(np.percentile(values, 99)), float(values.max()), size


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--photos", type=int, default=4, help="synthetic photos per size")
    parser.add_argument("--markdown", help="append the tables to this file")
    parser.add_argument("--no-parity", action="store_true", help="skip the draft path's pixel differences")
    parser.add_argument("--sizes", default="640x480,4000x3000", help="JPEG sizes to time, WxH,WxH")
    args = parser.parse_args(argv)
    facts = run_facts("benchmarks.preprocess_stages")
    rows, parity_rows = [], []
    for width, height in (tuple(int(n) for n in size.split("x")) for size in args.sizes.split(",")):
        datas = [photo(width, height, seed) for seed in range(args.photos)]
        medians = time_stages(datas, args.rounds)
        for stage in dict.fromkeys(stage for stage, _ in medians):
            old, new = medians[(stage, "before")], medians[(stage, "served")]
            rows.append([f"{width}x{height}", stage, fmt(old, 3), fmt(new, 3), fmt(old / new, 2)])
    for width, height in () if args.no_parity else PARITY_SIZES:
        datas = [photo(width, height, seed) for seed in range(args.photos)]
        for interpolation in pre.DRAFT_FILTERS:
            spec = InputSpec(interpolation=interpolation)
            for margin in sorted({1, 2, pre.DRAFT_MARGIN}):
                mean, p99, peak, size = parity(datas, margin, spec)
                parity_rows.append([f"{width}x{height}", interpolation, margin, size, fmt(mean, 3), fmt(p99, 1),
                                    fmt(peak, 0)])
    decoders = f"Pillow {PIL.__version__}" + (f", simplejpeg {simplejpeg.__version__}" if simplejpeg else "")
    text = "\n\n".join([
        facts_block(facts) + f"\n- Decoders: {decoders}",
        markdown_table(["JPEG", "stage", "before ms", "served ms", "before / served"], rows),
        *([markdown_table(["JPEG", "interpolation", "DRAFT_MARGIN", "decoded at", "mean abs diff", "p99 diff",
                           "max diff"], parity_rows)] if parity_rows else [])])
    emit(text + "\n", Path(args.markdown) if args.markdown else None)


if __name__ == "__main__":
    main()
