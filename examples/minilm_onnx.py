"""all-MiniLM-L6-v2 quantized by qlib, exported to ONNX and run by ONNX Runtime.

Exports the transformer (token ids and attention mask in, token embeddings out; batch and
sequence length dynamic) with qlib.export_onnx, and sets it beside fp32 in torch and in ONNX
Runtime, qlib's int8 model in torch, and ONNX Runtime's own dynamic int8 quantization of the fp32
graph (onnxruntime.quantization.quantize_dynamic): mean cosine similarity of the sentence
embeddings (mean-pooled, as sentence-transformers) to torch fp32, ONNX file bytes, and the median
latency of a batch of 64 sentences (the models timed in turn).

    .venv/bin/python examples/minilm_onnx.py [--sentences 300] [--threads 2]
"""
from __future__ import annotations

import argparse
import copy
import logging
import os
import statistics
import sys
import tempfile
import time
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
from torch import nn  # noqa: E402

import qlib  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from minilm_int8 import load_model, sentences  # noqa: E402


class TokenEmbeddings(nn.Module):
    """The transformer alone: (input_ids, attention_mask) -> last hidden state."""

    def __init__(self, bert: nn.Module):
        super().__init__()
        self.bert = bert

    def forward(self, input_ids, attention_mask):
        return self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


def sentence_embeddings(tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.unsqueeze(-1).to(tokens.dtype)
    return nn.functional.normalize((tokens * m).sum(1) / m.sum(1).clamp_min(1e-9), dim=-1)


def export(model: nn.Module, example, path: str, qlib_model: bool) -> None:
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("seq", max=512)
    dims = ({0: batch, 1: seq}, {0: batch, 1: seq})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if qlib_model:
            program = qlib.export_onnx(model, example, dynamic_shapes=dims, verbose=False)
        else:
            program = torch.onnx.export(model, example, dynamo=True, dynamic_shapes=dims, verbose=False)
    program.save(path)


def median_ms(fns, batch, repeat: int) -> list:
    """Median ms of each fn(batch), timed round-robin (a noisy machine's phases hit all alike)."""
    times = [[] for _ in fns]
    for r in range(repeat + 1):
        for fn, t in zip(fns, times):
            t0 = time.perf_counter()
            fn(batch)
            if r:  # (the first round warms up)
                t.append(time.perf_counter() - t0)
    return [statistics.median(t) * 1e3 for t in times]


def run(n_sentences: int = 300, threads: int = 2, repeat: int = 15) -> dict:
    """{model name: {cosine, min_cosine (to torch fp32), cosine_qlib, min_cosine_qlib (to qlib's
    int8 model in torch), bytes (of the ONNX file, or None), latency_ms (NaN with repeat 0)}}."""
    logging.disable(logging.WARNING)  # (the exporter's registry warnings)
    import onnxruntime as ort
    from onnxruntime.quantization import QuantType, quantize_dynamic

    torch.manual_seed(0)
    torch.set_num_threads(threads)
    st = load_model().eval()
    tokenizer = st.tokenizer
    fp32 = TokenEmbeddings(st[0].auto_model).eval()
    int8 = qlib.quantize_dynamic(copy.deepcopy(fp32))
    texts = sentences(n_sentences)
    batches = [tokenizer(texts[i:i + 64], padding=True, truncation=True, return_tensors="pt")
               for i in range(0, len(texts), 64)]
    example = (batches[0]["input_ids"][:2], batches[0]["attention_mask"][:2])

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    # (no spinning after a run: its threads would take the cores from the next model timed)
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    with tempfile.TemporaryDirectory() as tmp:
        paths = {name: os.path.join(tmp, f"{name}.onnx") for name in ("fp32", "qlib", "ort_int8")}
        export(fp32, example, paths["fp32"], qlib_model=False)
        export(int8, example, paths["qlib"], qlib_model=True)
        quantize_dynamic(paths["fp32"], paths["ort_int8"], weight_type=QuantType.QInt8, per_channel=True)
        sessions = {name: ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
                    for name, path in paths.items()}
        sizes = {name: os.path.getsize(path) for name, path in paths.items()}

    def in_torch(model):
        def fn(b):
            with torch.inference_mode():
                return model(b["input_ids"], b["attention_mask"])
        return fn

    def in_ort(session):
        def fn(b):
            feeds = {i.name: t.numpy() for i, t in zip(session.get_inputs(), (b["input_ids"], b["attention_mask"]))}
            return torch.from_numpy(session.run(None, feeds)[0])
        return fn

    def embeddings(fn):
        return torch.cat([sentence_embeddings(fn(b), b["attention_mask"]) for b in batches])

    models = {"torch fp32": (in_torch(fp32), None), "ONNX Runtime fp32": (in_ort(sessions["fp32"]), sizes["fp32"]),
              "qlib int8 (torch)": (in_torch(int8), None),
              "qlib int8 -> ONNX Runtime": (in_ort(sessions["qlib"]), sizes["qlib"]),
              "ONNX Runtime quantize_dynamic int8": (in_ort(sessions["ort_int8"]), sizes["ort_int8"])}
    ref, ref_int8 = embeddings(in_torch(fp32)), embeddings(in_torch(int8))
    latency = median_ms([fn for fn, _ in models.values()], batches[0], repeat) if repeat else [float("nan")] * 5
    rows = {}
    for (name, (fn, size)), ms in zip(models.items(), latency):
        emb = embeddings(fn)
        cos, cos8 = (nn.functional.cosine_similarity(emb, r, dim=1) for r in (ref, ref_int8))
        rows[name] = {"cosine": cos.mean().item(), "min_cosine": cos.min().item(), "cosine_qlib": cos8.mean().item(),
                      "min_cosine_qlib": cos8.min().item(), "bytes": size, "latency_ms": ms}
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sentences", type=int, default=300)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--repeat", type=int, default=15)
    args = p.parse_args()
    rows = run(args.sentences, args.threads, args.repeat)
    print(f"all-MiniLM-L6-v2, {args.sentences} sentences, {args.threads} threads; cosine similarity of the "
          f"sentence embeddings (mean, min); latency: a batch of 64 (median of {args.repeat})")
    print(f"{'model':<36}{'to torch fp32':>16}{'to qlib int8 (torch)':>24}{'ONNX MB':>9}{'ms / batch':>12}")
    for name, r in rows.items():
        mb = f"{r['bytes'] / 1e6:.1f}" if r["bytes"] else "-"
        print(f"{name:<36}{r['cosine']:>9.4f}{r['min_cosine']:>7.4f}{r['cosine_qlib']:>17.4f}"
              f"{r['min_cosine_qlib']:>7.4f}{mb:>9}{r['latency_ms']:>12.1f}")


if __name__ == "__main__":
    main()
