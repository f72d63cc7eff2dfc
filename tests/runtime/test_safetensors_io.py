"""Reading tensors from real safetensors files with direct I/O (and the buffered fallback)."""

import logging
import os
import shutil
import subprocess

import pytest
import torch
from safetensors.torch import load_file, save_file

from vllm_moe_offload.core.plan import HUGE_PAGE_BYTES, buffer_bytes, read_buffer_bytes
from vllm_moe_offload.runtime.ledger import BudgetExceeded, BudgetLedger, MemoryKind
from vllm_moe_offload.runtime.memory import ALIGN_BYTES
from tests.runtime.conftest import huge_bytes_of, thp_setting
from vllm_moe_offload.runtime.safetensors_io import (
    CheckpointIndex,
    ReadBuffers,
    TensorReader,
    ThreadLocalReaders,
    read_groups,
)


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


def _experts_checkpoint(folder, num_experts=3, rows=40, cols=129):
    """Mixtral-style expert tensors (odd sizes: spans straddle blocks) and one unrelated tensor."""
    torch.manual_seed(1)
    tensors = {"model.embed_tokens.weight": torch.randn(300, 64, dtype=torch.bfloat16)}
    for e in range(num_experts):
        for proj in ("w1", "w2", "w3"):
            tensors[f"model.layers.0.block_sparse_moe.experts.{e}.{proj}.weight"] = torch.randn(
                rows, cols, dtype=torch.bfloat16
            )
    save_file(tensors, str(folder / "model.safetensors"))
    return folder, 3 * rows * cols * 2


def test_largest_expert_span_is_what_one_expert_read_covers(tmp_path):
    folder, expert_bytes = _experts_checkpoint(tmp_path)
    index = CheckpointIndex(folder)
    assert index.largest_expert_span() == expert_bytes  # three neighbours, one span, nothing else
    names = [f"model.layers.0.block_sparse_moe.experts.1.{p}.weight" for p in ("w1", "w3", "w2")]
    assert len(read_groups([index[n] for n in names])) == 1


def test_far_apart_tensors_are_read_separately(tmp_path):
    folder, _ = _experts_checkpoint(tmp_path)
    index = CheckpointIndex(folder)
    # expert 0's w1 and expert 2's w3 have four projections between them: two reads, not one wide one
    far = [index["model.layers.0.block_sparse_moe.experts.0.w1.weight"],
           index["model.layers.0.block_sparse_moe.experts.2.w3.weight"]]
    assert [len(g) for g in read_groups(far)] == [1, 1]
    ledger = BudgetLedger(10**6)
    reader = TensorReader(direct_io=True, buffers=ReadBuffers(1, ledger))
    got = reader.read(far[::-1])
    expected = load_file(str(folder / "model.safetensors"))
    assert torch.equal(got[0], expected["model.layers.0.block_sparse_moe.experts.2.w3.weight"])
    assert torch.equal(got[1], expected["model.layers.0.block_sparse_moe.experts.0.w1.weight"])
    assert ledger.held_bytes <= read_buffer_bytes(far[0].num_bytes)
    reader.close()


def test_read_buffers_grow_through_the_ledger_and_stay_within_the_planned_size(tmp_path):
    folder, expert_bytes = _experts_checkpoint(tmp_path)
    index = CheckpointIndex(folder)
    ledger = BudgetLedger(10**6)
    readers = ThreadLocalReaders(direct_io=True, lanes=1, ledger=ledger, convert_bytes=1000)
    expected = load_file(str(folder / "model.safetensors"))
    for e in range(3):
        names = [f"model.layers.0.block_sparse_moe.experts.{e}.{p}.weight" for p in ("w1", "w3", "w2")]
        with readers.fetching(f"expert {e}") as reader:
            assert ledger.held(MemoryKind.CONVERT) == 1000  # the conversion's temporaries, while it runs
            got = reader.read([index[n] for n in names])
        assert all(torch.equal(t, expected[n]) for t, n in zip(got, names))
        assert 0 < ledger.held_bytes == readers.buffers.held_bytes <= read_buffer_bytes(expert_bytes)
    assert ledger.peak_bytes <= read_buffer_bytes(expert_bytes) + 1000
    readers.close()
    assert ledger.held_bytes == 0


