"""Reading tensors from real safetensors files with direct I/O (and the buffered fallback)."""

import logging
import os
import shutil
import subprocess

import pytest
import torch
from safetensors.torch import load_file, save_file

from vllm_moe_offload.runtime.safetensors_io import CheckpointIndex, TensorReader


@pytest.fixture
def checkpoint(tmp_path):
    torch.manual_seed(0)
    tensors = {
        # odd sizes so that tensors straddle 4 KiB boundaries
        "a.weight": torch.randn(37, 129, dtype=torch.bfloat16),
        "b.weight": torch.randn(5000, dtype=torch.float32),
        "c.weight": torch.randint(-5, 5, (3, 7), dtype=torch.int64),
    }
    save_file(tensors, str(tmp_path / "model.safetensors"))
    return tmp_path


def _check_all(index, reader, folder):
    expected = load_file(str(folder / "model.safetensors"))
    got = reader.read([index[n] for n in ("a.weight", "b.weight", "c.weight")])
    for name, tensor in zip(("a.weight", "b.weight", "c.weight"), got):
        assert torch.equal(tensor, expected[name]), name
    assert torch.equal(reader.read([index["b.weight"]])[0], expected["b.weight"])


def test_direct_reads_match_safetensors(checkpoint):
    index = CheckpointIndex(checkpoint)
    reader = TensorReader(direct_io=True)
    _check_all(index, reader, checkpoint)
    assert reader.bytes_read >= sum(index[n].num_bytes for n in ("a.weight", "b.weight", "c.weight"))
    reader.close()


def test_buffered_reads_match_safetensors(checkpoint):
    reader = TensorReader(direct_io=False)
    _check_all(CheckpointIndex(checkpoint), reader, checkpoint)
    reader.close()


@pytest.mark.skipif(shutil.which("fincore") is None, reason="needs util-linux fincore")
def test_direct_reads_leave_the_page_cache_empty(checkpoint):
    path = checkpoint / "model.safetensors"
    index = CheckpointIndex(checkpoint)  # reads the header through the page cache
    fd = os.open(path, os.O_RDONLY)
    os.fsync(fd)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    os.close(fd)
    if _resident_bytes(path) != 0:
        pytest.skip("this filesystem keeps the file cached despite DONTNEED")
    reader = TensorReader(direct_io=True)
    reader.read([index["b.weight"]])
    assert _resident_bytes(path) == 0
    reader.close()
    buffered = TensorReader(direct_io=False)
    buffered.read([index["b.weight"]])
    assert _resident_bytes(path) > 0  # the check can fail: buffered reads do fill the cache
    buffered.close()


def _resident_bytes(path) -> int:
    out = subprocess.run(["fincore", "--bytes", "--noheadings", "--output", "RES", str(path)],
                         capture_output=True, text=True, check=True).stdout
    return int(out.strip())


def _refuses_direct_io(folder: str) -> bool:
    probe = os.path.join(folder, "probe")
    open(probe, "wb").close()
    try:
        os.close(os.open(probe, os.O_RDONLY | os.O_DIRECT))
        return False
    except OSError:
        return True
    finally:
        os.remove(probe)


def test_fallback_where_direct_io_is_refused(caplog):
    # tmpfs refused O_DIRECT before Linux 6.6; where it accepts it, no filesystem
    # here refuses and the fallback cannot be exercised.
    shm = "/dev/shm/vllm_moe_offload_test"
    shutil.rmtree(shm, ignore_errors=True)
    os.makedirs(shm)
    try:
        if not _refuses_direct_io(shm):
            pytest.skip("tmpfs on this kernel accepts O_DIRECT; no refusing filesystem to test on")
        torch.manual_seed(0)
        tensor = torch.randn(100, 10)
        save_file({"x.weight": tensor}, f"{shm}/model.safetensors")
        reader = TensorReader(direct_io=True)
        with caplog.at_level(logging.WARNING, logger="vllm.moe_offload.safetensors_io"):
            got = reader.read([CheckpointIndex(shm)["x.weight"]])[0]
            reader.read([CheckpointIndex(shm)["x.weight"]])
        assert torch.equal(got, tensor)
        warnings = [r for r in caplog.records if "direct I/O refused" in r.getMessage()]
        assert len(warnings) == 1  # once per file
        reader.close()
    finally:
        shutil.rmtree(shm, ignore_errors=True)


def test_missing_tensor_names_the_key(checkpoint):
    with pytest.raises(KeyError, match="tensor 'zzz' is not in the checkpoint"):
        CheckpointIndex(checkpoint)["zzz"]


def test_folder_without_safetensors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no \\*.safetensors files"):
        CheckpointIndex(tmp_path)
