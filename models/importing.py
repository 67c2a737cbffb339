"""Import an UNTRUSTED classifier file (the BadNet a user bought or downloaded).

A model file from the wild is the attacker's first chance to run code on the defender's machine,
so nothing here unpickles arbitrary objects:

* ``.safetensors``: plain tensors, loaded into a zoo architecture (``arch`` required).
* state dicts (``torch.save`` zip or legacy files): only ever ``torch.load(weights_only=True)``.
* TorchScript archives: ``torch.jit.load``, whose unpickler builds TorchScript objects only,
  after refusing code that calls file-touching operators.
* ``torch.export`` programs (``.pt2``): ``torch.export.load`` is NOT safe on its own in torch
  2.14 (pickle fallbacks for weights and sample inputs, ``sympy.sympify`` of shape expressions,
  ``exec`` of guard code, compiled AOTInductor libraries). The archive is therefore checked
  against an allow-list before it is loaded, and the graph's operators after. The module is
  made trainable (batch norm and dropout follow ``train()`` / ``eval()``) and remembers the
  program's input ranges for re-export (:mod:`models.exported`).

Every file is read once into memory and checked and loaded from those same bytes
(:func:`import_net_bytes` takes bytes already read, e.g. by a bundle that checksummed them).
"""

from __future__ import annotations

import ast
import io
import json
import math
import operator
import pickle
import re
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from torch import nn

from models.classifiers import build_classifier, validate_arch_kwargs
from models.exported import trainable_module
from models.nets import NET_FORMATS, Net
from models.spec import InputSpec

# The dummy forward uses two images: it also catches export programs with a static batch of 1.
CHECK_BATCH = 2

STATE_DICT_KEYS = ("state_dict", "model_state_dict")
_UNPICKLER_REASON = re.compile(r"WeightsUnpickler error: ([^\n]*?)(?: Please use|$)", re.MULTILINE)

# Operators that read or write files; refused in TorchScript code and exported graphs.
FILE_OPERATORS = frozenset({"from_file", "save", "load_tensor"})
_TORCHSCRIPT_FILE_OPS = re.compile(r"\b(" + "|".join(sorted(FILE_OPERATORS)) + r")\b")

# --- torch.export archive allow-list (torch/export/pt2_archive/constants.py) ---
PT2_FORMAT_MEMBER = "archive_format"
PT2_FORMAT_VALUE = b"pt2"
PT2_FIXED_MEMBERS = frozenset(
    {"archive_format", "archive_version", "byteorder", ".data/version", ".data/serialization_id"}
)
PT2_WEIGHTS_DIR = "data/weights/"
PT2_CONSTANTS_DIR = "data/constants/"
PT2_SAMPLE_INPUTS_DIR = "data/sample_inputs/"
PT2_MODELS_DIR = "models/"
PT2_EXTRA_DIR = "extra/"
PT2_CONFIG_SUFFIXES = ("_weights_config.json", "_constants_config.json")
PT2_TENSOR_CONSTANT_PREFIX = "tensor_"

# Node targets an exported classifier may name: ATen-style operators and symbolic arithmetic.
_NAME_PART = r"(?!__)[A-Za-z_]\w*"
_TARGET_OPS = re.compile(
    rf"^torch\.ops\.(?!higher_order\.){_NAME_PART}\.({_NAME_PART})(\.{_NAME_PART})?$"
)
_OPERATOR_NAMES = (
    "getitem", "add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "neg", "pos", "abs",
    "eq", "ne", "lt", "le", "gt", "ge", "and_", "or_", "not_", "lshift", "rshift",
)  # fmt: skip
_TORCH_SYM_NAMES = ("sym_max", "sym_min", "sym_not", "sym_float", "sym_int", "sym_ite", "sym_sqrt")
_MATH_NAMES = ("trunc", "floor", "ceil")
_ALLOWED_TARGET_NAMES = frozenset(
    [f"_operator.{name}" for name in _OPERATOR_NAMES]
    + [f"torch.{name}" for name in _TORCH_SYM_NAMES]
    + [f"math.{name}" for name in _MATH_NAMES]
)
_ALLOWED_CALLABLE_TARGETS = frozenset(
    [getattr(operator, name) for name in _OPERATOR_NAMES]
    + [getattr(torch, name) for name in _TORCH_SYM_NAMES if hasattr(torch, name)]
    + [getattr(math, name) for name in _MATH_NAMES]
)

