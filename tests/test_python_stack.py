"""The code runs on the Python stacks pip resolves today (issue 11, section 1).

CI runs the suite on the oldest and the newest Python the machines have (3.11 and 3.13),
each with the newest versions pip resolves; on 3.12+ that is a tifffile which removed
``TiffPageSeries.get_shape``/``get_axes``. These tests check, for the INSTALLED tifffile,
that every attribute gpufusion takes from a tifffile object exists, and that the
real-data switch of ``.ci/run`` turns an absent ``../shared/data`` into a failure.
"""

from __future__ import annotations

import ast
import inspect
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile

import gpufusion
from gpufusion.readers.images import open_tile
from gpufusion.readers.ome_tiff import tiff_series_planes
from gpufusion.readers.tiff_compat import series_dims

from . import conftest

PACKAGE = Path(gpufusion.__file__).parent
COMPAT = PACKAGE / "readers" / "tiff_compat.py"

#: tifffile API that newer releases removed; only the compatibility module may name it.
REMOVED = {
    "get_shape": "TiffPageSeries.get_shape, removed in tifffile 2026.5.2",
    "get_axes": "TiffPageSeries.get_axes, removed in tifffile 2026.5.2",
}

#: Attributes of the plain values tifffile hands back (arrays, dtypes, tuples, strings, dicts,
#: paths): the scan cannot tell those values from tifffile objects, so their names pass.
PLAIN_VALUES = set().union(*(dir(t) for t in (np.ndarray, np.dtype, tuple, str, dict, Path)))


def _root(node: ast.AST) -> ast.AST:
    """The leftmost node of an attribute / subscript / call chain (``a`` in ``a.b[0].c()``)."""
    while isinstance(node, ast.Attribute | ast.Subscript | ast.Call | ast.Starred):
        node = node.func if isinstance(node, ast.Call) else node.value
    return node


def _names(target: ast.AST) -> list[str]:
    return [n.id for n in ast.walk(target) if isinstance(n, ast.Name)]


_FUNCTIONS = (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)


def _scope_nodes(scope: ast.AST) -> list[ast.AST]:
    """The nodes of ``scope`` outside the functions nested in it."""
    nodes, todo = [], list(ast.iter_child_nodes(scope))
    while todo:
        node = todo.pop()
        nodes.append(node)
        if not isinstance(node, _FUNCTIONS):
            todo.extend(ast.iter_child_nodes(node))
    return nodes


def _function_taint(tree: ast.Module, roots: set[str]) -> dict[ast.AST, set[str]]:
    """Names bound to tifffile objects in each function (and the module) of ``tree``.

    A name is a tifffile object when it is the imported ``tifffile`` module (or a name
    imported from it), or is bound by ``=``, ``with ... as`` or ``for`` from a chain rooted
    at one, or is the parameter of a function of the same module that receives one.
    Nested functions see the names of the function around them.
    """
    parent: dict[ast.AST, ast.AST] = {}
    scopes: list[ast.AST] = [tree]
    for scope in scopes:  # grows while iterating: breadth-first over nested functions
        for node in _scope_nodes(scope):
            if isinstance(node, _FUNCTIONS):
                parent[node] = scope
                scopes.append(node)
    defs = {f.name: f for f in scopes if isinstance(f, ast.FunctionDef | ast.AsyncFunctionDef)}
    taint: dict[ast.AST, set[str]] = {scope: set(roots) for scope in scopes}

    def tainted(expr: ast.AST, names: set[str]) -> bool:
        if isinstance(expr, ast.Call) and isinstance(expr.func, ast.Name) and expr.func.id in (
            "enumerate", "reversed", "list", "iter", "zip"
        ):
            return any(tainted(arg, names) for arg in expr.args)
        root = _root(expr)
        return isinstance(root, ast.Name) and root.id in names

    changed = True
    while changed:
        changed = False
        for scope in scopes:
            names = taint[scope]
            bound = set(taint[parent[scope]]) if scope in parent else set()
            for node in _scope_nodes(scope):
                if isinstance(node, ast.Assign) and tainted(node.value, names):
                    bound |= {n for t in node.targets for n in _names(t)}
                elif isinstance(node, ast.withitem) and node.optional_vars is not None:
                    if tainted(node.context_expr, names):
                        bound |= set(_names(node.optional_vars))
                elif isinstance(node, ast.For | ast.comprehension) and tainted(node.iter, names):
                    bound |= set(_names(node.target))
                elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
                    callee = defs.get(node.func.id)
                    if callee is not None:
                        params = [a.arg for a in callee.args.posonlyargs + callee.args.args]
                        for param, arg in zip(params, node.args, strict=False):
                            if tainted(arg, names) and param not in taint[callee]:
                                taint[callee].add(param)
                                changed = True
            if bound - names:
                names |= bound
                changed = True
    return taint


def tifffile_attributes(source: str) -> set[tuple[str, int]]:
    """``(attribute, line)`` for each attribute taken from a tifffile object in ``source``."""
    tree = ast.parse(source)
    roots = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots |= {a.asname or a.name for a in node.names if a.name == "tifffile"}
        elif isinstance(node, ast.ImportFrom) and node.module == "tifffile":
            roots |= {a.asname or a.name for a in node.names}
    if not roots:
        return set()
    found = set()
    for scope, names in _function_taint(tree, roots).items():
        for node in _scope_nodes(scope):
            if isinstance(node, ast.Attribute):
                root = _root(node)
                if isinstance(root, ast.Name) and root.id in names:
                    found.add((node.attr, node.lineno))
    return found


