"""Per-image CPU of data-prep's decode + resize + encode, and the quality it keeps (issue 16, speed).

    .venv/bin/pip install opencv-python-headless simplejpeg==1.9.0  # once: measured here, not dependencies
    .venv/bin/python benchmarks/resize_micro.py [--images 200] [--reps 3] [--workdir /tmp/resize_micro]
        [--only VARIANT ...] [--tree /tmp/before]
    # --tree: the root of another checkout (e.g. `git archive`) whose process_image is measured

Variants of a library that is not installed are left out. One process, one thread (`time.process_time`,
robust to other load on a shared machine; OpenCV and torch held to one thread, as a worker of 16 threads
would have to), on the benchmark's own corpus
(`build_corpus` of benchmarks/data_prep_vs_img2dataset.py: photo-like JPEGs, longer side 640, quality 90).
Every variant makes the stored image of `--resize-mode shorter --image-size 256 --resample area`, JPEG
quality 95.
Quality: PSNR of the stored image, decoded, against a reference = a full-resolution decode resized to the
same size with Pillow's Lanczos (mean and min over the images).

Variants (decode / resize / encode):
  pillow_draft_box      Pillow, draft (DCT-scaled) decode where the shrink is >= 2 / Pillow BOX / Pillow
                        (data-prep before the draft fix: the decoder's padded last column and row resized
                        as picture, the size computed from the decoded size)
  pillow_draft_fixed_box  the same decode; resized from the picture's own box to the original's size,
                        box (data-prep since the draft fix)
  pillow_draft_fixed, pillow_draft_fixed_bilinear   the same, bicubic or bilinear after a DCT-scaled
                        decode (box otherwise)
  pillow_box            Pillow full decode / Pillow BOX / Pillow
  pillow_box_gap1       Pillow full decode / Pillow BOX with reducing_gap=1 (integer Image.reduce
                        first) / Pillow
  pillow_ycbcr_draft_box  as pillow_draft_box, decoded to, resized in and encoded from YCbCr (no colour
                        conversions: the JPEG's own colour space)
  pillow_ycbcr_box      as pillow_box, in YCbCr
  pillow_draft_cv2area  as pillow_draft_box, resize with OpenCV INTER_AREA on the decoded pixels
  pillow_cv2area        Pillow full decode / OpenCV INTER_AREA / Pillow
  pillow_torch_aa       Pillow full decode / torch's uint8 antialiased bilinear (already a dependency)
                        / Pillow
  pillow_draft_torch_aa as pillow_torch_aa, after a draft decode
  cv2_reduced           cv2.imdecode with IMREAD_REDUCED_COLOR_2/4/8 where the shrink allows /
                        INTER_AREA / cv2.imencode
  cv2_full              cv2.imdecode / INTER_AREA / cv2.imencode
  sj_full_box           simplejpeg (libjpeg-turbo) full decode / Pillow BOX / Pillow
  sj_pow2_box           simplejpeg decode scaled 1/2, 1/4 or 1/8 where the shrink allows (Pillow's draft
                        rule) / BOX from the picture's box / Pillow
  sj_m8_box, sj_m8_bilinear, sj_m8_bicubic   simplejpeg decode scaled by the smallest M/8 (M = 1..8)
                        whose picture (original size * M/8, fractional) keeps the shorter side >= 256 /
                        that filter from the picture's exact box (libjpeg pads the scaled size up to whole
                        pixels) / Pillow
  sj_pow2_box_sjenc, sj_m8_bilinear_sjenc, sj_m8_bicubic_sjenc   the same, encoded by simplejpeg (4:2:0)
  process_image         data_prep.images.process_image of this tree or --tree (total only)
"""
from __future__ import annotations

import argparse
import io
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

try:  # measured only, not a dependency: its variants are left out where it is not installed
    import cv2
except ImportError:
    cv2 = None
try:
    import simplejpeg
except ImportError:
    simplejpeg = None

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.data_prep_vs_img2dataset import build_corpus  # noqa: E402


def _scaled_size(size: tuple[float, float], shorter_px: int) -> tuple[int, int]:
    scale = shorter_px / max(1, min(size))
    return max(1, round(size[0] * scale)), max(1, round(size[1] * scale))

SIZE_PX = 256
QUALITY = 95


