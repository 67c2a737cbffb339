"""Model bundles: one directory holding the nets of a deployment and everything to trust them.

Layout::

    manifest.json            written last; lists every other file with its sha256
    badnet.safetensors       one file per net role (or .torchscript.pt / .pt2)
    goodnet.safetensors
    validation.safetensors   tensor groups (e.g. the clean validation set)
    report.md, grid.png ...  extra files, verbatim

A bundle whose checksums fail is refused (design notes, "Model bundle"). Writing a bundle is
not atomic by itself: :class:`models.store.ModelStore` writes into a temp dir and renames it.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import Any

import safetensors.torch
import torch
from pydantic import BaseModel, ConfigDict, ValidationError, field_validator, model_validator

from models.classifiers import ARCHITECTURES, validate_arch_kwargs
from models.importing import import_entry_bytes
from models.nets import Net, NetFormat
from models.spec import InputSpec

BUNDLE_FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
TENSOR_SUFFIX = ".safetensors"
HASH_CHUNK_BYTES = 1 << 20
# Net roles and tensor groups become file stems.
NAME_PATTERN = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")


class BundleError(ValueError):
    """A bundle cannot be written or read."""


class BundleIntegrityError(BundleError):
    """A bundle's manifest is unreadable, or a listed file is missing or fails its checksum."""


def _check_name(kind: str, name: str) -> str:
    if not NAME_PATTERN.match(name):
        raise BundleError(f"invalid {kind} name {name!r}: use letters, digits, '_', '.', '-'")
    return name


def _check_relative(path: str) -> str:
    """A file name inside the bundle: relative, POSIX, no '..', not the manifest itself."""
    pure = PurePosixPath(path)
    if (
        not path
        or "\\" in path
        or pure.is_absolute()
        or any(part in ("", ".", "..") for part in path.split("/"))
        or path == MANIFEST_NAME
    ):
        raise BundleError(f"invalid file name in bundle: {path!r}")
    return path


class NetEntry(BaseModel):
    """How one net is stored: its format, file and (for zoo nets) architecture."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    format: NetFormat
    file: str
    arch: str | None = None
    arch_kwargs: dict[str, Any] = {}

    @field_validator("file")
    @classmethod
    def _file_ok(cls, value: str) -> str:
        return _check_relative(value)

    @model_validator(mode="after")
    def _architecture_ok(self) -> NetEntry:
        """A zoo net names a registered architecture and kwargs within its bounds."""
        if self.format == "zoo":
            if not self.arch:
                raise ValueError("a zoo net needs its architecture name (arch)")
            if self.arch not in ARCHITECTURES:
                raise ValueError(
                    f"unknown architecture {self.arch!r}; known: {', '.join(ARCHITECTURES)}"
                )
            validate_arch_kwargs(self.arch, self.arch_kwargs)
        return self


class Manifest(BaseModel):
    """``manifest.json``: what a bundle holds, where it came from and how to check it."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    format_version: int
    name: str
    version: str
    parent: str | None = None
    created: str
    spec: dict[str, Any]
    class_names: list[str]
    nets: dict[str, NetEntry]
    tensors: dict[str, str] = {}
    files: dict[str, str]
    metrics: dict[str, Any] = {}
    provenance: dict[str, Any] = {}

    @field_validator("format_version")
    @classmethod
    def _known_format(cls, value: int) -> int:
        if value != BUNDLE_FORMAT_VERSION:
            raise ValueError(
                f"bundle format {value} is not supported (this code reads {BUNDLE_FORMAT_VERSION})"
            )
        return value

    @field_validator("spec")
    @classmethod
    def _spec_ok(cls, value: dict[str, Any]) -> dict[str, Any]:
        return InputSpec.from_dict(value).to_dict()

    @field_validator("files")
    @classmethod
    def _files_ok(cls, value: dict[str, str]) -> dict[str, str]:
        for name, digest in value.items():
            _check_relative(name)
            if not re.fullmatch(r"[0-9a-f]{64}", digest):
                raise ValueError(f"sha256 of {name!r} is not 64 hex digits")
        return value

    @model_validator(mode="after")
    def _listed(self) -> Manifest:
        for role, entry in self.nets.items():
            if entry.file not in self.files:
                raise ValueError(f"net {role!r} file {entry.file!r} is not in files")
        for group, file in self.tensors.items():
            if file not in self.files:
                raise ValueError(f"tensor group {group!r} file {file!r} is not in files")
        if not self.class_names:
            raise ValueError("class_names is empty")
        return self

    @property
    def input_spec(self) -> InputSpec:
        return InputSpec.from_dict(self.spec)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Manifest:
        return cls.model_validate(data)


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for chunk in iter(lambda: handle.read(HASH_CHUNK_BYTES), b""):
            digest.update(chunk)
    return digest.hexdigest()


