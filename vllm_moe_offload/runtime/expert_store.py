"""Expert stores: every expert of a checkpoint, written once to disk in the form a load wants.

Two kinds of store:

- quantized (schemes ``int4``, ``int4+int2``): each expert's projections
  (gate, up, down; checkpoint layout, one
  :class:`~vllm_moe_offload.runtime.quant.QuantTensor` each) back to back, one
  block per precision ("int4", and "int2" for the ``int4+int2`` scheme).
  Checkpoint layout, not the kernel's: the quantization groups must run along
  the input dimension, and the CPU kernels' prepacked layout interleaves output
  rows along its last dimension. A load is read + dequantize + the layer's
  converter, the same conversion the disk tier runs on every fetch.
- kernel (scheme ``kernel``): each expert as the layer's converter returns it
  for this tensor-parallel rank (``w13``, ``w2``, then a quantized layer's
  per-expert scales; each tensor of whole 4 KiB blocks starts 4096-aligned),
  so that a load is one direct read straight into the slot's tensors: no
  conversion, no staging buffer, no copy (:meth:`ExpertStore.read_kernel`).
  The bytes depend on the vLLM and torch versions, the kernel (CPU ISA), the
  rank's shard and the dtype; all of them are in the manifest (:class:`KernelLayout`).
- packed (scheme ``packed``): the kernel store's tensors coded losslessly,
  about 0.75 of their bytes for trained bfloat16 weights
  (``runtime/packed_codec.py``: each value's high byte in 4 bits), blocks of
  varying length, each pages of whole chunks. A load reads the block in pieces
  of whole pages (one for experts up to 8 MiB) and decodes each into the slot
  before the next one reads: fewer bytes from the disk for one pass of the
  loader's CPU, a read buffer of a piece.

Layout of a store directory::

    manifest.json      format version, scheme, checkpoint identity, layout, per-expert offset/length/crc32
    layer_000.bin      one file per MoE layer; each expert's bytes contiguous, starting 4096-aligned

The store is built in a temporary sibling directory, fsynced and renamed into
place, so a crash mid-build never leaves a directory that loads. A store whose
manifest does not match the checkpoint (file names, sizes, mtimes, a hash of
the safetensors headers), format version, scheme or layout is stale: logged,
rebuilt, never used. Every read checks its length; an expert's first read in
this process also checks its crc32 (later reads of the same bytes skip the
0.4 ms per 3 MiB that the check costs here).
"""

from __future__ import annotations

import errno
import functools
import hashlib
import json
import logging
import math
import os
import shutil
import struct
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from vllm_moe_offload.core.config import OffloadConfigError, format_bytes
from vllm_moe_offload.core.plan import round_up
from vllm_moe_offload.runtime.crc import crc32
from vllm_moe_offload.runtime.quant import GROUP_OF_BITS, QuantizationError, QuantTensor, packed_nbytes, quantize
from vllm_moe_offload.runtime.safetensors_io import (
    ALIGN_BYTES,
    CheckpointIndex,
    TensorLocation,
    TensorReader,
    ThreadLocalReaders,
)
from vllm_moe_offload.runtime.expert_layout import ExpertLayout
from vllm_moe_offload.runtime import packed_codec
from vllm_moe_offload.runtime.memory import aligned_empty
from vllm_moe_offload.runtime.packed_codec import DTYPES as CODED_DTYPES
from vllm_moe_offload.runtime.packed_codec import VERSION as PACKED_CODING_VERSION
from vllm_moe_offload.runtime.packed_codec import PackedCodingError, max_block_bytes, read_piece_bytes
from vllm_moe_offload.runtime.tiers import Converter

logger = logging.getLogger("vllm.moe_offload.expert_store")

#: bump whenever the bytes or the manifest change meaning; older stores are rebuilt.
#: 2: in a kernel store every tensor of whole 4 KiB blocks starts aligned (read straight into its slot)
FORMAT_VERSION = 2

#: scheme -> the precisions stored for every expert: name -> bits (group from GROUP_OF_BITS)
SCHEMES: dict[str, dict[str, int]] = {"int4": {"int4": 4}, "int4+int2": {"int4": 4, "int2": 2}}

