"""Task-aware fidelity: what a model's user sees, not only how close the raw tensors are.

A whole-output cosine can read 0.999 while a detector's class scores are destroyed (boxes and
scores share one tensor and the boxes dominate its norm), or while a text detector's mask
loses half its pixels. These metrics look at the task instead: a slice of an output on its
own, detections after NMS matched against the reference's, binarized text masks, top-1 labels.

Every function takes either one array (batch on axis 0) or a list of such arrays (one per
feed, as `runtime.run_all` collects them); pure numpy.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .fidelity import cosine


def _batches(outputs) -> list[np.ndarray]:
    """One array or a list of per-feed arrays -> a list of arrays whose axis 0 is the batch."""
    if isinstance(outputs, np.ndarray):
        return [outputs]
    return [np.asarray(o) for o in outputs]


def _images(outputs) -> list[np.ndarray]:
    """Per-image arrays (batch axis dropped), in order over all feeds."""
    return [image for batch in _batches(outputs) for image in batch]


# --------------------------------------------------------------------------
# slices and rows
# --------------------------------------------------------------------------
def part_cosine(ref, cand, axis: int = 1, start: int | None = None, stop: int | None = None) -> float:
    """Cosine over all feeds of `output[..., start:stop, ...]` (the slice taken on `axis`).

    YOLOv8's class scores are `part_cosine(ref, cand, axis=1, start=4)`, its boxes `stop=4`;
    with neither bound it is the whole-output cosine. Feeds may differ in shape (a sequence
    length), but each reference/candidate pair must match."""
    refs, cands = _batches(ref), _batches(cand)
    if len(refs) != len(cands):
        raise ValueError(f"{len(refs)} reference outputs but {len(cands)} candidate outputs")
    a, b = [], []
    for r, c in zip(refs, cands):
        if r.shape != c.shape:
            raise ValueError(f"output shapes differ: {r.shape} vs {c.shape}")
        index = [slice(None)] * r.ndim
        index[axis] = slice(start, stop)
        a.append(r[tuple(index)].astype(np.float64).ravel())
        b.append(c[tuple(index)].astype(np.float64).ravel())
    return cosine(np.concatenate(a), np.concatenate(b)) if a else 1.0


def row_cosines(ref, cand) -> np.ndarray:
    """Cosine of each row (last axis) separately, e.g. one per sentence embedding; 1 where both rows are zero."""
    a = np.concatenate([r.reshape(-1, r.shape[-1]) for r in _batches(ref)]).astype(np.float64)
    b = np.concatenate([c.reshape(-1, c.shape[-1]) for c in _batches(cand)]).astype(np.float64)
    na, nb = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
    dot = np.einsum("ij,ij->i", a, b)
    with np.errstate(invalid="ignore", divide="ignore"):
        result = dot / (na * nb)
    result = np.where((na == 0) & (nb == 0), 1.0, np.where((na == 0) | (nb == 0), 0.0, result))
    return np.nan_to_num(result, nan=0.0)


def top1_agreement(ref, cand, axis: int = -1) -> float:
    """Fraction of rows whose argmax (the predicted class) is the same in both."""
    a = np.concatenate([np.argmax(r, axis=axis).ravel() for r in _batches(ref)])
    b = np.concatenate([np.argmax(c, axis=axis).ravel() for c in _batches(cand)])
    if a.shape != b.shape:
        raise ValueError(f"{a.size} reference rows but {b.size} candidate rows")
    return float(np.mean(a == b)) if a.size else 1.0


def top1_accuracy(logits, labels, axis: int = -1) -> float:
    """Fraction of rows whose argmax equals the label."""
    predicted = np.concatenate([np.argmax(x, axis=axis).ravel() for x in _batches(logits)])
    labels = np.asarray(labels).ravel()
    if predicted.shape != labels.shape:
        raise ValueError(f"{predicted.size} predictions but {labels.size} labels")
    return float(np.mean(predicted == labels)) if labels.size else 1.0


# --------------------------------------------------------------------------
# detection (YOLOv8-style heads)
# --------------------------------------------------------------------------
@dataclass(frozen=True)
class Detections:
    """One image's detections, best score first; len() is their number."""

    boxes: np.ndarray  # float [n, 4] x1, y1, x2, y2
    scores: np.ndarray  # float [n]
    classes: np.ndarray  # int [n]

    def __len__(self) -> int:
        return int(self.scores.shape[0])


def box_iou(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """IoU of one xyxy box with each of `boxes` [n, 4]."""
    x1 = np.maximum(box[0], boxes[:, 0])
    y1 = np.maximum(box[1], boxes[:, 1])
    x2 = np.minimum(box[2], boxes[:, 2])
    y2 = np.minimum(box[3], boxes[:, 3])
    inter = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    area = (box[2] - box[0]) * (box[3] - box[1])
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    union = area + areas - inter
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, inter / union, 0.0)


