"""The checkpoint reader checks a safetensors header itself, as safetensors does (it no longer
asks safetensors to parse it a second time): every malformed header is refused with a message,
and a header parsed in pieces is exactly the header parsed whole."""

import json
import struct
from pathlib import Path

import orjson
import pytest
import torch
from safetensors.torch import save_file

from goat_runtime.adapters import checkpoint
from goat_runtime.adapters.checkpoint import Checkpoint, CheckpointError


def write(path: Path, header: dict, data: bytes) -> Path:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


def two_tensors(**changes) -> dict:
    header = {"a": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]},
              "b": {"dtype": "F32", "shape": [4], "data_offsets": [16, 32]}}
    for key, value in changes.items():
        header[key[0]][key[2:]] = value
    return header


def test_a_safetensors_file_reads_as_written(tmp_path: Path) -> None:
    tensors = {"x": torch.randn(3, 5), "y": torch.randn(7).to(torch.bfloat16),
               "empty": torch.zeros(0, 4), "z": torch.randn(2, 2, 2).half()}
    save_file(tensors, str(tmp_path / "f.safetensors"), metadata={"format": "pt"})
    read = Checkpoint(tmp_path / "f.safetensors")
    assert read.keys() == set(tensors)
    for key, value in tensors.items():
        assert read.tensor(key).dtype == value.dtype and torch.equal(read.tensor(key), value)


@pytest.mark.parametrize("header, data, message", [
    (two_tensors(a_data_offsets=[0, 12]), bytes(32), "data_offsets do not hold its shape"),
    (two_tensors(b_data_offsets=[20, 36]), bytes(36), "leave gaps"),  # a gap
    (two_tensors(b_data_offsets=[12, 28]), bytes(28), "overlap"),
    (two_tensors(), bytes(40), "do not end with the file"),  # bytes left over
    (two_tensors(a_data_offsets=[0.0, 16]), bytes(32), "not lists of non-negative integers"),
    (two_tensors(a_data_offsets=[True, 16]), bytes(32), "not lists of non-negative integers"),
    (two_tensors(a_data_offsets=[0, 16, 0]), bytes(32), "not lists of non-negative integers"),
    (two_tensors(a_shape=[2, -2]), bytes(32), "not lists of non-negative integers"),
    (two_tensors(a_shape="2x2"), bytes(32), "not lists of non-negative integers"),
    (two_tensors(a_shape=[2 ** 40, 2 ** 40]), bytes(32), "integers (of at most 64 bits)"),
    (two_tensors(a_shape=[2 ** 30, 2 ** 30]), bytes(32), "data_offsets do not hold its shape"),
    ({"a": {"dtype": "F32", "shape": [2]}}, bytes(8), "lacks dtype, shape or data_offsets"),
    ({"a": [1, 2]}, bytes(8), "lacks dtype, shape or data_offsets"),
    ([1, 2], b"", "not a JSON object"),
    ({**two_tensors(), "__metadata__": {"n": 1}}, bytes(32), "__metadata__"),
    (two_tensors(a_dtype="I32"), bytes(32), "a has dtype I32; expected a floating point"),
    (two_tensors(a_dtype=["F32"]), bytes(32), "expected a floating point"),
])
def test_malformed_headers_are_refused(tmp_path: Path, header, data: bytes,
                                       message: str) -> None:
    path = write(tmp_path / "f.safetensors", header, data)
    with pytest.raises(CheckpointError, match=r"f\.safetensors") as error:
        Checkpoint(path)
    assert message in str(error.value)


@pytest.mark.parametrize("raw", [b"", b"\x10\x00\x00", struct.pack("<Q", 99) + b"{}",
                                 struct.pack("<Q", 5) + b"{nope"])
def test_unreadable_files_are_refused(tmp_path: Path, raw: bytes) -> None:
    (tmp_path / "f.safetensors").write_bytes(raw)
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        Checkpoint(tmp_path / "f.safetensors")


@pytest.mark.parametrize("key", ["plain", 'with },"a brace', 'ends with }', "\\u00e9"])
def test_a_header_parsed_in_pieces_is_the_header_parsed_whole(monkeypatch, key: str) -> None:
    monkeypatch.setattr(checkpoint, "_HEADER_PIECE", 64)
    header = {f"{key} {i}": {"dtype": "F32", "shape": [1, i], "data_offsets": [i, i + 1]}
              for i in range(200)}
    header["__metadata__"] = {"note": 'a "},"quoted" value'}
    raw = json.dumps(header, separators=(",", ":")).encode()
    assert checkpoint._parse_header(raw) == orjson.loads(raw) == header
    with pytest.raises(ValueError):
        checkpoint._parse_header(raw[:-1])  # a broken header fails like a whole parse


