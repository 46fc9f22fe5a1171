"""Stores of token rows (build_store(..., rows="tokens")): a row per labelled token, ragged
sequences stored flat with their (item, position), resumable bit for bit, never a sequence
in two splits."""

import numpy as np
import pytest
import torch
from test_text import TEXTS, TinyEncoder, alone, chars

import engine
from engine import _tasks
from engine.errors import DataError, InvalidArgumentError, NonFiniteError
from engine.text import TextDataset


def vowel_labels(index: int, ids: list[int]) -> list[int]:
    """Per token: 1 for a vowel, 0 for another letter, -1 (not stored) for a space."""
    text = TEXTS[index]
    return [-1 if c == " " else int(c in "aeiou") for c in text][: len(ids)]


def tokens_data(**kw) -> TextDataset:
    return TextDataset(TEXTS, tokenizer=chars, token_labels=vowel_labels, **kw)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return TinyEncoder().eval()


def _build(model, path, data=None, **kw):
    opts = {"layers": ["layers.0", "layers.1"], "rows": "tokens", "dtype": "float32",
            "batch_size": 5, "valid_size": 0, "progress": False, **kw}
    return engine.build_store(model, data if data is not None else tokens_data(), path, **opts)


@pytest.mark.parametrize("side", ["right", "left"])
def test_rows_are_the_labelled_tokens_of_each_text(model, tmp_path, side):
    store = _build(model, tmp_path / "s.zarr", tokens_data(padding_side=side))
    assert store.token_rows
    item, pos, y = store.index("train"), store.positions("train"), store.labels("train")
    want = [(i, p, int(c in "aeiou")) for i, t in enumerate(TEXTS) for p, c in enumerate(t)
            if c != " "]
    assert store.rows("train") == len(want)  # spaces (-1) and padding are not stored
    assert list(zip(item.tolist(), pos.tolist(), y.tolist(), strict=True)) == want
    feats = [store.read("train", "layers.0"), store.read("train", "layers.1")]
    for i, text in enumerate(TEXTS):
        hand = alone(model, text)
        rows = item == i
        for k in range(2):
            np.testing.assert_allclose(feats[k][rows], hand[k][pos[rows]].numpy(),
                                       rtol=1e-4, atol=1e-5)
    assert [layer.reduction for layer in store.meta.layers] == ["tokens:each"] * 2
    assert store.verify().ok
    # a per-token probe solves like any other
    res = engine.solve(store, l2=1e-2, device="cpu", progress=False)
    assert set(res.table.layer) == {"layers.0", "layers.1"}


class _Flaky(TinyEncoder):
    """Raises on its ``fail_at``-th forward pass (``fail_at`` is no parameter: the model's
    fingerprint is that of a TinyEncoder)."""

    def __init__(self, fail_at: int):
        super().__init__()
        self.calls, self.fail_at = 0, fail_at

    def forward(self, input_ids, attention_mask):
        self.calls += 1
        if self.calls == self.fail_at:
            raise RuntimeError("simulated failure")
        return super().forward(input_ids, attention_mask)


def test_an_interrupted_token_store_resumes_to_the_same_arrays(model, tmp_path):
    """Blocks of 64 token rows cut across batches of 5 texts: a resume starts at the batch
    holding the first uncommitted row and ends with the arrays of an uninterrupted build."""
    whole = _build(model, tmp_path / "whole.zarr", block_bytes=1)
    assert whole.meta.config.block_rows == 64 and whole.rows("train") > 64
    torch.manual_seed(0)
    flaky = _Flaky(fail_at=4)  # the two passes of the first rows, one batch, then boom
    flaky.load_state_dict(model.state_dict())
    path = tmp_path / "s.zarr"
    with pytest.raises(RuntimeError, match="simulated failure"):
        _build(flaky, path, block_bytes=1)
    assert engine.open_store(path).committed("train") == 0  # 39 rows: no block yet
    flaky.fail_at = 9  # batches 1 (39 rows) and 2 (46 rows: block 0 is full), then boom
    with pytest.raises(RuntimeError, match="simulated failure") as info:
        _build(flaky, path, block_bytes=1)
    assert any("token rows" in n for n in info.value.__notes__)
    done = engine.open_store(path).committed("train")
    assert done == 64
    flaky.fail_at = -1
    store = _build(flaky, path, block_bytes=1)
    assert store.complete and store.verify().ok
    for name in ("index", "position", "labels/y", "features/layers.0", "features/layers.1"):
        np.testing.assert_array_equal(store.group[f"train/{name}"][:],
                                      whole.group[f"train/{name}"][:])


def test_a_sequence_is_never_in_two_splits(model, tmp_path):
    store = _build(model, tmp_path / "s.zarr", valid_size=3)
    train, valid = set(store.index("train")), set(store.index("valid"))
    assert len(valid) == 3 and not train & valid and len(train | valid) == len(TEXTS)
    assert store.verify().ok


def test_bad_token_inputs_are_named_and_nothing_is_written(model, tmp_path):
    path = tmp_path / "s.zarr"
    short = TextDataset(TEXTS, tokenizer=chars, token_labels=[[0]] * len(TEXTS))
    with pytest.raises(DataError, match=r"text 0: 1 token labels for its 9 tokens"):
        _build(model, path, short)
    with pytest.raises(InvalidArgumentError, match="reduce='pool' does not apply"):
        _build(model, path, reduce="pool")
    with pytest.raises(InvalidArgumentError, match="labels= .* does not apply"):
        _build(model, path, labels={"other": lambda y: y})
    per_item = TextDataset(TEXTS, [0] * len(TEXTS), tokenizer=chars)
    with pytest.raises(DataError, match=r"labels of shape \(12,\) do not line up"):
        _build(model, path, per_item)
    assert not path.exists()


def test_a_nan_token_is_named_by_its_row_and_nothing_is_committed(tmp_path):
    torch.manual_seed(0)
    model = TinyEncoder().eval()
    with torch.no_grad():
        model.embed.weight[chars("z")[0]] = float("nan")  # "zzz" is text 4
    # texts 0-3 store 7 + 16 + 2 + 11 = 36 tokens: the first "z" is row 36
    with pytest.raises(NonFiniteError, match=r"layer 'embed', split 'train', row 36:.*"
                                             r"Rows before 0 are committed"):
        _build(model, tmp_path / "s.zarr", layers=["embed"])
    assert engine.open_store(tmp_path / "s.zarr").committed("train") == 0


def test_token_ids_make_the_control_task_of_token_types(model, tmp_path):
    store = _build(model, tmp_path / "s.zarr", valid_size=0.3)
    item, pos = store.index("train"), store.positions("train")
    ids = store.labels("train", "token")
    want = {(i, p): chars(TEXTS[i])[p] for i in range(len(TEXTS))
            for p in range(len(TEXTS[i]))}
    assert [want[(int(i), int(p))] for i, p in zip(item, pos, strict=True)] == ids.tolist()
    res = engine.solve(store, l2=[1e-3, 1e-1], controls=["control"], device="cpu",
                       progress=False)
    assert res.table.selectivity.notna().all()
    y = {s: torch.from_numpy(store.labels(s)) for s in store.splits}
    types = {s: store.labels(s, "token") for s in store.splits}
    task = _tasks.control_task(y, 2, seed=0, types=types)  # one class per token type
    for s in store.splits:
        for t in np.unique(types[s]):
            assert len(set(task.labels[s][types[s] == t].tolist())) == 1
