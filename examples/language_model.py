"""Per-token probes of a small language model: where does it track which bracket is open?

A synthetic language of nested brackets, ``( [ ) ]`` and filler words ``a b c``, always
well nested (``a ( b [ c ] ) a``). To predict the next token a model must know which bracket
closes next: the innermost open one, which depends on the whole prefix (a stack), not on
the current token. A GPT-2 (``transformers``, built from a config, random weights; a
word-level tokenizer trained locally with ``tokenizers``) is trained briefly as a causal
LM, and every token of held-out texts is probed at each layer for "the innermost open
bracket: none, ( or [" (``build_store(..., rows="tokens")``), before and after training.

    python examples/language_model.py                 # about 40 seconds on 2 CPU cores
    python examples/language_model.py --quick         # the test's run: about 10 seconds
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

import engine

OPEN, CLOSE, FILLER = ("(", "["), (")", "]"), ("a", "b", "c")
CLASSES = ("none open", "( open", "[ open")


def sentence(rng: np.random.Generator, length: int, depth: int = 4) -> tuple[str, list[int]]:
    """A well-nested text of about ``length`` words and, per word, the innermost bracket
    open after it (0: none, 1: "(", 2: "[")."""
    words, labels, stack = [], [], []
    while len(words) < length or stack:
        r = rng.random()
        if stack and (r < 0.3 or len(words) >= length):
            words.append(CLOSE[stack.pop()])
        elif r < 0.6 and len(stack) < depth and len(words) < length:
            stack.append(int(rng.integers(2)))
            words.append(OPEN[stack[-1]])
        else:
            words.append(FILLER[int(rng.integers(3))])
        labels.append(stack[-1] + 1 if stack else 0)
    return " ".join(words), labels


def corpus(n: int, length: int, seed: int) -> tuple[list[str], list[list[int]]]:
    rng = np.random.default_rng(seed)
    pairs = [sentence(rng, int(rng.integers(length // 2, length + 1))) for _ in range(n)]
    return [t for t, _ in pairs], [y for _, y in pairs]


def word_tokenizer():
    """A word-level tokenizer of the language, trained here (nothing downloaded)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.train_from_iterator([" ".join(OPEN + CLOSE + FILLER)],
                            trainers.WordLevelTrainer(special_tokens=["[PAD]", "[UNK]"]))
    return tok


def gpt2(vocab: int, layers: int, width: int, context: int):
    import transformers

    config = transformers.GPT2Config(vocab_size=vocab, n_positions=context, n_embd=width,
                                     n_layer=layers, n_head=4, resid_pdrop=0.0,
                                     embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=None,
                                     eos_token_id=None)
    return transformers.GPT2LMHeadModel(config)


def train(model, data: engine.TextDataset, epochs: int, batch_size: int, lr: float,
          seed: int, log) -> float:
    """Causal-LM training (next word), padding masked out of the loss; the last loss."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    last = float("nan")
    for epoch in range(epochs):
        order = torch.randperm(len(data), generator=gen).tolist()
        for a in range(0, len(order), batch_size):
            b = data.__getitems__(order[a : a + batch_size]).inputs
            target = b["input_ids"].masked_fill(b["attention_mask"] == 0, -100)
            loss = model(**b, labels=target).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
            last = loss.item()
        log(f"epoch {epoch + 1}/{epochs}: next-word loss {last:.3f}")
    model.eval()
    return last


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default="language-model")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)
    log = (lambda m: None) if args.quiet else (lambda m: print(m, flush=True))
    out = Path(args.out)
    n_lm, n_probe, length, epochs, layers = ((600, 160, 24, 3, 3) if args.quick else
                                             (6000, 600, 40, 3, 4))
    tok = word_tokenizer()
    pad = tok.token_to_id("[PAD]")
    lm_texts, _ = corpus(n_lm, length, args.seed)
    texts, labels = corpus(n_probe, length, args.seed + 1)
    cut = n_probe * 3 // 4
    probe = {"train": engine.TextDataset(texts[:cut], tokenizer=tok, pad_id=pad,
                                         token_labels=labels[:cut], classes=CLASSES),
             "test": engine.TextDataset(texts[cut:], tokenizer=tok, pad_id=pad,
                                        token_labels=labels[cut:], classes=CLASSES)}
    torch.manual_seed(args.seed)
    model = gpt2(tok.get_vocab_size(), layers, 64, 2 * length + 16)
    sites = ["transformer.wte", *(f"transformer.h.{i}" for i in range(layers))]
    results = {}
    for state in ("init", "trained"):
        if state == "trained":
            train(model, engine.TextDataset(lm_texts, [0] * n_lm, tokenizer=tok, pad_id=pad),
                  epochs, 32, 3e-3, args.seed, log)
        store = engine.build_store(model, probe, out / f"{state}.zarr", layers=sites,
                                   rows="tokens", valid_size=0.2, overwrite=True,
                                   seed=args.seed, progress=not args.quiet)
        results[state] = engine.solve(store, l2=[1e-4, 1e-3, 1e-2], progress=False,
                                      device="cpu", run="brackets")
        log(f"{state}: {store.rows('train'):,} train tokens; test error per layer:\n"
            f"{results[state].error('test').round(3).to_string()}")
    page = engine.report(results, out / "report", title="Which bracket is open? Per-token "
                         "probes of a small GPT-2, before and after training")
    log(f"report: {page}")
    return {state: r.error("test") for state, r in results.items()}


if __name__ == "__main__":
    main()
