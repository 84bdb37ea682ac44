"""The house drawn from the source: layers point down only, no import cycles, no function-local
imports, ``import cetvm.kvm`` loads no engine, no ``._name`` access across modules, and kvm/
writes no attribute of the CPU object (DESIGN.md "Layers"; issue 11's acceptance checks).

Everything is read with :mod:`ast` from src/cetvm (nothing is imported but in the one
subprocess check), so a violation names the file and line.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src" / "cetvm"

#: Each package and the packages it may import (DESIGN.md: cli → linux → vmm → kvm → cpu →
#: xstate → cpuid → arch, plus report → arch). "base" is the root package (CetvmError and
#: friends) and cetvm.files (the file boundary), which every layer may use.
CHAIN = ("arch", "cpuid", "xstate", "cpu", "kvm", "vmm", "linux", "cli")
ALLOWED: dict[str, set[str]] = {layer: {"base", *CHAIN[:i]} for i, layer in enumerate(CHAIN)}
ALLOWED["report"] = {"base", "arch"}
for _user in ("vmm", "linux", "cli"):
    ALLOWED[_user].add("report")
#: conformance.py drives kvm-unit-tests through the QEMU-compatible front end: a cli tool.
ALLOWED["conformance"] = ALLOWED["cli"]
ALLOWED["cli"].add("conformance")
ALLOWED["base"] = {"base"}
ALLOWED["__main__"] = {"cli"}


@dataclass(frozen=True)
class Import:
    importer: str      # module name, e.g. cetvm.kvm.api
    target: str        # imported module, e.g. cetvm.cpu.vcpu
    line: int
    local: bool        # inside a function
    type_only: bool    # under ``if TYPE_CHECKING:``


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {module_name(p): p for p in SRC.rglob("*.py")}


def layer(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1 or parts[1] == "files":
        return "base"
    return parts[1]


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    nodes: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for stmt in node.body:
                nodes.update(id(n) for n in ast.walk(stmt))
    return nodes


def _function_nodes(tree: ast.AST) -> set[int]:
    nodes: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            nodes.update(id(n) for n in ast.walk(node) if n is not node)
    return nodes


def imports_of(module: str) -> list[Import]:
    tree = ast.parse(MODULES[module].read_text())
    type_only, local = _type_checking_nodes(tree), _function_nodes(tree)
    found = []
    for node in ast.walk(tree):
        targets: list[str] = []
        if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] == "cetvm":
            base = node.module or ""
            # ``from cetvm.cpu import emulate`` imports the submodule cetvm.cpu.emulate
            subs = [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in MODULES]
            targets = subs if len(subs) == len(node.names) else [base, *subs]
        elif isinstance(node, ast.Import):
            targets = [a.name for a in node.names if a.name.split(".")[0] == "cetvm"]
        found += [Import(module, t, node.lineno, id(node) in local, id(node) in type_only)
                  for t in targets if t in MODULES]
    return found


ALL_IMPORTS = [imp for module in sorted(MODULES) for imp in imports_of(module)]


def upward_imports(imports: list[Import]) -> list[str]:
    """The imports that go against the layer order, as "importer:line: ..." lines."""
    return [f"{i.importer}:{i.line}: {layer(i.importer)} imports {i.target} ({layer(i.target)})"
            for i in imports
            if layer(i.importer) != layer(i.target) and layer(i.target) not in ALLOWED[layer(i.importer)]]


def test_layers_point_down_only():
    upward = upward_imports(ALL_IMPORTS)
    assert not upward, "imports against the layer order:\n" + "\n".join(upward)


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

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
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles():
    """Between modules, counting every import that runs (function-local ones too, not the
    annotation-only ones under TYPE_CHECKING)."""
    edges: dict[str, set[str]] = defaultdict(set)
    for module in MODULES:
        edges[module]
    for i in ALL_IMPORTS:
        if not i.type_only and i.target != i.importer:
            edges[i.importer].add(i.target)
    assert _cycles(edges) == []


def test_no_function_local_imports():
    local = [f"{MODULES[i.importer].relative_to(SRC.parent)}:{i.line}: {i.target}" for i in ALL_IMPORTS if i.local]
    assert not local, "function-local imports of cetvm modules:\n" + "\n".join(local)


def test_the_check_sees_an_upward_import_and_a_cycle():
    """The checks above are not vacuous: the real import graph has edges in every layer, and the
    cycle finder finds a planted cycle."""
    assert {layer(i.importer) for i in ALL_IMPORTS} >= {"arch", "cpuid", "xstate", "cpu", "kvm", "vmm", "cli", "report"}
    planted = [Import("cetvm.cpu.vcpu", "cetvm.kvm.api", 1, False, False),
               Import("cetvm.report.violation", "cetvm.cpu.vcpu", 2, False, False),
               Import("cetvm.kvm.api", "cetvm.cpu.vcpu", 3, False, False)]
    assert [line.split(":")[0] for line in upward_imports(planted)] == ["cetvm.cpu.vcpu", "cetvm.report.violation"]
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == [["a", "b", "c"]]


def test_importing_kvm_loads_no_engine():
    """``import cetvm.kvm`` (the policy: caps, CPUID, MSRs) needs neither Unicorn nor iced-x86."""
    code = ("import sys, cetvm.kvm; "
            "print(','.join(m for m in ('unicorn', 'iced_x86', 'cetvm.cpu.vcpu') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == ""


# ----------------------------------------------------------------------- private names
#: Private names of other code that src/ reads, each with its reason. Everything else must be
#: defined (assigned, def'd, imported) in the module that reads it.
PRIVATE_ALLOWED: dict[tuple[str, str], str] = {
    ("*", "_uch"): "Unicorn 2.1.4's C engine handle: the ctypes calls into libunicorn need it "
                   "(the version is pinned and self-checked)",
    ("*", "_SubParsersAction"): "argparse's subparser type, named in an annotation",
    ("cpu/faults.py", "_value2member_map_"): "enum's value lookup without raising",
}
def _private_names_defined(tree: ast.AST) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif (isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store)
              and isinstance(node.value, ast.Name) and node.value.id in ("self", "cls")):
            names.add(node.attr)  # an attribute of its own objects; ``other._x = ...`` is a use
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update(a.asname or a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.arg):
            names.add(node.arg)
    return names


def private_reads(trees: dict[str, ast.AST]) -> list[str]:
    """``x._name`` uses in each module (keyed by its path under src/cetvm) of a private name the
    module does not define itself."""
    defined = {rel: _private_names_defined(tree) for rel, tree in trees.items()}
    bad = []
    for rel, tree in trees.items():
        own = defined[rel]
        for node in ast.walk(tree):
            if not isinstance(node, ast.Attribute):
                continue
            name = node.attr
            if not name.startswith("_") or name.startswith("__") or name in own:
                continue
            if ("*", name) in PRIVATE_ALLOWED or (rel, name) in PRIVATE_ALLOWED:
                continue
            bad.append(f"src/cetvm/{rel}:{node.lineno}: {ast.unparse(node)}")
    return bad


def test_no_private_access_across_modules():
    trees = {str(p.relative_to(SRC)): ast.parse(p.read_text()) for p in SRC.rglob("*.py")}
    bad = private_reads(trees)
    assert not bad, "private names read across modules:\n" + "\n".join(bad)
    planted = {"a.py": ast.parse("class A:\n    def f(self):\n        self._x = 1\n        return self._x\n"),
               "b.py": ast.parse("def g(a):\n    a._y = 2\n    return a._x\n")}
    assert private_reads(planted) == ["src/cetvm/b.py:2: a._y", "src/cetvm/b.py:3: a._x"]


# ----------------------------------------------------------------------- the kvm ↔ cpu seam
def _is_cpu_object(node: ast.expr) -> bool:
    """``cpu``, ``self.cpu``, ``vcpu.cpu``...: the CPU object KVM drives."""
    return (isinstance(node, ast.Name) and node.id == "cpu") or (isinstance(node, ast.Attribute) and node.attr == "cpu")


def cpu_attribute_writes(source: str) -> list[str]:
    """Assignments to an attribute of the CPU object in ``source``, as "line: target"."""
    writes = []
    for node in ast.walk(ast.parse(source)):
        targets: list[ast.expr] = []
        if isinstance(node, ast.Assign):
            targets = [t for target in node.targets for t in (target.elts if isinstance(target, ast.Tuple) else [target])]
        elif isinstance(node, (ast.AugAssign, ast.AnnAssign)):
            targets = [node.target]
        writes += [f"{node.lineno}: {ast.unparse(t)}"
                   for t in targets if isinstance(t, ast.Attribute) and _is_cpu_object(t.value)]
    return writes


def test_kvm_writes_no_cpu_attribute():
    """KVM programs the CPU through its VMCS and the vCPU's methods (vmptrld, set_reg,
    write_cr, set_msr, load_xcr0, inject_exception...), never by assigning its attributes."""
    writes = [f"{path.relative_to(SRC.parent)}:{w}" for path in sorted((SRC / "kvm").rglob("*.py"))
              for w in cpu_attribute_writes(path.read_text())]
    assert not writes, "kvm/ writes attributes of the CPU:\n" + "\n".join(writes)
    planted = "cpu.xcr0 = 1\nself.cpu.exception_bitmap |= 2\nvcpu.cr4, cpu.has_ibt = 0, True\nstate.cr4 = 4\n"
    assert cpu_attribute_writes(planted) == ["1: cpu.xcr0", "2: self.cpu.exception_bitmap", "3: cpu.has_ibt"]


def test_the_engine_exception_stays_in_cpu():
    """Unicorn (and its UcError) is the CPU's business: no other layer imports it."""
    users = [str(p.relative_to(SRC.parent)) for p in SRC.rglob("*.py")
             if not p.relative_to(SRC).parts[0] == "cpu"
             and any(isinstance(n, (ast.Import, ast.ImportFrom))
                     and any((getattr(n, "module", None) or a.name).split(".")[0] == "unicorn" for a in n.names)
                     for n in ast.walk(ast.parse(p.read_text())))]
    assert not users, f"modules outside cpu/ import unicorn: {users}"
