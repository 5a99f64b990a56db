"""The reference models load, pass the checker, and behave sensibly on real inputs."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest

pytestmark = pytest.mark.realmodel


def _session(path):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _check(path):
    onnx.checker.check_model(str(path), full_check=True)


def _io(sess):
    return (
        [(i.name, i.type, i.shape) for i in sess.get_inputs()],
        [(o.name, o.type, o.shape) for o in sess.get_outputs()],
    )


# --------------------------------------------------------------------------- digits
def test_digits_mlp(digits_mlp_path):
    import zoo

    _check(digits_mlp_path)
    model = onnx.load(str(digits_mlp_path))
    assert model.opset_import[0].version == 17
    assert [n.op_type for n in model.graph.node] == ["Gemm", "Relu", "Gemm", "Relu", "Gemm"]
    sess = _session(digits_mlp_path)
    ins, outs = _io(sess)
    assert ins == [("input", "tensor(float)", ["batch", 64])]
    assert outs == [("logits", "tensor(float)", ["batch", 10])]
    X, y = zoo.digits_test()
    assert X.dtype == np.float32 and X.shape[1] == 64 and y.dtype == np.int64
    assert 0.0 <= X.min() and X.max() <= 1.0
    logits = sess.run(None, {"input": X})[0]
    acc = float((logits.argmax(1) == y).mean())
    assert acc >= 0.95, acc


def test_digits_inputs_and_calibration(digits_mlp_path, tmp_path):
    import zoo

    feeds = zoo.digits_inputs(5)
    assert len(feeds) == 5 and feeds[0]["input"].shape == (1, 64)
    p = zoo.calibration_npz("digits_mlp", tmp_path / "c.npz", 6)
    with np.load(p) as z:
        assert set(z.files) == {"input"}
        assert z["input"].shape == (6, 1, 64) and z["input"].dtype == np.float32


# --------------------------------------------------------------------------- YOLOv8n
def test_yolov8n(yolov8n_path):
    import zoo

    _check(yolov8n_path)
    sess = _session(yolov8n_path)
    ins, outs = _io(sess)
    assert ins[0][0] == "images" and ins[0][2][1] == 3
    feeds = zoo.yolov8n_inputs(3)  # astronaut, coffee, chelsea
    assert feeds[0]["images"].shape == (1, 3, 320, 320)
    assert feeds[0]["images"].dtype == np.float32
    out = sess.run(None, feeds[0])[0]
    # 4 box coords + 18 class scores, 40*40 + 20*20 + 10*10 anchors
    assert out.shape == (1, 22, 2100)
    assert np.isfinite(out).all()
    assert out[0, 4:].max() > 0.3  # a face on the astronaut photo
    # the inputs are distinct real images
    assert not np.allclose(feeds[0]["images"], feeds[1]["images"])


# --------------------------------------------------------------------------- PP-OCR det
def test_ppocr_det(ppocr_det_path):
    import inputs

    _check(ppocr_det_path)
    sess = _session(ppocr_det_path)
    ins, outs = _io(sess)
    assert ins[0][0] == "x"
    feed = inputs.ppocr_det_inputs(2)[1]
    assert feed["x"].shape == (1, 3, 320, 640) and feed["x"].dtype == np.float32
    text_map = sess.run(None, feed)[0]
    assert text_map.shape == (1, 1, 320, 640)
    blank = inputs.ppocr_normalize(np.full((320, 640, 3), 200, np.uint8))
    blank_map = sess.run(None, {"x": blank})[0]
    text_frac = float((text_map > 0.3).mean())
    blank_frac = float((blank_map > 0.3).mean())
    assert text_frac > 0.02, text_frac
    assert blank_frac < 0.002, blank_frac


# --------------------------------------------------------------------------- MiniLM
def test_minilm(minilm_path):
    import minilm
    import zoo

    _check(minilm_path)
    sess = _session(minilm_path)
    ins, outs = _io(sess)
    assert [i[0] for i in ins] == ["input_ids", "attention_mask", "token_type_ids"]
    assert all(i[1] == "tensor(int64)" for i in ins)
    assert [o[0] for o in outs] == ["last_hidden_state", "sentence_embedding"]

    tok = zoo.minilm_tokenizer()
    pairs = [
        "A man is playing a guitar on the street corner.",
        "Someone is strumming a guitar outside on the sidewalk.",
        "The stock market fell sharply after the interest rate announcement.",
    ]
    feed = tok(pairs)
    hidden, emb = sess.run(None, feed)
    assert hidden.shape == (3, feed["input_ids"].shape[1], 384)
    assert emb.shape == (3, 384)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-4)
    np.testing.assert_allclose(
        emb, minilm.mean_pool_normalize(hidden, feed["attention_mask"]), atol=1e-5
    )
    cos = emb @ emb.T
    assert cos[0, 1] > cos[0, 2] + 0.2, cos
    # padding must not change a sentence's embedding
    single = sess.run(["sentence_embedding"], tok(pairs[2:]))[0]
    np.testing.assert_allclose(single[0], emb[2], atol=1e-4)


def test_minilm_inputs_and_calibration(minilm_path, tmp_path):
    import zoo

    feeds = zoo.minilm_inputs(4)
    assert len(feeds) == 4 and feeds[0]["input_ids"].shape[0] == 1
    assert feeds[0]["input_ids"][0, 0] == 101  # [CLS]
    batches = zoo.minilm_batches(8)
    assert sum(b["input_ids"].shape[0] for b in batches) == len(zoo.sentences()) >= 60
    p = zoo.calibration_npz("minilm", tmp_path / "m.npz", 5)
    with np.load(p) as z:
        assert set(z.files) == {"input_ids", "attention_mask", "token_type_ids"}
        assert z["input_ids"].shape[:2] == (5, 1) and z["input_ids"].dtype == np.int64
    sess = _session(minilm_path)
    sess.run(None, {k: v[0] for k, v in np.load(p).items()})


def test_image_inputs_deterministic():
    import zoo

    a = zoo.ppocr_det_inputs(1)[0]["x"]
    b = zoo.ppocr_det_inputs(1)[0]["x"]
    np.testing.assert_array_equal(a, b)
    ys = zoo.yolov8n_inputs(20)
    assert len({f["images"].tobytes() for f in ys}) == 20