#: the scheme (and its one precision) of a store of experts in kernel layout
KERNEL = "kernel"
#: the scheme (and its one precision) of a store of experts in kernel layout, coded losslessly
PACKED = "packed"
#: the schemes whose experts are read in kernel layout (:meth:`ExpertStore.read_kernel`)
KERNEL_SCHEMES = (KERNEL, PACKED)

MANIFEST = "manifest.json"


class ExpertStoreError(RuntimeError):
    """A store that cannot be used: a torn or corrupted expert, a missing file."""


@dataclass(frozen=True)
class LayerSpec:
    """One MoE layer's experts in the checkpoint."""

    names: ExpertLayout
    num_experts: int

    @property
    def key(self) -> str:
        return self.names.prefix


@dataclass(frozen=True)
class KernelLayout:
    """What the bytes of a kernel store are: each layer's converter output for this rank.

    ``identity`` names everything the bytes depend on (vLLM and torch versions,
    the kernel and its ISA, the rank's shard, the dtype; the integration layer
    fills it); ``w13`` / ``w2`` are one expert's kernel tensors as
    ``(shape, dtype)``, ``extra`` a quantized layer's other per-expert tensors
    (its scales, in slot-pool order); ``converters`` convert each layer's
    experts, in the order of the store's layers (only a build calls them).
    """

    identity: dict
    w13: tuple[tuple[int, ...], torch.dtype]
    w2: tuple[tuple[int, ...], torch.dtype]
    converters: Sequence[Converter] = field(default=(), compare=False)
    extra: tuple[tuple[tuple[int, ...], torch.dtype], ...] = ()

    def describe(self) -> dict:
        """The manifest's record of this layout (JSON)."""
        out = {
            **self.identity,
            "w13": {"shape": list(self.w13[0]), "dtype": str(self.w13[1])},
            "w2": {"shape": list(self.w2[0]), "dtype": str(self.w2[1])},
            "w2_offset": self.w2_offset,
            "expert_bytes": self.expert_bytes,
        }
        if self.extra:
            out["extra"] = [{"shape": list(shape), "dtype": str(dtype), "offset": offset}
                            for (shape, dtype), offset in zip(self.extra, self.offsets[2:])]
        return out

    @property
    def parts(self) -> list[tuple[tuple[int, ...], torch.dtype]]:
        """Every tensor of an expert's block, in order: ``w13``, ``w2``, extras."""
        return [self.w13, self.w2, *self.extra]

    @property
    def offsets(self) -> list[int]:
        """Where each of :attr:`parts` starts in an expert's block: ``w13`` at 0, ``w2`` 4096-aligned after it,
        each extra 4096-aligned when it is whole 4 KiB blocks (so a direct read can land in its slot), else
        64-aligned after the one before (small scales: 4 KiB apart they would make a block larger than the
        checkpoint's read of the same expert, which sizes the read buffers; they are copied from a small one)."""
        out, end = [], 0
        for n, part in enumerate(self.parts):
            whole_blocks = n < 2 or _nbytes(*part) % ALIGN_BYTES == 0
            out.append(round_up(end, ALIGN_BYTES if whole_blocks else _EXTRA_ALIGN_BYTES))
            end = out[-1] + _nbytes(*part)
        return out

    @property
    def staged_read_bytes(self) -> int:
        """The bytes of one direct read of a block into host slots that do not land in a slot (the read buffer's
        share, ``TensorReader.read_into``): the padding and the parts that are not whole 4 KiB blocks, whose slot
        pools are not aligned (``slots.slot_pool``). Whole-block parts at aligned offsets land in their slots."""
        direct = sum(_nbytes(*part) for part, offset in zip(self.parts, self.offsets)
                     if _nbytes(*part) % ALIGN_BYTES == 0 and offset % ALIGN_BYTES == 0)
        return round_up(self.expert_bytes, ALIGN_BYTES) - direct

    @property
    def packed_block_bytes(self) -> int:
        """The most one expert's block can take in a packed store (every tensor raw, every page's slack lost):
        the store's stale check."""
        return max_block_bytes([math.prod(shape) for shape, _ in self.parts])

    @property
    def packed_piece_bytes(self) -> int:
        """The pieces a load reads a packed block in (whole pages): its read buffer."""
        return read_piece_bytes(self.packed_block_bytes)

    def packing_refusal(self) -> str | None:
        """Why this layout cannot be stored packed (the coding takes 2-byte floats, an expert's two tensors);
        None when it can."""
        if self.extra:
            return f"its kernel tensors include {len(self.extra)} per-expert scales (a quantized layer)"
        for name, (shape, dtype) in zip(("w13", "w2"), self.parts):
            if dtype not in CODED_DTYPES:
                return f"its {name} is {dtype} in kernel layout; the coding takes {[str(d) for d in CODED_DTYPES]}"
        return None

    @property
    def w2_offset(self) -> int:
        """Where ``w2`` starts in an expert's block: after ``w13``, aligned for direct I/O."""
        return self.offsets[1]

    @property
    def expert_bytes(self) -> int:
        """One expert's block: ``w13``, padding, ``w2`` (and so on for extras)."""
        return self.offsets[-1] + _nbytes(*self.parts[-1])


