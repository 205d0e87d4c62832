"""Refuse TorchScript and torch.export models whose graphs could touch the host.

TorchScript is code: `torch.from_file(path, True, n).copy_(x)` in a forward writes any file the
process may write, and `torch.jit.load` itself runs a scripted `__setstate__`. So before a model
runs (or is exported), every op it can execute is checked against what is known to be pure:

* deny by default: an op passes only if its namespace is allowed AND it is not denied by name or
  by the types in its schema;
* `aten::` (tensor math, nn ops, list/str/dict helpers) is allowed, except the ops below that
  reach files, streams or other storage, and any op whose schema mentions a Storage, Future,
  Stream, Event, Await or a custom class. `aten::warn` stays allowed: torch's own scripted
  modules call `warnings.warn` (nn.TransformerEncoder does), and it reaches only Python's
  warnings machinery (stderr, captured by the step), unlike `prim::Print`/`aten::_print`
  (stdout, where `mnnpipe run` prints its result);
* `prim::` only for the listed control-flow / container / attribute / metadata ops (not
  PythonOp, Print, rpc, fork, CallMethod on interfaces, ...);
* every other namespace (quantized, c10d, profiler, custom ops) is refused, and so is any value of
  a custom class type (`__torch__.torch.classes.*`, C++ objects with their own methods).

TorchScript: every method of every submodule, with calls inlined (functions and methods the graph
calls are checked as part of it) and nested blocks (if/loop bodies) walked. torch.export: every
call_function node of the program's graph and of its nested graphs (higher-order ops).
"""

from __future__ import annotations

import functools
import operator
import re
import zipfile
from pathlib import Path
from typing import Any, Iterator

from .errors import InputError

# By name: aten ops whose purpose is I/O or re-pointing a tensor at storage.
DENIED_ATEN = {
    "aten::from_file": "maps a host file into a tensor (writes reach the file)",
    "aten::save": "writes a file",
    "aten::_print": "prints",
    "aten::set_": "re-points a tensor at another storage",
    "aten::set_data": "re-points a tensor at another storage",
    "aten::wait": "waits on a future (async machinery)",
    "aten::record_stream": "device streams",
}
# By schema: ops taking or returning these types reach beyond plain tensors and values.
_UNSAFE_TYPES = re.compile(r"Storage|Future|Stream|Event|Await|Capsule|__torch__")

ALLOWED_PRIM = frozenset(
    {
        "prim::Constant", "prim::GetAttr", "prim::SetAttr", "prim::If", "prim::Loop",
        "prim::ListConstruct", "prim::ListUnpack", "prim::TupleConstruct", "prim::TupleUnpack",
        "prim::TupleIndex", "prim::DictConstruct", "prim::CreateObject", "prim::NumToTensor",
        "prim::RaiseException", "prim::Uninitialized", "prim::unchecked_cast",
        "prim::unchecked_unwrap_optional", "prim::isinstance", "prim::device", "prim::dtype",
        "prim::layout", "prim::is_cuda", "prim::is_cpu", "prim::is_quantized", "prim::is_sparse",
        "prim::is_nested", "prim::is_meta", "prim::is_mkldnn", "prim::requires_grad", "prim::data",
        "prim::shape", "prim::min", "prim::max", "prim::abs", "prim::TypeCheck", "prim::EnumValue",
        "prim::EnumName", "prim::StringIndex", "prim::ModuleContainerIndex", "prim::tolist",
        "prim::type", "prim::name", "prim::index", "prim::itemsize", "prim::nbytes",
        "prim::rangelist", "prim::AutogradZero", "prim::AutogradAdd", "prim::BroadcastSizes",
        "prim::ConstantChunk", "prim::ChunkSizes", "prim::Guard", "prim::BailOut",
        "prim::grad",
    }
)
# torch.export graphs: plain Python callables allowed as call_function targets (SymInt arithmetic).
_ALLOWED_PYTHON_TARGETS = frozenset(
    {
        operator.getitem, operator.add, operator.sub, operator.mul, operator.floordiv,
        operator.truediv, operator.mod, operator.neg, operator.pow, operator.eq, operator.ne,
        operator.lt, operator.le, operator.gt, operator.ge,
    }
)

# The check itself can be switched off only by tests of the confinement behind it.
_ENABLED = True