def _pillow_decode(raw: bytes, draft: bool, mode: str = "RGB") -> Image.Image:
    image = Image.open(io.BytesIO(raw))
    if draft or mode != "RGB":  # mode "YCbCr": libjpeg skips its colour conversion
        image.draft(mode, _scaled_size(image.size, SIZE_PX) if draft else None)
    image.load()
    return image


def _pillow_encode(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=QUALITY)
    return out.getvalue()


def _pillow_draft_fixed(raw: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(raw))
    stored_size = image.size
    drafted = image.draft("RGB", _scaled_size(image.size, SIZE_PX))
    image.load()
    if drafted and image.size != stored_size:
        # The picture's box; the target is taken from it, i.e. from the original size.
        image.info["dct_box"] = drafted[1]
    return image


def _resize_fixed(after_dct: Image.Resampling):
    def resize(image: Image.Image, target: tuple[int, int]) -> Image.Image:
        box = image.info.get("dct_box")
        return image.resize(target, after_dct if box else Image.Resampling.BOX, box=box, reducing_gap=3.0)
    return resize


def _simplejpeg_scale(size: tuple[int, int], powers_of_two: bool) -> int:
    """M of the smallest M/8 at which the picture's shorter side is still >= SIZE_PX; M in 1, 2, 4, 8 only
    (Pillow's draft: libjpeg-turbo has SIMD IDCTs for these) with `powers_of_two`, else 1..8."""
    scale = min(8, max(1, -(-8 * SIZE_PX // min(size))))
    return next(m for m in (1, 2, 4, 8) if m >= scale) if powers_of_two else scale


def _simplejpeg_decode(raw: bytes, scales: str) -> Image.Image:
    """simplejpeg (libjpeg-turbo) decode, scaled in the IDCT by M/8 ("m8": any M, "pow2": 1/2, 1/4, 1/8,
    "full": none); `info["dct_box"]`: the exact box of the picture in the (padded) scaled pixels."""
    width, height = Image.open(io.BytesIO(raw)).size  # header only: data-prep has it from Image.open
    scale = 8 if scales == "full" else _simplejpeg_scale((width, height), scales == "pow2")
    # simplejpeg takes the smallest factor whose padded size (ceil(side * M / 8)) is >= the minimum;
    # asking for the padded size of M picks M itself (M - 1 could pass 255.5 px as >= 256).
    if width <= height:
        minimum = {"min_width": -(-width * scale // 8)}
    else:
        minimum = {"min_height": -(-height * scale // 8)}
    # A new array each call: glibc serves it with mmap when other variants' frees run in between, ~160 page
    # faults (~0.4 ms) a full 640 px decode, ~40 at 1/2 (2026-12-02; MALLOC_MMAP_THRESHOLD_=4194304 removes
    # them). A data-prep worker interleaves as well, so they are counted here.
    # RGB, copied by fromarray (~0.1 ms): an RGBX array would be shared by Image.frombuffer, but as an RGBX
    # image, whose resize treats X as a fourth channel (+0.3-0.35 ms here, 2026-12-02).
    image = Image.fromarray(simplejpeg.decode_jpeg(raw, "RGB", **minimum))
    if scale < 8:
        image.info["dct_box"] = (0.0, 0.0, width * scale / 8, height * scale / 8)
    return image


def _simplejpeg_encode(image: Image.Image) -> bytes:
    # 4:2:0 as Pillow's default, so that only the encoder differs (simplejpeg's own default is 4:4:4).
    return simplejpeg.encode_jpeg(np.asarray(image), QUALITY, image.mode, "420")


def _cv2_area(image: Image.Image, target: tuple[int, int]) -> Image.Image:
    return Image.fromarray(cv2.resize(np.asarray(image), target, interpolation=cv2.INTER_AREA))


def _torch_aa_bilinear(image: Image.Image, target: tuple[int, int]) -> Image.Image:
    import torch

    pixels = torch.from_numpy(np.array(image)).permute(2, 0, 1)[None]  # uint8, channels last in memory
    out = torch.nn.functional.interpolate(pixels, size=(target[1], target[0]), mode="bilinear",
                                          antialias=True, align_corners=False)
    return Image.fromarray(out[0].permute(1, 2, 0).contiguous().numpy())


def _cv2_decode(raw: bytes, reduced: bool) -> np.ndarray:
    flags = cv2.IMREAD_COLOR
    if reduced:  # the same rule as Pillow's draft: the largest 1/n (n = 2, 4, 8) that stays >= the target
        header = Image.open(io.BytesIO(raw))  # size from the header only, nothing decoded
        scale = min(header.size) / SIZE_PX
        for factor, flag in ((8, cv2.IMREAD_REDUCED_COLOR_8), (4, cv2.IMREAD_REDUCED_COLOR_4),
                             (2, cv2.IMREAD_REDUCED_COLOR_2)):
            if scale >= factor:
                flags = flag
                break
    return cv2.imdecode(np.frombuffer(raw, np.uint8), flags)


def variants() -> dict:
    """name -> (decode(raw) -> pixels, resize(pixels, target) -> pixels, encode(pixels) -> bytes)."""
    def pil(draft: bool, resize, mode: str = "RGB"):
        return (lambda raw: _pillow_decode(raw, draft, mode), resize, _pillow_encode)

    box = lambda im, t: im.resize(t, Image.Resampling.BOX, reducing_gap=3.0)  # noqa: E731
    box1 = lambda im, t: im.resize(t, Image.Resampling.BOX, reducing_gap=1.0)  # noqa: E731
    found = {
        "pillow_draft_box": pil(True, box),
        "pillow_draft_fixed": (_pillow_draft_fixed, _resize_fixed(Image.Resampling.BICUBIC), _pillow_encode),
        "pillow_draft_fixed_box": (_pillow_draft_fixed, _resize_fixed(Image.Resampling.BOX), _pillow_encode),
        "pillow_draft_fixed_bilinear": (_pillow_draft_fixed, _resize_fixed(Image.Resampling.BILINEAR),
                                        _pillow_encode),
        "pillow_box": pil(False, box),
        "pillow_box_gap1": pil(False, box1),
        "pillow_ycbcr_draft_box": pil(True, box, "YCbCr"),
        "pillow_ycbcr_box": pil(False, box, "YCbCr"),
        "pillow_torch_aa": pil(False, _torch_aa_bilinear),
        "pillow_draft_torch_aa": pil(True, _torch_aa_bilinear),
    }
    if simplejpeg is not None:
        m8 = lambda raw: _simplejpeg_decode(raw, "m8")  # noqa: E731
        pow2 = lambda raw: _simplejpeg_decode(raw, "pow2")  # noqa: E731
        resize_box = _resize_fixed(Image.Resampling.BOX)
        found.update({
            "sj_full_box": (lambda raw: _simplejpeg_decode(raw, "full"), box, _pillow_encode),
            "sj_pow2_box": (pow2, resize_box, _pillow_encode),
            "sj_pow2_box_sjenc": (pow2, resize_box, _simplejpeg_encode),
            "sj_m8_box": (m8, resize_box, _pillow_encode),
            "sj_m8_bilinear": (m8, _resize_fixed(Image.Resampling.BILINEAR), _pillow_encode),
            "sj_m8_bicubic": (m8, _resize_fixed(Image.Resampling.BICUBIC), _pillow_encode),
            "sj_m8_bilinear_sjenc": (m8, _resize_fixed(Image.Resampling.BILINEAR), _simplejpeg_encode),
            "sj_m8_bicubic_sjenc": (m8, _resize_fixed(Image.Resampling.BICUBIC), _simplejpeg_encode),
        })
    if cv2 is not None:
        area = lambda px, t: cv2.resize(px, t, interpolation=cv2.INTER_AREA)  # noqa: E731

        def encode_cv2(pixels: np.ndarray) -> bytes:
            return cv2.imencode(".jpg", pixels, [cv2.IMWRITE_JPEG_QUALITY, QUALITY])[1].tobytes()

        found.update({
            "pillow_draft_cv2area": pil(True, _cv2_area),
            "pillow_cv2area": pil(False, _cv2_area),
            "cv2_reduced": (lambda raw: _cv2_decode(raw, True), area, encode_cv2),
            "cv2_full": (lambda raw: _cv2_decode(raw, False), area, encode_cv2),
        })
    return found


def psnr(stored: bytes, full: Image.Image) -> float:
    stored_image = Image.open(io.BytesIO(stored)).convert("RGB")
    got = np.asarray(stored_image, dtype=np.float64)
    # The reference at the stored size: a draft decode can round the target to one pixel less.
    reference = np.asarray(full.resize(stored_image.size, Image.Resampling.LANCZOS), dtype=np.float64)
    mse = np.mean((got - reference) ** 2)
    return float(10 * np.log10(255.0 ** 2 / max(mse, 1e-12)))


def measure(chosen: dict, items: list[bytes], sizes: list[tuple[int, int]], reps: int,
            references: list[Image.Image]) -> list[dict]:
    """Variants interleaved image by image, so that a change of load on a shared machine hits them alike.

    Beside the totals, per image group: `ge2`, shrink >= 2 (a power-of-two DCT scale applies, Pillow's
    draft), and `lt2`, shrink below 2 (only an M/8 scale, M = 5..7, or none)."""
    spent = {name: {"decode": 0.0, "resize": 0.0, "encode": 0.0} for name in chosen}
    by_group = {name: {"ge2": 0.0, "lt2": 0.0} for name in chosen}
    groups = ["ge2" if min(size) >= 2 * SIZE_PX else "lt2" for size in sizes]
    outputs: dict[str, list[bytes]] = {name: [] for name in chosen}
    for rep in range(reps):
        for raw, size, group in zip(items, sizes, groups):
            target = _scaled_size(size, SIZE_PX)
            for name, (decode, resize, encode) in chosen.items():
                t0 = time.process_time()
                pixels = decode(raw)
                t1 = time.process_time()
                pixels = resize(pixels, target)
                t2 = time.process_time()
                data = encode(pixels)
                t3 = time.process_time()
                spent[name]["decode"] += t1 - t0
                spent[name]["resize"] += t2 - t1
                spent[name]["encode"] += t3 - t2
                by_group[name][group] += t3 - t0
                if rep == 0:
                    outputs[name].append(data)
    rows = []
    count = reps * len(items)
    for name in chosen:
        scores = [psnr(data, ref) for data, ref in zip(outputs[name], references)]
        row = {"variant": name, **{f"{k}_ms": round(1e3 * v / count, 3) for k, v in spent[name].items()}}
        row["total_ms"] = round(sum(row[f"{k}_ms"] for k in spent[name]), 3)
        row.update(psnr_mean_db=round(float(np.mean(scores)), 2), psnr_min_db=round(float(np.min(scores)), 2))
        for group in ("ge2", "lt2"):
            picked = [score for score, g in zip(scores, groups) if g == group]
            if picked:
                row[f"{group}_images"] = len(picked)
                row[f"{group}_total_ms"] = round(1e3 * by_group[name][group] / (reps * len(picked)), 3)
                row[f"{group}_psnr_mean_db"] = round(float(np.mean(picked)), 2)
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/resize_micro"))
    parser.add_argument("--only", nargs="*", help="variant names (default: all)")
    parser.add_argument("--tree", default=None, help="repository root to import data_prep from")
    args = parser.parse_args()
    if args.tree:
        sys.path.insert(0, args.tree)
    from data_prep import images as data_prep_images
    from data_prep.images import ImageOptions, process_image
    if cv2 is not None:
        cv2.setNumThreads(1)
    try:
        import torch

        torch.set_num_threads(1)
    except ImportError:
        pass
    items = [p.read_bytes() for p in build_corpus(args.workdir / f"corpus{args.images}", args.images)]
    sizes = [Image.open(io.BytesIO(raw)).size for raw in items]
    references = [_pillow_decode(raw, False) for raw in items]  # full resolution
    print(json.dumps({"opencv": cv2 and cv2.__version__, "pillow": Image.__version__,
                      "simplejpeg": simplejpeg and simplejpeg.__version__, "images": len(items),
                      "data_prep": str(Path(data_prep_images.__file__).parent.parent),
                      "reps": args.reps, "load_average": os.getloadavg()}))
    chosen = {name: steps for name, steps in variants().items() if not args.only or name in args.only}
    if not args.only or "process_image" in args.only:
        options = ImageOptions(SIZE_PX, "shorter", QUALITY, resample="area")
        chosen["process_image"] = (lambda raw: process_image(raw, options).data, lambda data, target: data,
                                   lambda data: data)
    for row in measure(chosen, items, sizes, args.reps, references):
        print(json.dumps(row))
    print(json.dumps({"load_average": os.getloadavg()}))

if __name__ == "__main__":
    main()
