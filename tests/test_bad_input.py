"""The bad-input catalogue (benchmarks/_bad_inputs.py): every case raises its error class (the
command line: exits with its status), with a message naming what is wrong and what to do,
and loses nothing already written; docs/errors.md has a row for every case."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

import engine
from benchmarks import _bad_inputs as B

DOCS = Path(__file__).resolve().parents[1] / "docs" / "errors.md"


@pytest.mark.parametrize("case", B.CASES, ids=[c.name for c in B.CASES])
def test_case(case, tmp_path):
    reason = B.skip_reason(case)
    if reason is not None:
        pytest.skip(reason)
    work = tmp_path / "case"
    work.mkdir()
    ok, message = B.run_case(case, work)
    assert ok, message
    assert list(tmp_path.iterdir()) == [work], "a file appeared outside the case's folder"


def test_catalogue_is_large_and_covers_api_and_cli():
    names = [c.name for c in B.CASES]
    assert len(names) == len(set(names)), "duplicate case names"
    assert len(B.CASES) >= 24
    assert {c.where for c in B.CASES} == {"api", "cli"}
    assert sum(c.where == "cli" for c in B.CASES) >= 5
    for c in B.CASES:
        assert c.fragments, c.name
        if c.where == "cli":
            assert c.expected in (1, 2), c.name
        else:
            assert isinstance(c.expected, type) and issubclass(c.expected, BaseException)


def test_run_case_reports_a_wrong_class_or_message(tmp_path):
    """run_case is what the reliability benchmark counts: it must fail a case whose error
    class or message is not the promised one."""
    good = next(c for c in B.CASES if c.name == "solve: one class")
    wrong_class = B.Case("x", "api", good.call, engine.StoreError, good.fragments)
    wrong_text = B.Case("x", "api", good.call, good.expected, ("no such words",))
    no_error = B.Case("x", "api", lambda tmp: None, engine.DataError, ("x",))
    for case in (wrong_class, wrong_text, no_error):
        ok, message = B.run_case(case, tmp_path)
        assert not ok and message


def test_every_case_is_in_docs_errors_md():
    text = DOCS.read_text()
    missing = [c.name for c in B.CASES if f"| {c.name} |" not in text]
    assert not missing, f"docs/errors.md has no row for {missing}"


def test_docs_list_every_error_class():
    text = DOCS.read_text()
    for name in engine.errors.__all__:
        assert name in text, name


def test_every_engine_error_is_a_probe_engine_error_and_a_builtin():
    for name in engine.errors.__all__:
        cls = getattr(engine.errors, name)
        if cls is engine.ProbeEngineWarning:
            assert issubclass(cls, UserWarning)
            continue
        assert issubclass(cls, engine.ProbeEngineError)
        if cls is not engine.ProbeEngineError:
            assert set(cls.__mro__) & {KeyError, ValueError, OSError, TypeError,
                                       ImportError}, name


def test_read_only_store_refused_before_writing_even_as_root(tmp_path, monkeypatch):
    """The read-only cases need a non-root user to be real; here the permission check itself
    is exercised by denying write access to the store folder."""
    path = B.base_store(tmp_path)
    real = os.access

    def access(p, mode, *a, **kw):
        if mode & os.W_OK and str(p).startswith(str(path)):
            return False
        return real(p, mode, *a, **kw)

    monkeypatch.setattr(os, "access", access)
    before = B._snapshot(path)
    with pytest.raises(engine.StoreError, match="read-only"):
        engine.solve(path, l2=1e-3, progress=False, device="cpu")
    with pytest.raises(engine.StoreError, match="read-only"):
        engine.open_store(path).add_labels("parity", lambda y: y % 2)
    with pytest.raises(engine.StoreError, match="cannot write"):
        B._build(tmp_path, name="s.zarr", resume=True)
    assert B._snapshot(path) == before


def test_forward_error_keeps_its_type_and_the_store_resumes(tmp_path):
    """The midway failure keeps the model's own exception (a caller's ``except`` still works)
    and adds notes; resuming with the fixed model gives the uninterrupted arrays."""
    case = next(c for c in B.CASES if c.name == "model forward raises midway")
    with pytest.raises(RuntimeError) as info:
        case.call(tmp_path)
    assert not isinstance(info.value, engine.ProbeEngineError)
    assert any("resume=True" in n for n in info.value.__notes__)
    case.check(tmp_path)  # hooks gone, training mode back, verify ok, resume equal
    assert np.isfinite(engine.open_store(tmp_path / "s.zarr").read("train", "fc")).all()
