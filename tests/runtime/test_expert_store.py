"""The quantized expert store on a real safetensors checkpoint: layout, reuse, staleness, atomic
writes, torn reads, and the QuantSource tier on top of it."""

from __future__ import annotations

import json
import logging
import os
import zlib

import pytest
import torch
from safetensors.torch import save_file

from vllm_moe_offload.core.config import OffloadConfigError
from vllm_moe_offload.runtime import expert_store
from vllm_moe_offload.runtime.expert_store import (
    MANIFEST,
    ExpertStoreError,
    LayerSpec,
    open_or_build,
    store_directory,
)
from vllm_moe_offload.runtime.quant import dequantize, quantize
from vllm_moe_offload.runtime.quant_source import QuantSource
from vllm_moe_offload.runtime.safetensors_io import ALIGN_BYTES, CheckpointIndex, ThreadLocalReaders
from vllm_moe_offload.runtime.tiers import DiskSource
from tests.runtime.conftest import E, H, I, LAYERS
from tests.runtime.conftest import expert_names as _names


def _cat(w1, w3, w2, into=None):
    return torch.cat([w1, w3]), w2  # [2I, H], [H, I]: the Triton kernel layout


def _layers():
    return [LayerSpec(_names(i), E) for i in range(LAYERS)]


def _open(folder, root, readers, scheme="int4"):
    return open_or_build(CheckpointIndex(folder), _layers(), scheme, store_directory(root, folder, scheme), readers)


def test_store_layout_and_manifest(checkpoint, tmp_path, readers):
    folder, _ = checkpoint
    store = _open(folder, tmp_path / "stores", readers, "int4+int2")
    manifest = json.loads((store.directory / MANIFEST).read_text())
    assert manifest["format_version"] == expert_store.FORMAT_VERSION
    assert manifest["scheme"] == "int4+int2"
    assert manifest["precisions"] == {"int4": {"bits": 4, "group": 64}, "int2": {"bits": 2, "group": 32}}
    assert manifest["checkpoint"]["files"][0]["name"] == "model.safetensors"
    layer = manifest["layers"][_names(1).prefix]
    assert layer["tensors"] == [
        {"proj": "w1", "shape": [I, H], "dtype": "torch.bfloat16"},
        {"proj": "w3", "shape": [I, H], "dtype": "torch.bfloat16"},
        {"proj": "w2", "shape": [H, I], "dtype": "torch.bfloat16"},
    ]
    raw = (store.directory / layer["file"]).read_bytes()
    # int4: w1/w3 [64, 96 -> 128 padded] = 64*64 B data + 2*64*2*2 B meta each; w2 [96, 64]: 96*32 + 2*96*2
    assert store.expert_nbytes("int4") == 2 * (4096 + 512) + (3072 + 384)
    for precision in ("int4", "int2"):
        for e in range(E):
            block = store.block(_names(1).prefix, e, precision)
            assert block.offset % ALIGN_BYTES == 0
            assert zlib.crc32(raw[block.offset : block.offset + block.length]) == block.crc32
    assert store.total_bytes == sum(f.stat().st_size for f in store.directory.glob("layer_*.bin"))


def test_fetch_equals_dequantized_checkpoint_through_the_converter(checkpoint, tmp_path, readers):
    folder, tensors = checkpoint
    store = _open(folder, tmp_path / "stores", readers, "int4+int2")
    source = QuantSource(store, _names(0).prefix, _cat, readers, torch.bfloat16)
    disk = DiskSource(CheckpointIndex(folder), _names(0), _cat, readers)
    for e in (0, E - 1):
        prefix = f"{_names(0).prefix}.{e}"
        for low, bits in ((False, 4), (True, 2)):
            got = source.fetch(e, low_precision=low)
            ref = [
                dequantize(quantize(tensors[f"{prefix}.{p}.weight"], bits), torch.bfloat16) for p in ("w1", "w3", "w2")
            ]
            assert torch.equal(got.w13, torch.cat(ref[:2])) and torch.equal(got.w2, ref[2])
            assert got.w13.dtype == torch.bfloat16
            assert got.bytes_read >= store.expert_nbytes("int4" if bits == 4 else "int2")
        full = disk.fetch(e)
        err = (source.fetch(e).w13.float() - full.w13.float()).abs().max().item()
        assert 0 < err < 0.05  # int4 of N(0, 0.05): a step of about 0.3 / 15
    assert source.fetch(0).bytes_read < disk.fetch(0).bytes_read / 2
    assert source.tier.value == "quant"


def test_int4_store_has_no_low_precision(checkpoint, tmp_path, readers):
    folder, _ = checkpoint
    source = QuantSource(_open(folder, tmp_path / "s", readers), _names(0).prefix, _cat, readers, torch.bfloat16)
    assert not source.has_low_precision
    with pytest.raises(ValueError, match="has no int2 experts"):
        source.fetch(0, low_precision=True)