def utc_now_iso() -> str:
    """The current time as ISO-8601 UTC, to the second."""
    return datetime.now(UTC).isoformat(timespec="seconds")


def write_manifest(directory: Path, manifest: Manifest) -> Path:
    """Write ``manifest.json`` (sorted keys, indented, newline-terminated)."""
    path = Path(directory) / MANIFEST_NAME
    path.write_text(json.dumps(manifest.to_dict(), indent=2, sort_keys=True) + "\n")
    return path


def write_bundle(
    directory: Path,
    *,
    name: str,
    version: str,
    parent: str | None,
    spec: InputSpec,
    class_names: list[str],
    nets: dict[str, Net],
    tensors: dict[str, dict[str, torch.Tensor]] | None = None,
    metrics: dict[str, Any] | None = None,
    provenance: dict[str, Any] | None = None,
    extra_files: dict[str, bytes] | None = None,
) -> Manifest:
    """Write a bundle into ``directory`` (created if needed; it must hold no manifest yet).

    Nets are saved in their own format under their role name, tensor groups as
    ``<group>.safetensors``, extra files verbatim; ``manifest.json`` with every file's sha256
    comes last, so a directory without a manifest is an unfinished bundle.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if (directory / MANIFEST_NAME).exists():
        raise BundleError(f"{directory} already holds a bundle")
    if not nets:
        raise BundleError("a bundle needs at least one net")
    for role, net in nets.items():
        if net.spec != spec or net.num_classes != len(class_names):
            raise BundleError(
                f"net {role!r} expects {net.spec} with {net.num_classes} classes; the bundle "
                f"has {spec} with {len(class_names)} classes"
            )
    written: list[str] = []

    def claim(file_name: str) -> str:
        if file_name in written:
            raise BundleError(f"two bundle parts would both be written to {file_name!r}")
        written.append(file_name)
        return file_name

    net_entries: dict[str, dict[str, Any]] = {}
    for role, net in nets.items():
        claim(net.file_name(_check_name("net role", role)))
        paths = net.save(directory, role)
        net_entries[role] = net.manifest_entry(paths[0].name)
    tensor_files: dict[str, str] = {}
    for group, group_tensors in (tensors or {}).items():
        file_name = claim(_check_name("tensor group", group) + TENSOR_SUFFIX)
        contiguous = {
            key: value.detach().to("cpu").contiguous().clone()
            for key, value in group_tensors.items()
        }
        safetensors.torch.save_file(contiguous, str(directory / file_name))
        tensor_files[group] = file_name
    for rel, content in (extra_files or {}).items():
        target = directory / claim(_check_relative(rel))
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(content)
    manifest = Manifest(
        format_version=BUNDLE_FORMAT_VERSION,
        name=name,
        version=version,
        parent=parent,
        created=utc_now_iso(),
        spec=spec.to_dict(),
        class_names=list(class_names),
        nets=net_entries,
        tensors=tensor_files,
        files={rel: sha256_file(directory / rel) for rel in sorted(written)},
        metrics=dict(metrics or {}),
        provenance=dict(provenance or {}),
    )
    write_manifest(directory, manifest)
    return manifest


def read_manifest(directory: Path) -> Manifest:
    """Parse and validate ``manifest.json`` (no checksums); ``BundleIntegrityError`` if bad."""
    path = Path(directory) / MANIFEST_NAME
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise BundleIntegrityError(f"{directory} has no {MANIFEST_NAME}") from None
    except (OSError, ValueError) as err:
        raise BundleIntegrityError(f"{path} is unreadable: {err}") from None
    try:
        return Manifest.from_dict(data)
    except ValidationError as err:
        raise BundleIntegrityError(f"{path} is not a valid manifest: {err}") from None


def verify_bundle(directory: Path) -> Manifest:
    """Recompute the sha256 of every listed file; refuse the first missing or changed one."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    root = directory.resolve()
    for rel, expected in sorted(manifest.files.items()):
        path = (directory / rel).resolve()
        if not path.is_relative_to(root):
            raise BundleIntegrityError(f"{directory}: listed file {rel!r} lies outside the bundle")
        if not path.is_file():
            raise BundleIntegrityError(f"{directory}: listed file {rel!r} is missing")
        if sha256_file(path) != expected:
            raise BundleIntegrityError(f"{directory}: file {rel!r} fails its sha256 check")
    return manifest


