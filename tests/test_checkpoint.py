import pickle

import pytest
import torch

import backbones
from backbones.checkpoint import CheckpointMismatchError, atomic_save, load_backbone, safe_load, save_backbone
from tests.conftest import tiny_backbone


def test_round_trip_keeps_weights_and_metadata(tmp_path):
    net = tiny_backbone(20)
    save_backbone(net, tmp_path / "b.pt", "digits", test_accuracy=0.5)
    loaded, meta = load_backbone(tmp_path / "b.pt", arch="cifar_resnet20", dataset="digits", num_classes=10)
    assert meta["arch"] == "cifar_resnet20" and meta["dataset"] == "digits" and meta["input_size"] == [1, 16, 16]
    assert meta["test_accuracy"] == 0.5 and "torch" in meta["versions"]
    x = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), net(x))


def test_mismatch_names_every_wrong_field(tmp_path):
    save_backbone(tiny_backbone(20), tmp_path / "b.pt", "digits")
    with pytest.raises(CheckpointMismatchError) as err:
        load_backbone(tmp_path / "b.pt", arch="cifar_resnet110", dataset="cifar10", input_size=(3, 32, 32))
    message = str(err.value)
    assert "arch: checkpoint has 'cifar_resnet20', asked for 'cifar_resnet110'" in message
    assert "dataset: checkpoint has 'digits', asked for 'cifar10'" in message
    assert "input_size" in message


class Payload:
    def __reduce__(self):
        return (print, ("unpickled arbitrary code",))


def test_pickled_objects_are_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"metadata": Payload(), "model": {}}, path)
    with pytest.raises(ValueError, match="weights_only"):
        safe_load(path)


def test_atomic_save_keeps_the_old_file_when_writing_fails(tmp_path):
    path = tmp_path / "c.pt"
    atomic_save({"x": torch.ones(2)}, path)
    with pytest.raises((pickle.PicklingError, AttributeError, TypeError)):
        atomic_save({"x": lambda: 0}, path)
    assert torch.equal(safe_load(path)["x"], torch.ones(2))
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]  # no temporary left behind


def test_missing_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_backbone(tmp_path / "nope.pt")


def test_not_a_backbone_checkpoint(tmp_path):
    atomic_save({"weights": torch.ones(1)}, tmp_path / "w.pt")
    with pytest.raises(ValueError, match="not a backbone checkpoint"):
        backbones.load_backbone(tmp_path / "w.pt")


def test_leftover_temporary_files_are_removed_by_the_next_save(tmp_path):
    from backbones.checkpoint import atomic_save

    stale = tmp_path / ".agent.pt.abc123.tmp"  # what a save killed mid-write leaves
    stale.write_bytes(b"half a checkpoint")
    other = tmp_path / ".other.pt.def456.tmp"  # another file's: not ours to remove
    other.write_bytes(b"x")
    atomic_save({"a": 1}, tmp_path / "agent.pt")
    assert not stale.exists() and other.exists() and (tmp_path / "agent.pt").is_file()


def test_a_save_leaves_the_temporary_file_of_another_running_save_alone(tmp_path):
    """Two processes writing one cache entry at once (two runs on an empty cache): the second save
    once removed the first one's temporary file mid-write, and the first one failed on its rename."""
    import os
    import subprocess
    import sys

    from backbones.checkpoint import atomic_save

    running = tmp_path / f".data.pt.{os.getppid()}.x1.tmp"  # a live process's save in progress
    running.write_bytes(b"being written")
    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    killed = tmp_path / f".data.pt.{int(ended.stdout)}.x2.tmp"  # a process that has ended: left over
    killed.write_bytes(b"half")
    atomic_save({"a": 1}, tmp_path / "data.pt")
    assert running.exists() and not killed.exists() and (tmp_path / "data.pt").is_file()
