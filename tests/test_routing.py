import torch

from skipnet_env.routing import masked_forward, route_block, routed_forward
from tests.conftest import tiny_backbone


def test_all_executed_reproduces_the_backbone():
    net = tiny_backbone(38)
    x = torch.randn(16, 1, 16, 16)
    with torch.no_grad():
        full = net(x)
        routed = routed_forward(net, x, torch.ones(16, net.num_blocks, dtype=torch.bool))
    torch.testing.assert_close(routed, full, rtol=1e-5, atol=1e-5)


def test_skipped_block_gives_its_shortcut_output():
    net = tiny_backbone(20)
    h = torch.randn(4, 4, 16, 16)
    identity_block, projection_block = net.blocks[1], net.blocks[3]
    with torch.no_grad():
        assert torch.equal(route_block(identity_block, h, torch.zeros(4, dtype=torch.bool)), h)
        projected = route_block(projection_block, h, torch.zeros(4, dtype=torch.bool))
        torch.testing.assert_close(projected, projection_block.shortcut(h))
        assert projected.shape == (4, 8, 8, 8)


def test_mixed_rows_match_per_row_execution_and_the_masked_forward():
    net = tiny_backbone(20)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, 1, 16, 16, generator=g)
    execute = torch.rand(32, net.num_blocks, generator=g) < 0.5
    with torch.no_grad():
        routed = routed_forward(net, x, execute)
        masked = masked_forward(net, x, execute)
        rows = []
        for b in range(32):  # reference: one image at a time, plain Python
            h = net.stem(x[b : b + 1])
            for i, block in enumerate(net.blocks):
                h = block(h) if execute[b, i] else block.shortcut(h)
            rows.append(net.head(h))
    torch.testing.assert_close(routed, torch.cat(rows), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(routed, masked, rtol=1e-5, atol=1e-5)


def test_gradients_flow_through_executed_rows():
    net = tiny_backbone(20)
    x = torch.randn(8, 1, 16, 16, requires_grad=True)
    execute = torch.tensor([True, False] * 4)[:, None].expand(8, net.num_blocks)
    routed_forward(net, x, execute).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert net.blocks[1].conv1.weight.grad.abs().sum() > 0


def test_bottleneck_backbone_routes_like_its_masked_forward():
    import backbones
    from tests.conftest import randomize

    torch.manual_seed(0)
    net = randomize(backbones.create("imagenet_resnet50", num_classes=3, image_size=32))
    x = torch.randn(6, 3, 32, 32)
    execute = torch.rand(6, net.num_blocks, generator=torch.Generator().manual_seed(1)) < 0.5
    execute[:, 0] = True
    with torch.no_grad():
        torch.testing.assert_close(
            routed_forward(net, x, execute), masked_forward(net, x, execute), rtol=1e-4, atol=1e-4
        )
        everything = torch.ones(6, net.num_blocks, dtype=torch.bool)
        torch.testing.assert_close(routed_forward(net, x, everything), net(x), rtol=1e-5, atol=1e-5)


def test_gathered_rows_are_the_rows_in_the_activations_layout():
    """A channels_last activation (a ViT's token grid, the CUDA engine's) is gathered through its
    NHWC view: the same values as indexing, still channels_last; a contiguous one stays contiguous."""
    from skipnet_env.routing import gather_rows

    h = torch.randn(10, 2, 3, 6).permute(0, 3, 1, 2)  # (B, C=6, 2, 3) laid out token by token
    rows = torch.tensor([7, 1, 4])
    got = gather_rows(h, rows)
    assert torch.equal(got, h[rows]) and got.is_contiguous(memory_format=torch.channels_last)
    plain = h.contiguous()
    assert torch.equal(gather_rows(plain, rows), plain[rows]) and gather_rows(plain, rows).is_contiguous()
