"""The quantized expert store: every expert of a checkpoint, int4 (and int2), written once to disk.

Layout of a store directory::

    manifest.json      format version, scheme, checkpoint identity, layout, per-expert offset/length/crc32
    layer_000.bin      one file per MoE layer; each expert's bytes contiguous, starting 4096-aligned

An expert's bytes are its projections (gate, up, down; checkpoint layout, one
:class:`~vllm_moe_offload.runtime.quant.QuantTensor` each) back to back, one
block per precision ("int4", and "int2" for the ``int4+int2`` scheme).
Checkpoint layout, not the kernel's: the quantization groups must run along the
input dimension, and the CPU kernels' prepacked layout interleaves output rows
along its last dimension. A load is read + dequantize + the layer's converter,
the same conversion the disk tier runs on every fetch.

The store is built in a temporary sibling directory, fsynced and renamed into
place, so a crash mid-build never leaves a directory that loads. A store whose
manifest does not match the checkpoint (file names, sizes, mtimes, a hash of
the safetensors headers), format version, scheme or layout is stale: logged,
rebuilt, never used. Every read checks length and crc32.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import struct
import time
import uuid
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from vllm_moe_offload.core.config import OffloadConfigError, format_bytes
from vllm_moe_offload.runtime.quant import GROUP_OF_BITS, QuantizationError, QuantTensor, packed_nbytes, quantize
from vllm_moe_offload.runtime.safetensors_io import (
    ALIGN_BYTES,
    CheckpointIndex,
    TensorLocation,
    TensorReader,
    ThreadLocalReaders,
)
from vllm_moe_offload.runtime.tiers import CheckpointNames

logger = logging.getLogger("vllm.moe_offload.expert_store")

#: bump whenever the bytes or the manifest change meaning; older stores are rebuilt
FORMAT_VERSION = 1

#: scheme -> the precisions stored for every expert: name -> bits (group from GROUP_OF_BITS)
SCHEMES: dict[str, dict[str, int]] = {"int4": {"int4": 4}, "int4+int2": {"int4": 4, "int2": 2}}

MANIFEST = "manifest.json"


class ExpertStoreError(RuntimeError):
    """A store that cannot be used: a torn or corrupted expert, a missing file."""


@dataclass(frozen=True)
class LayerSpec:
    """One MoE layer's experts in the checkpoint."""

    names: CheckpointNames
    num_experts: int

    @property
    def key(self) -> str:
        return self.names.prefix


def store_directory(root: str | os.PathLike, checkpoint_folder: str | os.PathLike, scheme: str) -> Path:
    """``root/<checkpoint name>-<hash of its real path>-<scheme>``; ``root`` is ``cache_dir``
    or ``$VLLM_CACHE_ROOT/moe_offload/stores`` (the integration layer decides)."""
    real = os.path.realpath(checkpoint_folder)
    digest = hashlib.sha256(real.encode()).hexdigest()[:12]
    return Path(root) / f"{Path(real).name}-{digest}-{scheme}"


def checkpoint_identity(index: CheckpointIndex) -> dict:
    """What changes when the checkpoint does: each file's name, size and mtime, and its header bytes."""
    files, headers = [], hashlib.sha256()
    for path in sorted(index.folder.glob("*.safetensors")):
        stat = path.stat()
        files.append({"name": path.name, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns})
        with open(path, "rb") as f:
            head = f.read(8)
            headers.update(head + f.read(struct.unpack("<Q", head)[0]))
    return {"folder": str(index.folder.resolve()), "files": files, "header_sha256": headers.hexdigest()}


def _layout(index: CheckpointIndex, layer: LayerSpec) -> list[dict]:
    """Each projection of expert 0: checkpoint name suffix, shape [out, in], dtype."""
    out = []
    for name in layer.names.of(0):
        loc = index[name]
        if len(loc.shape) != 2 or not loc.dtype.is_floating_point:
            raise OffloadConfigError(
                f"quant: {name} is {loc.dtype} {list(loc.shape)} in {loc.path}; the quantized store takes "
                "2-D floating-point expert weights only (is the checkpoint already quantized?); use quant 'none'"
            )
        out.append({"proj": name.rsplit(".", 2)[-2], "shape": list(loc.shape), "dtype": str(loc.dtype)})
    return out


