"""Text capture benchmark: pooled features of every block of a 12-layer transformer, side by
side in one run.

All variants run the same ``transformers`` BERT (random weights, built from a config) over
the same tokenised texts (``engine.TextDataset``: whitespace words, padded per batch), batch
by batch under ``torch.inference_mode``:

- plain: ``model(**batch)``, what the user runs anyway;
- ours: ``engine.build_store`` of the 12 blocks with ``tokens:mean`` (padding excluded) into
  a float16 store: capture, reduce, compress, checksum, write;
- hidden-states loop: ``model(**batch, output_hidden_states=True)``, then a masked mean of
  each block's states, kept in memory (the usual hand loop);
- run_with_cache: a forward hook on every module keeping its output (TransformerLens' way:
  every activation kept, then the 12 blocks selected and pooled);
- ours, first 3 blocks: ``build_store`` of blocks 0-2 only: the forward stops after block 2.

Ratios are time / plain (median of ``--repeats``, variants interleaved). Target: ours <= 1.3x
plain. The bytes each way holds per batch are reported beside: run_with_cache holds every
activation of a batch; ours one block of pooled rows, whatever the number of texts.

    python -m benchmarks.text_capture [--quick] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import engine

from .capture import machine

TARGET = 1.3
LAYERS = 12


def corpus(n: int, max_words: int, vocab: int, seed: int = 0) -> tuple[list[str], list[int]]:
    """``n`` texts of 4..``max_words`` words drawn from ``vocab`` words, and a label each
    (whether word 0 occurs)."""
    rng = np.random.default_rng(seed)
    texts, labels = [], []
    for _ in range(n):
        words = rng.integers(0, vocab, size=int(rng.integers(4, max_words + 1)))
        texts.append(" ".join(f"w{w}" for w in words))
        labels.append(int((words == 0).any()))
    return texts, labels


def words(vocab: int):
    """A whitespace tokenizer over ``w0 .. w{vocab-1}`` (ids from 1; 0 pads)."""
    return lambda text: [int(w[1:]) + 1 for w in text.split()]


def model_for(hidden: int, vocab: int, max_len: int) -> torch.nn.Module:
    import transformers

    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=vocab + 1, hidden_size=hidden,
                                     num_hidden_layers=LAYERS, num_attention_heads=4,
                                     intermediate_size=4 * hidden,
                                     max_position_embeddings=max_len + 2)
    return transformers.BertModel(config).eval()


def batches(data: engine.TextDataset, batch_size: int):
    for a in range(0, len(data), batch_size):
        yield data.__getitems__(list(range(a, min(a + batch_size, len(data)))))


def plain(model, data, batch_size) -> dict:
    with torch.inference_mode():
        for b in batches(data, batch_size):
            model(**b.inputs)
    return {}


def hidden_states_loop(model, data, batch_size) -> dict:
    out: list[list[torch.Tensor]] = [[] for _ in range(LAYERS)]
    with torch.inference_mode():
        for b in batches(data, batch_size):
            states = model(**b.inputs, output_hidden_states=True).hidden_states
            m = b.inputs["attention_mask"].unsqueeze(2).to(states[0].dtype)
            for i in range(LAYERS):
                out[i].append((states[i + 1] * m).sum(1) / m.sum(1))
    return {"features": [torch.cat(o) for o in out]}


def run_with_cache(model, data, batch_size) -> dict:
    cache: dict[str, object] = {}
    hooks = [m.register_forward_hook(lambda _m, _a, o, name=name: cache.__setitem__(name, o))
             for name, m in model.named_modules() if name]
    out: list[list[torch.Tensor]] = [[] for _ in range(LAYERS)]
    held = 0
    try:
        with torch.inference_mode():
            for b in batches(data, batch_size):
                cache.clear()
                model(**b.inputs)
                held = max(held, sum(t.numel() * t.element_size() for v in cache.values()
                                     for t in (v if isinstance(v, tuple) else (v,))
                                     if isinstance(t, torch.Tensor)))
                m = b.inputs["attention_mask"].unsqueeze(2).float()
                for i in range(LAYERS):
                    h = cache[f"encoder.layer.{i}"]
                    h = h[0] if isinstance(h, tuple) else h
                    out[i].append((h * m).sum(1) / m.sum(1))
    finally:
        for h in hooks:
            h.remove()
    return {"features": [torch.cat(o) for o in out], "held_bytes": held}


def ours(model, data, batch_size, tmp: Path, layers: int = LAYERS) -> dict:
    path = tmp / f"s-{time.perf_counter_ns()}.zarr"
    store = engine.build_store(model, data, path, layers=[f"encoder.layer.{i}"
                                                          for i in range(layers)],
                               reduce="tokens:mean", batch_size=batch_size, valid_size=0,
                               device="cpu", progress=False)
    return {"store": store}


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--texts", type=int, help="default 512 (quick: 256)")
    ap.add_argument("--hidden", type=int, help="default 256 (quick: 128)")
    ap.add_argument("--device", default="cpu", help="cpu only: the ratios are CPU figures")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    if args.device != "cpu":
        ap.error("the text capture benchmark runs on the CPU (--device cpu)")
    n, max_words, hidden, batch_size = (256, 64, 128, 32) if args.quick else (512, 128, 256, 32)
    n, hidden = args.texts or n, args.hidden or hidden
    vocab = 1000
    texts, labels = corpus(n, max_words, vocab)
    data = engine.TextDataset(texts, labels, tokenizer=words(vocab))
    model = model_for(hidden, vocab, max_words)
    tokens = sum(len(t.split()) for t in texts)
    print(f"BERT {LAYERS} layers, hidden {hidden}; {n} texts, {tokens:,} tokens, batch "
          f"{batch_size}, torch threads {torch.get_num_threads()}", flush=True)

    times: dict[str, list[float]] = {}
    extra: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="probe-engine-text-") as tmp:
        variants = {
            "plain": lambda: plain(model, data, batch_size),
            "ours": lambda: ours(model, data, batch_size, Path(tmp)),
            "hidden_states_loop": lambda: hidden_states_loop(model, data, batch_size),
            "run_with_cache": lambda: run_with_cache(model, data, batch_size),
            "ours_first_3": lambda: ours(model, data, batch_size, Path(tmp), layers=3),
        }
        plain(model, data, batch_size)  # warm-up
        for _ in range(args.repeats):
            for name, run in variants.items():
                t0 = time.perf_counter()
                extra[name] = run()
                times.setdefault(name, []).append(time.perf_counter() - t0)
        # the ways agree: ours (float16) against the hand loop (float32)
        store, loop = extra["ours"]["store"], extra["hidden_states_loop"]["features"]
        worst = max(float(np.abs(store.read("train", f"encoder.layer.{i}").astype(np.float32)
                                 - loop[i].numpy()).max()) for i in range(LAYERS))
        block_bytes = store.meta.config.block_rows * LAYERS * hidden * 2
    med = {k: statistics.median(v) for k, v in times.items()}
    rows = []
    for name in ("ours", "hidden_states_loop", "run_with_cache", "ours_first_3"):
        ratio = med[name] / med["plain"]
        rows.append({"case": f"text {name} / plain forward", "ratio": round(ratio, 3),
                     "seconds": round(med[name], 3), "plain_s": round(med["plain"], 3),
                     "target": TARGET if name == "ours" else None, "kind": "time/plain"})
        print(f"{name:<20} {med[name]:7.2f} s   {ratio:5.2f}x plain ({med['plain']:.2f} s)",
              flush=True)
    held = extra["run_with_cache"]["held_bytes"]
    print(f"bytes held per batch: run_with_cache {held / 2**20:.1f} MiB (every activation); "
          f"ours one block of pooled rows, {block_bytes / 2**20:.2f} MiB; ours vs the hand "
          f"loop: max |diff| {worst:.1e} (float16 storage)")
    rows[0].update(run_with_cache_held_bytes=held, ours_block_bytes=block_bytes,
                   max_abs_diff_vs_loop=worst, texts=n, tokens=tokens, hidden=hidden)
    if args.json:
        Path(args.json).write_text(json.dumps(
            {"machine": machine(), "date": time.strftime("%Y-%m-%d"), "quick": args.quick,
             "torch": torch.__version__, "results": rows}, indent=2))
    return rows


if __name__ == "__main__":
    main()