def test_second_open_reuses_the_store(checkpoint, tmp_path, readers, caplog, monkeypatch):
    folder, _ = checkpoint
    first = _open(folder, tmp_path / "s", readers)
    built = first.manifest
    monkeypatch.setattr(expert_store, "quantize", _must_not_run)
    with caplog.at_level(logging.INFO, logger="vllm.moe_offload.expert_store"):
        again = _open(folder, tmp_path / "s", readers)
    assert again.manifest == built
    assert "using the int4 expert store" in caplog.text


def _must_not_run(*args, **kwargs):
    raise AssertionError("the store was rebuilt")


@pytest.mark.parametrize(
    "change", ["touch", "rewrite", "version", "scheme_in_manifest", "truncate_layer", "malformed_manifest"]
)
def test_stale_store_is_rebuilt(checkpoint, tmp_path, readers, caplog, monkeypatch, change):
    folder, tensors = checkpoint
    store = _open(folder, tmp_path / "s", readers)
    layer_file = store.layer_file(_names(0).prefix)
    if change == "touch":
        st = (folder / "model.safetensors").stat()
        os.utime(folder / "model.safetensors", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    elif change == "rewrite":
        tensors = dict(tensors)
        key = f"{_names(0).prefix}.0.w1.weight"
        tensors[key] = tensors[key] * 2
        save_file(tensors, str(folder / "model.safetensors"))
    elif change == "version":
        monkeypatch.setattr(expert_store, "FORMAT_VERSION", expert_store.FORMAT_VERSION + 1)
    elif change == "scheme_in_manifest":
        manifest = json.loads((store.directory / MANIFEST).read_text())
        manifest["precisions"]["int4"]["group"] = 128
        (store.directory / MANIFEST).write_text(json.dumps(manifest))
    elif change == "truncate_layer":
        os.truncate(layer_file, layer_file.stat().st_size - 1)
    elif change == "malformed_manifest":
        manifest = json.loads((store.directory / MANIFEST).read_text())
        del manifest["layers"][_names(1).prefix]["file"]
        (store.directory / MANIFEST).write_text(json.dumps(manifest))
    with caplog.at_level(logging.INFO, logger="vllm.moe_offload.expert_store"):
        rebuilt = _open(folder, tmp_path / "s", readers)
    assert "is stale" in caplog.text and "wrote the int4 expert store" in caplog.text
    assert rebuilt.manifest["format_version"] == expert_store.FORMAT_VERSION
    assert rebuilt.manifest["checkpoint"] == expert_store.checkpoint_identity(CheckpointIndex(folder))
    source = QuantSource(rebuilt, _names(0).prefix, _cat, readers, torch.bfloat16)
    ref = dequantize(quantize(tensors[f"{_names(0).prefix}.0.w1.weight"], 4), torch.bfloat16)
    assert torch.equal(source.fetch(0).w13[:I], ref)
    assert [p.name for p in (tmp_path / "s").iterdir()] == [rebuilt.directory.name]  # old store removed


def test_crash_mid_build_leaves_nothing_that_loads(checkpoint, tmp_path, readers, monkeypatch, caplog):
    folder, _ = checkpoint
    calls = {"n": 0}
    real = expert_store.quantize

    def crash_on_the_20th(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 20:
            raise KeyboardInterrupt("simulated crash mid-build")
        return real(*args, **kwargs)

    monkeypatch.setattr(expert_store, "quantize", crash_on_the_20th)
    with pytest.raises(KeyboardInterrupt):
        _open(folder, tmp_path / "s", readers)
    assert list((tmp_path / "s").iterdir()) == []  # no store, no temporary directory
    monkeypatch.setattr(expert_store, "quantize", real)
    with caplog.at_level(logging.INFO, logger="vllm.moe_offload.expert_store"):
        _open(folder, tmp_path / "s", readers)
    assert "wrote the int4 expert store" in caplog.text


def test_killed_build_leftovers_are_never_loaded_and_are_cleaned(checkpoint, tmp_path, readers, monkeypatch):
    """A process killed between writing and renaming leaves a temporary directory behind."""
    folder, _ = checkpoint
    directory = store_directory(tmp_path / "s", folder, "int4")

    def die_at_rename(src, dst):
        raise SystemExit("killed at rename")

    monkeypatch.setattr(expert_store.shutil, "rmtree", lambda *a, **k: None)  # a kill runs no cleanup
    monkeypatch.setattr(expert_store.os, "rename", die_at_rename)
    with pytest.raises(SystemExit):
        _open(folder, tmp_path / "s", readers)
    monkeypatch.undo()
    (leftover,) = (tmp_path / "s").iterdir()
    assert leftover.name.startswith(f".{directory.name}.tmp-") and (leftover / MANIFEST).exists()
    assert not directory.exists()
    # pretend the dead build was another process's, long gone
    dead = leftover.with_name(f".{directory.name}.tmp-999999999-deadbeef")
    leftover.rename(dead)
    _open(folder, tmp_path / "s", readers)
    assert [p.name for p in (tmp_path / "s").iterdir()] == [directory.name]


def test_corrupted_or_torn_expert_is_refused(checkpoint, tmp_path, readers):
    folder, _ = checkpoint
    store = _open(folder, tmp_path / "s", readers)
    source = QuantSource(store, _names(1).prefix, _cat, readers, torch.bfloat16)
    path = store.layer_file(_names(1).prefix)
    block = store.block(_names(1).prefix, 2, "int4")
    with open(path, "r+b") as f:
        f.seek(block.offset + 100)
        byte = f.read(1)
        f.seek(block.offset + 100)
        f.write(bytes([byte[0] ^ 0xFF]))
    where = rf"expert 2 of {_names(1).prefix} \(int4\) in .*layer_001.bin"
    with pytest.raises(ExpertStoreError, match=rf"{where} is corrupted"):
        source.fetch(2)
    source.fetch(1)  # the others still load
    last = store.block(_names(1).prefix, E - 1, "int4")
    os.truncate(path, last.offset + 10)  # truncated after start-up
    fresh = ThreadLocalReaders(direct_io=True)  # a reader without cached descriptors
    with pytest.raises(ExpertStoreError, match=rf"expert {E - 1} of .* failed: short read"):
        QuantSource(store, _names(1).prefix, _cat, fresh, torch.bfloat16).fetch(E - 1)
    fresh.close()


def test_cache_dir_under_a_file_is_a_clear_error(checkpoint, tmp_path, readers):
    folder, _ = checkpoint
    (tmp_path / "a-file").write_text("")
    with pytest.raises(OffloadConfigError, match=rf"cannot write the int4 expert store under {tmp_path}/a-file"):
        _open(folder, tmp_path / "a-file", readers)


def test_unwritable_cache_dir_is_a_clear_error(checkpoint, tmp_path, readers):
    folder, _ = checkpoint
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if os.access(locked, os.W_OK):
            pytest.skip("running as root: permissions do not stop writes")
        with pytest.raises(OffloadConfigError, match=rf"cannot write the int4 expert store under {locked}"):
            _open(folder, locked, readers)
    finally:
        locked.chmod(0o700)


def test_non_float_experts_are_refused(tmp_path, readers):
    folder = tmp_path / "ckpt"
    folder.mkdir()
    tensors = {f"{_names(0).prefix}.{e}.{p}.weight": torch.zeros(4, 64, dtype=torch.int8)
               for e in range(2) for p in ("w1", "w3", "w2")}
    save_file(tensors, str(folder / "model.safetensors"))
    with pytest.raises(OffloadConfigError, match="2-D floating-point expert weights only"):
        open_or_build(CheckpointIndex(folder), [LayerSpec(_names(0), 2)], "int4", tmp_path / "s" / "x", readers)


def test_weights_outside_float16_range_are_refused_naming_the_tensor(tmp_path, readers):
    folder = tmp_path / "ckpt"
    folder.mkdir()
    tensors = {f"{_names(0).prefix}.{e}.{p}.weight": torch.randn(4, 64) for e in range(2) for p in ("w1", "w3", "w2")}
    tensors[f"{_names(0).prefix}.1.w3.weight"][0, 0] = 1e9
    save_file(tensors, str(folder / "model.safetensors"))
    with pytest.raises(OffloadConfigError, match=rf"cannot quantize {_names(0).prefix}.1.w3.weight to int4: .*float16"):
        open_or_build(CheckpointIndex(folder), [LayerSpec(_names(0), 2)], "int4", tmp_path / "s" / "x", readers)
    assert list((tmp_path / "s").iterdir()) == []


@pytest.fixture
def small_disk(tmp_path):
    """A real 32 KiB filesystem (tmpfs), or a skip where the test may not mount one."""
    import subprocess

    mount = tmp_path / "small-disk"
    mount.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=32k", "tmpfs", str(mount)], capture_output=True)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({made.stderr.decode().strip() or made.returncode})")
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


def test_a_store_the_disk_cannot_hold_is_refused_before_writing(checkpoint, small_disk, readers):
    folder, _ = checkpoint
    with pytest.raises(OffloadConfigError, match=r"the int4 expert store needs .* \(10 experts x \d+ bytes\) but "
                       rf"{small_disk} has .* free; free space or set --moe-offload-cache-dir"):
        _open(folder, small_disk, readers)
    assert [p.name for p in small_disk.rglob("*") if p.is_file()] == []  # no partial store left behind
