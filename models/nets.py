"""``Net``: one classifier as pre-deployment, repair and serving handle it.

A Net keeps its on-disk form: a zoo net (architecture name + kwargs + safetensors weights), a
TorchScript module, or a ``torch.export`` program. A BadNet whose architecture is in no zoo
stays TorchScript (or exported) through retraining, repair and serving, and its retrained
copies are saved the same way (design notes, "Model bundle").
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, cast, get_args

import safetensors.torch
import torch
from torch import nn

from models.exported import NotTrainableError, export_dynamic_shapes, training_refusal
from models.spec import InputSpec

NetFormat = Literal["zoo", "torchscript", "export"]
NET_FORMATS: tuple[str, ...] = get_args(NetFormat)

# File suffix per format; the stem is the net's role in a bundle ("badnet", "goodnet").
SUFFIXES: dict[str, str] = {
    "zoo": ".safetensors",
    "torchscript": ".torchscript.pt",
    "export": ".pt2",
}

PREDICT_BATCH_SIZE = 512
# torch.export specialises a batch of 1 to a constant; export with 2 and a dynamic batch dim.
EXPORT_EXAMPLE_BATCH = 2
SAFETENSORS_FORMAT_TAG = "nnoculation-zoo"
SAVE_ERROR_CHARS = 600  # torch's export errors run to pages; their start says what went wrong


class NetSaveError(ValueError):
    """A net could not be written in its format (e.g. torch refused to re-export it)."""


def exported_batch_dim() -> dict[int, Any]:
    """The dynamic-shape spec that keeps the batch dimension of an exported program free."""
    return {0: torch.export.Dim("batch")}


def export_module(module: nn.Module, spec: InputSpec) -> torch.export.ExportedProgram:
    """Export ``module`` in eval mode (an inference program) with a dynamic batch size.

    ``module`` takes the normalised float input of ``spec``; its train/eval mode is restored.
    A module loaded from a ``torch.export`` program is exported with that program's dynamic
    dimensions and ranges (e.g. the user's ``Dim("batch", max=4096)``), others with a free
    batch dimension.
    """
    device = module_device(module)
    kept = export_dynamic_shapes(module, EXPORT_EXAMPLE_BATCH)
    dynamic_shapes, batch = kept or ((exported_batch_dim(),), EXPORT_EXAMPLE_BATCH)
    example = torch.zeros((batch, *spec.shape), device=device)
    was_training = module.training
    _set_mode(module, False)
    try:
        return torch.export.export(module, (example,), dynamic_shapes=dynamic_shapes)
    finally:
        _set_mode(module, was_training)


def _set_mode(module: nn.Module, training: bool) -> None:
    """``module.train(training)``; modules from ``ExportedProgram.module()`` refuse it."""
    with contextlib.suppress(NotImplementedError):
        module.train(training)


def module_device(module: nn.Module) -> torch.device:
    """The device of the first parameter or buffer (CPU for a stateless module)."""
    for parameter in module.parameters():
        return parameter.device
    for buffer in module.buffers():
        return buffer.device
    return torch.device("cpu")


@dataclass
class Net:
    """A classifier plus what is needed to feed it, save it and rebuild it.

    ``module`` takes normalised float input; :meth:`logits` and :meth:`predict` take the uint8
    images ``[N, C, H, W]`` that travel through the system and normalise them with ``spec``.
    """

    module: nn.Module
    format: NetFormat
    spec: InputSpec
    num_classes: int
    arch: str | None = None
    arch_kwargs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.format not in NET_FORMATS:
            raise ValueError(f"unknown net format {self.format!r}; known: {NET_FORMATS}")
        if self.format == "zoo" and not self.arch:
            raise ValueError("a zoo net needs its architecture name")
        try:
            json.dumps(self.arch_kwargs)
        except TypeError as err:
            raise ValueError(f"arch_kwargs must be JSON-serialisable: {err}") from None

    @property
    def device(self) -> torch.device:
        return module_device(self.module)

    def logits(self, images_uint8: torch.Tensor) -> torch.Tensor:
        """Logits ``[N, num_classes]`` for uint8 images, on the module's device.

        Runs in whatever mode the module is in and keeps autograd on, so training loops use it.
        """
        self.spec.check(images_uint8)
        x = self.spec.to_model_input(images_uint8.to(self.device))
        return self.module(x)

    def scores(
        self, images_uint8: torch.Tensor, batch_size: int = PREDICT_BATCH_SIZE
    ) -> torch.Tensor:
        """Logits (float32, on CPU) in eval mode and without gradients, batch by batch.

        The module's train/eval mode is restored afterwards.
        """
        self.spec.check(images_uint8)
        was_training = self.module.training
        self.train_mode(False)
        try:
            with torch.no_grad():
                parts = [
                    self.logits(images_uint8[start : start + batch_size]).float().cpu()
                    for start in range(0, images_uint8.shape[0], batch_size)
                ]
        finally:
            self.train_mode(was_training)
        if not parts:
            return torch.zeros(0, self.num_classes)
        return torch.cat(parts)

    def predict(
        self, images_uint8: torch.Tensor, batch_size: int = PREDICT_BATCH_SIZE
    ) -> torch.Tensor:
        """Predicted labels (int64, on CPU): the arg-max of :meth:`scores`."""
        return self.scores(images_uint8, batch_size).argmax(dim=1)

    def train_mode(self, flag: bool) -> Net:
        """Switch train/eval mode.

        ``torch.export`` programs imported by :mod:`models.importing` switch like any module
        (their batch norm and dropout follow the mode, see :mod:`models.exported`); a bare
        ``ExportedProgram.module()`` refuses ``.train()`` in torch 2.14 and is left as it is.
        """
        _set_mode(self.module, flag)
        return self

    def check_trainable(self) -> None:
        """Raise :class:`~models.exported.NotTrainableError` (a ``ValueError``) when training
        could not give this net its training behaviour (an exported program whose batch norm
        or dropout mode was fixed at export); training would then silently differ."""
        reason = training_refusal(self.module)
        if reason is not None:
            what = "torch.export program" if self.format == "export" else f"{self.format} net"
            raise NotTrainableError(f"this {what} cannot be retrained: {reason}")

    def to(self, device: torch.device | str) -> Net:
        """Move the module to ``device`` in place; returns ``self``."""
        self.module.to(device)
        return self

    def clone(self) -> Net:
        """An independent deep copy (same format, same device)."""
        if self.format == "torchscript":
            buffer = io.BytesIO()
            torch.jit.save(cast(torch.jit.ScriptModule, self.module), buffer)
            buffer.seek(0)
            # our own module, serialised just above in memory: no untrusted file is read here
            module = torch.jit.load(buffer, map_location=self.device)
            module.train(self.module.training)
        else:
            module = copy.deepcopy(self.module)
        return Net(
            module=module,
            format=self.format,
            spec=self.spec,
            num_classes=self.num_classes,
            arch=self.arch,
            arch_kwargs=copy.deepcopy(self.arch_kwargs),
        )

    def file_name(self, stem: str) -> str:
        """The file :meth:`save` writes for ``stem``."""
        return stem + SUFFIXES[self.format]

    def save(self, directory: Path, stem: str) -> list[Path]:
        """Write the net under ``directory`` in its own format; returns the files written."""
        directory = Path(directory)
        path = directory / self.file_name(stem)
        if self.format == "zoo":
            state = {
                name: tensor.detach().to("cpu").contiguous().clone()
                for name, tensor in self.module.state_dict().items()
            }
            metadata = {"format": SAFETENSORS_FORMAT_TAG, "arch": str(self.arch)}
            safetensors.torch.save_file(state, str(path), metadata=metadata)
        elif self.format == "torchscript":
            torch.jit.save(cast(torch.jit.ScriptModule, self.module), str(path))
        else:
            try:
                program = export_module(self.module, self.spec)
            except Exception as err:
                text = " ".join(line.strip() for line in str(err).splitlines() if line.strip())
                raise NetSaveError(
                    f"could not export the {stem} as a torch.export program: "
                    f"{text[:SAVE_ERROR_CHARS] or type(err).__name__}"
                ) from err
            torch.export.save(program, str(path))
        return [path]

    def manifest_entry(self, file_name: str) -> dict[str, Any]:
        """The JSON description of this net in a bundle manifest."""
        return {
            "format": self.format,
            "file": file_name,
            "arch": self.arch,
            "arch_kwargs": copy.deepcopy(self.arch_kwargs),
        }

    @classmethod
    def load(cls, directory: Path, entry: dict[str, Any], spec: InputSpec, num_classes: int) -> Net:
        """Load a net written by :meth:`save` onto the CPU, in eval mode.

        The file is read once and its bytes go through
        :func:`models.importing.import_entry_bytes`, the guarded loader every untrusted model
        takes: TorchScript and ``torch.export`` files are never handed to ``torch.jit.load`` /
        ``torch.export.load`` unchecked. No checksum is verified here; :meth:`Bundle.net
        <models.bundle.Bundle.net>` checks the bytes against the manifest first.
        """
        from models.importing import import_entry_bytes  # models.importing imports this module

        data = (Path(directory) / entry["file"]).read_bytes()
        return import_entry_bytes(data, entry, spec, num_classes)