def test_twins_and_stacks_on_a_grid(tmp_path: Path) -> None:
    """Interleaved copies compare equal as one strided range, a changed byte is found, and a
    grid of keys stacks as one view; keys off the grid stack by copying."""
    values = {f"m{m}.e{e}.{kind}": torch.randn(2, 3)
              for m in range(3) for e in range(4) for kind in ("a", "b")}
    twins = {f"m{m}.t{e}.{kind}": values[f"m{m}.e{e}.{kind}"].clone()
             for m in range(3) for e in range(4) for kind in ("a", "b")}
    save_file({**values, **twins}, str(tmp_path / "f.safetensors"))
    read = Checkpoint(tmp_path / "f.safetensors")
    main = [[f"m{m}.e{e}.a" for e in range(4)] for m in range(3)]
    copies = [[f"m{m}.t{e}.a" for e in range(4)] for m in range(3)]
    assert read.grid(main) is not None and read.grid(copies) is not None
    assert read.same(copies, main) is None
    assert read.same(copies, [row[::-1] for row in main]) == "m0.t0.a"
    stacked = read.stack(main)
    assert stacked.shape == (3, 4, 2, 3) and stacked.untyped_storage().data_ptr() == \
        read.tensor("m0.e0.a").untyped_storage().data_ptr()  # a view
    assert torch.equal(stacked, torch.stack([torch.stack([values[k] for k in row])
                                             for row in main]))
    shuffled = [row[::-1] for row in main]
    assert read.grid(shuffled) is None
    assert torch.equal(read.stack(shuffled), torch.stack([torch.stack([values[k] for k in row])
                                                          for row in shuffled]))
    twins["m2.t3.b"][1, 2] += 1
    save_file({**values, **twins}, str(tmp_path / "g.safetensors"))
    read = Checkpoint(tmp_path / "g.safetensors")
    b_main = [[f"m{m}.e{e}.b" for e in range(4)] for m in range(3)]
    assert read.same([[k.replace(".e", ".t") for k in row] for row in b_main],
                     b_main) == "m2.t3.b"


def test_non_finite_values_are_found_in_any_part(tmp_path: Path) -> None:
    values = torch.zeros(3 * checkpoint.SERIAL_NUMEL)
    values[-1] = float("nan")
    save_file({"x": values}, str(tmp_path / "f.safetensors"))
    with pytest.raises(CheckpointError, match="x contains NaN or Inf"):
        Checkpoint(tmp_path / "f.safetensors")


def test_a_header_seen_before_is_checked_once(tmp_path: Path, monkeypatch) -> None:
    """Files with byte-identical headers (adapters trained alike) share one parsed and checked
    header; each file's values are still its own and still checked for NaN and Inf, and a
    refused header is refused again (only headers that passed are kept)."""
    monkeypatch.setattr(checkpoint, "_CHECKED_HEADERS", checkpoint._HeaderCache(size=2))
    checks = []
    original = Checkpoint._check_header
    monkeypatch.setattr(Checkpoint, "_check_header",
                        lambda self, *args: checks.append(self.path) or original(self, *args))
    values = [torch.randn(2, 4) for _ in range(3)]
    paths = [tmp_path / f"{i}.safetensors" for i in range(3)]
    for path, value in zip(paths, values, strict=True):
        save_file({"w": value}, str(path))
    for path, value in zip(paths, values, strict=True):
        assert torch.equal(Checkpoint(path).tensor("w"), value)
    assert checks == paths[:1]
    assert Checkpoint(paths[1]).entries is Checkpoint(paths[2]).entries

    values[1][0, 0] = float("nan")
    save_file({"w": values[1]}, str(paths[1]))
    with pytest.raises(CheckpointError, match="w contains NaN or Inf"):
        Checkpoint(paths[1])
    assert checks == paths[:1]

    bad = write(tmp_path / "bad.safetensors", two_tensors(b_data_offsets=[20, 36]), bytes(36))
    for _ in range(2):
        with pytest.raises(CheckpointError, match="leave gaps"):
            Checkpoint(bad)
    assert checks == [paths[0], bad, bad]
    # two other headers push the first out of a cache of two
    save_file({"w": torch.zeros(3)}, str(tmp_path / "x.safetensors"))
    save_file({"w": torch.zeros(5)}, str(tmp_path / "y.safetensors"))
    for name in ("x", "y", "0"):
        Checkpoint(tmp_path / f"{name}.safetensors")
    assert checks[-3:] == [tmp_path / "x.safetensors", tmp_path / "y.safetensors", paths[0]]