# Shape expressions (``expr_str``) are parsed by ``sympy.sympify``, i.e. ``eval``: allow only
# calls to these SymPy / torch-sympy constructors, bare names, numbers and arithmetic.
_SYMPY_CALLS = frozenset((
    "Symbol", "Integer", "Rational", "Float", "Add", "Mul", "Pow", "Max", "Min", "Mod", "Abs",
    "FloorDiv", "CeilDiv", "CleanDiv", "PythonMod", "ModularIndexing", "Where",
    "CeilToInt", "FloorToInt", "TruncToInt", "RoundToInt", "RoundDecimal",
    "IntTrueDiv", "FloatTrueDiv", "ToFloat", "PowByNatural", "FloatPow", "LShift", "RShift",
    "Identity", "Eq", "Ne", "Ge", "Gt", "Le", "Lt", "And", "Or", "Not",
    "StrictGreaterThan", "StrictLessThan", "GreaterThan", "LessThan", "Equality", "Unequality",
))  # fmt: skip
_SYMPY_CALL_PATTERN = re.compile(r"^(OpaqueUnaryFn|BitwiseFn)_[A-Za-z0-9_]+$")
_SYMBOL_ASSUMPTIONS = frozenset(
    ("positive", "negative", "nonnegative", "nonpositive", "integer", "real", "finite", "evaluate")
)
_IDENTIFIER = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")
# Guard code is ``exec``-ed: allow ``L[...]`` tensor sizes, arithmetic and a few functions.
_GUARD_METHODS = frozenset({"size", "stride", "storage_offset", "dim", "numel"})
_GUARD_MODULE_FUNCS = {"math": frozenset({"floor", "ceil", "trunc", "sqrt"})}
_GUARD_NAMES = frozenset({"L", "inf"})
# Guard text is pasted into generated source: no comments, line breaks, escapes or quotes
# other than the single quotes of ``L['x']``.
_EXPRESSION_BAD_CHARS = re.compile(r'[#"\\\n\r]')
_ARITHMETIC_NODES = (
    ast.Expression, ast.BinOp, ast.UnaryOp, ast.BoolOp, ast.Compare, ast.operator,
    ast.unaryop, ast.boolop, ast.cmpop, ast.Load, ast.Constant,
)  # fmt: skip


class UnsafeModelError(ValueError):
    """The model file holds something other than tensors and code we can load safely."""


def _unpickle_refused(path: Path, reason: object) -> UnsafeModelError:
    return UnsafeModelError(
        f"{path} was refused: it contains pickled objects other than tensors ({reason}). "
        "Unpickling them could run arbitrary code. Convert the model where you trust it: "
        "save `model.state_dict()` with `safetensors.torch.save_file(...)` and import the "
        ".safetensors file with its architecture name (or export it with torch.jit / "
        "torch.export)."
    )


def import_net(
    path: Path,
    spec: InputSpec,
    num_classes: int,
    arch: str | None = None,
    arch_kwargs: dict[str, Any] | None = None,
) -> Net:
    """Load an untrusted classifier file as a :class:`Net` (on the CPU, eval mode).

    Reads the file once and hands its bytes to :func:`import_net_bytes` (see there).
    """
    path = Path(path)
    return import_net_bytes(path.read_bytes(), path, spec, num_classes, arch, arch_kwargs)


def import_net_bytes(
    data: bytes,
    name: str | Path,
    spec: InputSpec,
    num_classes: int,
    arch: str | None = None,
    arch_kwargs: dict[str, Any] | None = None,
) -> Net:
    """Load an untrusted classifier from its file's bytes as a :class:`Net` (CPU, eval mode).

    ``name`` is the file name: its suffix picks the format where the content does not
    (``.safetensors``, ``.pt2``), and it names the file in error messages. ``arch`` /
    ``arch_kwargs`` name the zoo architecture for weights-only files (safetensors, state
    dicts); the kwargs are checked against the architecture's bounds first. The net is checked
    with one forward pass on a zero batch of ``spec``'s shape. Raises
    :class:`UnsafeModelError` for files that would need arbitrary unpickling and ``ValueError``
    for files that do not fit ``spec`` / ``num_classes`` (or kwargs the architecture refuses).
    Callers that checksum a file should pass the very bytes they hashed.
    """
    path = Path(name)
    data = bytes(data)
    arch_kwargs = dict(arch_kwargs or {})
    if path.suffix == ".safetensors":
        try:
            state = safetensors.torch.load(data)
        except Exception as err:
            raise ValueError(f"{path} is not a readable safetensors file: {err}") from None
        net = _zoo_net(path, state, spec, num_classes, arch, arch_kwargs)
    else:
        archive = _open_zip(data)
        if path.suffix == ".pt2" or (archive is not None and _is_pt2(archive)):
            if archive is None:
                raise ValueError(f"{path} is not a torch.export archive (not a zip file)")
            net = Net(_load_exported(path, data, archive), "export", spec, num_classes)
        elif archive is not None and _is_torchscript(archive):
            net = Net(_load_torchscript(path, data, archive), "torchscript", spec, num_classes)
        else:
            state = _state_dict_from(path, _weights_only_load(path, data))
            net = _zoo_net(path, state, spec, num_classes, arch, arch_kwargs)
    net.train_mode(False)
    _check_forward(path, net)
    return net


