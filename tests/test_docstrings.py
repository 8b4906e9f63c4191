"""Every public callable of the listed modules has a numpydoc docstring that fits its signature.

Two checks, so that the rule holds where the docs extra is not installed:

- our own (always): a Parameters section naming exactly the signature's
  parameters, in order, each with a type, and a Returns section wherever
  the function returns a value;
- numpydoc's ``numpydoc.validate`` (when the docs extra is installed, as in
  CI's doctest step): the same and more (``REQUIRED``), and for the API a
  user reads first (``FULL``) also See Also and Examples.

Following numpydoc's conventions, a property is documented as an attribute
(a summary line, no Parameters, Returns, See Also or Examples of its own),
and a record class (dataclass, NamedTuple) may document its fields, which
are its constructor's parameters, under Attributes instead of Parameters.

The Examples themselves run as doctests in CI
(``python -m pytest --doctest-modules`` over ``MODULES``, in ``.ci/run``).
Add a module to ``MODULES`` once its docstrings are complete.
"""

import ast
import dataclasses
import importlib
import inspect
import re
import textwrap

import pytest

#: Modules whose public callables must be fully documented.
MODULES = [
    "numba_lora.kernels.lora",
    "numba_lora.kernels.multi",
    "numba_lora.kernels.convert",
    "numba_lora.multi",
    "numba_lora.config",
    "numba_lora.distributed",
    "numba_lora.errors",
    "numba_lora._cache",
    "numba_lora._threads",
    "numba_lora.bench.timing",
    "numba_lora.bench.cases",
    "numba_lora.bench.report",
    "numba_lora.bench.cli",
    "numba_lora.nf4",
    "numba_lora.training",
    "numba_lora.checkpoint",
    "numba_lora.io.peft",
    "numba_lora.io.safetensors",
    "numba_lora.optim",
    "numba_lora.kernels.quantize",
    "numba_lora.kernels.qlora",
    "numba_lora.kernels.train",
    "numba_lora.layer",
    "numba_lora.qlora",
    "numba_lora.adapter",
]

#: numpydoc codes every public callable must pass: a docstring, every
#: parameter documented with a type and a description and none that is not
#: in the signature, in order, and a described Returns section wherever the
#: function returns a value.
REQUIRED = {"GL08", "PR01", "PR02", "PR03", "PR04", "PR07", "RT01", "RT03"}

#: What users meet first (the package's and the kernels' exports and their
#: methods) must also have See Also and Examples.
FULL_CODES = {"SA01", "EX01"}

#: Callables exempt from a code, and why.
EXEMPT = {
    # argparse's own constructor: its parameters are argparse's, documented there.
    ("numba_lora.bench.cli.ArgumentParser", "PR01"): "argparse.ArgumentParser's parameters",
    # Not exported: module plumbing for the cache locator, documented in prose.
    ("numba_lora._cache.cache_dirs", "RT01"): "private helper listed in __all__ for tests",
    ("numba_lora._cache.source_digest", "RT01"): "private helper listed in __all__ for tests",
}


def _own(module, obj):
    return getattr(obj, "__module__", None) == module.__name__


def public_callables():
    """``(qualified name, object)`` for every public callable of ``MODULES``.

    A module's ``__all__`` names its public objects; a class adds its public
    methods and properties (``__call__`` counts as public).
    """
    found = []
    for name in MODULES:
        module = importlib.import_module(name)
        for attr in getattr(module, "__all__", [n for n in vars(module) if not n.startswith("_")]):
            obj = getattr(module, attr)
            if not callable(obj) or not _own(module, obj):
                continue
            found.append((f"{name}.{attr}", obj))
            if inspect.isclass(obj):
                for member, value in vars(obj).items():
                    if member.startswith("_") and member != "__call__":
                        continue
                    if isinstance(value, property) or inspect.isfunction(value):
                        found.append((f"{name}.{attr}.{member}", value))
    return found


def _full_api():
    import numba_lora
    from numba_lora import kernels

    names = set()
    for package in (numba_lora, kernels):
        for attr in package.__all__:
            obj = getattr(package, attr)
            module = getattr(obj, "__module__", "")
            if inspect.isclass(obj) and issubclass(obj, BaseException) and attr != "LoraError":
                continue  # the subclasses say when they are raised; LoraError shows them caught
            if module in MODULES and callable(obj):
                names.add(f"{module}.{getattr(obj, '__name__', attr)}")
    # distributed is imported on its own (import numba_lora.distributed)
    names.update(f"numba_lora.distributed.{n}" for n in ("merge", "forward_batch"))
    return names


