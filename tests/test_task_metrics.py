"""Task-aware metrics on hand-built outputs whose answer is known, plus one real detector check."""

import numpy as np
import pytest

from onnxshrink.task_metrics import (
    Detections,
    detection_agreement,
    mask_iou,
    nms,
    part_cosine,
    row_cosines,
    top1_accuracy,
    top1_agreement,
    yolo_detections,
)

CLASSES = 3


def yolo_output(objects, anchors: int = 50) -> np.ndarray:
    """A YOLOv8-style output [1, 4 + CLASSES, anchors]: one anchor per (cx, cy, w, h, class, score),
    every other anchor a background box scoring 0.01."""
    out = np.zeros((1, 4 + CLASSES, anchors), dtype=np.float32)
    out[0, :4] = np.array([100.0, 100.0, 10.0, 10.0])[:, None]
    out[0, 4:] = 0.01
    for anchor, (cx, cy, w, h, cls, score) in enumerate(objects):
        out[0, :4, anchor] = cx, cy, w, h
        out[0, 4 + cls, anchor] = score
    return out


FOUR = [(20, 20, 10, 10, 0, 0.9), (60, 20, 10, 10, 1, 0.8), (20, 60, 12, 8, 2, 0.7), (60, 60, 8, 12, 0, 0.6)]


# --------------------------------------------------------------------------
# slices, rows, labels
# --------------------------------------------------------------------------
def test_part_cosine_sees_crushed_scores_that_whole_output_cosine_hides():
    ref = yolo_output(FOUR)
    ref[0, :4] *= 10  # boxes in pixels dominate the tensor's norm, as in a real detector
    cand = ref.copy()
    cand[0, 4:] = 0.0  # every class score crushed to zero
    assert part_cosine(ref, cand) > 0.99
    assert part_cosine(ref, cand, axis=1, stop=4) == pytest.approx(1.0)
    assert part_cosine(ref, cand, axis=1, start=4) == 0.0


def test_part_cosine_over_feeds_of_different_lengths():
    rng = np.random.default_rng(0)
    ref = [rng.standard_normal((1, n, 8)) for n in (3, 5)]
    assert part_cosine(ref, [r.copy() for r in ref], axis=2, start=2) == pytest.approx(1.0)
    assert part_cosine(ref, [-r for r in ref], axis=2, start=2) == pytest.approx(-1.0)
    with pytest.raises(ValueError):
        part_cosine(ref, [ref[0], ref[0]])


def test_row_cosines_one_per_row():
    ref = np.array([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]])
    cand = np.array([[1.0, 1.0], [0.0, 2.0], [0.0, 0.0]])
    np.testing.assert_allclose(row_cosines(ref, cand), [np.sqrt(0.5), 1.0, 1.0])


def test_top1_agreement_and_accuracy():
    ref = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.3, 0.7]])
    cand = np.array([[0.8, 0.2], [0.9, 0.1], [0.6, 0.4], [0.1, 0.9]])
    assert top1_agreement(ref, cand) == 0.75
    assert top1_agreement([ref[:2], ref[2:]], [cand[:2], cand[2:]]) == 0.75
    assert top1_accuracy(ref, [0, 1, 1, 1]) == 0.75


# --------------------------------------------------------------------------
# detection
# --------------------------------------------------------------------------
def test_decode_gives_xyxy_boxes_scores_classes_best_first():
    (dets,) = yolo_detections(yolo_output(FOUR))
    assert len(dets) == 4
    np.testing.assert_allclose(dets.scores, [0.9, 0.8, 0.7, 0.6], rtol=1e-6)
    np.testing.assert_array_equal(dets.classes, [0, 1, 2, 0])
    np.testing.assert_allclose(dets.boxes[0], [15, 15, 25, 25])
    np.testing.assert_allclose(dets.boxes[2], [14, 56, 26, 64])


def test_decode_drops_low_scores_and_applies_class_aware_nms():
    objects = [(20, 20, 10, 10, 0, 0.9), (21, 20, 10, 10, 0, 0.8),  # same class, IoU 0.82: suppressed
               (21, 21, 10, 10, 1, 0.7),  # overlaps but another class: kept
               (60, 60, 10, 10, 2, 0.2)]  # under conf 0.25: dropped
    (dets,) = yolo_detections(yolo_output(objects))
    np.testing.assert_array_equal(dets.classes, [0, 1])
    np.testing.assert_allclose(dets.scores, [0.9, 0.7], rtol=1e-6)
    (low,) = yolo_detections(yolo_output(objects), conf=0.1)
    assert len(low) == 3
    (capped,) = yolo_detections(yolo_output(objects), conf=0.1, max_det=2)
    assert len(capped) == 2


