"""The benchmark helpers that only run in full on a GPU: their CPU path, small."""

from __future__ import annotations

import importlib
import json
import re
from pathlib import Path

import pytest
import torch

from benchmarks import precision
from benchmarks import solve as bench
from benchmarks.imagenet_scale import PEERS


def test_resnet50_shaped_pass_reports_time_against_the_gemm_floor():
    (r,) = bench.resnet50_pass(torch.device("cpu"), rows=256, classes=1000, repeats=1)
    assert r["matmul"] == "float32"
    assert r["sum_D"] == 15_168 and len(bench.RESNET50_WIDTHS) == 17
    assert r["pass_s"] > 0 and r["floor_s"] > 0 and r["matmul_tflops"] > 0
    flop = 4 * 256 * 15_168 * 1000
    assert r["floor_s"] == pytest.approx(flop / (r["matmul_tflops"] * 1e12), rel=0.01)
    assert r["ratio"] == round(r["pass_s"] / r["floor_s"], 2)


def test_precision_gradients_are_the_objectives_and_bfloat16_ones_are_near():
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(200, 7, generator=gen), torch.arange(200) % 3
    w, b = torch.randn(7, 3, generator=gen), torch.randn(3, generator=gen)
    wd, bd = w.double().requires_grad_(), b.double().requires_grad_()
    loss = torch.nn.functional.cross_entropy(x.double() @ wd + bd, y)
    (loss + 0.5 * precision.L2 * (wd**2).sum()).backward()
    exact = precision.gradient(w, b, x, y, "float64")
    torch.testing.assert_close(exact, torch.cat([wd.grad, bd.grad[None]]))
    for mode in ("bf16", "bf16-f32-logits"):
        err = (precision.gradient(w, b, x, y, mode) - exact).abs().max()
        assert 0 < err < 0.02 * exact.abs().max()


def test_sass_loops_count_instructions_per_load():
    from benchmarks import sass

    text = """
        /*0100*/                   MOV R1, c[0x0][0x28] ;
        /*0110*/                   LD.E R2, desc[UR4][R4.64] ;
        /*0120*/                   FADD R3, R2, -R5 ;
        /*0130*/                   MUFU.EX2 R3, R3 ;
        /*0140*/              @!P0 LD.E R6, desc[UR4][R8.64] ;
        /*0150*/               @P1 BRA 0x110 ;
        /*0160*/                   EXIT ;
    """
    assert sass.loops(text) == [{"start": "0x110", "instructions": 5, "loads": 2, "mufu": 1,
                                 "per_load": 2.5}]


def test_imagenet_scale_runs_the_protocol_at_one_objective_for_every_solver(tmp_path):
    from benchmarks import imagenet_scale

    results = imagenet_scale.main(["--rows", "400", "--classes", "10", "--width", "48",
                                   "--peers", "sklearn-lbfgs", "torch-lbfgs",
                                   "--json", str(tmp_path / "r.json")])
    by_case = {r["case"]: r for r in results}
    ours = by_case["ours: DINOv2 protocol"]
    for peer in ("sklearn-lbfgs", "torch-lbfgs"):
        r = by_case[f"ours vs {peer}"]
        assert not r["extrapolated"] and r["peer_rows"] == 400
        assert r["speedup"] == pytest.approx(r["peer_s"] / r["ours_s"], rel=0.1)  # rounded
        # the same objective, so the same lambda kept and the same test error within a row
        assert r["peer_best_l2"] == ours["best_l2"]
        assert abs(r["peer_test_top1"] - ours["test_top1"]) <= 1 / 80
    assert max(r["objective_gap"] for r in results if "objective_gap" in r) < 1e-2
    ooc = by_case["out-of-core pass / in-memory pass"]
    assert ooc["features"] == ["streamed", "resident"]  # the budget made train stream
    assert by_case["out-of-core protocol / in-memory protocol"]["same_l2"]
    assert len(by_case["pass time vs rows"]["seconds"]) == 3
    assert json.loads((tmp_path / "r.json").read_text())["results"] == json.loads(
        json.dumps(results, default=float))


