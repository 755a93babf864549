"""Cross-entropy through a frozen head with its gradient computed in the forward: same loss and gradient as autograd."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from restora.kernels.head_loss import frozen_head, frozen_head_ce


def _case(bias: bool = False) -> tuple[nn.Linear, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    head = nn.Linear(32, 300, bias=bias).requires_grad_(False)
    with torch.no_grad():
        head.weight.normal_(0, 0.3, generator=g)
    h = torch.randn(70, 32, generator=g)
    y = torch.randint(0, 300, (70,), generator=g)
    y[::7] = -100  # ignored positions
    return head, h, y


def _reference(head: nn.Linear, h: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    h = h.clone().requires_grad_(True)
    loss = F.cross_entropy(head(h).float(), y, reduction="sum")
    loss.backward()
    return loss.detach(), h.grad


@pytest.mark.parametrize("chunk", [16, 1024])
@pytest.mark.parametrize("bias", [False, True])
def test_same_loss_and_gradient_as_autograd_fp32(chunk, bias):
    head, h, y = _case(bias)
    want_loss, want_grad = _reference(head, h, y)
    x = h.clone().requires_grad_(True)
    loss = frozen_head_ce(head, x, y, chunk)
    (2.5 * loss).backward()  # the incoming gradient scales dL/dh
    torch.testing.assert_close(loss, want_loss, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(x.grad, 2.5 * want_grad, rtol=1e-4, atol=1e-5)
    assert float(x.grad[::7].abs().sum()) == 0.0  # ignored rows get no gradient


def test_bf16_autocast_matches_autograd_rounding():
    head, h, y = _case()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want_loss, want_grad = _reference(head, h, y)
        x = h.clone().requires_grad_(True)
        loss = frozen_head_ce(head, x, y, 32)
    loss.backward()
    torch.testing.assert_close(loss, want_loss, rtol=1e-6, atol=1e-3)  # the same bf16 logits, fp32 softmax
    torch.testing.assert_close(x.grad, want_grad, rtol=2e-2, atol=2e-3)


def test_fp32_head_under_autocast_is_cast_once_and_recast_when_changed():
    import restora.kernels.head_loss as hl

    head, h, y = _case()

    def kept() -> torch.Tensor | None:
        return hl._CASTS.find(head, (head.weight,), torch.bfloat16)

    with torch.autocast("cpu", dtype=torch.bfloat16):
        first = frozen_head_ce(head, h, y, 32)
        cast = kept()
        assert cast is not None and cast.dtype == torch.bfloat16 and torch.equal(cast, head.weight.bfloat16())
        assert torch.equal(frozen_head_ce(head, h, y, 32), first) and kept() is cast
        with torch.no_grad():
            head.weight.mul_(0.5)  # in place: the version moves, the cast is made again
        want, _ = _reference(head, h, y)
        torch.testing.assert_close(frozen_head_ce(head, h, y, 32), want, rtol=1e-6, atol=1e-3)
        assert kept() is not None and kept() is not cast


def test_no_grad_computes_the_loss_only():
    head, h, y = _case()
    with torch.no_grad():
        loss = frozen_head_ce(head, h, y)
    torch.testing.assert_close(loss, _reference(head, h, y)[0], rtol=1e-5, atol=1e-4)


def test_which_heads_are_frozen():
    head, _, _ = _case()
    assert frozen_head(head)
    assert not frozen_head(nn.Linear(4, 4))  # trainable weight: autograd must see the logits
    assert not frozen_head(nn.Sequential(nn.Linear(4, 4).requires_grad_(False)))  # not a plain linear


def test_compiled_elementwise_part_matches(monkeypatch):
    """Large chunks run the element-wise part compiled: same loss and gradient."""
    pytest.importorskip("torch._inductor")
    import restora.kernels.head_loss as hl

    head, h, y = _case()
    want_loss, want_grad = _reference(head, h, y)
    monkeypatch.setattr(hl, "COMPILE_MIN", 1)
    monkeypatch.setattr(hl, "_compiled", None)
    x = h.clone().requires_grad_(True)
    loss = frozen_head_ce(head, x, y, 32)
    loss.backward()
    assert hl._compiled is not None and hl._compiled is not hl._ce_and_grad
    torch.testing.assert_close(loss, want_loss, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(x.grad, want_grad, rtol=1e-4, atol=1e-5)


def test_a_failing_compile_falls_back_to_the_same_arithmetic(monkeypatch):
    import restora.kernels.head_loss as hl

    def broken(*args, **kwargs):
        raise RuntimeError("no compiler here")

    head, h, y = _case()
    want_loss, want_grad = _reference(head, h, y)
    monkeypatch.setattr(hl, "COMPILE_MIN", 1)
    monkeypatch.setattr(hl, "_compiled", broken)
    x = h.clone().requires_grad_(True)
    with pytest.warns(UserWarning, match="torch.compile of the loss failed"):
        loss = frozen_head_ce(head, x, y, 32)
    loss.backward()
    assert hl._compiled is hl._ce_and_grad  # later chunks run uncompiled without retrying
    torch.testing.assert_close(loss, want_loss, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(x.grad, want_grad, rtol=1e-4, atol=1e-5)