#: where a kernel block's extras start: a multiple of any dtype's size and of a cache line
_EXTRA_ALIGN_BYTES = 64


def _nbytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    return math.prod(shape) * dtype.itemsize


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


def _layout(index: CheckpointIndex, layer: LayerSpec, quantizing: bool) -> list[dict]:
    """Each projection of expert 0 as it is stored: what it is read from, shape [out, in], dtype.

    ``quantizing``: the store quantizes the weights, so they must be floating-point ones (a kernel store
    keeps whatever vLLM's conversion makes of them, an int4 checkpoint's packed int32 too)."""
    out = []
    layout = layer.names
    for proj, label, shape in zip(layout.projections, layout.labels(0), layout.shapes(index)):
        dtype = proj.location(index, 0).dtype
        if len(shape) != 2 or (quantizing and not dtype.is_floating_point):
            raise OffloadConfigError(
                f"quant: {label} is {dtype} {list(shape)} in {index[proj.tensor(0)].path}; the quantized store takes "
                "2-D floating-point expert weights only (is the checkpoint already quantized?); use quant 'none'"
            )
        out.append({"proj": proj.label(), "shape": list(shape), "dtype": str(dtype)})
    return out


def _expected(index: CheckpointIndex, layers: list[LayerSpec], scheme: str, kernel: KernelLayout | None) -> dict:
    """The manifest's fields that must match for a store to be used."""
    if scheme in KERNEL_SCHEMES:
        if kernel is None:
            raise ValueError(f"a {scheme} store needs the kernel layout")
        precisions = {scheme: kernel.describe()}
        if scheme == PACKED:
            refusal = kernel.packing_refusal()
            if refusal is not None:
                raise OffloadConfigError(f"store 'packed' cannot code these experts: {refusal}; use store 'kernel'")
            precisions[PACKED]["coding"] = f"high byte in 4 bits, version {PACKED_CODING_VERSION}"
    elif scheme in SCHEMES:
        precisions = {p: {"bits": b, "group": GROUP_OF_BITS[b]} for p, b in SCHEMES[scheme].items()}
    else:
        raise ValueError(f"unknown store scheme {scheme!r}; allowed: {sorted(SCHEMES) + list(KERNEL_SCHEMES)}")
    return {
        "format_version": FORMAT_VERSION,
        "scheme": scheme,
        "precisions": precisions,
        "checkpoint": checkpoint_identity(index),
        "layers": {
            layer.key: {"num_experts": layer.num_experts,
                        "tensors": _layout(index, layer, scheme not in KERNEL_SCHEMES)}
            for layer in layers
        },
    }


@dataclass(frozen=True)
class ExpertBlock:
    """Where one precision of one expert lies in its layer file."""

    offset: int
    length: int
    crc32: int