def import_entry_bytes(
    data: bytes, entry: dict[str, Any], spec: InputSpec, num_classes: int
) -> Net:
    """Load a net described by a bundle manifest entry (``format``, ``file``, ``arch``,
    ``arch_kwargs``) from the bytes of its file, through the same checks as any import.

    A zoo entry is read as safetensors into its (bounds-checked) architecture; TorchScript and
    ``torch.export`` entries take :func:`import_net_bytes`, and the format found must be the one
    the entry declares. A manifest only proves that files were not changed after it was
    written, not who wrote it, so nothing here trusts a bundle more than a downloaded file.
    """
    fmt = entry.get("format")
    name = Path(str(entry.get("file", "")))
    if fmt not in NET_FORMATS:
        raise ValueError(f"{name}: unknown net format {fmt!r}; known: {NET_FORMATS}")
    if fmt != "zoo":
        net = import_net_bytes(data, name, spec, num_classes)
        if net.format != fmt:
            raise ValueError(f"{name} is declared as a {fmt} net but holds a {net.format} one")
        return net
    try:
        state = safetensors.torch.load(bytes(data))
    except Exception as err:
        raise ValueError(f"{name} is not a readable safetensors file: {err}") from None
    arch = entry.get("arch")
    net = _zoo_net(name, state, spec, num_classes, arch, dict(entry.get("arch_kwargs") or {}))
    net.train_mode(False)
    _check_forward(name, net)
    return net


def _zoo_net(
    path: Path,
    state: dict[str, torch.Tensor],
    spec: InputSpec,
    num_classes: int,
    arch: str | None,
    arch_kwargs: dict[str, Any],
) -> Net:
    if not arch:
        raise ValueError(
            f"{path} holds weights only: name its zoo architecture (arch=...) to import it"
        )
    arch_kwargs = validate_arch_kwargs(arch, arch_kwargs)
    module = build_classifier(arch, spec, num_classes, **arch_kwargs)
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise ValueError(
            f"the weights in {path} do not fit architecture {arch!r} with input "
            f"{list(spec.shape)} and {num_classes} classes: {err}"
        ) from None
    return Net(module, "zoo", spec, num_classes, arch=arch, arch_kwargs=arch_kwargs)


def _open_zip(data: bytes) -> zipfile.ZipFile | None:
    if not zipfile.is_zipfile(io.BytesIO(data)):
        return None
    try:
        return zipfile.ZipFile(io.BytesIO(data))
    except zipfile.BadZipFile:
        return None


def _members(archive: zipfile.ZipFile) -> dict[str, str]:
    """Member names with the archive's single top-level folder stripped -> full names."""
    names = [name for name in archive.namelist() if not name.endswith("/")]
    roots = {name.split("/", 1)[0] for name in names}
    if len(roots) == 1 and all("/" in name for name in names):
        return {name.split("/", 1)[1]: name for name in names}
    return {name: name for name in names}


def _is_pt2(archive: zipfile.ZipFile) -> bool:
    members = _members(archive)
    return (
        PT2_FORMAT_MEMBER in members
        and archive.read(members[PT2_FORMAT_MEMBER]).strip() == PT2_FORMAT_VALUE
    )


def _is_torchscript(archive: zipfile.ZipFile) -> bool:
    return any(name.startswith("code/") for name in _members(archive))


def _weights_only_load(path: Path, data: bytes) -> Any:
    """``torch.load(weights_only=True)``; any unpickling refusal becomes UnsafeModelError."""
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise _unpickle_refused(path, _unpickler_reason(err)) from None
    except Exception as err:
        raise ValueError(f"{path} is not a readable PyTorch file: {_first_line(err)}") from None


