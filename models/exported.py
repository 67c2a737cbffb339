"""``torch.export`` programs as trainable classifiers.

``ExportedProgram.module()`` gives a ``GraphModule`` whose ``train()`` / ``eval()`` raise
``NotImplementedError`` in torch 2.14 (``torch/export/exported_program.py``): the program's
batch norm and dropout nodes carry their mode as a constant argument, fixed when the program
was exported (``aten.batch_norm.default(..., training=False, momentum, eps, ...)``,
``aten.dropout.default(x, p, train=False)`` for a program exported in eval mode). Retraining
such a module silently keeps the BadNet's batch-norm statistics and leaves dropout off. torch
2.14 ships no way around it: ``torch.ao.quantization.move_exported_model_to_train`` went with
the rest of ``torch.ao.quantization.pt2e`` to torchao
(``torchao/quantization/pt2e/export_utils.py``, ``_move_exported_model_to_train``), which
rewrites the same ``aten.batch_norm`` / ``aten.dropout`` calls with the flag flipped, by pattern
matching (pytorch issue 103681), and is not a dependency here.

:func:`trainable_module` makes the mode a property of the module again: each batch-norm and
dropout node becomes a call of a small module (:class:`ModeBatchNorm`, :class:`ModeDropout`)
that reads ``self.training``, so ``module.train()`` / ``.eval()`` work as on any ``nn.Module``
and a re-export in eval mode gives an inference program again. Programs whose mode cannot be
recovered (batch norm decomposed to its functional form) are marked: :func:`training_refusal`
says why, and training refuses them (:class:`NotTrainableError`) instead of training them in the
wrong mode. As with torchao's version, only batch norm and dropout follow the mode: other
Python branches on ``self.training`` were settled when the program was exported, and a dropout
that ``run_decompositions()`` removed from an eval-mode program cannot be brought back.

The program's dynamic input dimensions and their ranges (``Dim("batch", max=4096)``) are kept
on the module (:func:`export_dynamic_shapes`), so a retrained copy is exported with the user's
own constraints rather than an unbounded batch that torch would refuse.
"""

from __future__ import annotations

import operator
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.export.graph_signature import InputKind

# Keys of ``GraphModule.meta`` (kept by ``copy.deepcopy`` and so by ``Net.clone``).
DIMS_META = "nnoculation_export_dims"
REFUSAL_META = "nnoculation_training_refusal"
BATCH_DIM_NAME = "batch"

aten = torch.ops.aten
# Batch norm ops whose statistics live in buffers updated in place (or not at all), by the
# positions of their momentum and eps arguments and whether they return a tuple.
_BATCH_NORMS: dict[Any, tuple[int, int, bool]] = {
    aten.batch_norm.default: (6, 7, False),
    aten._native_batch_norm_legit_no_training.default: (5, 6, True),
    aten._native_batch_norm_legit.default: (6, 7, True),
    aten._batch_norm_with_update.default: (5, 6, True),
    aten._batch_norm_no_update.default: (5, 6, True),
}
# Dropout ops ``(input, p, train)``, by the torch function that replaces them.
_DROPOUTS: dict[Any, str] = {
    aten.dropout.default: "dropout",
    aten.feature_dropout.default: "feature_dropout",
    aten.alpha_dropout.default: "alpha_dropout",
    aten.feature_alpha_dropout.default: "feature_alpha_dropout",
    aten.native_dropout.default: "dropout",
}
_DROPOUT_FUNCTIONS = {
    "dropout": torch.dropout,
    "feature_dropout": torch.feature_dropout,
    "alpha_dropout": torch.alpha_dropout,
    "feature_alpha_dropout": torch.feature_alpha_dropout,
}
# Operator names whose behaviour depends on the training mode; any left after the rewrite
# (functional batch norm, decomposed dropout) means the program cannot be trained correctly.
_MODE_DEPENDENT = ("batch_norm", "dropout", "bernoulli")


class NotTrainableError(ValueError):
    """A net whose training behaviour (batch norm, dropout) cannot be restored."""