def _expected(index: CheckpointIndex, layers: list[LayerSpec], scheme: str) -> dict:
    """The manifest's fields that must match for a store to be used."""
    if scheme not in SCHEMES:
        raise ValueError(f"unknown quantization scheme {scheme!r}; allowed: {sorted(SCHEMES)}")
    return {
        "format_version": FORMAT_VERSION,
        "scheme": scheme,
        "precisions": {p: {"bits": b, "group": GROUP_OF_BITS[b]} for p, b in SCHEMES[scheme].items()},
        "checkpoint": checkpoint_identity(index),
        "layers": {
            layer.key: {"num_experts": layer.num_experts, "tensors": _layout(index, layer)} for layer in layers
        },
    }


@dataclass(frozen=True)
class ExpertBlock:
    """Where one precision of one expert lies in its layer file."""

    offset: int
    length: int
    crc32: int


class ExpertStore:
    """An opened, validated store; :meth:`read` hands out one expert's quantized projections."""

    def __init__(self, directory: Path, manifest: dict) -> None:
        self.directory = directory
        self.manifest = manifest
        self.precisions = {p: (v["bits"], v["group"]) for p, v in manifest["precisions"].items()}
        self._layers = manifest["layers"]

    @property
    def total_bytes(self) -> int:
        return int(self.manifest["total_bytes"])

    def layer_file(self, layer_key: str) -> Path:
        return self.directory / self._layers[layer_key]["file"]

    def block(self, layer_key: str, expert_idx: int, precision: str) -> ExpertBlock:
        return ExpertBlock(*self._layers[layer_key]["experts"][precision][expert_idx])

    def expert_nbytes(self, precision: str) -> int:
        """Quantized bytes of one expert (the same for every layer of a model; the first layer's)."""
        layer = next(iter(self._layers.values()))
        return layer["experts"][precision][0][1]

    def read(self, layer_key: str, expert_idx: int, precision: str, reader: TensorReader) -> list[QuantTensor]:
        """The expert's projections (gate, [up,] down), verified; raises ExpertStoreError when torn."""
        if precision not in self.precisions:
            raise ValueError(f"this store ({self.manifest['scheme']}) has no {precision} experts; "
                             f"it has {sorted(self.precisions)}")
        path = self.layer_file(layer_key)
        where = f"expert {expert_idx} of {layer_key} ({precision}) in {path}"
        block = self.block(layer_key, expert_idx, precision)
        try:
            (raw,) = reader.read([TensorLocation(str(path), block.offset, block.length, torch.uint8, (block.length,))])
        except OSError as exc:
            raise ExpertStoreError(f"reading {where} failed: {exc}") from exc
        if raw.numel() != block.length:
            raise ExpertStoreError(f"{where}: read {raw.numel()} bytes, the manifest says {block.length}")
        crc = zlib.crc32(raw.numpy())
        if crc != block.crc32:
            raise ExpertStoreError(
                f"{where} is corrupted: crc32 {crc:#010x} != {block.crc32:#010x} in the manifest; "
                f"delete {self.directory} to rebuild the store"
            )
        bits, group = self.precisions[precision]
        out, start = [], 0
        for tensor in self._layers[layer_key]["tensors"]:
            shape = tuple(tensor["shape"])
            size = packed_nbytes(shape, bits, group)
            out.append(QuantTensor.from_bytes(raw[start : start + size], shape, bits, group))
            start += size
        return out


def open_or_build(
    index: CheckpointIndex, layers: list[LayerSpec], scheme: str, directory: str | os.PathLike,
    readers: ThreadLocalReaders,
) -> ExpertStore:
    """The store at ``directory`` when it matches the checkpoint; else (re)build it first."""
    directory = Path(directory)
    expected = _expected(index, layers, scheme)
    manifest = _load_manifest(directory)
    if manifest is not None:
        try:
            why = _stale_reason(manifest, expected, directory)
        except (KeyError, TypeError, AttributeError) as exc:
            why = f"malformed manifest ({type(exc).__name__}: {exc})"
        if why is None:
            logger.info("using the %s expert store at %s (%s)", scheme, directory,
                        format_bytes(int(manifest["total_bytes"])))
            return ExpertStore(directory, manifest)
        logger.warning("the expert store at %s is stale (%s); rebuilding it", directory, why)
    elif directory.exists():
        logger.warning("the expert store at %s has no readable manifest; rebuilding it", directory)
    return ExpertStore(directory, _build(index, layers, expected, directory, readers))


def _load_manifest(directory: Path) -> dict | None:
    try:
        return json.loads((directory / MANIFEST).read_text())
    except (OSError, ValueError):
        return None


