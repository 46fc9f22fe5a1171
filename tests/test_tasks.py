"""Tasks in the batched solve (engine/_tasks.py): controls, MDL blocks and class weights are
more probes on the same features, each checked against scikit-learn fitted on what the task
means (permuted labels, a subset of rows, weighted rows), and batched equal to alone."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import log_loss
from test_solve import _one_thread, blobs, objective, solve  # noqa: F401  (fixture)

from engine import _lbfgs, _tasks
from engine._fit import objective_for
from engine._sources import ProbeData
from engine.errors import DataError, InvalidArgumentError, SplitNotFoundError
from engine.kernels.reference import softmax_xent
from engine.objective import Point, weighted_softmax_xent
from engine.options import SolveOptions

LAM = 1e-2


def _weighted_objective(x, y, w, b, lam, weights) -> float:
    x, w, b = (np.asarray(a, dtype=np.float64) for a in (x, w, b))
    z = x @ w + b
    m = z.max(axis=1, keepdims=True)
    loss = np.log(np.exp(z - m).sum(axis=1)) + m[:, 0] - z[np.arange(len(y)), y]
    return float((weights * loss).sum() / weights.sum() + 0.5 * lam * np.sum(w * w))


def _fit_task(x, y, task: _tasks.Task, lam=LAM) -> np.ndarray:
    """theta (D+1, C) of one probe of ``task`` fitted by the batched driver."""
    data = ProbeData.from_arrays({"x": x}, y, None)
    options = SolveOptions.from_kwargs(l2=lam, device="cpu", dtype="float64", tol=1e-9)
    obj = objective_for(data, ["x"], options)
    obj.add_tasks([task])
    out = {}
    _lbfgs.fit(obj, ["x"], [lam], options.lbfgs, lambda layer, sols: out.update(s=sols),
               tasks=[task.name])
    (s,) = out["s"]
    assert s.task == task.name and s.converged
    return s.theta.numpy()


def _sklearn(x, y, c_inverse, **kw) -> LogisticRegression:
    return LogisticRegression(C=c_inverse, tol=1e-10, max_iter=10000, **kw).fit(
        x.astype(np.float64), y)


def test_a_task_of_permuted_labels_is_fitted_on_them():
    x, y = blobs(240, 6, 4, seed=1)
    task = _tasks.shuffled_task({"train": torch.from_numpy(y)}, seed=3)
    ys = task.labels["train"].numpy()
    assert sorted(ys) == sorted(y) and (ys != y).mean() > 0.5
    theta = _fit_task(x, y, task)
    clf = _sklearn(x, ys, 1 / (LAM * len(y)))
    ours = objective(x, ys, theta[:-1], theta[-1], LAM)
    ref = objective(x, ys, clf.coef_.T, clf.intercept_, LAM)
    assert abs(ours - ref) <= 1e-6 * ref


def test_a_task_on_a_subset_of_rows_is_scikit_learn_on_that_subset():
    x, y = blobs(300, 5, 3, seed=2)
    fit, score = _tasks.mdl_tasks(torch.from_numpy(y), [60, 150, 300], seed=0)
    subset = fit[1].labels["train"].numpy() != _tasks.IGNORE
    assert subset.sum() == 150
    nxt = score[1].labels["train"].numpy() != _tasks.IGNORE
    assert nxt.sum() == 150 and not (subset & nxt).any()
    theta = _fit_task(x, y, fit[1])
    clf = _sklearn(x[subset], y[subset], 1 / (LAM * 150))
    ours = objective(x[subset], y[subset], theta[:-1], theta[-1], LAM)
    ref = objective(x[subset], y[subset], clf.coef_.T, clf.intercept_, LAM)
    assert abs(ours - ref) <= 1e-6 * ref


def test_the_weighted_kernel_is_the_row_weighted_cross_entropy_and_its_gradient():
    gen = torch.Generator().manual_seed(4)
    k, b, c = 3, 50, 12
    z = (4 * torch.randn(b, k * c, generator=gen, dtype=torch.float64)).view(b, k, c)
    logits = z.transpose(0, 1)  # (K, B, C) strided, as the solver's
    fresh = logits.clone()  # logits get the gradient below
    y = torch.randint(0, c, (b,), generator=gen)
    y[::7] = _tasks.IGNORE
    w = torch.rand(b, generator=gen, dtype=torch.float64) + 0.5
    keep = y >= 0
    t = logits.detach().clone().requires_grad_()
    per_row = torch.stack([torch.nn.functional.cross_entropy(
        t[j], y.clamp(min=0), reduction="none") for j in range(k)])  # (K, B)
    want = (per_row * torch.where(keep, w, 0.0)).sum(dim=1)
    want.sum().backward()
    plain = softmax_xent(logits.clone(), y, scale=0.5, ignore_index=_tasks.IGNORE)
    loss, top1, top5 = weighted_softmax_xent(logits, y, w, 0.5, True)
    torch.testing.assert_close(loss, want.detach(), rtol=1e-12, atol=0)
    torch.testing.assert_close(logits, 0.5 * t.grad, rtol=1e-12, atol=1e-15)  # in place
    # unit weights count the reference kernel's hits
    _, top1_ones, top5_ones = weighted_softmax_xent(fresh.clone(), y, torch.ones_like(w),
                                                    0.5, False)
    assert torch.equal(top1_ones, plain[2].double()) and torch.equal(top5_ones,
                                                                      plain[3].double())
    assert 0 < float(top1.sum()) < float(top5.sum())
    assert weighted_softmax_xent(fresh.clone(), y, w, 0.5, True, hits=False)[1:] == (None,
                                                                                    None)


def test_balanced_class_weights_are_scikit_learns():
    rng = np.random.default_rng(4)
    x, y = blobs(400, 5, 3, seed=4, noise=2.0)
    keep = (y != 0) | (rng.random(len(y)) < 0.2)  # class 0 rare
    x, y = x[keep], y[keep]
    weights = _tasks.balanced_weights(torch.from_numpy(y), 3).numpy()
    clf = _sklearn(x, y, 1 / (LAM * len(y)), class_weight="balanced")
    sk = np.array([len(y) / (3 * np.sum(y == c)) for c in range(3)])[y]
    np.testing.assert_allclose(weights, sk)
    res = solve({"x": x}, labels=y, l2=LAM, class_weight="balanced", dtype="float64",
                tol=1e-9)
    w, b = res.weights["x"]
    ours = _weighted_objective(x, y, w, b, LAM, weights)
    ref = _weighted_objective(x, y, clf.coef_.T, clf.intercept_, LAM, weights)
    assert abs(ours - ref) <= 1e-5 * ref
    # weighted train error is one minus the mean per-class recall
    pred = (x @ w + b).argmax(axis=1)
    recall = np.mean([np.mean(pred[y == c] == c) for c in range(3)])
    (train,) = res.table[res.table.split == "train"].top1_error
    assert train == pytest.approx(1 - recall, abs=1e-6)


def _splits(seed=5, n=(300, 150, 150), d=8, c=4):
    x, y = blobs(sum(n), d, c, seed=seed, noise=1.5)
    layers = {"a": x, "b": x[:, :3] + 0.1}
    cut = np.cumsum(n)[:-1]
    names = ("train", "valid", "test")
    feats = {s: {k: np.split(v, cut)[i] for k, v in layers.items()} for i, s in
             enumerate(names)}
    return feats, dict(zip(names, np.split(y, cut), strict=True))


def test_controls_give_selectivity_at_the_chosen_lambda():
    feats, labels = _splits()
    res = solve(feats, labels=labels, l2=[1e-3, 1e-1], controls=["control", "shuffled"])
    t = res.table
    for col in ("control_top1_error", "shuffled_top1_error", "selectivity"):
        assert t[col].notna().all(), col
    np.testing.assert_allclose(t.selectivity, t.control_top1_error - t.top1_error)
    test = t[t.split == "test"]
    # random labels cannot be predicted on rows the probe never saw: near chance (3/4)
    assert (test.control_top1_error > 0.55).all() and (test.shuffled_top1_error > 0.55).all()
    sel = test.set_index("layer").selectivity
    assert sel["a"] > 0.2 and sel["a"] > sel["b"] > 0  # more of the signal, more selective
    # the control probes are fitted at the lambda each layer chose, and memorise train
    train = t[t.split == "train"].set_index("layer")
    assert train.loc["a", "control_top1_error"] < test.set_index("layer").loc[
        "a", "control_top1_error"]


def test_mdl_codelength_is_the_per_block_scikit_learn_computation():
    feats, labels = _splits(seed=6)
    x, y = feats["train"]["a"], labels["train"]
    blocks = (10.0, 25.0, 50.0, 100.0)
    res = solve({"a": x}, labels=y, l2=LAM, mdl=True, mdl_blocks=blocks, dtype="float64",
                tol=1e-9)
    row = res.table.iloc[0]
    bounds = _tasks.mdl_boundaries(len(y), blocks)
    assert bounds == [30, 75, 150, 300]
    fit, score = _tasks.mdl_tasks(torch.from_numpy(y), bounds, seed=0)
    nats = 0.0
    for f, s in zip(fit, score, strict=True):
        rows = f.labels["train"].numpy() != _tasks.IGNORE
        nxt = s.labels["train"].numpy() != _tasks.IGNORE
        clf = _sklearn(x[rows], y[rows], 1 / (LAM * rows.sum()))
        nats += log_loss(y[nxt], clf.predict_proba(x[nxt]), labels=range(4),
                         normalize=False)
    want = bounds[0] * 2 + nats / math.log(2)  # log2(4 classes) = 2 bits
    assert row.codelength == pytest.approx(want, rel=1e-4)
    assert row.uniform_codelength == 2 * len(y)
    assert row.compression == pytest.approx(2 * len(y) / want)
    assert row.compression > 1.2  # the classes are learnable: the online code is shorter


def test_baselines_batched_equal_baselines_alone():
    feats, labels = _splits(seed=7)
    kw = dict(l2=[1e-3, 1e-1], controls=["shuffled"], mdl=True,
              mdl_blocks=(20.0, 50.0, 100.0))
    both = solve(feats, labels=labels, **kw).table.set_index(["layer", "split"])
    for layer in ("a", "b"):
        alone = solve(feats, labels=labels, layers=[layer], **kw).table.set_index(
            ["layer", "split"])
        cols = ["l2", "top1_error", "shuffled_top1_error", "codelength"]
        np.testing.assert_allclose(both.loc[layer, cols].to_numpy(float),
                                   alone.loc[layer, cols].to_numpy(float), rtol=1e-4)


def test_mdl_boundaries_follow_the_schedule():
    assert _tasks.mdl_boundaries(10_000, _tasks.MDL_FRACTIONS)[:3] == [10, 20, 40]
    assert _tasks.mdl_boundaries(10_000, _tasks.MDL_FRACTIONS)[-1] == 10_000
    assert _tasks.mdl_boundaries(50, (1.0, 2.0, 50.0, 100.0)) == [1, 25, 50]  # merged
    with pytest.raises(InvalidArgumentError, match="end at 100"):
        _tasks.mdl_boundaries(100, (10.0, 50.0))
    with pytest.raises(InvalidArgumentError, match="single MDL block"):
        _tasks.mdl_boundaries(1, (50.0, 100.0))


def test_a_control_task_maps_each_type_to_one_class():
    y = {"train": torch.tensor([0, 1, 2, 0, 1, 2, 0, 0]), "test": torch.tensor([1, 2, 0])}
    types = {"train": np.array([5, 6, 5, 7, 6, 5, 8, 7]), "test": np.array([7, 5, 9])}
    task = _tasks.control_task(y, 3, seed=0, types=types)
    by_type: dict[int, int] = {}
    for s in ("train", "test"):
        for t, c in zip(types[s], task.labels[s].tolist(), strict=True):
            assert by_type.setdefault(int(t), c) == c


@pytest.mark.parametrize(("kw", "match"), [
    (dict(controls=["shuffled"], refit=True, solver="sgd"), "refits on train \\+ valid are"),
    (dict(shots=[2], solver="ridge"), "solver='lbfgs'"),
    (dict(controls=["random"]), "controls must be some of"),
    (dict(mdl_blocks=(50.0, 10.0, 100.0)), "mdl_blocks must be increasing"),
    (dict(class_weight="auto"), "class_weight must be"),
])
def test_bad_task_options_are_refused(kw, match):
    with pytest.raises(InvalidArgumentError, match=match):
        SolveOptions.from_kwargs(**kw)


def test_a_token_store_without_token_ids_has_no_control_task():
    y = {"train": torch.tensor([0, 1, 0, 1])}
    with pytest.raises(InvalidArgumentError, match="label set named 'token'"):
        _tasks.plan(y, 2, controls=["control"], mdl_blocks=None, class_weight=None, seed=0,
                    token_rows=True)


def test_refit_is_scikit_learn_on_train_and_valid_scored_on_test():
    feats, labels = _splits(seed=8)
    grid = [1e-3, 1e-1]
    res = solve(feats, labels=labels, l2=grid, refit=True, dtype="float64", tol=1e-9)
    once = solve(feats, labels=labels, l2=grid, dtype="float64", tol=1e-9)
    t, t0 = res.table.set_index(["layer", "split"]), once.table.set_index(["layer", "split"])
    for layer in ("a", "b"):
        lam = t.loc[(layer, "test"), "l2"]
        assert lam == t0.loc[(layer, "test"), "l2"]  # chosen on valid, before the refit
        x = np.concatenate([feats["train"][layer], feats["valid"][layer]])
        y = np.concatenate([labels["train"], labels["valid"]])
        clf = _sklearn(x, y, 1 / (lam * len(y)))
        w, b = res.weights[layer]
        ours = objective(x, y, w, b, lam)
        ref = objective(x, y, clf.coef_.T, clf.intercept_, lam)
        assert abs(ours - ref) <= 1e-6 * ref
        pred = (feats["test"][layer] @ w + b).argmax(axis=1)
        assert t.loc[(layer, "test"), "top1_error"] == pytest.approx(
            np.mean(pred != labels["test"]))
        assert t.loc[(layer, "test"), "fitted_on"] == "train+valid"
        for split in ("train", "valid"):  # the probe that chose lambda, unchanged
            assert t.loc[(layer, split), "fitted_on"] == "train"
            assert t.loc[(layer, split), "top1_error"] == t0.loc[(layer, split), "top1_error"]
            assert t.loc[(layer, split), "iterations"] == t0.loc[(layer, split), "iterations"]
        # the test row is the refit's: its iterations are about those of a fit from zero
        # on train + valid (not equal: the passes sum the two splits apart, and the
        # preconditioner is train's)
        alone = solve({layer: x}, labels=y, l2=lam, dtype="float64", tol=1e-9)
        assert t.loc[(layer, "test"), "converged"]
        assert t.loc[(layer, "test"), "iterations"] == pytest.approx(
            alone.table.iterations.iloc[0], rel=0.2)


def test_refit_never_scores_rows_that_chose_lambda():
    feats, labels = _splits(seed=9)
    same = {**feats, "test": feats["valid"]}
    with pytest.raises(DataError, match="same rows"):
        solve(same, labels={**labels, "test": labels["valid"]}, l2=[1e-3, 1e-1], refit=True)
    no_test = {s: feats[s] for s in ("train", "valid")}
    with pytest.raises(SplitNotFoundError, match="no 'test'"):
        solve(no_test, labels={s: labels[s] for s in no_test}, l2=[1e-3, 1e-1], refit=True)


def test_few_shot_draws_are_scikit_learn_on_k_rows_per_class():
    feats, labels = _splits(seed=10)
    res = solve(feats, labels=labels, l2=LAM, shots=[2, 8], draws=3, dtype="float64",
                tol=1e-9, layers=["a"])
    t = res.table.set_index("split")
    y = {s: torch.from_numpy(v) for s, v in labels.items()}
    for k in (2, 8):
        errors = []
        for task in _tasks.few_shot_tasks(y, 4, k, 3, seed=0):
            rows = task.labels["train"].numpy() != _tasks.IGNORE
            assert rows.sum() == 4 * k
            assert (np.bincount(labels["train"][rows], minlength=4) == k).all()
            clf = _sklearn(feats["train"]["a"][rows], labels["train"][rows],
                           1 / (LAM * rows.sum()))
            errors.append(np.mean(clf.predict(feats["test"]["a"]) != labels["test"]))
        assert t.loc["test", f"shots_{k}_top1_error"] == pytest.approx(np.mean(errors),
                                                                       abs=1e-9)
        assert t.loc["test", f"shots_{k}_top1_error_std"] == pytest.approx(
            np.std(errors, ddof=1), abs=1e-9)
    # more rows per class, a better probe; all rows, better still
    assert t.loc["test", "top1_error"] < t.loc["test", "shots_8_top1_error"] < t.loc[
        "test", "shots_2_top1_error"]


def test_sgd_repeats_report_the_spread_over_seeds():
    feats, labels = _splits(seed=11)
    kw = dict(solver="sgd", l2=[1e-4, 1e-2], epochs=3, patience=2, batch_size=32, lr=0.05,
              layers=["a"])
    res = solve(feats, labels=labels, repeats=3, seed=4, **kw)
    alone = [solve(feats, labels=labels, seed=s, **kw).table.set_index("split")
             for s in (4, 5, 6)]
    t = res.table.set_index("split")
    for split in ("train", "valid", "test"):
        errors = [a.loc[split, "top1_error"] for a in alone]
        assert t.loc[split, "top1_error"] == alone[0].loc[split, "top1_error"]
        assert t.loc[split, "top1_error_seed_mean"] == pytest.approx(np.mean(errors))
        assert t.loc[split, "top1_error_seed_std"] == pytest.approx(np.std(errors, ddof=1))
    assert len({a.loc["test", "top1_error"] for a in alone}) > 1  # the seeds do differ


def test_sgd_controls_ride_the_probes_minibatches_and_equal_a_control_probe_alone():
    # SGD's controls: probes at every lambda on the control's labels, in the same
    # minibatches and GEMMs, each stopped on its own task's valid error; the layer's chosen
    # lambda's is reported, and is the probe SGD fits alone on those labels
    feats, labels = _splits(seed=12)
    kw = dict(solver="sgd", epochs=4, patience=2, batch_size=32, lr=0.05, seed=3,
              dtype="float64")
    res = solve(feats, labels=labels, l2=[1e-4, 1e-2], controls=["shuffled", "control"], **kw)
    plain = solve(feats, labels=labels, l2=[1e-4, 1e-2], **kw)
    t, t0 = res.table.set_index(["layer", "split"]), plain.table.set_index(["layer", "split"])
    for col in ("l2", "iterations", "top1_error"):  # the probes beside them: unchanged
        np.testing.assert_array_equal(t[col], t0[col], err_msg=col)
    np.testing.assert_allclose(t.loss, t0.loss, rtol=1e-12)
    tasks = _tasks.plan({s: torch.from_numpy(y) for s, y in labels.items()}, 4,
                        controls=["shuffled", "control"], mdl_blocks=None, class_weight=None,
                        seed=3)
    for task in tasks.tasks:
        for layer in ("a", "b"):
            lam = t.loc[(layer, "test"), "l2"]
            alone = solve({s: {layer: f[layer]} for s, f in feats.items()},
                          labels={s: y.numpy() for s, y in task.labels.items()}, l2=lam,
                          **kw).table.set_index("split")
            for split in ("train", "valid", "test"):
                assert t.loc[(layer, split), f"{task.name}_top1_error"] == pytest.approx(
                    alone.loc[split, "top1_error"], abs=1e-12), (task.name, layer, split)
    assert (t.loc[(slice(None), "test"), "shuffled_top1_error"] > 0.5).all()  # chance: 0.75
    np.testing.assert_allclose(t.selectivity, t.shuffled_top1_error - t.top1_error)


@pytest.mark.parametrize("group", [False, True])
def test_sparse_tasks_pass_equals_the_pass_over_every_row(monkeypatch, group):
    # tasks counting few rows (MDL blocks, few-shot draws, a weighted subset) take only
    # their rows of each block; the sums must be the pass over every row's, to rounding
    from engine import objective as objective_module

    x, y = blobs(1200, 9, 4, seed=11)
    feats = {"a": x, "b": x[:, :8] * 0.5}
    yt = torch.from_numpy(y)
    fit, score = _tasks.mdl_tasks(yt, [12, 300, 900, 1200], seed=1)
    shots = _tasks.few_shot_tasks({"train": yt}, 4, 5, 1, seed=2)
    subset = torch.where(torch.arange(1200) % 7 == 0, yt, _tasks.IGNORE)
    weighted = _tasks.Task("w", {"train": subset},
                           {"train": torch.rand(1200, generator=torch.Generator().manual_seed(3),
                                                dtype=torch.float64) + 0.5})
    tasks = [*fit, *score, *shots, weighted, _tasks.shuffled_task({"train": yt}, seed=4)]
    gen = torch.Generator().manual_seed(5)
    names = {"a": ["", "mdl:1", "mdl:3", "w", "mdl:1:next"],  # mdl:3 counts 900 of 1,200
             "b": ["shots:5:0", "", "shuffled", "mdl:2", "mdl:3"]}  # 2 and 3 dense
    points = [Point(layer, l2, torch.randn(feats[layer].shape[1] + 1, 4, generator=gen,
                                                  dtype=torch.float64), task)
              for layer, tasks_of in names.items()
              for l2, task in zip([1e-3, 1e-2, 1e-1, 1.0, 0.5], tasks_of, strict=True)]

    def evaluate(share):
        monkeypatch.setattr(objective_module, "SPARSE_SHARE", share)
        data = ProbeData.from_arrays(feats, yt.numpy(), None)
        options = SolveOptions.from_kwargs(device="cpu", dtype="float64")
        obj = objective_for(data, ["a", "b"], options, group=group)
        obj.add_tasks(tasks)
        obj.block_bytes = 1  # blocks of 256 rows: the tasks' rows fall across five
        return obj, obj.evaluate("train", points, grad=True)

    sparse_obj, got = evaluate(objective_module.SPARSE_SHARE)
    assert [sparse_obj.sparse_rows(t, "train") is not None for t in
            ("mdl:1", "mdl:3", "w", "shots:5:0", "shuffled", "mdl:1:next", "mdl:2")] == [
        True, False, True, True, False, True, True]
    dense_obj, want = evaluate(-1.0)
    assert all(dense_obj.sparse_rows(t.name, "train") is None for t in tasks)
    for g, w in zip(got, want, strict=True):
        assert g.objective == pytest.approx(w.objective, rel=1e-12)
        assert (g.top1_error, g.top5_error) == pytest.approx((w.top1_error, w.top5_error))
        torch.testing.assert_close(g.gradient, w.gradient, rtol=1e-10, atol=1e-12)