class ModeBatchNorm(nn.Module):
    """Batch norm of an exported graph, in the mode of the module (as ``nn.BatchNorm*``).

    Takes the graph's weight, bias and running statistics as inputs: they stay the buffers and
    parameters of the program's own submodules. ``cumulative`` (momentum 0 in the graph, which
    is what ``momentum=None`` becomes in an eval-mode export) averages over all batches seen.
    """

    def __init__(self, momentum: float, eps: float, cumulative: bool) -> None:
        super().__init__()
        self.momentum, self.eps, self.cumulative = momentum, eps, cumulative

    def forward(
        self,
        x: torch.Tensor,
        weight: torch.Tensor | None,
        bias: torch.Tensor | None,
        running_mean: torch.Tensor | None,
        running_var: torch.Tensor | None,
        num_batches_tracked: torch.Tensor | None = None,
    ) -> torch.Tensor:
        momentum = self.momentum
        if self.training and num_batches_tracked is not None:
            num_batches_tracked.add_(1)
            if self.cumulative:
                momentum = 1.0 / float(num_batches_tracked)
        training = self.training or running_mean is None or running_var is None
        return F.batch_norm(
            x, running_mean, running_var, weight, bias, training, momentum, self.eps
        )


class ModeDropout(nn.Module):
    """Dropout of an exported graph, active only in training mode (as ``nn.Dropout``)."""

    def __init__(self, kind: str, p: float) -> None:
        super().__init__()
        self.kind, self.p = kind, p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return cast(torch.Tensor, _DROPOUT_FUNCTIONS[self.kind](x, self.p, self.training))


def trainable_module(program: torch.export.ExportedProgram) -> fx.GraphModule:
    """``program.module()`` with a working ``train()`` / ``eval()`` (in eval mode), its batch
    norm and dropout following the mode, and the program's dynamic input dimensions recorded
    for re-export. What could not be made mode-aware is recorded for :func:`training_refusal`.
    """
    module = program.module()
    module.meta[DIMS_META] = _input_dims(program)
    problems = _rewrite_mode_ops(module)
    if problems:
        module.meta[REFUSAL_META] = ", ".join(sorted(set(problems)))
    for name in ("train", "eval"):  # torch's stubs that raise NotImplementedError
        module.__dict__.pop(name, None)
    module.eval()
    return module


def training_refusal(module: nn.Module) -> str | None:
    """Why ``module`` cannot be trained with training behaviour, or None when it can."""
    meta = getattr(module, "meta", None)
    if not isinstance(meta, dict) or not meta.get(REFUSAL_META):
        return None
    return (
        f"its graph holds {meta[REFUSAL_META]} in a form whose training mode was fixed at "
        "export time (as run_decompositions() leaves it), so its batch norm and dropout cannot "
        "be given training behaviour; export the model with torch.export.export and no "
        "run_decompositions(), or as TorchScript or safetensors weights"
    )


def export_dynamic_shapes(
    module: nn.Module, example_batch: int
) -> tuple[tuple[dict[int, Any]], int] | None:
    """The ``dynamic_shapes`` of the program ``module`` was loaded from, with ``example_batch``
    moved into its batch range; None for a module not loaded from a program."""
    meta = getattr(module, "meta", None)
    dims = meta.get(DIMS_META) if isinstance(meta, dict) else None
    if not dims:
        return None
    objects: dict[str, torch.export.Dim] = {}
    shapes: dict[int, Any] = {}
    batch = example_batch
    for index, (name, low, high) in sorted(dims.items()):
        if name not in objects:
            objects[name] = torch.export.Dim(name, min=low, max=high)
        shapes[index] = objects[name]
        if index == 0:
            batch = max(batch, low)
            batch = batch if high is None else min(batch, high)
    return (shapes,), batch


def _input_dims(program: torch.export.ExportedProgram) -> dict[int, tuple[str, int, int | None]]:
    """``{dim: (name, min, max)}`` for the symbolic dimensions of the program's only input
    (``max`` None when unbounded); dims that are expressions of others are left out."""
    users = [
        spec.arg.name
        for spec in program.graph_signature.input_specs
        if spec.kind == InputKind.USER_INPUT and hasattr(spec.arg, "name")
    ]
    if len(users) != 1:
        return {}
    placeholders = [n for n in program.graph.nodes if n.op == "placeholder"]
    value = next((n.meta.get("val") for n in placeholders if n.name == users[0]), None)
    dims: dict[int, tuple[str, int, int | None]] = {}
    names: dict[Any, str] = {}
    for index, size in enumerate(getattr(value, "shape", ())):
        if not isinstance(size, torch.SymInt):
            continue
        expr = size.node.expr
        bounds = program.range_constraints.get(expr)
        if bounds is None or not expr.is_Symbol:
            continue
        name = names.setdefault(expr, BATCH_DIM_NAME if index == 0 else f"dim{index}")
        dims[index] = (name, _bound(bounds.lower) or 0, _bound(bounds.upper))
    return dims


