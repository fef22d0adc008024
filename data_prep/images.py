"""Image decoding and normalisation shared by every command.

Every failure raises `RowRejected` with a short machine-readable reason, so callers count the
row instead of crashing (house rule 7)."""
from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass

import numpy as np
from PIL import Image, UnidentifiedImageError

RESIZE_MODES = ("shorter", "center-crop", "none")
# Resampling filters. "area" (img2dataset's default for shrinking, like OpenCV's INTER_AREA) averages
# every source pixel under an output pixel (Pillow's BOX filter): alias-free and the cheapest;
# images that have to grow use bicubic, since box-enlarging looks blocky.
RESAMPLE_FILTERS = {"area": Image.Resampling.BOX, "bilinear": Image.Resampling.BILINEAR,
                    "bicubic": Image.Resampling.BICUBIC, "lanczos": Image.Resampling.LANCZOS}
# Formats kept byte-for-byte when nothing about the pixels has to change (resize mode "none").
_PASSTHROUGH_FORMATS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}


class RowRejected(Exception):
    """A row that cannot become a sample; `reason` is the key counted in stats and manifest."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class ImageOptions:
    """How images are normalised before they are stored."""

    image_size: int = 256
    """Target size in pixels (shorter side, or the square side for center-crop)."""
    resize_mode: str = "shorter"
    """One of RESIZE_MODES; "none" keeps the pixels and, where possible, the original bytes."""
    jpeg_quality: int = 95
    """Quality for re-encoded JPEGs."""
    min_image_size: int = 0
    """Rows whose shorter side is below this many pixels are rejected as too_small."""
    resample: str = "area"
    """Filter of the resize, one of RESAMPLE_FILTERS ("area": box when shrinking, bicubic when enlarging)."""
    resize_only_if_bigger: bool = False
    """Images whose shorter side is already at most image_size are neither resized nor cropped
    (img2dataset's option of this name); they keep their original bytes where resize mode "none" would."""

    def __post_init__(self) -> None:
        if self.resize_mode not in RESIZE_MODES:
            raise ValueError(f"resize mode {self.resize_mode!r}: expected one of {RESIZE_MODES}")
        if self.resample not in RESAMPLE_FILTERS:
            raise ValueError(f"resample {self.resample!r}: expected one of {tuple(RESAMPLE_FILTERS)}")
        if self.image_size < 1 or not 1 <= self.jpeg_quality <= 100 or self.min_image_size < 0:
            raise ValueError("image size must be >= 1, JPEG quality in 1..100, min size >= 0")


@dataclass(frozen=True)
class EncodedImage:
    data: bytes
    ext: str
    """Extension for the tar member: jpg, png or webp."""
    original_width: int
    original_height: int
    width: int
    height: int


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def encode_jpeg(image: Image.Image, quality: int = 95) -> bytes:
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=quality)
    return out.getvalue()


def process_image(raw: bytes, options: ImageOptions) -> EncodedImage:
    """Decode, orient, convert to RGB, resize and encode one image."""
    if not raw:
        raise RowRejected("empty_file", "0 bytes")
    image = _open(raw)
    source_format = image.format
    if image.width * image.height > (Image.MAX_IMAGE_PIXELS or float("inf")):
        # Pillow only warns up to twice this size; a decompression bomb is a rejected row.
        raise RowRejected("image_too_large", f"{image.width}x{image.height}")
    orientation = _orientation(image)
    width, height = image.size  # read before draft mode shrinks what gets decoded
    if orientation in (5, 6, 7, 8):  # these EXIF orientations swap the stored axes
        width, height = height, width
    if min(width, height) < options.min_image_size:
        raise RowRejected("too_small", f"{width}x{height}, below --min-image-size {options.min_image_size}")
    keep_pixels = options.resize_mode == "none" or (
        options.resize_only_if_bigger and min(width, height) <= options.image_size)
    picture_box = None
    if not keep_pixels and source_format == "JPEG":
        # Decode at a reduced scale straight from the DCT: the largest speed-up for big JPEGs. The
        # decoder pads odd sizes to whole pixels: `picture_box` is the part that holds the picture.
        stored_size = image.size
        drafted = image.draft("RGB", _scaled_size(image.size, options.image_size))
        if drafted and image.size != stored_size:
            picture_box = drafted[1]
    image = _load(image)
    if keep_pixels and orientation == 1 and image.mode == "RGB" and source_format in _PASSTHROUGH_FORMATS:
        return EncodedImage(raw, _PASSTHROUGH_FORMATS[source_format], width, height, width, height)
    rgb = to_rgb(image)
    if not keep_pixels:
        # Scaled before it is turned upright: the picture box is in stored coordinates, and fewer
        # pixels are turned. The scale does not depend on the axes, so the sizes are those of upright.
        rgb = _scale_shorter(rgb, options.image_size, options.resample, dct_box=picture_box)
    upright = _orient(rgb, orientation)
    resized = upright if keep_pixels else resize(upright, options.image_size, options.resize_mode,
                                                 options.resample)
    return EncodedImage(encode_jpeg(resized, options.jpeg_quality), "jpg", width, height,
                        resized.width, resized.height)