def test_a_read_buffer_of_a_huge_page_or_more_is_whole_huge_pages(tmp_path):
    """An expert read of 3 MiB borrows a buffer of 4 MiB, in transparent huge pages where the kernel gives them
    (direct reads land 2-3x faster there), reserved in the ledger at its full size; a small read's buffer stays
    small pages, its size block-aligned; bytes read through either equal safetensors'."""
    torch.manual_seed(0)
    tensors = {f"model.layers.0.block_sparse_moe.experts.0.{p}.weight": torch.randn(512, 1024).bfloat16()
               for p in ("w1", "w3", "w2")}  # 1 MiB each: one expert's read spans 3 MiB
    tensors["small.weight"] = torch.randn(100).bfloat16()
    save_file(tensors, str(tmp_path / "model.safetensors"))
    index = CheckpointIndex(tmp_path)
    ledger = BudgetLedger(64 * 2**20)
    buffers = ReadBuffers(1, ledger)
    reader = TensorReader(direct_io=True, buffers=buffers)
    assert torch.equal(reader.read([index["small.weight"]])[0], tensors["small.weight"])
    assert buffers.held_bytes == ledger.held_bytes == buffer_bytes(ALIGN_BYTES) == ALIGN_BYTES
    names = [n for n in tensors if ".experts." in n]
    got = reader.read([index[n] for n in names])
    assert all(torch.equal(t, tensors[n]) for t, n in zip(got, names))
    assert buffers.held_bytes == ledger.held_bytes == 2 * HUGE_PAGE_BYTES  # 3 MiB + a block, rounded up
    assert buffer_bytes(3 * 2**20 + ALIGN_BYTES) == 2 * HUGE_PAGE_BYTES
    assert buffer_bytes(HUGE_PAGE_BYTES - 1) == HUGE_PAGE_BYTES - 1
    if thp_setting() in ("always", "madvise"):
        with buffers.borrow(1) as buf:
            view = torch.frombuffer(buf, dtype=torch.uint8)
            assert view.data_ptr() % HUGE_PAGE_BYTES == 0
            huge = huge_bytes_of(view)
            del view
        assert huge >= HUGE_PAGE_BYTES, huge  # the read touched both of its huge pages: at least one is huge
    reader.close()


def test_a_read_buffer_past_the_budget_is_refused_before_it_is_mapped(tmp_path):
    folder, expert_bytes = _experts_checkpoint(tmp_path)
    index = CheckpointIndex(folder)
    ledger = BudgetLedger(20_000)  # one projection's read (16384 bytes aligned) fits, a whole expert's does not
    reader = TensorReader(direct_io=True, buffers=ReadBuffers(1, ledger))
    names = [f"model.layers.0.block_sparse_moe.experts.0.{p}.weight" for p in ("w1", "w3", "w2")]
    with pytest.raises(BudgetExceeded, match=r"growing a read buffer to \d+ bytes \(read_buffer, \d+ bytes\) does "
                                             r"not fit the expert budget: 0 bytes already held \(nothing\)"):
        reader.read([index[n] for n in names])
    assert ledger.held_bytes == 0
    assert reader.read([index[names[0]]])[0].shape == (40, 129)  # a smaller read still fits
    reader.close()