def _stale_reason(manifest: dict, expected: dict, directory: Path) -> str | None:
    for key in ("format_version", "scheme", "precisions"):
        if manifest.get(key) != expected[key]:
            return f"{key} {manifest.get(key)!r}, expected {expected[key]!r}"
    if manifest.get("checkpoint") != expected["checkpoint"]:
        return "the checkpoint's files changed since the store was written"
    layers = {key: {f: layer[f] for f in ("num_experts", "tensors")} for key, layer in manifest["layers"].items()}
    if layers != expected["layers"]:
        return "the MoE layers' layout differs"
    for layer in manifest["layers"].values():
        path = directory / layer["file"]
        if not path.is_file() or path.stat().st_size != layer["file_bytes"]:
            return f"{path} is missing or has the wrong size"
    return None


def _build(
    index: CheckpointIndex, layers: list[LayerSpec], expected: dict, directory: Path, readers: ThreadLocalReaders
) -> dict:
    started = time.perf_counter()
    parent = directory.parent
    tmp = parent / f".{directory.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        parent.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
    except OSError as exc:
        raise OffloadConfigError(
            f"cannot write the quantized expert store under {parent}: {exc}; set cache_dir "
            "(--moe-offload-cache-dir) to a writable directory"
        ) from exc
    _remove_leftovers(parent, directory.name)
    try:
        manifest = dict(expected, layers={}, total_bytes=0)
        reader = TensorReader(readers.direct_io)  # its own descriptors, closed with the build
        total_experts = sum(layer.num_experts for layer in layers)
        try:
            with tqdm(total=total_experts, desc=f"quantizing experts ({expected['scheme']})", unit="expert") as bar:
                for layer_idx, layer in enumerate(layers):
                    entry = _write_layer(index, layer, expected, tmp / f"layer_{layer_idx:03d}.bin", reader, bar)
                    manifest["layers"][layer.key] = entry
                    manifest["total_bytes"] += entry["file_bytes"]
        finally:
            reader.close()
        _write_synced(tmp / MANIFEST, json.dumps(manifest, indent=1).encode())
        _fsync_dir(tmp)
        _replace_dir(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("wrote the %s expert store for %d MoE layers to %s in %.1f s: %s", expected["scheme"],
                len(layers), directory, time.perf_counter() - started, format_bytes(manifest["total_bytes"]))
    return manifest


def _write_layer(index: CheckpointIndex, layer: LayerSpec, expected: dict, path: Path, reader: TensorReader,
                 bar: tqdm) -> dict:
    precisions = expected["precisions"]
    blocks: dict[str, list[list[int]]] = {p: [] for p in precisions}
    with open(path, "wb") as f:
        for expert_idx in range(layer.num_experts):
            names = layer.names.of(expert_idx)
            weights = reader.read([index[n] for n in names])  # [out, in] each
            for precision, spec in precisions.items():
                raw = b"".join(_quantized(n, w, spec["bits"], spec["group"]) for n, w in zip(names, weights))
                offset = f.tell()
                f.write(raw)
                f.write(b"\0" * (-len(raw) % ALIGN_BYTES))  # the next expert starts aligned for O_DIRECT
                blocks[precision].append([offset, len(raw), zlib.crc32(raw)])
            bar.update(1)
        f.flush()
        os.fsync(f.fileno())
        file_bytes = f.tell()
    return {"file": path.name, "file_bytes": file_bytes, **expected["layers"][layer.key], "experts": blocks}


def _quantized(name: str, w: torch.Tensor, bits: int, group: int) -> bytes:
    try:
        return quantize(w, bits, group).to_bytes()
    except QuantizationError as exc:
        raise OffloadConfigError(f"quant: cannot quantize {name} to int{bits}: {exc}; use quant 'none'") from exc


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _replace_dir(tmp: Path, directory: Path) -> None:
    """Rename ``tmp`` to ``directory``, moving a stale one aside first (a directory rename cannot overwrite)."""
    old = None
    if directory.exists():
        old = directory.parent / f".{directory.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        os.rename(directory, old)
    os.rename(tmp, directory)
    _fsync_dir(directory.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _remove_leftovers(parent: Path, name: str) -> None:
    """Temporary and set-aside directories of builds whose process is gone (crashed mid-build)."""
    for path in parent.glob(f".{name}.*-*-*"):
        try:
            pid = int(path.name.rsplit("-", 2)[-2])
        except ValueError:
            continue
        if pid != os.getpid() and not _alive(pid):
            shutil.rmtree(path, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