def test_nms_keeps_separate_boxes_and_one_of_each_overlapping_pair():
    boxes = np.array([[0, 0, 10, 10], [1, 0, 11, 10], [50, 50, 60, 60], [0, 0, 10, 10]], dtype=float)
    keep = nms(boxes, np.array([0.5, 0.9, 0.8, 0.7]), np.array([0, 0, 0, 1]), iou=0.45)
    np.testing.assert_array_equal(keep, [1, 2, 3])


def test_identical_outputs_agree_fully():
    ref = [yolo_output(FOUR), yolo_output(FOUR[:2])]
    result = detection_agreement(ref, [r.copy() for r in ref])
    assert (result["precision"], result["recall"], result["f1"]) == (1.0, 1.0, 1.0)
    assert result["matched"] == result["reference"] == 6


def test_dropped_box_lowers_recall_only():
    result = detection_agreement(yolo_output(FOUR), yolo_output(FOUR[:3]))
    assert result["precision"] == 1.0
    assert result["recall"] == 0.75
    assert result["f1"] == pytest.approx(2 * 3 / (4 + 3))


def test_box_shifted_past_the_iou_threshold_or_relabelled_does_not_match():
    shifted = list(FOUR)
    shifted[0] = (26, 20, 10, 10, 0, 0.9)  # IoU with the original 4/16 = 0.25 < 0.5
    result = detection_agreement(yolo_output(FOUR), yolo_output(shifted))
    assert (result["matched"], result["precision"], result["recall"]) == (3, 0.75, 0.75)
    nudged = list(FOUR)
    nudged[0] = (21, 20, 10, 10, 0, 0.9)  # IoU 0.82: still a match
    assert detection_agreement(yolo_output(FOUR), yolo_output(nudged))["f1"] == 1.0
    relabelled = list(FOUR)
    relabelled[1] = (60, 20, 10, 10, 2, 0.8)
    assert detection_agreement(yolo_output(FOUR), yolo_output(relabelled))["matched"] == 3


def test_each_reference_box_is_matched_once():
    ref = [Detections(np.array([[0.0, 0, 10, 10]]), np.array([0.9]), np.array([0]))]
    cand = [Detections(np.array([[0.0, 0, 10, 10], [1.0, 0, 11, 10]]), np.array([0.9, 0.8]), np.array([0, 0]))]
    result = detection_agreement(ref, cand)
    assert (result["matched"], result["precision"], result["recall"]) == (1, 0.5, 1.0)


def test_empty_detections():
    empty = yolo_output([])
    assert detection_agreement(empty, empty)["f1"] == 1.0
    found_nothing = detection_agreement(yolo_output(FOUR), empty)
    assert (found_nothing["precision"], found_nothing["recall"], found_nothing["f1"]) == (1.0, 0.0, 0.0)
    invented = detection_agreement(empty, yolo_output(FOUR))
    assert (invented["precision"], invented["recall"], invented["f1"]) == (0.0, 1.0, 0.0)


# --------------------------------------------------------------------------
# text masks
# --------------------------------------------------------------------------
def test_mask_iou_of_known_rectangles():
    ref = np.zeros((3, 1, 40, 40), dtype=np.float32)
    cand = np.zeros_like(ref)
    ref[0, 0, 0:10, 0:10] = 0.9
    cand[0, 0, 0:10, 5:15] = 0.9  # half overlap: 50 / 150
    ref[1, 0, 0:10, 0:10] = 0.9
    cand[1, 0, 0:10, 0:10] = 0.31  # just over the threshold: identical masks
    cand[2, 0] = 0.3  # not over the threshold: both empty
    result = mask_iou(ref, cand, threshold=0.3)
    np.testing.assert_allclose(result["per_image"], [1 / 3, 1.0, 1.0])
    assert result["min"] == pytest.approx(1 / 3)
    assert result["mean"] == pytest.approx((1 / 3 + 2) / 3)
    per_feed = mask_iou([ref[:1], ref[1:]], [cand[:1], cand[1:]])
    np.testing.assert_allclose(per_feed["per_image"], result["per_image"])


# --------------------------------------------------------------------------
# a real detector
# --------------------------------------------------------------------------
@pytest.mark.realmodel
def test_yolov8n_finds_objects_in_the_sample_photos(yolov8n_path):
    import inputs

    from onnxshrink.runtime import make_session, run_all
    from onnxshrink.io import load

    session = make_session(load(yolov8n_path), threads=1)
    outputs = [out[0] for out in run_all(session, inputs.yolov8n_inputs(4))]
    detections = yolo_detections(outputs)
    assert len(detections) == 4
    assert sum(map(len, detections)) > 0
    assert detection_agreement(outputs, outputs)["f1"] == 1.0