@dataclass(frozen=True)
class Bundle:
    """A verified bundle on disk. Nets and tensors are loaded on demand, fresh on every call,
    so callers may train what they get without changing what others see."""

    path: Path
    manifest: Manifest

    @property
    def spec(self) -> InputSpec:
        return self.manifest.input_spec

    @property
    def class_names(self) -> list[str]:
        return list(self.manifest.class_names)

    @property
    def num_classes(self) -> int:
        return self.manifest.num_classes

    @property
    def roles(self) -> list[str]:
        return sorted(self.manifest.nets)

    def read_verified(self, rel: str) -> bytes:
        """The bytes of the listed file ``rel``, read once and checked against the manifest's
        sha256; ``BundleIntegrityError`` if missing, outside the bundle or changed.

        Callers deserialise these very bytes, so a file swapped on a shared volume after
        :func:`load_bundle` verified it is refused rather than loaded.
        """
        expected = self.manifest.files.get(rel)
        if expected is None:
            raise BundleIntegrityError(f"{self.path}: {rel!r} is not listed in the manifest")
        path = (self.path / rel).resolve()
        if not path.is_relative_to(self.path.resolve()):
            raise BundleIntegrityError(f"{self.path}: listed file {rel!r} lies outside the bundle")
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise BundleIntegrityError(f"{self.path}: listed file {rel!r} is missing") from None
        if hashlib.sha256(data).hexdigest() != expected:
            raise BundleIntegrityError(f"{self.path}: file {rel!r} fails its sha256 check")
        return data

    def net(self, role: str) -> Net:
        """Load the net stored under ``role`` (``"badnet"``, ``"goodnet"``) onto the CPU.

        The file's bytes are checksummed and deserialised from the same buffer. A bundle may
        come from anyone (a vendor, a colleague, an attacker), and its checksums only prove
        integrity, so every format takes the guarded import path of untrusted files.
        """
        try:
            entry = self.manifest.nets[role]
        except KeyError:
            raise KeyError(f"bundle {self.path} has no net {role!r}; it has {self.roles}") from None
        data = self.read_verified(entry.file)
        return import_entry_bytes(data, entry.model_dump(), self.spec, self.num_classes)

    def tensors(self, group: str) -> dict[str, torch.Tensor]:
        """Load the tensor group ``group`` (e.g. the validation set) onto the CPU, from bytes
        checked against the manifest."""
        try:
            file_name = self.manifest.tensors[group]
        except KeyError:
            known = sorted(self.manifest.tensors)
            raise KeyError(
                f"bundle {self.path} has no tensor group {group!r}; it has {known}"
            ) from None
        data = self.read_verified(file_name)
        try:
            return safetensors.torch.load(data)
        except Exception as err:
            raise BundleIntegrityError(
                f"{self.path}: tensor group {group!r} ({file_name}) is not readable: {err}"
            ) from None


def load_bundle(directory: Path, *, verify: bool = True) -> Bundle:
    """Open a bundle after checking every file's sha256 (``verify=False`` skips the hashes)."""
    directory = Path(directory)
    manifest = verify_bundle(directory) if verify else read_manifest(directory)
    return Bundle(path=directory, manifest=manifest)
