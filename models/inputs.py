"""Real, deterministic inputs for the reference models.

* ``yolov8n_inputs(n)``   scikit-image sample photos, letterboxed to 320x320
* ``ppocr_det_inputs(n)`` scikit-image photos with real sentences rendered on them
* ``minilm_inputs(n)``    sentences from ``models/sentences.txt``, tokenised
* ``digits_inputs(n)``    the digits test split
* ``calibration_npz(model_name, path, n)`` writes the project's calibration
  format: one array per model input, samples stacked on a new leading axis.

Every ``*_inputs`` function returns a list of feed dicts {input_name: array}.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

_HERE = Path(__file__).resolve().parent
if str(_HERE) not in sys.path:
    sys.path.insert(0, str(_HERE))

SENTENCES_FILE = _HERE / "sentences.txt"

YOLO_SIZE = 320
YOLO_INPUT = "images"
PPOCR_SIZE = (320, 640)  # (H, W), multiples of 32
PPOCR_INPUT = "x"
PPOCR_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
PPOCR_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)

# colour photos first, then grey-scale ones (converted to RGB)
_PHOTOS = (
    "astronaut", "coffee", "chelsea", "rocket", "motorcycle_left", "motorcycle_right",
    "hubble_deep_field", "immunohistochemistry", "retina", "camera", "coins", "clock",
    "moon", "brick", "grass", "gravel",
)


# --------------------------------------------------------------------------
# images
# --------------------------------------------------------------------------
def _load_photo(name: str) -> np.ndarray:
    import skimage.data as sd

    if name.startswith("motorcycle_"):
        left, right, _ = sd.stereo_motorcycle()
        img = left if name.endswith("left") else right
    else:
        img = getattr(sd, name)()
    img = np.asarray(img)
    if img.dtype != np.uint8:
        img = (img.astype(np.float64) * (255.0 / max(img.max(), 1))).astype(np.uint8)
    if img.ndim == 2:
        img = np.stack([img] * 3, axis=-1)
    return np.ascontiguousarray(img[..., :3])


def photo(i: int) -> np.ndarray:
    """The i-th deterministic RGB uint8 photo (HxWx3).  After the base set is used
    up, variants follow (mirror, then centre crops), so photos 0..n-1 are distinct."""
    k = len(_PHOTOS)
    img = _load_photo(_PHOTOS[i % k])
    variant = i // k
    if variant % 2 == 1:
        img = img[:, ::-1]
    if variant >= 2:
        h, w = img.shape[:2]
        f = 1.0 - 0.15 * min(variant // 2, 4)  # 0.85, 0.70, ...
        ch, cw = int(h * f), int(w * f)
        y0, x0 = (h - ch) // 2, (w - cw) // 2
        img = img[y0 : y0 + ch, x0 : x0 + cw]
    return np.ascontiguousarray(img)


def letterbox(img: np.ndarray, size: int = YOLO_SIZE, fill: int = 114) -> np.ndarray:
    """Resize keeping the aspect ratio so the long side is ``size``; pad (centred) with grey."""
    from PIL import Image

    h, w = img.shape[:2]
    s = size / max(h, w)
    nh, nw = max(1, round(h * s)), max(1, round(w * s))
    resized = np.asarray(Image.fromarray(img).resize((nw, nh), Image.BILINEAR))
    canvas = np.full((size, size, 3), fill, dtype=np.uint8)
    y0, x0 = (size - nh) // 2, (size - nw) // 2
    canvas[y0 : y0 + nh, x0 : x0 + nw] = resized
    return canvas


def yolo_preprocess(img: np.ndarray, size: int = YOLO_SIZE) -> np.ndarray:
    """RGB uint8 HxWx3 -> float32 [1,3,size,size] in [0,1]."""
    x = letterbox(img, size).astype(np.float32) / 255.0
    return np.ascontiguousarray(x.transpose(2, 0, 1)[None])


def yolov8n_inputs(n: int = 8, start: int = 0) -> list:
    """Feed dicts {'images': float32 [1,3,320,320]} from photos start .. start + n - 1 (see ``photo``)."""
    return [{YOLO_INPUT: yolo_preprocess(photo(i))} for i in range(start, start + n)]


def ppocr_normalize(img: np.ndarray) -> np.ndarray:
    """RGB uint8 HxWx3 -> float32 [1,3,H,W], (x/255 - mean)/std."""
    x = (img.astype(np.float32) / 255.0 - PPOCR_MEAN) / PPOCR_STD
    return np.ascontiguousarray(x.transpose(2, 0, 1)[None].astype(np.float32))


def _font(size: int):
    from PIL import ImageFont

    return ImageFont.load_default(size=size)


def _cover(img: np.ndarray, hw) -> np.ndarray:
    """Resize + centre-crop to exactly (H, W)."""
    from PIL import Image

    H, W = hw
    h, w = img.shape[:2]
    s = max(H / h, W / w)
    nh, nw = max(H, round(h * s)), max(W, round(w * s))
    r = np.asarray(Image.fromarray(img).resize((nw, nh), Image.BILINEAR))
    y0, x0 = (nh - H) // 2, (nw - W) // 2
    return np.ascontiguousarray(r[y0 : y0 + H, x0 : x0 + W])


def render_text_image(index: int, size=PPOCR_SIZE) -> np.ndarray:
    """Photo background (scikit-image) with three real sentences drawn on it; RGB uint8."""
    from PIL import Image, ImageDraw

    H, W = size
    bg = _cover(photo(index), size)
    im = Image.fromarray(bg)
    draw = ImageDraw.Draw(im, "RGBA")
    sents = sentences()
    rng = np.random.default_rng(1000 + index)
    y = int(rng.integers(12, 40))
    for j in range(3):
        text = sents[(3 * index + j) % len(sents)]
        fsize = int(rng.integers(20, 30))
        font = _font(fsize)
        # wrap to the image width
        words, lines, cur = text.split(), [], ""
        for wd in words:
            cand = (cur + " " + wd).strip()
            if draw.textlength(cand, font=font) > W - 40 and cur:
                lines.append(cur)
                cur = wd
            else:
                cur = cand
        lines.append(cur)
        x = int(rng.integers(10, 30))
        dark_on_light = (index + j) % 2 == 0
        for line in lines:
            if y + fsize + 8 > H:
                break
            box = draw.textbbox((x, y), line, font=font)
            pad = 5
            if dark_on_light:
                draw.rectangle((box[0] - pad, box[1] - pad, box[2] + pad, box[3] + pad), fill=(255, 255, 255, 200))
                color = tuple(int(c) for c in rng.integers(0, 60, 3))
            else:
                draw.rectangle((box[0] - pad, box[1] - pad, box[2] + pad, box[3] + pad), fill=(0, 0, 0, 170))
                color = tuple(int(c) for c in rng.integers(200, 256, 3))
            draw.text((x, y), line, font=font, fill=color)
            y += fsize + 14
        y += int(rng.integers(6, 24))
    return np.asarray(im.convert("RGB"))


def ppocr_det_inputs(n: int = 8) -> list:
    """Feed dicts {'x': float32 [1,3,320,640]}: photos with rendered sentences."""
    return [{PPOCR_INPUT: ppocr_normalize(render_text_image(i))} for i in range(n)]


# --------------------------------------------------------------------------
# sentences / MiniLM
# --------------------------------------------------------------------------
def sentences() -> list:
    return [s.strip() for s in SENTENCES_FILE.read_text(encoding="utf-8").splitlines() if s.strip()]


def _tokenizer():
    import zoo

    return zoo.minilm_tokenizer()


def minilm_batches(batch_size: int = 8, n: int | None = None, pad_to: int | None = None) -> list:
    """Feed dicts of ``batch_size`` sentences each (padded to the batch's longest,
    or to ``pad_to``), covering the first ``n`` sentences (all by default)."""
    sents = sentences()
    if n is not None:
        sents = [sents[i % len(sents)] for i in range(n)]
    tok = _tokenizer()
    return [tok(sents[i : i + batch_size], pad_to=pad_to) for i in range(0, len(sents), batch_size)]


def minilm_inputs(n: int = 8, pad_to: int | None = None) -> list:
    """n feed dicts, one sentence each: int64 input_ids/attention_mask/token_type_ids [1, seq]."""
    return minilm_batches(1, n, pad_to)


def minilm_fixed_length() -> int:
    """A fixed length (multiple of 8) that fits every sentence in sentences.txt."""
    tok = _tokenizer()
    longest = max(len(tok.encode(s)) for s in sentences())
    return int(-(-longest // 8) * 8)


# --------------------------------------------------------------------------
# digits
# --------------------------------------------------------------------------
def digits_inputs(n: int = 32, batch_size: int = 1) -> list:
    """Feed dicts {'input': float32 [batch_size, 64]} from the digits test split."""
    import zoo

    X, _ = zoo.digits_test()
    idx = [i % len(X) for i in range(n)]
    Xn = X[idx]
    return [{"input": np.ascontiguousarray(Xn[i : i + batch_size])} for i in range(0, n, batch_size)]


# --------------------------------------------------------------------------
# calibration
# --------------------------------------------------------------------------
_ALIASES = {"digits": "digits_mlp", "yolo": "yolov8n", "ppocr": "ppocr_det", "all-minilm-l6-v2": "minilm"}


def calibration_feeds(model_name: str, n: int) -> list:
    """n same-shaped feed dicts for ``model_name`` (MiniLM padded to a fixed length)."""
    name = _ALIASES.get(model_name.lower(), model_name.lower())
    if name == "yolov8n":
        return yolov8n_inputs(n)
    if name == "ppocr_det":
        return ppocr_det_inputs(n)
    if name == "minilm":
        return minilm_inputs(n, pad_to=minilm_fixed_length())
    if name == "digits_mlp":
        return digits_inputs(n)
    raise KeyError(f"unknown model {model_name!r}")


def calibration_npz(model_name: str, path, n: int = 16) -> Path:
    """Write n real samples as .npz: one array per input name, shape [n, *sample_shape]."""
    feeds = calibration_feeds(model_name, n)
    arrays = {k: np.stack([f[k] for f in feeds], axis=0) for k in feeds[0]}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        np.savez(f, **arrays)
    return path
