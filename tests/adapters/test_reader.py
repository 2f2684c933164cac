"""The adapter reader process: what it returns is what load_adapter returns in process (its
values laid out as slot images), its errors are the same errors, and a reader that dies fails
one read, not the next."""

import ctypes
import ctypes.util
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from goat_runtime.adapters.format import Adapter, AdapterError, load_adapter
from goat_runtime.adapters.reader import (
    AdapterReader,
    ReadAdapter,
    ScratchPool,
    _write_all,
    pack,
    unpack,
)
from goat_runtime.adapters.slots import slot_image
from tests.adapters.adapted_model import FIXTURE
from tests.adapters.test_format import BASE_LINEARS


@pytest.fixture(scope="module")
def reader():
    reader = AdapterReader()
    yield reader
    reader.shutdown()


# The fixture's linears fused as the engine fuses them (q/k/v, gate/up), lm_head alone.
GROUPS = (
    *(group for i in range(2) for group in (
        tuple(f"model.layers.{i}.self_attn.{n}_proj" for n in "qkv"),
        (f"model.layers.{i}.self_attn.o_proj",),
        (f"model.layers.{i}.mlp.gate_proj", f"model.layers.{i}.mlp.up_proj"),
        (f"model.layers.{i}.mlp.down_proj",))),
    ("lm_head",),
)


def assert_same(got: ReadAdapter, want: Adapter) -> None:
    """`got` describes `want` (its tensors' shapes on the meta device) and holds its values as
    slot images, exactly as slots.slot_image lays them out."""
    adapter = got.adapter
    assert (adapter.name, adapter.path, adapter.kind, adapter.signature,
            adapter.base_model_name_or_path) == (
        want.name, want.path, want.kind, want.signature, want.base_model_name_or_path)
    assert list(adapter.layers) == list(want.layers)
    for module, layer in want.layers.items():
        other = adapter.layers[module]
        assert (other.top_k, other.scale) == (layer.top_k, layer.scale)
        assert other.lora_a.is_meta and other.lora_a.shape == layer.lora_a.shape
        assert other.lora_b.is_meta and other.lora_b.shape == layer.lora_b.shape
        assert (other.router is None) == (layer.router is None)
        if layer.router is not None:
            assert other.router is not None and other.router.shape == layer.router.shape
    assert len(got.images) == len(GROUPS)
    for group, image in zip(GROUPS, got.images, strict=True):
        expected = slot_image([want.layers.get(n) for n in group],
                              [BASE_LINEARS[n][0] for n in group], BASE_LINEARS[group[0]][1])
        for name, tensor, wanted in zip(("shrink", "router", "expand", "slice_meta"),
                                        image.tensors(), expected.tensors(), strict=True):
            assert tensor.dtype == wanted.dtype, name
            assert torch.equal(tensor, wanted), name


@pytest.mark.parametrize("name", ["goat0", "goat1", "lora0"])
def test_packing_keeps_every_value(name: str) -> None:
    adapter = load_adapter(FIXTURE / "adapters" / name, BASE_LINEARS)
    packed, tensors = pack(adapter, GROUPS, BASE_LINEARS)
    values = torch.cat([t.reshape(-1).view(torch.float32) for t in tensors])
    assert values.numel() == packed.numel
    assert_same(unpack(packed, values), adapter)


def test_an_adapter_outside_the_groups_is_refused() -> None:
    adapter = load_adapter(FIXTURE / "adapters" / "goat0", BASE_LINEARS)
    with pytest.raises(AdapterError, match="outside the served linears"):
        pack(adapter, GROUPS[:4], BASE_LINEARS)


@pytest.mark.parametrize("name", ["goat0", "lora0"])
def test_the_reader_returns_what_load_adapter_returns(reader: AdapterReader, name: str) -> None:
    path = FIXTURE / "adapters" / name
    want = load_adapter(path, BASE_LINEARS, name="x", max_rank=64)
    assert_same(reader.read(path, BASE_LINEARS, name="x", max_rank=64, groups=GROUPS), want)


