import pickle

import pytest

import engine.errors as E

BUILTIN = {
    E.LayerNotFoundError: KeyError,
    E.LabelNotFoundError: KeyError,
    E.SplitNotFoundError: KeyError,
    E.StoreError: OSError,
    E.StoreExistsError: FileExistsError,
    E.StoreCorruptedError: OSError,
    E.StoreLockedError: OSError,
    E.StoreMismatchError: ValueError,
    E.DataError: ValueError,
    E.NonFiniteError: ValueError,
    E.DatasetNotFoundError: FileNotFoundError,
    E.ReductionError: ValueError,
    E.InvalidArgumentError: ValueError,
    E.RunNotFoundError: KeyError,
    E.ReportError: OSError,
    E.MemoryBudgetError: ValueError,
    E.MissingDependencyError: ModuleNotFoundError,
}


def test_all_lists_every_error():
    assert set(E.__all__) == ({c.__name__ for c in BUILTIN}
                              | {"ProbeEngineError", "ProbeEngineWarning"})
    assert issubclass(E.ProbeEngineWarning, UserWarning)


@pytest.mark.parametrize("cls", list(BUILTIN), ids=lambda c: c.__name__)
def test_hierarchy(cls):
    err = cls("msg")
    assert isinstance(err, E.ProbeEngineError)
    assert isinstance(err, BUILTIN[cls])
    assert cls.__doc__ and "\n" not in cls.__doc__.strip()
    with pytest.raises(E.ProbeEngineError):
        raise err
    assert str(pickle.loads(pickle.dumps(err))) == str(err)


def test_subclasses():
    assert issubclass(E.StoreExistsError, E.StoreError)
    assert issubclass(E.StoreCorruptedError, E.StoreError)
    assert issubclass(E.StoreLockedError, E.StoreError)
    assert issubclass(E.NonFiniteError, E.DataError)
    assert issubclass(E.InvalidArgumentError, TypeError)  # like scikit-learn's
    assert issubclass(E.MemoryBudgetError, E.InvalidArgumentError)


@pytest.mark.parametrize("cls", [E.LayerNotFoundError, E.LabelNotFoundError, E.SplitNotFoundError])
def test_key_errors_print_plain_message(cls):
    assert str(cls("msg")) == "msg"
    assert str(cls("no layer 'fc9'\nknown: a, b")) == "no layer 'fc9'\nknown: a, b"
    assert str(cls()) == ""
    assert str(cls("a", "b")) == str(("a", "b"))