def test_lanes_bound_the_fetches_that_run_at_once(tmp_path):
    import threading
    import time

    ledger = BudgetLedger(2 * 500)
    readers = ThreadLocalReaders(direct_io=True, lanes=2, ledger=ledger, convert_bytes=500)
    inside, most = [0], [0]
    lock = threading.Lock()

    def fetch():
        with readers.fetching("an expert"):
            with lock:
                inside[0] += 1
                most[0] = max(most[0], inside[0])
            time.sleep(0.02)
            with lock:
                inside[0] -= 1

    threads = [threading.Thread(target=fetch) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert most[0] == 2 and ledger.peak_bytes == 1000 and ledger.held_bytes == 0
    readers.close()


def test_read_then_hands_views_of_the_read_and_copies_out_what_stays_in_the_buffer(tmp_path):
    folder, expert_bytes = _experts_checkpoint(tmp_path)
    index = CheckpointIndex(folder)
    expected = load_file(str(folder / "model.safetensors"))
    reader = TensorReader(direct_io=True)
    names = [f"model.layers.0.block_sparse_moe.experts.{{}}.{p}.weight" for p in ("w1", "w3", "w2")]
    seen = []

    def keep_raw(tensors):  # returns the buffer's own views: they must come back as copies
        seen.append([t.data_ptr() for t in tensors])
        return tensors[0], tensors[2] * 1  # a view, and a fresh tensor
    first = reader.read_then([index[n.format(0)] for n in names], keep_raw)
    second = reader.read_then([index[n.format(1)] for n in names], keep_raw)  # reuses the buffer
    ptrs = seen[0] + seen[1]  # views into the one read buffer both times, no copy of the read
    assert max(ptrs) - min(ptrs) < read_buffer_bytes(expert_bytes)
    assert torch.equal(first[0], expected[names[0].format(0)])  # the copied-out view is intact
    assert torch.equal(first[1], expected[names[2].format(0)] * 1)
    assert torch.equal(second[0], expected[names[0].format(1)])
    far = [index[names[0].format(0)], index[names[2].format(2)]]  # two reads: plain copies
    got = reader.read_then(far, lambda tensors: tensors)
    assert torch.equal(got[1], expected[names[2].format(2)])
    reader.close()


def test_lane_scratch_is_reused_and_counted_inside_the_conversion_hold(tmp_path):
    ledger = BudgetLedger(10_000)
    readers = ThreadLocalReaders(direct_io=True, lanes=1, ledger=ledger, convert_bytes=1000)
    assert readers.scratch("w13", (10, 10), torch.float32).shape == (10, 10)  # outside a fetch: plain tensor
    ptrs = []
    for _ in range(3):
        with readers.fetching("an expert"):
            w = readers.scratch("w13", (100,), torch.float32)  # 400 bytes out of the 1000 held
            ptrs.append(w.data_ptr())
            assert ledger.held(MemoryKind.CONVERT) == 1000
        assert ledger.held(MemoryKind.CONVERT) == 400  # the scratch stays; the rest is released
    assert len(set(ptrs)) == 1
    with readers.fetching("a bigger expert"):
        readers.scratch("w13", (300,), torch.float32)  # grows by 800: 600 from the hold, 200 more
        assert ledger.held(MemoryKind.CONVERT) == 1200
    assert ledger.held(MemoryKind.CONVERT) == 1200
    readers.close()
    assert ledger.held_bytes == 0


@pytest.mark.parametrize("direct_io", [True, False])
def test_streamed_reads_hand_over_pieces_in_order_through_one_buffer(tmp_path, direct_io):
    """``read_streamed``: every byte once, in order, each piece in the same borrowed buffer; a short read and
    a failing consumer are errors."""
    data = os.urandom(5 * ALIGN_BYTES * 3 + 1234)  # 5 pieces of 3 blocks, the last one short
    path = tmp_path / "blocks.bin"
    path.write_bytes(data + bytes(ALIGN_BYTES))  # the file goes on past the range (a store's next block)
    reader = TensorReader(direct_io=direct_io)
    piece = 3 * ALIGN_BYTES
    got, buffers = [], set()

    def use(start, view):
        got.append((start, bytes(view)))
        buffers.add(torch.frombuffer(view, dtype=torch.uint8).data_ptr())

    reader.read_streamed(str(path), ALIGN_BYTES, len(data) - ALIGN_BYTES, piece, use)
    assert [start for start, _ in got] == list(range(0, len(data) - ALIGN_BYTES, piece))
    assert b"".join(chunk for _, chunk in got) == data[ALIGN_BYTES:]
    assert len(buffers) == 1  # one read buffer of a piece
    align = ALIGN_BYTES if direct_io else 1  # direct reads end at a whole block
    assert reader.bytes_read == -(-(len(data) - ALIGN_BYTES) // align) * align
    with pytest.raises(OSError, match="short read"):
        reader.read_streamed(str(path), 0, len(data) + 10 * ALIGN_BYTES, piece, lambda start, view: None)

    def failing(start, view):
        if start:
            raise RuntimeError("decode failed")
    with pytest.raises(RuntimeError, match="decode failed"):
        reader.read_streamed(str(path), 0, len(data), piece, failing)
    with pytest.raises(ValueError, match="not a multiple"):
        reader.read_streamed(str(path), 0, len(data), piece + 1, use)
    reader.close()