def _unpickler_reason(err: BaseException) -> str:
    """The line of torch's refusal that names the offending global, without its advice."""
    match = _UNPICKLER_REASON.search(str(err))
    return match.group(1).strip() if match else _first_line(err)


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _state_dict_from(path: Path, obj: Any) -> dict[str, torch.Tensor]:
    if isinstance(obj, dict):
        for key in STATE_DICT_KEYS:
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not obj:
        raise ValueError(
            f"{path} does not hold a state dict (a dict of tensors, or one under "
            f"{' / '.join(STATE_DICT_KEYS)}); got {type(obj).__name__}"
        )
    bad = [str(key) for key, value in obj.items() if not isinstance(value, torch.Tensor)]
    if bad:
        raise ValueError(f"{path}: state dict entries that are not tensors: {bad[:5]}")
    return {str(key): value for key, value in obj.items()}


def _load_torchscript(path: Path, data: bytes, archive: zipfile.ZipFile) -> nn.Module:
    for name, full in _members(archive).items():
        if name.startswith("code/") and name.endswith(".py"):
            text = archive.read(full).decode("utf-8", errors="replace")
            found = _TORCHSCRIPT_FILE_OPS.search(text)
            if found:
                raise UnsafeModelError(
                    f"{path} was refused: its TorchScript code ({name}) calls the "
                    f"file-touching operator {found.group(1)!r}"
                )
    try:
        return torch.jit.load(io.BytesIO(data), map_location="cpu")
    except Exception as err:
        raise ValueError(f"{path} is not a loadable TorchScript archive: {err}") from None


def _load_exported(path: Path, data: bytes, archive: zipfile.ZipFile) -> nn.Module:
    try:
        _check_pt2_archive(path, archive)
    except RecursionError:
        raise UnsafeModelError(f"{path} was refused: nesting too deep to check") from None
    try:
        program = torch.export.load(io.BytesIO(data))
    except Exception as err:
        raise ValueError(f"{path} is not a loadable torch.export program: {err}") from None
    _check_graph_targets(path, program)
    # Batch norm and dropout follow the module's train/eval mode; the input ranges are kept.
    return trainable_module(program)


def _check_pt2_archive(path: Path, archive: zipfile.ZipFile) -> None:
    """Refuse every part of a .pt2 archive that torch would unpickle, eval or exec unsafely."""
    for name, full in _members(archive).items():
        if name in PT2_FIXED_MEMBERS or name.startswith(PT2_EXTRA_DIR):
            continue
        if name.startswith((PT2_WEIGHTS_DIR, PT2_CONSTANTS_DIR)):
            if name.endswith(PT2_CONFIG_SUFFIXES):
                _check_payload_config(path, name, json.loads(archive.read(full)))
            continue
        if name.startswith(PT2_SAMPLE_INPUTS_DIR):
            _weights_only_load(path, archive.read(full))
            continue
        if name.startswith(PT2_MODELS_DIR) and name.endswith(".json"):
            _check_program_json(path, json.loads(archive.read(full)))
            continue
        raise UnsafeModelError(
            f"{path} was refused: archive member {name!r} is not part of a plain "
            "torch.export program (compiled libraries and legacy pickled parts are not loaded)"
        )


def _check_payload_config(path: Path, name: str, config: Any) -> None:
    entries = config.get("config", {}) if isinstance(config, dict) else None
    if not isinstance(entries, dict):
        raise ValueError(f"{path}: malformed {name}")
    for fqn, meta in entries.items():
        if not isinstance(meta, dict) or meta.get("use_pickle") is not False:
            raise _unpickle_refused(path, f"{fqn!r} in {name} is pickled")
        if name.startswith(PT2_CONSTANTS_DIR) and not str(meta.get("path_name", "")).startswith(
            PT2_TENSOR_CONSTANT_PREFIX
        ):
            raise _unpickle_refused(path, f"constant {fqn!r} is not a tensor")


def _walk_json(obj: Any) -> Iterator[tuple[str, Any]]:
    """Every (key, value) pair of a JSON document, depth first."""
    if isinstance(obj, dict):
        for key, value in obj.items():
            yield key, value
            yield from _walk_json(value)
    elif isinstance(obj, list):
        for value in obj:
            yield from _walk_json(value)


