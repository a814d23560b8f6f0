"""Structural re-parameterisation of 3x3 convs (RepVGG, ECBSR's edge-oriented block, SPAN's Conv3XC).

A `RepConv3x3` trains as a sum of linear branches and folds into one plain 3x3 conv for
inference, so a network built from it costs exactly what the plain network costs:

    plain 3x3            (the main branch)
    1x1 (expand) -> 3x3  (a wider linear pair: more parameters, same function class)
    1x1 -> fixed Sobel-x / Sobel-y / Laplacian depthwise, learnable per-channel scale and bias
    identity             (only when in == out)

Exactness at the borders: folding a 1x1 followed by a zero-padded 3x3 into one 3x3 is
only exact if the 1x1's output is padded with its *bias*, not with zeros (ECBSR). Here the
input is zero-padded before the 1x1 instead, which gives the same thing (a 1x1 conv maps a
zero pixel to its bias) with no bookkeeping; the 3x3 then runs without padding.

Every branch is linear in the input, so `folded_weight_bias()` is an exact (differentiable)
function of the parameters; `fold()` builds the `nn.Conv2d` and `fold_rep()` swaps it in at
the same attribute name, giving the plain model's module names and state_dict keys.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

# Fixed edge filters (ECBSR): Sobel-x, Sobel-y, Laplacian. Each sums to zero.
EDGE_MASKS = torch.tensor(
    [
        [[1.0, 0.0, -1.0], [2.0, 0.0, -2.0], [1.0, 0.0, -1.0]],
        [[1.0, 2.0, 1.0], [0.0, 0.0, 0.0], [-1.0, -2.0, -1.0]],
        [[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]],
    ]
)


class RepConv3x3(nn.Module):
    """A 3x3 conv (stride 1, padding 1, bias) trained as a sum of branches; `fold()` gives the plain conv.

    `expand`: width of the 1x1 -> 3x3 branch as a multiple of `out_channels` (0 turns it off).
    `edges`: the Sobel/Laplacian branch. `identity`: None means "when in == out".
    `online_fold`: train through `folded_weight_bias()`, one 3x3 conv per call: the same function and
    gradients as the branch sum at about the cost of the plain conv (measured 20 vs 67 ms per student
    training step on 2 CPU threads). The branches then only shape the optimisation.
    Use it where the plain model has `nn.Conv2d(cin, cout, 3, padding=1)`.

    Learning rate: with Adam every branch parameter moves by ~lr per step, so the folded kernel moves
    several times faster than a plain conv's. In short runs of the x4 student, lr 2e-3 (fine for the
    plain student) and 1e-3 killed every ReLU; 5e-4 trained.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        expand: float = 2.0,
        edges: bool = True,
        identity: bool | None = None,
        online_fold: bool = False,
    ):
        super().__init__()
        if identity is None:
            identity = in_channels == out_channels
        if identity and in_channels != out_channels:
            raise ValueError(f"identity branch needs in == out, got {in_channels} -> {out_channels}")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.identity = identity
        self.online_fold = online_fold

        self.conv = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        mid = round(expand * out_channels)
        self.expand_1x1 = nn.Conv2d(in_channels, mid, 1) if mid > 0 else None
        self.expand_3x3 = nn.Conv2d(mid, out_channels, 3) if mid > 0 else None  # input is pre-padded
        if edges:
            # One 1x1 per edge filter (as ECBSR), stored as one conv with 3 * out outputs, grouped k-major.
            self.edge_1x1 = nn.Conv2d(in_channels, 3 * out_channels, 1)
            self.edge_scale = nn.Parameter(torch.zeros(3, out_channels))
            self.edge_bias = nn.Parameter(torch.zeros(3, out_channels))
            # A constant, not a weight: kept out of the state_dict, but follows .to()/.double().
            self.register_buffer("edge_masks", EDGE_MASKS.clone(), persistent=False)
        else:
            self.edge_1x1 = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """He init on the main branch (as the plain student), small outputs from the extra branches."""
        nn.init.kaiming_normal_(self.conv.weight, nonlinearity="relu")
        nn.init.zeros_(self.conv.bias)
        if self.expand_1x1 is not None:
            # The bottleneck's features are O(1), its 3x3 starts ~10x smaller than the main branch,
            # so the block starts close to the plain conv and the branch grows as it helps.
            nn.init.kaiming_normal_(self.expand_1x1.weight, nonlinearity="linear")
            nn.init.zeros_(self.expand_1x1.bias)
            nn.init.kaiming_normal_(self.expand_3x3.weight, nonlinearity="linear")
            self.expand_3x3.weight.data.mul_(0.1)
            nn.init.zeros_(self.expand_3x3.bias)
        if self.edge_1x1 is not None:
            nn.init.kaiming_normal_(self.edge_1x1.weight, nonlinearity="linear")
            nn.init.zeros_(self.edge_1x1.bias)
            # ECBSR initialises the edge scales and biases near zero.
            nn.init.normal_(self.edge_scale, std=1e-3)
            nn.init.normal_(self.edge_bias, std=1e-3)

    @torch.no_grad()
    def zero_init(self) -> RepConv3x3:
        """Make the block output exactly zero (e.g. a residual tail: the network starts as the identity).

        The last linear map of each branch is zeroed, so the first step's gradients reach them and the
        branches grow from there. The fixed identity branch cannot be zeroed: build with identity=False.
        """
        if self.identity:
            raise ValueError("zero_init: this block has an identity branch; build it with identity=False")
        for p in (self.conv.weight, self.conv.bias):
            p.zero_()
        if self.expand_3x3 is not None:
            self.expand_3x3.weight.zero_()
            self.expand_3x3.bias.zero_()
        if self.edge_1x1 is not None:
            self.edge_scale.zero_()
            self.edge_bias.zero_()
        return self

    @torch.no_grad()
    def load_folded(self, weight: torch.Tensor, bias: torch.Tensor) -> RepConv3x3:
        """Make the block compute the plain conv (`weight`, `bias`): the main branch takes what the other
        branches do not already add, so they keep their own weights and go on learning (fine-tuning a
        folded student as rep blocks)."""
        folded_w, folded_b = self.folded_weight_bias()
        self.conv.weight.add_(weight.to(folded_w) - folded_w)
        self.conv.bias.add_(bias.to(folded_b) - folded_b)
        return self

    def _edge_kernel(self) -> torch.Tensor:
        """Depthwise kernels (3 * out, 1, 3, 3): mask k scaled per channel, in edge_1x1's output order."""
        k = self.edge_scale[:, :, None, None] * self.edge_masks[:, None]  # (3, out, 3, 3)
        return k.reshape(3 * self.out_channels, 1, 3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.online_fold:
            return F.conv2d(x, *self.folded_weight_bias(), padding=1)
        out = self.conv(x)
        if self.expand_1x1 is None and self.edge_1x1 is None:
            return out + x if self.identity else out
        # Zero-pad *before* the 1x1s: their border pixels then equal their biases, as folding assumes.
        xp = F.pad(x, (1, 1, 1, 1))
        if self.expand_1x1 is not None:
            out = out + self.expand_3x3(self.expand_1x1(xp))
        if self.edge_1x1 is not None:
            c = self.out_channels
            y = F.conv2d(self.edge_1x1(xp), self._edge_kernel(), self.edge_bias.reshape(-1), groups=3 * c)
            out = out + y.unflatten(1, (3, c)).sum(1)
        if self.identity:
            out = out + x
        return out

    def folded_weight_bias(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The single 3x3 kernel and bias equal to the sum of the branches (differentiable)."""
        weight, bias = self.conv.weight, self.conv.bias
        if self.expand_1x1 is not None:
            w1, b1 = self.expand_1x1.weight[:, :, 0, 0], self.expand_1x1.bias  # (mid, in), (mid,)
            w2, b2 = self.expand_3x3.weight, self.expand_3x3.bias  # (out, mid, 3, 3), (out,)
            weight = weight + torch.einsum("omhw,mi->oihw", w2, w1)
            bias = bias + b2 + torch.einsum("omhw,m->o", w2, b1)
        if self.edge_1x1 is not None:
            c = self.out_channels
            w1 = self.edge_1x1.weight[:, :, 0, 0].unflatten(0, (3, c))  # (3, out, in)
            b1 = self.edge_1x1.bias.unflatten(0, (3, c))  # (3, out)
            k = self._edge_kernel().reshape(3, c, 3, 3)  # (3, out, 3, 3)
            weight = weight + torch.einsum("kohw,koi->oihw", k, w1)
            bias = bias + (self.edge_bias + k.sum((2, 3)) * b1).sum(0)
        if self.identity:
            eye = torch.zeros_like(weight)
            eye[:, :, 1, 1] = torch.eye(self.out_channels, dtype=weight.dtype, device=weight.device)
            weight = weight + eye
        return weight, bias

    @torch.no_grad()
    def fold(self) -> nn.Conv2d:
        """An `nn.Conv2d(in, out, 3, padding=1)` computing the same function (same device and dtype)."""
        weight, bias = self.folded_weight_bias()
        conv = nn.Conv2d(self.in_channels, self.out_channels, 3, padding=1)
        conv = conv.to(device=weight.device, dtype=weight.dtype)
        conv.weight.copy_(weight)
        conv.bias.copy_(bias)
        return conv

    def extra_repr(self) -> str:
        mid = 0 if self.expand_1x1 is None else self.expand_1x1.out_channels
        edges = self.edge_1x1 is not None
        return f"{self.in_channels}, {self.out_channels}, mid={mid}, edges={edges}, identity={self.identity}"


def fold_rep(module: nn.Module) -> nn.Module:
    """A deep copy of `module` with every RepConv3x3 replaced by its folded Conv2d, at the same name.

    A model that uses RepConv3x3 where the plain model has a 3x3 Conv2d then has the plain
    model's module names, state_dict keys and shapes, so it saves, loads and exports as one.
    """
    if isinstance(module, RepConv3x3):
        return module.fold()
    out = copy.deepcopy(module)
    # Collect first: replacing children while iterating named_modules() would walk the new convs.
    reps = [(name, m) for name, m in out.named_modules() if isinstance(m, RepConv3x3)]
    for name, rep in reps:
        parent_name, _, child = name.rpartition(".")
        parent = out.get_submodule(parent_name) if parent_name else out
        setattr(parent, child, rep.fold())  # nn.Sequential children are named "0", "1", ...
    return out
