"""RepConv3x3: its folded 3x3 conv equals the branch sum exactly (borders included); fold_rep swaps it in."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sharpkd.models.rep import RepConv3x3, fold_rep

SHAPES = [(1, 13, 17), (2, 7, 5)]  # (batch, H, W): odd sizes, so every border case shows


def _train_a_little(model: nn.Module, in_channels: int, steps: int = 5) -> nn.Module:
    """A few Adam steps on a random target, so every branch (edge scales, biases, ...) is non-trivial."""
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(steps):
        x = torch.randn(2, in_channels, 9, 11)
        out = model(x)
        loss = (out - torch.randn_like(out)).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def _assert_branches_nontrivial(rep: RepConv3x3) -> None:
    for p in (rep.expand_1x1.bias, rep.expand_3x3.bias, rep.edge_1x1.bias, rep.edge_scale, rep.edge_bias):
        assert p.abs().min() > 0


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
@pytest.mark.parametrize("cin, cout", [(8, 8), (6, 10), (12, 4)])
def test_fold_matches_branches(cin, cout, dtype, tol):
    torch.manual_seed(0)
    rep = _train_a_little(RepConv3x3(cin, cout), cin)
    _assert_branches_nontrivial(rep)
    assert rep.identity == (cin == cout)
    rep = rep.to(dtype)
    conv = rep.fold()
    assert isinstance(conv, nn.Conv2d) and conv.weight.dtype == dtype
    assert (conv.in_channels, conv.out_channels, conv.kernel_size, conv.padding) == (
        cin,
        cout,
        (3, 3),
        (1, 1),
    )
    with torch.no_grad():
        for n, h, w in SHAPES:
            x = torch.randn(n, cin, h, w, dtype=dtype)
            ref, out = rep(x), conv(x)
            # Relative to the output's size, so the bound means the same for every channel count.
            assert (ref - out).abs().max() <= tol * max(1.0, ref.abs().max().item())


def test_borders_need_bias_padding():
    """The fold is exact at the borders only because the 1x1 branch sees a zero-padded input (ECBSR)."""
    torch.manual_seed(1)
    rep = _train_a_little(RepConv3x3(4, 4, edges=False, identity=False), 4).double()
    x = torch.randn(1, 4, 9, 9, dtype=torch.float64)
    with torch.no_grad():
        naive = rep.conv(x) + rep.expand_3x3(nn.functional.pad(rep.expand_1x1(x), (1, 1, 1, 1)))
        folded = rep.fold()(x)
    assert torch.allclose(rep(x), folded, atol=1e-12)
    inner = (slice(None), slice(None), slice(1, -1), slice(1, -1))
    assert torch.allclose(naive[inner], folded[inner], atol=1e-12)  # same inside
    assert not torch.allclose(naive, folded, atol=1e-6)  # but zero-padding the 1x1 output is not the fold


@pytest.mark.parametrize("expand, edges", [(0, False), (0, True), (1.0, False), (0.5, True)])
def test_fold_with_branches_switched_off(expand, edges):
    torch.manual_seed(2)
    rep = _train_a_little(RepConv3x3(5, 5, expand=expand, edges=edges), 5).double()
    x = torch.randn(2, 5, 7, 5, dtype=torch.float64)
    with torch.no_grad():
        assert torch.allclose(rep(x), rep.fold()(x), atol=1e-12)


def test_online_fold_gives_the_same_outputs_and_gradients():
    """online_fold runs one conv with folded_weight_bias(): the same function, so the same training."""
    torch.manual_seed(3)
    rep = _train_a_little(RepConv3x3(6, 6), 6).double()
    x = torch.randn(2, 6, 7, 9, dtype=torch.float64)
    target = torch.randn(2, 6, 7, 9, dtype=torch.float64)
    outs, grads = [], []
    for online in (False, True):
        rep.online_fold = online
        rep.zero_grad()
        out = rep(x)
        (out - target).square().sum().backward()
        outs.append(out.detach())
        grads.append([p.grad.clone() for p in rep.parameters()])
    assert torch.allclose(*outs, atol=1e-12)
    for a, b in zip(*grads, strict=True):
        assert torch.allclose(a, b, atol=1e-10)


def test_zero_init_gives_zero_output_and_still_learns():
    torch.manual_seed(4)
    rep = RepConv3x3(8, 12).zero_init()
    x = torch.randn(1, 8, 13, 17)
    assert rep(x).abs().max() == 0
    assert rep.fold()(x).abs().max() == 0
    (rep(x) - torch.randn(1, 12, 13, 17)).square().mean().backward()
    assert rep.conv.weight.grad.abs().sum() > 0 and rep.expand_3x3.weight.grad.abs().sum() > 0
    assert rep.edge_scale.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="identity=False"):
        RepConv3x3(8, 8).zero_init()
    RepConv3x3(8, 8, identity=False).zero_init()  # fine without the identity branch
    with pytest.raises(ValueError, match="in == out"):
        RepConv3x3(8, 4, identity=True)


def _net(conv, act=nn.ReLU) -> nn.Sequential:
    """A student-like stack: head (3*4 -> 8), two body convs (8 -> 8), tail (8 -> 12), activations between."""
    return nn.Sequential(conv(12, 8), act(), conv(8, 8), act(), conv(8, 8), act(), conv(8, 12))


def _plain(cin: int, cout: int) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, padding=1)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
def test_fold_rep_whole_network(dtype, tol):
    torch.manual_seed(5)
    rep_net = _train_a_little(_net(RepConv3x3, nn.PReLU), 12).to(dtype)
    folded = fold_rep(rep_net)
    assert not any(isinstance(m, RepConv3x3) for m in folded.modules())
    assert any(isinstance(m, RepConv3x3) for m in rep_net.modules())  # a copy: the original is untouched
    with torch.no_grad():
        for n, h, w in SHAPES:
            x = torch.randn(n, 12, h, w, dtype=dtype)
            ref = rep_net(x)
            assert (ref - folded(x)).abs().max() <= tol * max(1.0, ref.abs().max().item())


def test_fold_rep_state_dict_matches_plain_network():
    rep_net, plain = _net(RepConv3x3, nn.PReLU), _net(_plain, nn.PReLU)
    folded = fold_rep(rep_net)
    expect = {k: v.shape for k, v in plain.state_dict().items()}
    assert {k: v.shape for k, v in folded.state_dict().items()} == expect
    plain.load_state_dict(folded.state_dict())  # strict: the folded weights load into the plain model
    x = torch.randn(1, 12, 13, 17)
    with torch.no_grad():
        assert torch.equal(plain(x), folded(x))


def test_fold_rep_nested_modules_and_bare_block():
    class Tiny(nn.Module):
        def __init__(self, conv):
            super().__init__()
            self.head = nn.Sequential(conv(3, 4), nn.ReLU())
            self.tail = conv(4, 3)

        def forward(self, x):
            return self.tail(self.head(x))

    folded = fold_rep(Tiny(RepConv3x3))
    assert isinstance(folded.tail, nn.Conv2d) and isinstance(folded.head[0], nn.Conv2d)
    assert folded.state_dict().keys() == Tiny(_plain).state_dict().keys()
    assert isinstance(fold_rep(RepConv3x3(3, 3)), nn.Conv2d)


@pytest.mark.parametrize("scale", [2, 3, 4])
def test_fold_at_student_channel_counts(scale):
    """Head (3*s*s -> C), body (C -> C) and zero-initialised tail (C -> 3*s*s) at every student scale."""
    torch.manual_seed(scale)
    lr, c = 3 * scale * scale, 16
    net = nn.Sequential(RepConv3x3(lr, c), nn.ReLU(), RepConv3x3(c, c), nn.ReLU(), RepConv3x3(c, lr))
    net[-1].zero_init()
    net = _train_a_little(net, lr, steps=3).double()
    folded = fold_rep(net)
    x = torch.rand(1, lr, 13, 17, dtype=torch.float64)
    with torch.no_grad():
        assert torch.allclose(net(x), folded(x), atol=1e-11)
        assert net[-1](torch.rand(1, c, 5, 5, dtype=torch.float64)).abs().max() > 0  # the tail has learnt