class ExpertStore:
    """An opened, validated store: :meth:`read` hands out one expert's quantized projections,
    :meth:`read_kernel` one expert in kernel layout."""

    def __init__(self, directory: Path, manifest: dict, kernel: KernelLayout | None = None) -> None:
        self.directory = directory
        self.manifest = manifest
        self.scheme = manifest["scheme"]
        self.kernel = kernel if self.scheme in KERNEL_SCHEMES else None
        self.precisions = {
            p: (v["bits"], v["group"]) for p, v in manifest["precisions"].items() if p not in KERNEL_SCHEMES
        }
        self._layers = manifest["layers"]
        self._verified: set[tuple[str, int, str]] = set()  # (layer, expert, precision) whose crc32 matched

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
        (raw,) = self._read_block(layer_key, expert_idx, precision, reader, lambda raw: (raw,))
        bits, group = self.precisions[precision]
        out, start = [], 0
        for tensor in self._layers[layer_key]["tensors"]:
            shape = tuple(tensor["shape"])
            size = packed_nbytes(shape, bits, group)
            out.append(QuantTensor.from_bytes(raw[start : start + size], shape, bits, group))
            start += size
        return out

    def read_kernel(
        self, layer_key: str, expert_idx: int, reader: TensorReader, into: Sequence[torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, ...]:
        """The expert's kernel tensors ``(w13, w2, *extra)``, read into ``into`` (a slot's) or fresh tensors.

        One read of the expert's block: a tensor whose memory is aligned for
        direct I/O (slot pools are, see ``slots.slot_pool``; fresh tensors are)
        receives its bytes straight from the disk; only the rest (padding, small
        scales) passes through a read buffer. The first read of an expert in this
        process checks the block's crc32; a torn expert raises ExpertStoreError,
        and what it left in ``into`` must not be used.
        """
        kernel = self.kernel
        if kernel is None:
            raise ValueError(f"this store ({self.manifest['scheme']}) holds no experts in kernel layout")
        if into is None:
            into = tuple(aligned_empty(shape, dtype) for shape, dtype in kernel.parts)
        elif [(tuple(t.shape), t.dtype) for t in into] != [(tuple(shape), dtype) for shape, dtype in kernel.parts]:
            raise ValueError(f"cannot read expert {expert_idx} of {layer_key} into "
                             f"{[(list(t.shape), t.dtype) for t in into]}: the store holds "
                             f"{[(list(shape), dtype) for shape, dtype in kernel.parts]}")
        if self.scheme == PACKED:
            return self._read_packed(layer_key, expert_idx, reader, tuple(into))
        path, where, block, key = self._located(layer_key, expert_idx, KERNEL)
        try:
            crc = reader.read_into(str(path), block.offset, block.length, list(zip(kernel.offsets, into)),
                                   checksum=key not in self._verified)
        except OSError as exc:
            raise ExpertStoreError(f"reading {where} failed: {exc}") from exc
        if crc is not None:
            self._verify(key, crc, block.crc32, where)
        return tuple(into)

    def _read_packed(
        self, layer_key: str, expert_idx: int, reader: TensorReader, into: tuple[torch.Tensor, ...],
    ) -> tuple[torch.Tensor, ...]:
        """:meth:`read_kernel` from a packed store: the block read in pieces of whole pages (one for experts up
        to 8 MiB), each decoded into ``into`` (``runtime/packed_codec.py``) before the next one reads; the first
        read's crc32 chained over the pieces and checked at the end (a torn block fails the load either way)."""
        path, where, block, key = self._located(layer_key, expert_idx, PACKED)
        decoder = packed_codec.BlockDecoder(into)
        crc = 0 if key not in self._verified else None

        def decode(start: int, piece: memoryview) -> None:
            nonlocal crc
            if crc is not None:
                crc = crc32(piece, crc)
            decoder.feed(piece)

        try:
            reader.read_streamed(str(path), block.offset, block.length, self.kernel.packed_piece_bytes, decode)
            if crc is not None:
                self._verify(key, crc, block.crc32, where)
            decoder.finish()
        except OSError as exc:
            raise ExpertStoreError(f"reading {where} failed: {exc}") from exc
        except PackedCodingError as exc:
            raise ExpertStoreError(f"{where} does not decode ({exc}); delete {self.directory} to rebuild the store"
                                   ) from exc
        return into

    def _located(self, layer_key: str, expert_idx: int, precision: str) -> tuple[Path, str, ExpertBlock, tuple]:
        """Where an expert's block lies: its file, the block as errors name it, its extent and crc32 in the
        manifest, and its key among the verified blocks."""
        path = self.layer_file(layer_key)
        where = f"expert {expert_idx} of {layer_key} ({precision}) in {path}"
        return path, where, self.block(layer_key, expert_idx, precision), (layer_key, expert_idx, precision)

    def _verify(self, key: tuple, crc: int, expected: int, where: str) -> None:
        """An expert block's first read: its crc32 must be the manifest's; then it is not checked again."""
        if crc != expected:
            raise ExpertStoreError(
                f"{where} is corrupted: crc32 {crc:#010x} != {expected:#010x} in the manifest; "
                f"delete {self.directory} to rebuild the store"
            )
        self._verified.add(key)

    def _read_block(
        self, layer_key: str, expert_idx: int, precision: str, reader: TensorReader,
        use: Callable[[torch.Tensor], tuple[torch.Tensor, ...]],
    ) -> tuple[torch.Tensor, ...]:
        """``use(raw)`` on the expert's block ``raw [length] uint8``, verified (see ``read_then``)."""
        path, where, block, key = self._located(layer_key, expert_idx, precision)

        def verified(tensors: list[torch.Tensor]):
            (raw,) = tensors
            if raw.numel() != block.length:
                raise ExpertStoreError(f"{where}: read {raw.numel()} bytes, the manifest says {block.length}")
            if key not in self._verified:
                self._verify(key, crc32(raw.numpy()), block.crc32, where)
            return use(raw)

        loc = TensorLocation(str(path), block.offset, block.length, torch.uint8, (block.length,))
        try:
            return reader.read_then([loc], verified)
        except OSError as exc:
            raise ExpertStoreError(f"reading {where} failed: {exc}") from exc


def open_or_build(
    index: CheckpointIndex, layers: list[LayerSpec], scheme: str, directory: str | os.PathLike,
    readers: ThreadLocalReaders, kernel: KernelLayout | None = None,
) -> ExpertStore:
    """The store at ``directory`` when it matches the checkpoint; else (re)build it first.

    ``kernel``: the layout of a ``kernel`` store (and the converters that build it).
    """
    directory = Path(directory)
    expected = _expected(index, layers, scheme, kernel)
    manifest = _load_manifest(directory)
    if manifest is not None:
        try:
            why = _stale_reason(manifest, expected, directory, kernel.packed_block_bytes if kernel else 0)
        except (KeyError, TypeError, AttributeError) as exc:
            why = f"malformed manifest ({type(exc).__name__}: {exc})"
        if why is None:
            logger.info("using the %s expert store at %s (%s)%s", scheme, directory,
                        format_bytes(int(manifest["total_bytes"])), _decoder_note(scheme))
            return ExpertStore(directory, manifest, kernel)
        logger.warning("the expert store at %s is stale (%s); rebuilding it", directory, why)
    elif directory.exists():
        logger.warning("the expert store at %s has no readable manifest; rebuilding it", directory)
    if scheme in KERNEL_SCHEMES:
        coder = _kernel_encoder(kernel) if scheme == KERNEL else _packed_encoder(kernel)
    else:
        coder = _quant_encoder(expected["precisions"])
    return ExpertStore(directory, _build(index, layers, expected, directory, readers, coder), kernel)


def _decoder_note(scheme: str) -> str:
    """For a packed store: which decoder its loads run, made ready now (a first use compiles it) rather than
    at the first load, which would wait for the compiler."""
    return f", decoded by {packed_codec.implementation()}" if scheme == PACKED else ""


def _load_manifest(directory: Path) -> dict | None:
    try:
        return json.loads((directory / MANIFEST).read_text())
    except (OSError, ValueError):
        return None


def _stale_reason(manifest: dict, expected: dict, directory: Path, max_packed_bytes: int = 0) -> str | None:
    """Why the store at ``directory`` cannot be used (None: it can). ``max_packed_bytes``: a packed store's
    largest possible block (:attr:`KernelLayout.packed_block_bytes`)."""
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
        scheme = expected["scheme"]
        if scheme in KERNEL_SCHEMES:  # each block one direct read: where the layout says, aligned
            length = expected["precisions"][scheme]["expert_bytes"]
            for expert_idx, (offset, num_bytes, _) in enumerate(layer["experts"][scheme]):
                fits = num_bytes == length if scheme == KERNEL else 0 < num_bytes <= max_packed_bytes
                if offset % ALIGN_BYTES or not fits or offset + num_bytes > layer["file_bytes"]:
                    size = f"{length} bytes" if scheme == KERNEL else f"1 to {max_packed_bytes} bytes"
                    return (f"expert {expert_idx} in {path} is at byte {offset}, {num_bytes} bytes: "
                            f"a {scheme} block is {size} at a multiple of {ALIGN_BYTES} within the file")
    return None


#: (layer ordinal, checkpoint names of the expert's projections, their tensors [out, in], the layout's extras as
#: (param, shard_id, tensor)) -> precision -> bytes
Encoder = Callable[[int, list[str], list[torch.Tensor], list[tuple[str, str, torch.Tensor]]], dict[str, bytes]]


def _build(
    index: CheckpointIndex, layers: list[LayerSpec], expected: dict, directory: Path, readers: ThreadLocalReaders,
    encode: Encoder,
) -> dict:
    started = time.perf_counter()
    parent = directory.parent
    tmp = parent / f".{directory.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        parent.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
    except OSError as exc:
        raise OffloadConfigError(
            f"cannot write the {expected['scheme']} expert store under {parent}: {exc}; set cache_dir "
            "(--moe-offload-cache-dir) to a writable directory"
        ) from exc
    _remove_leftovers(parent, directory.name)
    try:
        manifest = dict(expected, layers={}, total_bytes=0)
        reader = TensorReader(readers.direct_io)  # its own descriptors, closed with the build
        total_experts = sum(layer.num_experts for layer in layers)
        try:
            what = {KERNEL: "converting experts to the kernel layout",
                    PACKED: "converting experts to the kernel layout and coding them"}.get(
                expected["scheme"], f"quantizing experts ({expected['scheme']})")
            with tqdm(total=total_experts, desc=what, unit="expert") as bar:
                for layer_idx, layer in enumerate(layers):
                    path = tmp / f"layer_{layer_idx:03d}.bin"
                    check = functools.partial(_check_free_space, expected["scheme"], total_experts=total_experts,
                                              tmp=tmp) if layer_idx == 0 else None
                    entry = _write_layer(index, layer, layer_idx, expected, path, reader, encode, bar, check)
                    manifest["layers"][layer.key] = entry
                    manifest["total_bytes"] += entry["file_bytes"]
        finally:
            reader.close()
        _write_synced(tmp / MANIFEST, json.dumps(manifest, indent=1).encode())
        _fsync_dir(tmp)
        _replace_dir(tmp, directory)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if exc.errno != errno.ENOSPC:
            raise
        raise OffloadConfigError(
            f"the disk under {parent} filled up while the {expected['scheme']} expert store was written "
            "(the partial store was removed); free space or set --moe-offload-cache-dir to a disk with room"
        ) from exc
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("wrote the %s expert store for %d MoE layers to %s in %.1f s: %s%s", expected["scheme"],
                len(layers), directory, time.perf_counter() - started, format_bytes(manifest["total_bytes"]),
                _decoder_note(expected["scheme"]))
    return manifest


def _check_free_space(scheme: str, per_expert_bytes: int, total_experts: int, tmp: Path) -> None:
    """Refuse a build the disk cannot hold before writing it: the first expert's bytes times every expert.

    MoE layers are alike, so the first expert stands for all.
    """
    needed, free = per_expert_bytes * total_experts, shutil.disk_usage(tmp).free
    if needed > free:
        raise OffloadConfigError(
            f"the {scheme} expert store needs {format_bytes(needed)} ({total_experts} experts x "
            f"{per_expert_bytes} bytes) but {tmp.parent} has {format_bytes(free)} free; free space or set "
            "--moe-offload-cache-dir to a disk with room"
        )


def _write_layer(
    index: CheckpointIndex, layer: LayerSpec, ordinal: int, expected: dict, path: Path, reader: TensorReader,
    encode: Encoder, bar: tqdm, check_space: Callable[[int], None] | None = None,
) -> dict:
    """Write one layer's experts; ``check_space`` is given the first expert's bytes before anything is written."""
    blocks: dict[str, list[list[int]]] = {p: [] for p in expected["precisions"]}
    with open(path, "wb") as f:
        dropped = 0  # bytes of the file written back and dropped from the page cache so far
        for expert_idx in range(layer.num_experts):
            names = layer.names.labels(expert_idx)
            # [out, in] each: an expert's own tensors, or its slices of stacked ones (transposed where stored so)
            tensors = reader.read(layer.names.locations(index, expert_idx))
            weights = layer.names.split(expert_idx, tensors)
            encoded = encode(ordinal, names, weights, layer.names.split_extras(expert_idx, tensors))
            if check_space is not None and expert_idx == 0:
                check_space(sum(len(raw) + (-len(raw) % ALIGN_BYTES) for raw in encoded.values()))
            for precision, raw in encoded.items():
                offset = f.tell()
                f.write(raw)
                f.write(b"\0" * (-len(raw) % ALIGN_BYTES))  # the next expert starts aligned for O_DIRECT
                blocks[precision].append([offset, len(raw), crc32(raw)])
            bar.update(1)
            if f.tell() - dropped >= DROP_WRITTEN_BYTES:
                dropped = _drop_written(f)
        _drop_written(f)
        file_bytes = f.tell()
    return {"file": path.name, "file_bytes": file_bytes, **expected["layers"][layer.key], "experts": blocks}


#: how much of a store file is written before it is written back and dropped from the page cache: a layer
#: of big experts (16 x 96 MiB) would otherwise sit in the cache, dirty, where a memory cgroup counts it
DROP_WRITTEN_BYTES = 64 * 2**20


def _drop_written(f) -> int:
    """Write ``f``'s bytes back to the disk and drop them from the page cache (loads read with O_DIRECT and
    never use them; a store as large as the experts would otherwise push everything else out). Returns the
    bytes written so far."""
    f.flush()
    os.fsync(f.fileno())
    os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    return f.tell()


def _quant_encoder(precisions: dict) -> Encoder:
    """Each precision of the store: the projections quantized, back to back."""

    def encode(ordinal: int, names: list[str], weights: list[torch.Tensor], extras=()) -> dict[str, bytes]:
        return {
            precision: b"".join(_quantized(n, w, spec["bits"], spec["group"]) for n, w in zip(names, weights))
            for precision, spec in precisions.items()
        }

    return encode


def _converted(kernel: KernelLayout, ordinal: int, names: list[str], weights: list[torch.Tensor],
               extras=()) -> list[torch.Tensor]:
    """One expert in kernel layout, as the layer's converter returns it: each of ``kernel.parts``, checked."""
    w1, w3, w2 = weights[0], (weights[1] if len(weights) == 3 else None), weights[-1]
    convert = kernel.converters[ordinal]
    parts = convert(w1, w3, w2, None, extras=extras) if extras else convert(w1, w3, w2, None)
    if len(parts) != len(kernel.parts):
        raise ExpertStoreError(f"{names[0]}: the converter gave {len(parts)} tensors, the layer's slots "
                               f"hold {len(kernel.parts)}")
    for n, (got, (shape, dtype)) in enumerate(zip(parts, kernel.parts)):
        if tuple(got.shape) != tuple(shape) or got.dtype != dtype:
            what = ("w13", "w2")[n] if n < 2 else f"extra {n - 2}"
            raise ExpertStoreError(
                f"{names[0]}: the converter gave {what} {got.dtype} {list(got.shape)}, the layer's slots "
                f"hold {dtype} {list(shape)}"
            )
    return list(parts)


def _kernel_encoder(kernel: KernelLayout) -> Encoder:
    """The layer's converter output: each of ``kernel.parts`` at its offset, zeros between (one expert's block
    in memory at a time)."""

    def encode_kernel(ordinal: int, names: list[str], weights: list[torch.Tensor], extras=()) -> dict[str, bytes]:
        block = bytearray(kernel.expert_bytes)
        for got, offset in zip(_converted(kernel, ordinal, names, weights, extras), kernel.offsets):
            raw = got.contiguous().view(-1).view(torch.uint8).numpy()  # [bytes]
            block[offset : offset + raw.size] = memoryview(raw)
        return {KERNEL: bytes(block)}

    return encode_kernel


def _packed_encoder(kernel: KernelLayout) -> Encoder:
    """The layer's converter output coded (``runtime/packed_codec.py``): one block of pages per expert."""

    def encode_packed(ordinal: int, names: list[str], weights: list[torch.Tensor], extras=()) -> dict[str, bytes]:
        return {PACKED: packed_codec.encode_block(_converted(kernel, ordinal, names, weights, extras))}

    return encode_packed


def _quantized(name: str, w: torch.Tensor, bits: int, group: int) -> bytes:
    try:
        return quantize(w.contiguous(), bits, group).to_bytes()
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
