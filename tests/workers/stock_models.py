"""Small deterministic models for the single-factor tests (no boft_plugin import: used by the stock-PEFT child)."""

import torch


class MLP(torch.nn.Module):
    """Linear widths 64 -> 96 -> 96 -> 24 (96 = 3 * 32: not a power of two)."""

    targets = ["lin0", "lin1", "head"]

    def __init__(self, bias=True):
        super().__init__()
        self.lin0 = torch.nn.Linear(64, 96, bias=bias)
        self.lin1 = torch.nn.Linear(96, 96, bias=bias)
        self.head = torch.nn.Linear(96, 24, bias=bias)

    def forward(self, x):
        return self.head(torch.relu(self.lin1(torch.relu(self.lin0(x)))))

    @staticmethod
    def example(seed=1):
        return torch.randn(3, 5, 64, generator=torch.Generator().manual_seed(seed))


class ConvNet(torch.nn.Module):
    """Two 3x3 convolutions (filter width 16 * 9 = 144) and an unadapted linear head."""

    targets = ["c1", "c2"]

    def __init__(self, bias=True):
        super().__init__()
        self.c1 = torch.nn.Conv2d(16, 16, 3, padding=1, bias=bias)
        self.c2 = torch.nn.Conv2d(16, 8, 3, padding=1, bias=bias)
        self.head = torch.nn.Linear(8 * 6 * 6, 10, bias=bias)

    def forward(self, x):
        return self.head(torch.relu(self.c2(torch.relu(self.c1(x)))).flatten(1))

    @staticmethod
    def example(seed=1):
        return torch.randn(2, 16, 6, 6, generator=torch.Generator().manual_seed(seed))


KINDS = {"linear": MLP, "conv": ConvNet}


def build(kind, bias=True, seed=0):
    torch.manual_seed(seed)
    return KINDS[kind](bias=bias).eval()
