"""Text in: TextDataset batches (padding, masks, tokenizers), and stores of a language
model's blocks whose token reductions exclude padding."""

import numpy as np
import pytest
import torch
from torch import nn

import engine
from engine.errors import DataError, InvalidArgumentError, ReductionError
from engine.text import TextDataset, as_token_ids

TEXTS = ["a cat sat", "the dog ran far away", "hi", "an apple a day", "zzz", "mat", "big red ball",
         "sky", "a", "long text with many many words in it", "ok", "cats and dogs"]
LABELS = [int("a" in t) for t in TEXTS]


def chars(text: str) -> list[int]:
    return [ord(c) % 60 + 1 for c in text]


class TinyEncoder(nn.Module):
    """Embedding + two transformer blocks taking a transformers model's keywords."""

    def __init__(self, vocab: int = 64, d: int = 16):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.layers = nn.ModuleList(nn.TransformerEncoderLayer(d, 2, 32, dropout=0.0,
                                                               batch_first=True)
                                    for _ in range(2))

    def forward(self, input_ids, attention_mask):
        h = self.embed(input_ids)
        for layer in self.layers:
            h = layer(h, src_key_padding_mask=attention_mask == 0)
        return h


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return TinyEncoder().eval()


def alone(model, text: str) -> list[torch.Tensor]:
    """Each block's (T, D) output on ``text`` by itself: no padding anywhere."""
    ids = torch.tensor([chars(text)])
    with torch.no_grad():
        h = model.embed(ids)
        out = []
        for layer in model.layers:
            h = layer(h)
            out.append(h[0])
    return out


def test_batches_pad_and_mask():
    ds = TextDataset(TEXTS, LABELS, tokenizer=chars, max_length=6, pad_id=0)
    b = ds.__getitems__([0, 2])
    assert b.inputs["input_ids"].tolist() == [chars("a cat ")[:6], chars("hi") + [0] * 4]
    assert b.inputs["attention_mask"].tolist() == [[1] * 6, [1, 1, 0, 0, 0, 0]]
    assert b.labels.tolist() == [1, 0]
    left = TextDataset(TEXTS, LABELS, tokenizer=chars, padding_side="left")
    assert left.__getitems__([2, 5]).inputs["attention_mask"].tolist() == [[0, 1, 1], [1, 1, 1]]
    item, label = ds[1]
    assert item["input_ids"].tolist() == chars("the do") and label == 1


def test_rows_of_dicts_and_tokenizer_kinds():
    rows = [{"text": t, "label": y} for t, y in zip(TEXTS, LABELS, strict=True)]
    ds = TextDataset(iter(rows), tokenizer=lambda t: {"input_ids": torch.tensor(chars(t))})
    assert len(ds) == len(TEXTS) and ds.targets.tolist() == LABELS
    assert ds[3][0]["input_ids"].tolist() == chars(TEXTS[3])

    class Encoding:
        def __init__(self, ids):
            self.ids = ids

    class Tok:  # the tokenizers.Tokenizer shape: not callable, encode(text).ids
        def encode(self, text):
            return Encoding(chars(text))

    assert as_token_ids(Tok())("ab") == chars("ab")
    with pytest.raises(InvalidArgumentError, match="tokenizer must map a string"):
        TextDataset(TEXTS, LABELS, tokenizer=3)
    with pytest.raises(DataError, match="12 texts but 2 labels"):
        TextDataset(TEXTS, [0, 1], tokenizer=chars)
    with pytest.raises(InvalidArgumentError, match="pass their labels"):
        TextDataset(TEXTS, tokenizer=chars)
    with pytest.raises(DataError, match="text 0 .* has no tokens"):
        TextDataset([""], [0], tokenizer=chars).__getitems__([0])


@pytest.mark.parametrize("side", ["right", "left"])
def test_language_model_store_excludes_padding(model, tmp_path, side):
    """Pooled features of a batch of padded texts equal each text's alone: padding never
    counts, whichever side it is on."""
    data = {"train": TextDataset(TEXTS, LABELS, tokenizer=chars, padding_side=side),
            "valid": TextDataset(TEXTS[:4], LABELS[:4], tokenizer=chars, padding_side=side)}
    reduce = {"layers.0": "tokens:mean", "layers.1": "tokens:last"}
    store = engine.build_store(model, data, tmp_path / "s.zarr", layers=["layers.0", "layers.1"],
                               reduce=reduce, dtype="float32", batch_size=5, progress=False)
    assert store.layers == ["layers.0", "layers.1"]
    got0, got1 = store.read("train", "layers.0"), store.read("train", "layers.1")
    for i, text in enumerate(TEXTS):
        h0, h1 = alone(model, text)
        np.testing.assert_allclose(got0[i], h0.mean(0).numpy(), rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(got1[i], h1[-1].numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(store.labels("train"), LABELS)
    # and the probes solve
    res = engine.solve(store, l2=1e-2, device="cpu", progress=False)
    assert set(res.table.layer) == {"layers.0", "layers.1"}


def test_auto_skips_token_ids_and_fixed_specs_refuse_ragged_text(model, tmp_path):
    data = TextDataset(TEXTS, LABELS, tokenizer=chars)
    # layers="auto" would take the model input: token ids are no features, so it is left out
    modules = engine.capture.select_modules(model, "auto", data.__getitems__([0, 1]).inputs)
    assert "" not in modules
    with pytest.raises(ReductionError, match=r"layer 'layers.0'.*tokens:mean"):
        engine.build_store(model, data, tmp_path / "s.zarr", layers=["layers.0"],
                           reduce={"layers.0": "none"}, batch_size=4, valid_size=0,
                           progress=False)


# -- a transformers model and tokenizer, built locally (nothing from the hub) -------------
def _word_tokenizer():
    import tokenizers  # the text extra, which `make test` installs
    from tokenizers import models, pre_tokenizers, trainers

    tok = tokenizers.Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(TEXTS, trainers.WordLevelTrainer(special_tokens=["[PAD]",
                                                                             "[UNK]"]))
    return tok


def test_transformers_bert_from_a_hf_dataset(tmp_path):
    import datasets
    import transformers
    tok = _word_tokenizer()
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=tok.get_vocab_size(), hidden_size=16,
                                     num_hidden_layers=3, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=32)
    bert = transformers.BertModel(config).eval()
    rows = datasets.Dataset.from_dict({"text": TEXTS, "label": LABELS})
    data = TextDataset(rows, tokenizer=tok, pad_id=tok.token_to_id("[PAD]"))
    store = engine.build_store(bert, data, tmp_path / "s.zarr", layers="encoder.layer.?",
                               reduce={"encoder.layer.2": "tokens:cls"}, dtype="float32",
                               batch_size=5, valid_size=0, progress=False)
    assert store.layers == ["encoder.layer.0", "encoder.layer.1", "encoder.layer.2"]
    assert [layer.reduction for layer in store.meta.layers] == ["tokens:mean"] * 2 + [
        "tokens:cls"]
    batch = data.__getitems__(list(range(len(TEXTS))))
    with torch.no_grad():
        hidden = bert(**batch.inputs, output_hidden_states=True).hidden_states
    mask = batch.inputs["attention_mask"].unsqueeze(2).float()
    for i in range(2):
        want = (hidden[i + 1] * mask).sum(1) / mask.sum(1)
        np.testing.assert_allclose(store.read("train", f"encoder.layer.{i}"), want.numpy(),
                                   rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(store.read("train", "encoder.layer.2"), hidden[3][:, 0].numpy(),
                               rtol=1e-4, atol=1e-5)
