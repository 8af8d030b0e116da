"""Memory-mapped safetensors: the same tensors as safetensors' own reader, damaged files as one error,
and released pages read back unchanged."""

from __future__ import annotations

import pytest
import torch
from circuit_catalog.ingest.mapped_weights import read_mapped, release_mapped
from safetensors.torch import load_file, save_file

from circuit_catalog.errors import TranscoderError


def test_mapped_tensors_equal_safetensors_own_reader(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {
        "W_enc": torch.randn(7, 5, generator=g), "half": torch.randn(3, 4, generator=g).half(),
        "brain": torch.randn(6, generator=g).bfloat16(), "ids": torch.arange(9).reshape(3, 3),
        "mask": torch.rand(5, generator=g) > 0.5, "scalar": torch.tensor(2.5), "empty": torch.zeros(0, 4),
    }
    path = tmp_path / "w.safetensors"
    save_file(tensors, path)
    mapped, reference = read_mapped(path), load_file(path)
    assert set(mapped) == set(reference)
    for name, t in reference.items():
        assert mapped[name].dtype == t.dtype and mapped[name].shape == t.shape
        assert torch.equal(mapped[name], t), name
    mapped["W_enc"].mul_(2)  # copy-on-write: the file keeps its values, the tensor its change
    assert torch.equal(load_file(path)["W_enc"], tensors["W_enc"])
    release_mapped()
    assert torch.equal(mapped["W_enc"], 2 * tensors["W_enc"])  # a released modified page is not lost
    assert torch.equal(mapped["ids"], tensors["ids"])  # released clean pages are read again from the file


@pytest.mark.parametrize("cut", [4, 20, -3])
def test_truncated_files_are_one_error(tmp_path, cut):
    path = tmp_path / "w.safetensors"
    save_file({"W": torch.ones(16, 16)}, path)
    data = path.read_bytes()
    path.write_bytes(data[:cut] if cut > 0 else data[:cut])
    with pytest.raises(TranscoderError, match="truncated") as info:
        read_mapped(path)
    assert "\n" not in str(info.value)


def test_binding_keeps_the_mapped_views_on_the_cpu_in_float32(saelens_dir, gpt2):
    """The bounded-memory pullback ingest needs the weights to stay views of the files once bound to a CPU float32
    model; casting (or moving) copies them, and leaves the files' views as they were."""
    from circuit_catalog.ingest.transcoder_formats import load_transcoders

    tset = load_transcoders(saelens_dir)
    pointers = {(tc.layer, name): getattr(tc, name).data_ptr() for tc in tset for name in ("W_enc", "W_dec")}
    mapped = tset[1].W_enc
    assert not mapped.untyped_storage().resizable()  # a numpy-mapped buffer, not torch-allocated memory
    tset.bind(gpt2)
    assert {(tc.layer, name): getattr(tc, name).data_ptr() for tc in tset for name in ("W_enc", "W_dec")} == pointers
    tset.to(dtype=torch.bfloat16)
    assert tset[1].W_enc.dtype == torch.bfloat16 and tset[1].W_enc.data_ptr() != pointers[1, "W_enc"]
    torch.testing.assert_close(tset[1].W_enc.float(), mapped, rtol=2**-8, atol=0)


def _resident_kib(path) -> int:
    """Resident KiB of this process's mappings of `path` (/proc/self/smaps)."""
    total, inside = 0, False
    for line in open("/proc/self/smaps"):
        if "-" in line.split(" ", 1)[0]:  # a mapping's header line: address range ... path
            inside = line.rstrip().endswith(str(path))
        elif inside and line.startswith("Rss:"):
            total += int(line.split()[1])
    return total


def test_release_keeps_the_files_asked_for(tmp_path):
    """`release_mapped(keep=...)` hands back the pages of every mapped file but those behind the kept tensors (the
    pullback ingest keeps a CLT source's decoder file resident while it runs through its readers)."""
    import os

    if not os.path.exists("/proc/self/smaps"):
        pytest.skip("no /proc/self/smaps to read residency from")
    paths = [tmp_path / "kept.safetensors", tmp_path / "released.safetensors"]
    for p in paths:
        save_file({"W": torch.ones(1024, 1024)}, p)
    kept, released = (read_mapped(p)["W"] for p in paths)
    assert kept.sum() == released.sum() == 1024 * 1024  # touch every page
    before = [_resident_kib(p) for p in paths]
    assert min(before) >= 4000
    release_mapped(keep=(kept[3:],))  # any view into the file keeps it
    after = [_resident_kib(p) for p in paths]
    if after[1] == before[1]:
        pytest.skip("the kernel refused MADV_PAGEOUT")
    assert after[0] == before[0] and after[1] < before[1] / 4
    assert released.sum() == 1024 * 1024  # read again from the file
