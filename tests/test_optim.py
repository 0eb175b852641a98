"""sigmax_fl.optim: the same weights as torch.optim, step for step, without its start-up cost."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from sigmax_fl import optim, task
from sigmax_fl.model import build_model


def _trained(make: object, steps: int = 40) -> list[torch.Tensor]:
    """The default model after ``steps`` minibatch steps of MSE on fixed random data."""
    torch.manual_seed(0)
    X, y = torch.randn(256, 50), torch.randn(256)
    model = build_model("trading-mlp", seed=3)
    opt = make(list(model.parameters()))
    for i in range(steps):
        rows = slice((i * 32) % 256, (i * 32) % 256 + 32)
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.mse_loss(model(X[rows]), y[rows]).backward()
        opt.step()
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize(
    ("ours", "theirs"),
    [
        (lambda p: optim.Adam(p, lr=1e-3), lambda p: torch.optim.Adam(p, lr=1e-3)),
        (lambda p: optim.Adam(p, lr=0.05), lambda p: torch.optim.Adam(p, lr=0.05)),
        (
            lambda p: optim.SGD(p, lr=0.01, momentum=0.9),
            lambda p: torch.optim.SGD(p, lr=0.01, momentum=0.9),
        ),
    ],
    ids=["adam", "adam-large-step", "sgd-momentum"],
)
def test_bit_identical_to_torch_optim(ours: object, theirs: object) -> None:
    got, want = _trained(ours), _trained(theirs)
    # The weights moved, and by exactly what torch.optim moves them.
    assert not torch.equal(got[0], build_model("trading-mlp", seed=3).net[0].weight)
    for a, b in zip(got, want, strict=True):
        assert torch.equal(a, b)


def test_a_parameter_without_gradient_is_left_alone() -> None:
    frozen, trained = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(3))
    opt = optim.Adam([frozen, trained], lr=0.1)
    trained.sum().backward()
    opt.step()
    assert torch.equal(frozen, torch.ones(3)) and not torch.equal(trained, torch.ones(3))
    assert opt.steps == [0, 1]


def test_training_never_imports_torch_dynamo() -> None:
    # A fresh process, as a deployed ClientApp is: a local epoch must not pull in torch._dynamo.
    code = (
        "import sys, numpy as np\n"
        "from sigmax_fl import task\n"
        "from sigmax_fl.model import build_model\n"
        "X = np.random.default_rng(0).normal(size=(64, 50)).astype(np.float32)\n"
        "for name in ('adam', 'sgd'):\n"
        "    task.train(build_model('trading-mlp'), X, X[:, 0], epochs=1, batch_size=16,\n"
        "               learning_rate=1e-3, optimizer=name)\n"
        "print(sorted(m for m in sys.modules if m.startswith('torch._dynamo')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_unknown_optimizer_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown optimizer 'adagrad'"):
        task.make_optimizer("adagrad", [torch.nn.Parameter(torch.ones(1))], 0.1)