def test_the_readers_errors_are_load_adapters(reader: AdapterReader, tmp_path: Path) -> None:
    path = tmp_path / "goat0"
    shutil.copytree(FIXTURE / "adapters" / "goat0", path)
    with pytest.raises(AdapterError, match="over the configured maximum 4"):
        reader.read(path, BASE_LINEARS, name="goat0", max_rank=4, groups=GROUPS)
    (path / "adapter_model.safetensors").unlink()
    with pytest.raises(AdapterError, match=r"missing adapter_model\.safetensors"):
        reader.read(path, BASE_LINEARS, name="goat0", max_rank=64, groups=GROUPS)


def without_pool(reader: AdapterReader, monkeypatch: pytest.MonkeyPatch) -> None:
    """Values through a new scratch file per read, as where there is no memfd."""
    monkeypatch.setattr(reader._files, "take", lambda: None)


def test_no_scratch_file_is_left(reader: AdapterReader, monkeypatch: pytest.MonkeyPatch) -> None:
    without_pool(reader, monkeypatch)
    reader.read(FIXTURE / "adapters" / "goat0", BASE_LINEARS, name="goat0", max_rank=64,
                groups=GROUPS)
    child = reader._run("pid", os.getpid)  # its files are named by its pid (other readers run)
    assert not [f for folder in reader._scratch
                for f in folder.glob(f"goat-serve-reader-{child}-*")]


def test_a_reader_that_dies_fails_one_read_and_is_replaced(reader: AdapterReader) -> None:
    with pytest.raises(AdapterError, match="reader process died"):
        reader._run("crash", os._exit, 3)
    path = FIXTURE / "adapters" / "lora0"
    assert_same(reader.read(path, BASE_LINEARS, name="lora0", max_rank=64, groups=GROUPS),
                load_adapter(path, BASE_LINEARS, name="lora0"))


def test_values_are_written_back_to_back(tmp_path: Path) -> None:
    """More buffers than one writev takes (1,024), of different sizes."""
    gen = np.random.default_rng(0)
    buffers = [gen.standard_normal(i % 7 + 1).astype(np.float32) for i in range(2500)]
    _write_all(tmp_path / "values.f32", buffers)
    np.testing.assert_array_equal(np.fromfile(tmp_path / "values.f32", dtype=np.float32),
                                  np.concatenate(buffers))