@functools.lru_cache(maxsize=None)
def _refusal(kind: str) -> str | None:
    """Why op `kind` ('ns::name') is refused, or None when it is allowed."""
    namespace = kind.split("::", 1)[0]
    if namespace == "prim":
        return None if kind in ALLOWED_PRIM else "not a known pure prim op"
    if namespace != "aten":
        return f"namespace '{namespace}::' is not allowed"
    if kind in DENIED_ATEN:
        return DENIED_ATEN[kind]
    import torch

    for schema in torch._C._jit_get_schemas_for_operator(kind):
        for arg in [*schema.arguments, *schema.returns]:
            if _UNSAFE_TYPES.search(str(arg.type)):
                return f"works on {arg.type}"
    return None


def _refuse(label: str, what: str, why: str) -> InputError:
    return InputError(f"{label}: refused, the model uses {what} ({why}); only side-effect-free ops may run")


def check_archive_code(label: str, path: Path) -> None:
    """Before torch.jit.load: refuse archives whose scripted classes define `__setstate__`
    (torch.jit.load runs it while loading, before any graph can be checked)."""
    try:
        with zipfile.ZipFile(path) as z:
            for name in z.namelist():
                if "/code/" in name and name.endswith(".py") and b"def __setstate__(" in z.read(name):
                    raise _refuse(label, f"a scripted __setstate__ in {name.split('/code/', 1)[1]}", "it runs while loading")
    except zipfile.BadZipFile:
        return  # torch.jit.load names the problem


def _nodes(block: Any) -> Iterator[Any]:
    for node in block.nodes():
        yield node
        for sub in node.blocks():
            yield from _nodes(sub)


def _typename(value: Any) -> str:
    try:
        return str(value.type())
    except RuntimeError:
        return ""


def check_torchscript(label: str, model: Any) -> None:
    """Every method of every submodule of a loaded ScriptModule, nested blocks walked.

    A call to a submodule's method is checked where that method is (every submodule is visited);
    any other call (free functions, TorchScript classes, interfaces) is inlined first, so what it
    runs is checked as part of the caller; an interface call that cannot be inlined is refused
    (its `prim::CallMethod` is not on the allowlist).
    """
    import torch

    if not _ENABLED:
        return
    modules = [(name, m._c) for name, m in model.named_modules() if getattr(m, "_c", None) is not None]
    module_types = {c._type().qualified_name() for _, c in modules}
    seen: set[str] = set()
    for mod_name, c in modules:
        qualified = c._type().qualified_name()
        if qualified in seen:
            continue  # instances of one scripted class share their code
        seen.add(qualified)
        for method in c._method_names():
            where = f"{mod_name + '.' if mod_name else ''}{method}"
            graph = c._get_method(method).graph
            if any(_foreign_call(node, module_types) for node in _nodes(graph)):
                graph = graph.copy()
                torch._C._jit_pass_inline(graph)
            for node in _nodes(graph):
                kind = node.kind()
                if kind == "prim::CallMethod" and not _foreign_call(node, module_types):
                    continue
                why = _refusal(kind)
                if why is not None:
                    raise _refuse(label, f"'{kind}' in {where}", why)
                for value in [*node.inputs(), *node.outputs()]:
                    t = _typename(value)
                    if "__torch__.torch.classes" in t:
                        raise _refuse(label, f"custom class {t} in {where}", "C++ objects with their own methods")


def _foreign_call(node: Any, module_types: set[str]) -> bool:
    """A call whose callee is not a method of one of the model's own (separately checked) modules."""
    if node.kind() == "prim::CallFunction":
        return True
    if node.kind() != "prim::CallMethod":
        return False
    return _typename(node.inputsAt(0)) not in module_types


def check_exported(label: str, program: Any) -> None:
    """Every call_function of an ExportedProgram's graph and of its nested graphs."""
    import torch

    if not _ENABLED:
        return
    for gm in program.graph_module.modules():
        graph = getattr(gm, "graph", None)
        if not isinstance(graph, torch.fx.Graph):
            continue
        for node in graph.nodes:
            if node.op in ("placeholder", "output", "get_attr"):
                continue
            if node.op != "call_function":
                raise _refuse(label, f"a '{node.op}' node ({node.target})", "exported programs call ops only")
            target = node.target
            if isinstance(target, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
                kind = target._schema.name if isinstance(target, torch._ops.OpOverload) else f"{target._qualified_op_name}"
                kind = kind if "::" in kind else f"{target.namespace}::{kind}"
                why = _refusal(kind)
                if why is not None:
                    raise _refuse(label, f"'{kind}'", why)
            elif target not in _ALLOWED_PYTHON_TARGETS:
                raise _refuse(label, f"'{getattr(target, '__qualname__', target)}'", "not a known pure op")
