"""The safe checkpoint reader: tensors of every dtype/layout, wrappers, refusals."""
import io
import os
import pickle
import subprocess
import sys
import zipfile
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest

from weights_convert.export import write_pth
from weights_convert.pth import UnsafeCheckpointError, load_checkpoint, read_pth
from weights_convert.tensorfile import CheckpointError, PendingTensor, read_safetensors, write_safetensors

import torch  # noqa: E402
REPO = Path(__file__).resolve().parents[2]


def _ref(t):
    return t.float().numpy() if t.dtype == torch.bfloat16 else t.numpy()


def test_reads_every_dtype_and_layout(tmp_path):
    g = torch.Generator().manual_seed(0)
    base = torch.randn(6, 5, generator=g)
    sd = OrderedDict(
        f32=torch.randn(3, 4, generator=g),
        transposed=base.t(),  # non-contiguous strides
        sliced=base[1:5:2, 1:4],  # storage offset + strides, shares storage with `transposed`
        bf16=torch.randn(7, generator=g).to(torch.bfloat16),
        f16=torch.randn(2, 3, generator=g).half(),
        f64=torch.randn(2, generator=g).double(),
        i64=torch.arange(5),
        i32=torch.arange(4, dtype=torch.int32),
        u8=torch.arange(3, dtype=torch.uint8),
        flags=torch.tensor([True, False, True]),
        scalar=torch.tensor(2.5),
        empty=torch.zeros(0, 3),
    )
    sd["param"] = torch.nn.Parameter(torch.randn(2, 2, generator=g))
    path = tmp_path / "ck.pth"
    torch.save(sd, path)
    got = load_checkpoint(path)
    assert list(got) == list(sd)
    for key, ref in sd.items():
        arr = np.asarray(got[key])
        expect = _ref(ref.detach())
        assert arr.shape == expect.shape, key
        assert arr.dtype == expect.dtype, key
        np.testing.assert_array_equal(arr, expect, err_msg=key)
    assert got["bf16"].dtype == np.float32  # widened exactly


def test_wrappers_prefix_and_extra_entries(tmp_path):
    sd = {"module.a.weight": torch.ones(2, 2), "module.b": torch.zeros(3)}
    path = tmp_path / "wrapped.pth"
    torch.save({"model": sd, "epoch": 7, "best": np.float64(0.25), "name": b"x", "opt": {"lr": 1e-4}}, path)
    got = load_checkpoint(path)
    assert sorted(got) == ["a.weight", "b"]
    assert read_pth(path)["best"] == 0.25
    path2 = tmp_path / "state.pth"
    torch.save({"state_dict": {"x": torch.ones(1)}}, path2)
    assert list(load_checkpoint(path2)) == ["x"]


def test_state_dict_metadata_and_batchnorm(tmp_path):
    m = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    m(torch.randn(2, 3, 8, 8))  # moves the running stats and the batch counter
    path = tmp_path / "bn.pth"
    torch.save(m.state_dict(), path)  # an OrderedDict carrying `_metadata` (pickle BUILD)
    got = load_checkpoint(path)
    for k, v in m.state_dict().items():
        np.testing.assert_array_equal(np.asarray(got[k]), v.numpy(), err_msg=k)
    assert int(np.asarray(got["1.num_batches_tracked"])) == 1


def test_safetensors_roundtrip_and_library_compat(tmp_path):
    from safetensors.numpy import load_file, save_file

    rng = np.random.default_rng(0)
    arrays = {"a/kernel": rng.standard_normal((3, 5)).astype(np.float32), "b": np.arange(4, dtype=np.int64),
              "c": np.array(1.5, np.float32)}
    mine = tmp_path / "mine.safetensors"
    write_safetensors(mine, [PendingTensor(k, v.shape, v.dtype, lambda v=v: v) for k, v in arrays.items()])
    theirs = load_file(mine)  # the reference library reads what we write
    for k, v in arrays.items():
        np.testing.assert_array_equal(theirs[k], v)
    lib = tmp_path / "lib.safetensors"
    save_file({"x.weight": arrays["a/kernel"]}, lib)
    got, _ = read_safetensors(lib)  # and we read what it writes
    np.testing.assert_array_equal(np.asarray(got["x.weight"]), arrays["a/kernel"])
    assert list(load_checkpoint(lib)) == ["x.weight"]


def test_native_pth_writer_loads_in_torch(tmp_path):
    rng = np.random.default_rng(1)
    sd = {"w": rng.standard_normal((4, 3)).astype(np.float32), "n": np.array(3, np.int64),
          "h": rng.standard_normal(5).astype(np.float16), "m": np.array([True, False]), "e": np.zeros((0,), np.float32)}
    out = tmp_path / "native.pth"
    assert write_pth(sd, out, writer="native") == "native"
    for mmap in (False, True):
        loaded = torch.load(out, weights_only=True, mmap=mmap)
        assert list(loaded) == list(sd)
        for k, v in sd.items():
            assert tuple(loaded[k].shape) == v.shape
            np.testing.assert_array_equal(loaded[k].numpy(), v)
    with pytest.raises(FileExistsError):
        write_pth(sd, out)


def _malicious_pth(path: Path, marker: Path) -> None:
    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    buf = io.BytesIO()
    pickle.dump({"image_encoder.pos_embed": Payload()}, buf, protocol=2)
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", buf.getvalue())
        zf.writestr("archive/version", "3\n")


def test_malicious_pickle_is_refused_without_running(tmp_path):
    marker = tmp_path / "pwned"
    bad = tmp_path / "bad.pth"
    _malicious_pth(bad, marker)
    with pytest.raises(UnsafeCheckpointError, match=r"os\.system|posix\.system"):
        load_checkpoint(bad)
    assert not marker.exists()
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "weights_convert", "convert", "--checkpoint", str(bad),
                           "--out", str(out)], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 2, proc.stderr
    assert "refusing to load" in proc.stderr and proc.stderr.count("\n") == 1
    assert not marker.exists() and not out.exists()


@pytest.mark.parametrize("payload", ["eval", "module", "build"])
def test_other_code_paths_are_refused(tmp_path, payload):
    if payload == "eval":
        data = b"\x80\x02cbuiltins\neval\nX\x04\x00\x00\x001+1\x85R."
    elif payload == "module":  # torch.save(model) pickles the module class
        buf = io.BytesIO()
        pickle.dump(torch.nn.Linear(2, 2), buf, protocol=2)
        data = buf.getvalue()
    else:  # BUILD (set state) on something other than an OrderedDict
        data = b"\x80\x02}}b."
    path = tmp_path / "x.pth"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", data)
    with pytest.raises(CheckpointError):
        read_pth(path)


def test_legacy_and_foreign_files_are_refused(tmp_path):
    legacy = tmp_path / "legacy.pth"
    torch.save({"a": torch.ones(2)}, legacy, _use_new_zipfile_serialization=False)
    with pytest.raises(CheckpointError, match="legacy"):
        load_checkpoint(legacy)
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"hello world, not a checkpoint")
    with pytest.raises(CheckpointError, match="not a PyTorch"):
        load_checkpoint(junk)
    with pytest.raises(CheckpointError, match="no such file"):
        load_checkpoint(tmp_path / "missing.pth")
    no_tensors = tmp_path / "none.pth"
    torch.save({"epoch": 3}, no_tensors)
    with pytest.raises(CheckpointError, match="no state dict"):
        load_checkpoint(no_tensors)