def test_a_scratch_folder_that_refuses_the_values_passes_to_the_next(
        reader: AdapterReader, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """(/dev/shm full, as a container's 64 MB one can be: its write fails, the next folder's
    does not.)"""
    without_pool(reader, monkeypatch)
    monkeypatch.setattr(reader, "_scratch", [tmp_path / "not-there", tmp_path])
    path = FIXTURE / "adapters" / "goat1"
    assert_same(reader.read(path, BASE_LINEARS, name="goat1", max_rank=64, groups=GROUPS),
                load_adapter(path, BASE_LINEARS, name="goat1"))
    assert list(tmp_path.iterdir()) == []


def _mapping(read: ReadAdapter) -> str:
    """The one file all of a read's tensors are mapped from."""
    (filename,) = {t.untyped_storage().filename for image in read.images
                   for t in image.tensors()}
    assert filename is not None
    return filename


def test_values_are_mapped_not_copied(reader: AdapterReader,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """The values stay in the scratch file's pages (a mapping, its name already unlinked), so
    releasing them unmaps them instead of leaving a freed buffer in malloc's heap."""
    without_pool(reader, monkeypatch)
    read = reader.read(FIXTURE / "adapters" / "goat0", BASE_LINEARS, name="goat0",
                       max_rank=64, groups=GROUPS)
    assert not Path(_mapping(read)).exists()


@pytest.mark.skipif(not hasattr(os, "memfd_create"), reason="memfd: Linux only")
def test_a_file_is_written_again_only_once_its_values_are_released(reader: AdapterReader) -> None:
    """Reads write into the pool's memory files; one whose images are still held (its slot not
    yet written) is not written over, one whose images are released is used again."""
    def read(name: str) -> ReadAdapter:
        return reader.read(FIXTURE / "adapters" / name, BASE_LINEARS, name=name, max_rank=64,
                           groups=GROUPS)

    first, second = read("goat0"), read("lora0")
    assert _mapping(first) != _mapping(second)
    assert_same(first, load_adapter(FIXTURE / "adapters" / "goat0", BASE_LINEARS, name="goat0"))
    reused = _mapping(second)
    del second
    third = read("goat1")  # smaller than the file's earlier values: the rest is not read
    assert _mapping(third) == reused
    assert_same(third, load_adapter(FIXTURE / "adapters" / "goat1", BASE_LINEARS, name="goat1"))


@pytest.mark.skipif(not hasattr(os, "memfd_create"), reason="memfd: Linux only")
def test_the_pool_keeps_released_files_up_to_its_bytes() -> None:
    pool = ScratchPool(keep_bytes=3 << 10)
    files = [pool.take() for _ in range(3)]
    for fd in files:
        assert fd is not None
        os.ftruncate(fd, 1 << 10)
        pool.give_back(fd)
    again = pool.take()
    assert again == files[2]  # the last released comes back first
    assert again is not None
    os.ftruncate(again, 4 << 10)  # a larger read's values
    pool.give_back(again)  # over the bytes kept: closed
    with pytest.raises(OSError):
        os.fstat(again)
    pool.close()
    for fd in files[:2]:
        with pytest.raises(OSError):
            os.fstat(fd)  # type: ignore[arg-type]


@pytest.mark.skipif(not hasattr(os, "memfd_create"), reason="memfd: Linux only")
def test_the_pool_holds_at_most_max_files_open() -> None:
    """(On an accelerator the host keeps each adapter's images, and with them its file.)"""
    pool = ScratchPool(max_files=2)
    first, second = pool.take(), pool.take()
    assert first is not None and second is not None
    assert pool.take() is None  # a new scratch file for that read
    pool.give_back(first)
    assert pool.take() == first
    pool.close()
    for fd in (first, second):
        pool.give_back(fd)
        with pytest.raises(OSError):
            os.fstat(fd)


def test_a_values_file_of_the_wrong_size_is_refused(
        reader: AdapterReader, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = FIXTURE / "adapters" / "lora0"
    packed, tensors = pack(load_adapter(path, BASE_LINEARS), GROUPS, BASE_LINEARS)
    short = tmp_path / "short.f32"
    _write_all(short, [t.numpy() for t in tensors][:-1])
    monkeypatch.setattr(reader, "_run", lambda *args: (packed, short))
    with pytest.raises(AdapterError, match=r"passed \d+ bytes for \d+ 4-byte values"):
        reader.read(path, BASE_LINEARS, name="lora0", max_rank=64, groups=GROUPS)
    assert not short.exists()


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]


def _freed_bytes_kept(nbytes: int) -> int:
    """In the reader process: allocate and free `nbytes`; the free bytes glibc's heap keeps."""
    block = torch.ones(nbytes, dtype=torch.uint8)  # its pages touched, as a read's are
    del block
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    libc.mallinfo2.restype = _MallInfo2
    return int(libc.mallinfo2().fordblks)


@pytest.mark.skipif(not hasattr(ctypes.CDLL(ctypes.util.find_library("c")), "mallinfo2"),
                    reason="glibc's malloc only")
def test_the_reader_keeps_what_a_read_frees_for_the_next(reader: AdapterReader) -> None:
    """(By default glibc maps an allocation this large on its own and unmaps it when freed, so
    that the next read faults fresh pages in again.)"""
    assert reader._run("kept", _freed_bytes_kept, 20 << 20) >= 20 << 20