def _check_program_json(path: Path, program: Any) -> None:
    for key, value in _walk_json(program):
        if key == "expr_str":
            _check_expression(path, value, _sympy_node_ok)
        elif key == "guards_code":
            for guard in value or []:
                _check_expression(path, guard, _guard_node_ok)
        elif key == "target" and isinstance(value, str):
            if not (_TARGET_OPS.match(value) or value in _ALLOWED_TARGET_NAMES):
                raise UnsafeModelError(f"{path} was refused: graph calls {value!r}")
            op_name = _TARGET_OPS.match(value)
            if op_name and op_name.group(1) in FILE_OPERATORS:
                raise UnsafeModelError(f"{path} was refused: graph calls {value!r}")


def _check_expression(path: Path, text: Any, node_ok: Callable[[ast.AST], bool]) -> None:
    if not isinstance(text, str) or _EXPRESSION_BAD_CHARS.search(text):
        raise UnsafeModelError(f"{path} was refused: malformed expression {text!r}")
    try:
        tree = ast.parse(text, mode="eval")
    except SyntaxError:
        raise UnsafeModelError(f"{path} was refused: unparsable expression {text!r}") from None
    for node in ast.walk(tree):
        if not node_ok(node):
            raise UnsafeModelError(
                f"{path} was refused: expression {text!r} holds {type(node).__name__}, "
                "which a shape expression never needs"
            )


def _sympy_node_ok(node: ast.AST) -> bool:
    if isinstance(node, ast.Constant):
        return isinstance(node.value, (int, float, bool)) or (
            isinstance(node.value, str) and bool(_IDENTIFIER.match(node.value))
        )
    if isinstance(node, ast.Name):
        return bool(_IDENTIFIER.match(node.id))
    if isinstance(node, ast.Call):
        name = node.func.id if isinstance(node.func, ast.Name) else ""
        return name in _SYMPY_CALLS or bool(_SYMPY_CALL_PATTERN.match(name))
    if isinstance(node, ast.keyword):
        return node.arg in _SYMBOL_ASSUMPTIONS and isinstance(node.value, ast.Constant)
    return isinstance(node, _ARITHMETIC_NODES)


def _guard_node_ok(node: ast.AST) -> bool:
    if isinstance(node, ast.Constant):
        return isinstance(node.value, (int, float, bool)) or (
            isinstance(node.value, str) and bool(_IDENTIFIER.match(node.value))
        )
    if isinstance(node, ast.Name):
        return node.id in _GUARD_NAMES or node.id in _GUARD_MODULE_FUNCS
    if isinstance(node, ast.Subscript):
        return isinstance(node.slice, ast.Constant)
    if isinstance(node, ast.Attribute):
        if isinstance(node.value, ast.Name) and node.value.id in _GUARD_MODULE_FUNCS:
            return node.attr in _GUARD_MODULE_FUNCS[node.value.id]
        return node.attr in _GUARD_METHODS
    if isinstance(node, ast.Call):
        return isinstance(node.func, ast.Attribute) and not node.keywords
    return isinstance(node, _ARITHMETIC_NODES)


def _check_graph_targets(path: Path, program: torch.export.ExportedProgram) -> None:
    for module in program.graph_module.modules():
        if not isinstance(module, torch.fx.GraphModule):
            continue
        for node in module.graph.nodes:
            if node.op not in ("call_function", "call_method", "call_module"):
                continue
            target = node.target
            if node.op == "call_function" and isinstance(target, torch._ops.OpOverload):
                if target._opname in FILE_OPERATORS:
                    raise UnsafeModelError(f"{path} was refused: graph calls {target}")
                continue
            if node.op == "call_function" and target in _ALLOWED_CALLABLE_TARGETS:
                continue
            raise UnsafeModelError(f"{path} was refused: graph node {node.op} {target!r}")


def _check_forward(path: Path, net: Net) -> None:
    images = torch.zeros((CHECK_BATCH, *net.spec.shape), dtype=torch.uint8)
    try:
        with torch.no_grad():
            out = net.logits(images)
    except Exception as err:
        raise ValueError(
            f"{path} does not run on input [N, {', '.join(map(str, net.spec.shape))}]: "
            f"{_first_line(err)}"
        ) from None
    expected = (CHECK_BATCH, net.num_classes)
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != expected:
        got = list(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(
            f"{path} returns {got} for a batch of {CHECK_BATCH}, expected logits {list(expected)}"
        )
