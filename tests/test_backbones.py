import pytest
import torch
import torchvision
from torch.utils.flop_counter import FlopCounterMode

import backbones
from backbones.cifar_resnet import BasicBlock
from tests.conftest import randomize, tiny_backbone


def test_registry_lists_and_creates():
    names = backbones.list()
    for depth in (20, 38, 56, 74, 110, 152):
        assert f"cifar_resnet{depth}" in names
    for depth in (18, 34, 50, 101, 152):
        assert f"imagenet_resnet{depth}" in names
    assert backbones.list("cifar_*") == [n for n in names if n.startswith("cifar_")]
    net = backbones.create("cifar_resnet110", num_classes=100)
    assert net.num_blocks == 54 and net.num_classes == 100 and net.arch == "cifar_resnet110"


def test_unknown_backbone_lists_valid_names():
    with pytest.raises(ValueError, match="cifar_resnet110"):
        backbones.create("resnet9000")


@pytest.mark.parametrize("depth,blocks", [(20, 9), (38, 18), (74, 36)])
def test_cifar_structure(depth, blocks):
    net = backbones.create(f"cifar_resnet{depth}")
    assert net.num_blocks == blocks
    n = blocks // 3
    for i, block in enumerate(net.blocks):
        downsampling = i in (n, 2 * n)
        assert isinstance(block, BasicBlock)
        assert isinstance(block.shortcut, torch.nn.Sequential) == downsampling  # 1x1 projection + BN
    assert [c for c, _, _ in net.activation_shapes[1:]] == [16] * n + [32] * n + [64] * n
    assert net(torch.zeros(2, 3, 32, 32)).shape == (2, 10)


def test_bad_depth_and_width():
    with pytest.raises(ValueError, match="6n"):
        backbones.cifar_resnet.cifar_resnet(21)
    with pytest.raises(ValueError, match="width"):
        backbones.cifar_resnet.cifar_resnet(20, width=0)


def test_flops_parts_add_up_to_the_framework_count_of_the_whole_network():
    net = tiny_backbone(38)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        net(torch.zeros(1, *net.input_size))
    flops = net.flops
    assert flops.full == counter.get_total_flops()
    assert all(s == 0 for s, b in zip(flops.block_skipped, net.blocks) if isinstance(b.shortcut, torch.nn.Identity))
    assert all(0 < s < e for s, e in zip(flops.block_skipped, flops.block_executed) if s)


def test_flops_spent_of_a_route():
    net = tiny_backbone(20)
    f = net.flops
    executed = torch.tensor([[True] * 9, [False] * 9])
    spent = f.spent(executed)
    assert spent[0].item() == f.full
    assert spent[1].item() == f.stem + f.head + sum(f.block_skipped)


@pytest.mark.parametrize("depth", [18, 50])
def test_imagenet_resnet_matches_torchvision(depth):
    torch.manual_seed(0)
    net = randomize(backbones.create(f"imagenet_resnet{depth}", num_classes=7, image_size=64))
    torch.manual_seed(0)  # same construction order -> same initial weights; same BN randomisation order
    reference = randomize(getattr(torchvision.models, f"resnet{depth}")(num_classes=7))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(net(x), reference(x), rtol=1e-5, atol=1e-5)
    assert net.num_blocks == {18: 8, 50: 16}[depth]
    downsampling = [not isinstance(b.shortcut, torch.nn.Identity) for b in net.blocks]
    assert downsampling[0] == (depth == 50)  # a bottleneck's first block projects 64 -> 256 channels
    assert sum(downsampling) == (4 if depth == 50 else 3)
    assert net.flops.full > 0


def test_stochastic_depth_drops_to_the_shortcut_in_training_only():
    net = tiny_backbone(20)
    net.set_stochastic_depth(0.5)
    assert net.drop_rates[0] == 0.0 and net.drop_rates[-1] == pytest.approx(0.5)
    x = torch.randn(64, 1, 16, 16)
    with torch.no_grad():
        eval_out = net(x)
        net.train()
        for m in net.modules():  # keep BN in eval so only the drops differ
            if isinstance(m, torch.nn.BatchNorm2d):
                m.eval()
        train_out = net(x)
    assert not torch.allclose(eval_out, train_out)
    with pytest.raises(ValueError):
        net.set_stochastic_depth(1.0)


def test_activation_probe_leaves_batchnorm_statistics_alone():
    net = tiny_backbone(20)
    net.train()
    before = [m.running_mean.clone() for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    _ = net.activation_shapes
    after = [m.running_mean for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert all(torch.equal(a, b) for a, b in zip(before, after)) and net.training


def test_a_cached_backbone_is_named_by_every_option_that_changes_its_weights():
    """Regression: the cache key left out the SGD momentum, so a backbone trained with another
    momentum reused the cached one. Every TrainConfig field is either in the key or said here not to
    change the weights (a new field fails this test until it is placed)."""
    import dataclasses

    from backbones.pretrained import NAMED_WHEN_CHANGED, WEIGHT_FIELDS, weights_key
    from backbones.train import TrainConfig

    named_otherwise = {"arch", "dataset", "data_root", "download"}  # in the file name or the data's fingerprint
    named_resolved = {"precision"}  # as "auto" resolves on this device, where it is not fp32
    no_effect = {"device", "out", "resume", "log_dir", "num_workers", "progress"}
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    assert fields == set(WEIGHT_FIELDS) | set(NAMED_WHEN_CHANGED) | named_otherwise | named_resolved | no_effect
    base = TrainConfig(image_size=16, lr=0.1, precision="fp32")
    assert weights_key(dataclasses.replace(base, precision="bf16")) == weights_key(base) + "-bf16"
    # the caches made before momentum was named keep their names
    assert weights_key(base) == (
        "width0.5-image_size16-epochs10-batch_size128-lr0.1-weight_decay0.0005-drop_rate0.5-drop_schedulelinear"
        "-shift2-flipNone-seed0"
    )
    assert weights_key(dataclasses.replace(base, momentum=0.5)) == weights_key(base) + "-momentum0.5"