def nms(boxes: np.ndarray, scores: np.ndarray, classes: np.ndarray, iou: float = 0.45,
        max_det: int = 300) -> np.ndarray:
    """Indices kept by greedy class-aware NMS, best score first.

    Greedy: take the best remaining box, drop the rest of its class that overlap it by more
    than `iou`. Each step is one vectorized IoU against what is left, so the loop runs once
    per kept box, not once per pair."""
    order = np.argsort(-scores, kind="stable")
    keep = []
    while order.size and len(keep) < max_det:
        best, rest = order[0], order[1:]
        keep.append(best)
        overlap = box_iou(boxes[best], boxes[rest])
        order = rest[(overlap <= iou) | (classes[rest] != classes[best])]
    return np.asarray(keep, dtype=np.int64)


def yolo_detections(output, conf: float = 0.25, iou: float = 0.45, max_det: int = 300) -> list[Detections]:
    """Decode YOLOv8-style outputs [b, 4 + C, anchors] (rows cx, cy, w, h, then C class scores)
    into per-image detections: each anchor's best class, score > `conf`, class-aware NMS.

    `output` is one such array or a list of them (one per feed); the result has one entry per image."""
    result = []
    for image in _images(output):
        if image.ndim != 2 or image.shape[0] < 5:
            raise ValueError(f"expected a YOLOv8 output [b, 4 + classes, anchors], got an image of shape {image.shape}")
        rows = image.astype(np.float64)
        class_scores = rows[4:]
        classes = np.argmax(class_scores, axis=0)
        scores = class_scores[classes, np.arange(rows.shape[1])]
        chosen = scores > conf
        cx, cy, w, h = rows[:4, chosen]
        boxes = np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], axis=1)
        scores, classes = scores[chosen], classes[chosen]
        keep = nms(boxes, scores, classes, iou, max_det)
        result.append(Detections(boxes[keep], scores[keep], classes[keep].astype(np.int64)))
    return result


def match_detections(ref: Detections, cand: Detections, iou: float = 0.5) -> int:
    """How many candidate detections find a reference detection of the same class at IoU >= `iou`.

    Greedy, candidates in descending score order; each reference box is taken once, by the
    unmatched same-class box that overlaps it most."""
    taken = np.zeros(len(ref), dtype=bool)
    matched = 0
    for index in np.argsort(-cand.scores, kind="stable"):
        if not len(ref):
            break
        overlap = box_iou(cand.boxes[index], ref.boxes)
        overlap[taken | (ref.classes != cand.classes[index])] = -1.0
        best = int(np.argmax(overlap))
        if overlap[best] >= iou:
            taken[best] = True
            matched += 1
    return matched


def detection_agreement(ref_outputs, cand_outputs, iou: float = 0.5, conf: float = 0.25,
                        nms_iou: float = 0.45) -> dict:
    """Precision, recall and F1 of the candidate's detections against the reference's (taken as
    ground truth), pooled over all images.

    Inputs are raw YOLOv8 outputs (decoded with `yolo_detections(conf, nms_iou)`) or lists of
    `Detections`. Precision is 1 when the candidate finds nothing, recall 1 when the reference
    has nothing; F1 = 2 matched / (reference + candidate detections), 1 when both are empty."""
    refs = _as_detections(ref_outputs, conf, nms_iou)
    cands = _as_detections(cand_outputs, conf, nms_iou)
    if len(refs) != len(cands):
        raise ValueError(f"{len(refs)} reference images but {len(cands)} candidate images")
    matched = sum(match_detections(r, c, iou) for r, c in zip(refs, cands))
    n_ref, n_cand = sum(map(len, refs)), sum(map(len, cands))
    return {
        "precision": matched / n_cand if n_cand else 1.0,
        "recall": matched / n_ref if n_ref else 1.0,
        "f1": 2 * matched / (n_ref + n_cand) if n_ref + n_cand else 1.0,
        "matched": matched, "reference": n_ref, "candidate": n_cand,
    }


def _as_detections(outputs, conf: float, nms_iou: float) -> list[Detections]:
    if isinstance(outputs, (list, tuple)) and all(isinstance(d, Detections) for d in outputs):
        return list(outputs)
    return yolo_detections(outputs, conf, nms_iou)


# --------------------------------------------------------------------------
# segmentation maps (PP-OCR det)
# --------------------------------------------------------------------------
def mask_iou(ref_map, cand_map, threshold: float = 0.3) -> dict:
    """IoU of the binarized maps (`value > threshold`, as PP-OCR's DB post-processing does at 0.3),
    per image and its mean and min; an image where both masks are empty counts as 1."""
    refs, cands = _images(ref_map), _images(cand_map)
    if len(refs) != len(cands):
        raise ValueError(f"{len(refs)} reference maps but {len(cands)} candidate maps")
    per_image = []
    for r, c in zip(refs, cands):
        if r.shape != c.shape:
            raise ValueError(f"map shapes differ: {r.shape} vs {c.shape}")
        a, b = r > threshold, c > threshold
        union = np.count_nonzero(a | b)
        per_image.append(np.count_nonzero(a & b) / union if union else 1.0)
    per_image = np.asarray(per_image, dtype=np.float64)
    return {"per_image": per_image,
            "mean": float(per_image.mean()) if per_image.size else 1.0,
            "min": float(per_image.min()) if per_image.size else 1.0}


__all__ = ["Detections", "box_iou", "detection_agreement", "mask_iou", "match_detections", "nms",
           "part_cosine", "row_cosines", "top1_accuracy", "top1_agreement", "yolo_detections"]
