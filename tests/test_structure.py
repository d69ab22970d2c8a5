"""The package's shape, checked from its source: no module over 500 lines, no import cycle among
vd_jax modules (imports inside functions count), and no module reaching into another module's
`_private` names. Each check reads the files with `ast` (nothing is imported), and each has a
test that feeds it a small made-up package with the defect, so a check that cannot fail fails.
"""
from __future__ import annotations

import ast
import pathlib
from typing import Dict, List, Set, Tuple

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1] / 'vd_jax'
MAX_LINES = 500


def modules(root: pathlib.Path) -> Dict[str, pathlib.Path]:
    """{dotted module name: file} for every .py file under `root` (packages by their name)."""
    out = {}
    for path in sorted(root.rglob('*.py')):
        parts = list(path.relative_to(root.parent).with_suffix('').parts)
        if parts[-1] == '__init__':
            parts = parts[:-1]
        out['.'.join(parts)] = path
    return out


def _absolute(module: str, is_package: bool, target: str, level: int) -> str:
    if level == 0:
        return target
    base = module.split('.') if is_package else module.split('.')[:-1]
    base = base[:len(base) - (level - 1)]
    return '.'.join(base + ([target] if target else []))


def imports(mods: Dict[str, pathlib.Path]) -> Tuple[Dict[str, Set[str]], List[str]]:
    """(module -> the package modules it imports anywhere in its body, the private names one
    module takes from another: 'a.b imports c._x')."""
    edges: Dict[str, Set[str]] = {m: set() for m in mods}
    private: List[str] = []
    for mod, path in mods.items():
        tree = ast.parse(path.read_text(), str(path))
        is_package = path.name == '__init__.py'
        aliases: Dict[str, str] = {}   # local name -> imported package module
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for a in node.names:
                    if a.name in mods:
                        edges[mod].add(a.name)
                        if a.asname:
                            aliases[a.asname] = a.name
            elif isinstance(node, ast.ImportFrom):
                target = _absolute(mod, is_package, node.module or '', node.level)
                for a in node.names:
                    sub = f'{target}.{a.name}'
                    if sub in mods:
                        edges[mod].add(sub)
                        aliases[a.asname or a.name] = sub
                    elif target in mods:
                        edges[mod].add(target)
                        if a.name.startswith('_') and not a.name.startswith('__'):
                            private.append(f'{mod} imports {target}.{a.name}')
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                    and node.value.id in aliases and node.attr.startswith('_')
                    and not node.attr.startswith('__') and aliases[node.value.id] != mod):
                private.append(f'{mod} uses {aliases[node.value.id]}.{node.attr}')
        edges[mod].discard(mod)
    return edges, sorted(set(private))


def cycles(edges: Dict[str, Set[str]]) -> List[List[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on_stack: Set[str] = set()
    found: List[List[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def long_modules(mods: Dict[str, pathlib.Path], limit: int = MAX_LINES) -> List[str]:
    return [f'{m}: {n} lines' for m, p in mods.items()
            if (n := len(p.read_text().splitlines())) > limit]


def test_no_module_over_500_lines():
    assert long_modules(modules(ROOT)) == []


def test_no_import_cycles_counting_imports_inside_functions():
    edges, _ = imports(modules(ROOT))
    assert cycles(edges) == []


def test_no_module_uses_another_modules_private_names():
    _, private = imports(modules(ROOT))
    assert private == []


@pytest.fixture
def toy(tmp_path):
    """A made-up package 'vd_jax' with a cycle through a function-local import, a private
    import, a private attribute through a module alias, and a long module."""
    pkg = tmp_path / 'vd_jax'
    (pkg / 'sub').mkdir(parents=True)
    (pkg / '__init__.py').write_text('')
    (pkg / 'sub' / '__init__.py').write_text('')
    (pkg / 'a.py').write_text('from vd_jax.sub import b\n\ndef f():\n    return b.g()\n')
    (pkg / 'sub' / 'b.py').write_text('def g():\n    from vd_jax import a  # noqa\n'
                                      '    return a\n\n_hidden = 1\n')
    (pkg / 'c.py').write_text('from vd_jax.sub.b import _hidden\nfrom vd_jax.sub import b as bb\n'
                              'x = bb._hidden\n' + 'y = 1\n' * 501)
    return pkg


def test_the_checks_find_each_defect_in_a_made_up_package(toy):
    mods = modules(toy)
    assert set(mods) == {'vd_jax', 'vd_jax.a', 'vd_jax.sub', 'vd_jax.sub.b', 'vd_jax.c'}
    edges, private = imports(mods)
    assert cycles(edges) == [['vd_jax.a', 'vd_jax.sub.b']]
    assert private == ['vd_jax.c imports vd_jax.sub.b._hidden', 'vd_jax.c uses vd_jax.sub.b._hidden']
    assert long_modules(mods) == ['vd_jax.c: 504 lines']