def tifffile_api() -> set[str]:
    """Every attribute name of the installed tifffile: module, classes, their annotations."""
    names = set(dir(tifffile))
    modules = [m for name, m in sys.modules.items() if name.split(".")[0] == "tifffile"]
    for module in modules:
        for _, cls in inspect.getmembers(module, inspect.isclass):
            if not cls.__module__.startswith("tifffile"):
                continue
            names |= set(dir(cls))
            for base in cls.__mro__:
                names |= set(getattr(base, "__annotations__", {}))
                names |= set(getattr(base, "__slots__", ()))
    names |= set(dir(tifffile.TIFF))
    return names


def package_sources() -> dict[Path, str]:
    return {p: p.read_text(encoding="utf-8") for p in sorted(PACKAGE.rglob("*.py"))}


def test_scan_finds_tifffile_attributes_through_calls_and_loops():
    source = (
        "import tifffile\n"
        "def inner(path, series):\n"
        "    for page in enumerate(series):\n"
        "        page.dataoffsets\n"
        "    return series.get_shape(False)\n"
        "def outer(path):\n"
        "    with tifffile.TiffFile(path) as tif:\n"
        "        s = tif.series[0]\n"
        "        shape = inner(path, s)\n"
        "    return shape.count(1), path.name\n"
    )
    found = {name for name, _ in tifffile_attributes(source)}
    assert found == {"TiffFile", "series", "dataoffsets", "get_shape"}


def test_tiff_readers_use_only_api_of_the_installed_tifffile():
    api = tifffile_api()
    assert "TiffFile" in api and "dataoffset" in api  # the API listing itself works
    missing = []
    for path, source in package_sources().items():
        for name, line in sorted(tifffile_attributes(source)):
            if name not in api and name not in PLAIN_VALUES:
                missing.append(f"{path.relative_to(PACKAGE)}:{line}: .{name}")
    assert missing == [], f"tifffile {tifffile.__version__} lacks: {missing}"


def test_removed_tifffile_api_is_named_only_by_the_compatibility_module():
    offenders = []
    for path, source in package_sources().items():
        if path == COMPAT:
            continue
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.Attribute) and node.attr in REMOVED:
                offenders.append(f"{path.relative_to(PACKAGE)}:{node.lineno}: {REMOVED[node.attr]}")
    assert offenders == []


def test_series_dims_keeps_singleton_axes_on_this_tifffile(tmp_path: Path):
    path = tmp_path / "tzcyx.tif"
    tifffile.imwrite(path, np.zeros((2, 3, 1, 8, 8), np.uint8), imagej=True,
                     metadata={"axes": "TZCYX"})
    with tifffile.TiffFile(path) as tif:
        assert tif.series[0].shape == (2, 3, 8, 8)  # the default series is squeezed
        assert series_dims(tif, 0) == ((2, 3, 1, 8, 8, 1), "TZCYXS")
    # a channel index past the single channel is named, not silently read as channel 0
    assert [page for _, page in tiff_series_planes(path, channel=0, timepoint=1)] == [3, 4, 5]
    with pytest.raises(gpufusion.errors.InputError, match=r"C index 1 does not exist \(size 1\)"):
        tiff_series_planes(path, channel=1, timepoint=0)


def test_tiff_tiles_open_and_fuse_on_this_tifffile(tmp_path: Path):
    rng = np.random.default_rng(11)
    truth = rng.integers(0, 4000, (40, 70), dtype=np.uint16)
    paths = []
    for k, (y, x) in enumerate([(0, 0), (0, 30)]):
        paths.append(tmp_path / f"tile{k}.ome.tif")
        tifffile.imwrite(paths[-1], truth[y:y + 40, x:x + 40][None], metadata={"axes": "ZYX"})
    tiles = [open_tile(p) for p in paths]
    assert [t.shape for t in tiles] == [(40, 40), (40, 40)]  # Z=1 squeezed
    mosaic = gpufusion.mosaic_from_positions(tiles, [(0, 0), (0, 30)])
    fused = np.asarray(gpufusion.fuse(mosaic, chunks=32, blend="linear"))
    np.testing.assert_array_equal(fused, truth)


@pytest.mark.parametrize(
    ("flag", "outcome"),
    [("1", pytest.fail.Exception), ("0", pytest.skip.Exception), ("", pytest.skip.Exception)],
)
def test_require_real_data_flag_turns_the_skip_into_a_failure(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
    flag: str, outcome: type[BaseException],
):
    monkeypatch.setenv(conftest.REQUIRE_DATA_ENV, flag)
    monkeypatch.setattr(conftest, "DATA", tmp_path / "absent")
    with pytest.raises(outcome, match="real data not present: .*absent") as excinfo:
        request.getfixturevalue("data_dir")
    assert (conftest.REQUIRE_DATA_ENV in str(excinfo.value)) == (flag == "1")
    with pytest.raises(outcome, match="real data not present: .*tile.tif"):
        conftest.missing_real_data(tmp_path / "tile.tif")  # what the per-file checks call


def test_present_real_data_is_returned_with_the_flag_set(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, request: pytest.FixtureRequest
):
    monkeypatch.setenv(conftest.REQUIRE_DATA_ENV, "1")
    monkeypatch.setattr(conftest, "DATA", tmp_path)
    assert request.getfixturevalue("data_dir") == tmp_path