def _number(value: Any) -> float | None:
    """A constant number argument of a node; None for anything else (a symbolic value)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def _bound(value: Any) -> int | None:
    """An integer range bound, None for an infinite one."""
    try:
        return int(value)
    except (TypeError, ValueError, AttributeError, OverflowError):
        return None


def _rewrite_mode_ops(module: fx.GraphModule) -> list[str]:
    """Replace batch norm / dropout nodes by mode-aware module calls; returns the names of
    mode-dependent ops that could not be replaced."""
    graph = module.graph
    problems: list[str] = []
    count = 0
    for node in list(graph.nodes):
        if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
            continue
        name = str(node.target._opname)
        known = node.target in _BATCH_NORMS or node.target in _DROPOUTS
        if not known:
            if any(word in name for word in _MODE_DEPENDENT):
                problems.append(name)
            continue
        replacement = _replacement(module, node) if _first_output_only(node) else None
        if replacement is None:
            problems.append(name)
            continue
        _replace(module, node, *replacement, f"mode_op_{count}")
        count += 1
    if count:
        graph.lint()
        module.recompile()
    return problems


def _returns_tuple(node: fx.Node) -> bool:
    if node.target in _BATCH_NORMS:
        return _BATCH_NORMS[node.target][2]
    return node.target is aten.native_dropout.default


def _first_output_only(node: fx.Node) -> bool:
    """A node that returns a tensor, or a tuple of which only the first item is used."""
    return not _returns_tuple(node) or all(
        user.op == "call_function" and user.target is operator.getitem and user.args[1] == 0
        for user in node.users
    )


def _replacement(module: fx.GraphModule, node: fx.Node) -> tuple[nn.Module, tuple[Any, ...]] | None:
    """The mode-aware module for a batch norm or dropout node, and its inputs."""
    if node.target in _DROPOUTS:
        p = _number(node.args[1]) if len(node.args) > 1 and not node.kwargs else None
        return None if p is None else (ModeDropout(_DROPOUTS[node.target], p), (node.args[0],))
    momentum_at, eps_at, _ = _BATCH_NORMS[node.target]
    if len(node.args) <= eps_at or node.kwargs:
        return None
    x, weight, bias, mean, var = node.args[:5]
    momentum, eps = _number(node.args[momentum_at]), _number(node.args[eps_at])
    if momentum is None or eps is None:
        return None
    counter = _num_batches_tracked(module, mean)
    inputs: tuple[Any, ...] = (x, weight, bias, mean, var)
    if counter is not None:
        inputs += (counter,)
    return ModeBatchNorm(momentum, eps, cumulative=momentum == 0.0), inputs


def _num_batches_tracked(module: fx.GraphModule, running_mean: Any) -> fx.Node | None:
    """The get_attr node of the ``num_batches_tracked`` buffer beside ``running_mean``; an
    increment the graph already does (a training-mode export) is removed: the batch norm
    module does it, in training mode only."""
    if not isinstance(running_mean, fx.Node) or running_mean.op != "get_attr":
        return None
    owner = str(running_mean.target).rpartition(".")[0]
    target = f"{owner}.num_batches_tracked" if owner else "num_batches_tracked"
    try:
        module.get_buffer(target)
    except AttributeError:
        return None
    graph = module.graph
    node = next((n for n in graph.nodes if n.op == "get_attr" and n.target == target), None)
    if node is None:
        with graph.inserting_after(running_mean):
            node = graph.get_attr(target)
    for user in list(node.users):
        if user.op == "call_function" and user.target is aten.add_.Tensor and user.args[0] is node:
            user.replace_all_uses_with(node)
            graph.erase_node(user)
    return node


def _replace(
    module: fx.GraphModule, node: fx.Node, op: nn.Module, inputs: tuple[Any, ...], name: str
) -> None:
    """Call ``op`` on ``inputs`` instead of ``node`` (instead of its first output for a
    tuple-returning node, see :func:`_first_output_only`)."""
    graph = module.graph
    replaced = list(node.users) if _returns_tuple(node) else [node]
    module.add_submodule(name, op)
    with graph.inserting_before(node):
        new = graph.call_module(name, inputs)
    if replaced:
        new.meta = dict(replaced[0].meta)
    for old in replaced:
        old.replace_all_uses_with(new)
        if old is not node:
            graph.erase_node(old)
    graph.erase_node(node)