def test_text_capture_compares_every_way_at_the_same_features(tmp_path):
    from benchmarks import text_capture

    rows = text_capture.main(["--quick", "--texts", "24", "--hidden", "32", "--repeats", "1",
                              "--json", str(tmp_path / "t.json")])
    by_case = {r["case"]: r for r in rows}
    ours = by_case["text ours / plain forward"]
    assert ours["target"] == 1.3 and ours["ratio"] > 0 and ours["texts"] == 24
    # ours (float16 in the store) equals the hand loop over output_hidden_states
    assert ours["max_abs_diff_vs_loop"] < 5e-3
    # every activation of a batch against one block of pooled rows
    assert ours["run_with_cache_held_bytes"] > 10 * ours["ours_block_bytes"]
    assert set(by_case) == {f"text {n} / plain forward" for n in
                            ("ours", "hidden_states_loop", "run_with_cache", "ours_first_3")}


def test_baselines_ride_one_solve_and_equal_one_fit_at_a_time(tmp_path):
    from benchmarks import baselines

    rows = baselines.main(["--quick", "--rows", "300", "--mdl-blocks", "12.5", "25", "50",
                           "100", "--sklearn-max-dim", "100", "--json",
                           str(tmp_path / "b.json")])
    by_case = {r["case"]: r for r in rows}
    plain = by_case["baselines plain solve (grid, outputs, bootstrap)"]
    ours = by_case["baselines ours: + controls + MDL, one solve / plain"]
    assert plain["train_rows"] == 250 and plain["mdl_boundaries"] == [32, 63, 125, 250]
    # the ratio comes from unrounded times, the stored seconds are rounded to 1 ms
    assert ours["target"] == 3.0
    assert abs(ours["ratio"] - ours["seconds"] / plain["seconds"]) < 0.02
    for layer in ours["per_layer"].values():  # controls near chance, a shorter online code
        assert layer["control_test_top1_error"] > 0.6 and layer["compression"] > 1
    # one solve per fit finds what the batched baselines found: the same control errors and,
    # at a tight tolerance, the same codelengths
    separate = by_case["baselines one fit at a time / plain"]
    assert separate["solves"] == 4 * (1 + 2 + 3) and separate["same_l2_alone"]
    assert separate["control_test_error_max_abs_diff"] < 1e-9
    assert separate["codelength_max_rel_diff"] < 0.05  # the solves' own tol: 1e-4
    assert ours["codelength_check"]["max_rel_diff"] < 1e-3
    sk = by_case["baselines scikit-learn loop (controls + MDL) / plain"]
    assert sk["fits"] == 3 * (2 + 3) and sk["left_out"] == ["input"]  # 784 features
    assert json.loads((tmp_path / "b.json").read_text())["results"] == json.loads(
        json.dumps(rows, default=float))


def test_the_device_script_calls_modules_and_flags_that_exist(capsys):
    """benchmarks/gpu.sh runs where nothing can be fixed between its steps (a task's device
    time is 15 minutes): every benchmark it calls must exist and take every flag it is
    given, and every test file it names must exist."""
    root = Path(__file__).resolve().parents[1]
    script = (root / "benchmarks" / "gpu.sh").read_text().replace("\\\n", " ")
    calls = re.findall(r"python3 -m (benchmarks\.\w+)([^|\n]*)", script)
    assert {m for m, _ in calls} == {"benchmarks.capture", "benchmarks.solve",
                                     "benchmarks.kernel", "benchmarks.imagenet_scale"}
    for module, args in calls:
        flags = set(re.findall(r"(?<![\w-])--[a-z][a-z-]*", args))
        assert "--json" in flags, module  # its figures must come back under $OUT
        with pytest.raises(SystemExit):
            importlib.import_module(module).main(["--help"])
        usage = capsys.readouterr().out
        for flag in flags:
            assert re.search(rf"(?<![\w-]){flag}(?![\w-])", usage), (module, flag)
    peers = re.search(r"--peers ([\w -]+?) --", script).group(1).split()
    assert peers and set(peers) <= set(PEERS), peers  # else it fails after ours has run
    tests = re.findall(r"tests/test_\w+\.py", script)
    assert tests and all((root / t).is_file() for t in tests), tests