PUBLIC = public_callables()
FULL = _full_api()


def _in_full(qualname):
    return qualname in FULL or qualname.rsplit(".", 1)[0] in FULL


# --------------------------------------------------------------- own check
_SECTION = re.compile(r"^(\w[\w ]*)\n-{3,}\n", re.MULTILINE)


def _sections(doc):
    doc = inspect.cleandoc(doc)
    heads = list(_SECTION.finditer(doc))
    return {m.group(1): doc[m.end():heads[i + 1].start() if i + 1 < len(heads) else len(doc)]
            for i, m in enumerate(heads)}


def _documented_parameters(section):
    names = []
    for line in section.splitlines():
        if line and not line[0].isspace():
            head = line.split(" : ")[0]
            names.extend(n.strip().lstrip("*") for n in head.split(","))
    return names


def _is_record(obj):
    """A dataclass or NamedTuple: its constructor's parameters are its fields."""
    return inspect.isclass(obj) and (dataclasses.is_dataclass(obj) or (
        issubclass(obj, tuple) and hasattr(obj, "_fields")))


def _signature_parameters(obj):
    if isinstance(obj, property):
        return []
    if inspect.isclass(obj) and "__init__" not in vars(obj):
        return []  # the constructor is a base class's (Exception, argparse): documented there
    target = obj.__init__ if inspect.isclass(obj) else obj
    try:
        sig = inspect.signature(target)
    except (TypeError, ValueError):
        return None
    return [p for p in sig.parameters if p not in ("self", "cls")]


def _returns_value(obj):
    func = getattr(obj, "py_func", obj)  # a Numba dispatcher: its Python source
    if inspect.isclass(func) or isinstance(func, property):
        return False
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(func)))
    except (OSError, TypeError):
        return False
    body = tree.body[0]

    def walk(node):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef)):
                continue  # a nested function's return is not this one's
            if isinstance(child, ast.Return) and child.value is not None and not (
                    isinstance(child.value, ast.Constant) and child.value.value is None):
                return True
            if walk(child):
                return True
        return False

    return walk(body)


def test_the_list_is_not_empty():
    assert len(PUBLIC) > 50
    assert "numba_lora.kernels.lora.merge" in FULL
    assert "numba_lora.multi.MultiLoraLinear" in FULL


@pytest.mark.parametrize("qualname,obj", PUBLIC, ids=[q for q, _ in PUBLIC])
def test_parameters_and_returns_match_the_signature(qualname, obj):
    doc = obj.__doc__  # a property's is its doc= or else its getter's
    assert doc and doc.strip(), f"{qualname} has no docstring"
    sections = _sections(doc)
    expected = _signature_parameters(obj)
    if expected and (qualname, "PR01") not in EXEMPT:
        # numpydoc convention: a record class (dataclass, NamedTuple) documents
        # its fields, which are also its constructor's parameters, once, under
        # Attributes; they must then match the fields in order.
        head = "Attributes" if _is_record(obj) and "Parameters" not in sections else "Parameters"
        assert head in sections, f"{qualname}: no {head} section"
        documented = _documented_parameters(sections[head])
        assert documented == expected, (
            f"{qualname}: Parameters {documented} do not match the signature {expected}")
    if _returns_value(obj) and (qualname, "RT01") not in EXEMPT:
        assert "Returns" in sections or "Yields" in sections, f"{qualname}: no Returns section"


# --------------------------------------------------------- numpydoc's check
#: numpydoc's parameter codes, which a record class answers under Attributes.
PARAMETER_CODES = {"PR01", "PR02", "PR03", "PR04", "PR07"}


# Properties are left out: numpydoc documents a property as an attribute (a
# summary, maybe a description; no Parameters or Returns, and no See Also or
# Examples of its own: its class's show it), so the one code that applies is
# GL08, which the check above already makes (and numpydoc.validate cannot find
# the source line of a ``property(lambda self: ..., doc=...)``).
@pytest.mark.parametrize("qualname", [q for q, o in PUBLIC if not isinstance(o, property)])
def test_numpydoc_validation(qualname):
    validate = pytest.importorskip("numpydoc.validate").validate
    codes = REQUIRED | (FULL_CODES if _in_full(qualname) else set())
    obj = dict(PUBLIC)[qualname]
    if _is_record(obj) and "Parameters" not in _sections(obj.__doc__ or ""):
        codes -= PARAMETER_CODES  # fields under Attributes, matched above
    errors = [(code, message) for code, message in validate(qualname)["errors"]
              if code in codes and (qualname, code) not in EXEMPT]
    assert not errors, f"{qualname}: {errors}"
