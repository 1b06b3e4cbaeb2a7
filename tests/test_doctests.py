"""Run the examples in the public docstrings as doctests."""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import prism
import prism.reference
import prism.theory


def _modules():
    names = ["prism"]
    for package in (prism.reference, prism.theory):
        names += [f"{package.__name__}.{m.name}" for m in pkgutil.iter_modules(package.__path__)]
    return names


@pytest.mark.parametrize("name", _modules())
def test_docstring_examples(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0, f"{result.failed} doctest(s) failed in {name}"