def _open(raw: bytes) -> Image.Image:
    try:
        return Image.open(io.BytesIO(raw))
    except UnidentifiedImageError:
        raise RowRejected("not_an_image", f"{len(raw)} bytes in no image format Pillow reads") from None
    except Image.DecompressionBombError as exc:
        raise RowRejected("image_too_large", str(exc)) from None
    except Exception as exc:  # noqa: BLE001 - any decoder failure is a bad row
        raise RowRejected("corrupt_image", f"{type(exc).__name__}: {exc}") from None


def _orientation(image: Image.Image) -> int:
    try:
        return int(image.getexif().get(0x0112, 1) or 1)
    except Exception:  # noqa: BLE001 - unreadable EXIF: treat as upright, pixels may still decode
        return 1


def _load(image: Image.Image) -> Image.Image:
    try:
        image.load()
        return image
    except Exception as exc:  # noqa: BLE001 - truncated data, decoder errors
        raise RowRejected("corrupt_image", f"{type(exc).__name__}: {exc}") from None


# EXIF orientation -> the turn that makes stored pixels upright (ImageOps.exif_transpose's table; applied
# here to the scaled image, whose EXIF block a conversion may not carry).
_UPRIGHT = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
            4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE,
            6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE, 8: Image.Transpose.ROTATE_90}


def _orient(image: Image.Image, orientation: int) -> Image.Image:
    # Phones store rotated pixels plus an EXIF tag; training wants upright pixels.
    method = _UPRIGHT.get(orientation)
    return image.transpose(method) if method is not None else image


def _scaled_size(size: tuple[float, float], shorter_px: int) -> tuple[int, int]:
    width, height = size
    scale = shorter_px / max(1, min(width, height))
    return max(1, round(width * scale)), max(1, round(height * scale))


def to_rgb(image: Image.Image) -> Image.Image:
    """CMYK, palette, alpha, 16-bit and float images to 8-bit RGB (alpha over white)."""
    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        image = _to_8bit(image)
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def _to_8bit(image: Image.Image) -> Image.Image:
    values = np.asarray(image)
    if image.mode == "F":
        scaled = np.clip(values, 0, 255)
    else:
        # 16-bit data spans 0..65535; keep the top 8 bits rather than clipping everything to white.
        scaled = np.clip(values.astype(np.int64), 0, 65535) >> 8
    return Image.fromarray(scaled.astype(np.uint8), mode="L")


def resize(image: Image.Image, size_px: int, mode: str, resample: str = "area") -> Image.Image:
    """Shorter side to `size_px` ("shorter"), then a centred square crop ("center-crop")."""
    if mode == "none":
        return image
    image = _scale_shorter(image, size_px, resample)
    if mode == "center-crop":
        left = (image.width - size_px) // 2
        top = (image.height - size_px) // 2
        image = image.crop((left, top, left + size_px, top + size_px))
    return image


def _scale_shorter(image: Image.Image, size_px: int, resample: str,
                   dct_box: tuple[float, float, float, float] | None = None) -> Image.Image:
    """The shorter side of the picture to `size_px`, at the size a full decode would give.

    `dct_box`: set when a JPEG draft decode scaled the picture down in the DCT, the part of `image` that
    holds it (the decoder pads odd sizes to whole pixels; scaling the pad as picture shifted and
    stretched the output). Box stays the filter after such a decode: bicubic gains 1.9 dB PSNR more but
    costs 0.3-0.4 ms per 640 px image, +8-11% (benchmarks/resize_micro.py, RESULTS.md issue 16)."""
    box = dct_box or (0.0, 0.0, float(image.width), float(image.height))
    picture_size = (box[2] - box[0], box[3] - box[1])
    target = _scaled_size(picture_size, size_px)
    if target == image.size and dct_box is None:
        return image
    filt = RESAMPLE_FILTERS[resample]
    if resample == "area" and target[0] > picture_size[0]:
        filt = Image.Resampling.BICUBIC  # enlarging: a box filter would only repeat pixels
    return image.resize(target, filt, box=box, reducing_gap=3.0)
