"""muon.py: the Newton-Schulz orthogonalization and Muon's step, against recomputations."""

import pytest
import torch

from muon import Muon, orthogonalize


def test_orthogonalize_keeps_singular_vectors_and_moves_singular_values_near_one():
    """Wide, tall and batched matrices with singular values spread over 0.02-1 (times any scale):
    in the input's singular bases the result is diagonal (the same singular vectors), and every
    singular value is now between 0.6 and 1.25."""
    torch.manual_seed(0)
    for shape in [(40, 100), (100, 40), (3, 24, 24)]:
        k = min(shape[-2:])
        u = torch.linalg.qr(torch.randn(*shape[:-1], k, dtype=torch.float64)).Q      # (..., m, k)
        v = torch.linalg.qr(torch.randn(*shape[:-2], shape[-1], k, dtype=torch.float64)).Q  # (..., n, k)
        singular_values = torch.logspace(-1.7, 0, k, dtype=torch.float64)
        updates = 1e-3 * u @ torch.diag(singular_values) @ v.mT
        in_bases = u.mT @ orthogonalize(updates) @ v                      # (..., k, k)
        diagonal = in_bases.diagonal(dim1=-2, dim2=-1)
        assert (in_bases - torch.diag_embed(diagonal)).abs().max() < 1e-9, f"{shape}: singular vectors changed"
        assert diagonal.min() > 0.6 and diagonal.max() < 1.25, f"{shape}: singular values {diagonal.aminmax()}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_muon_steps_each_matrix_by_its_own_orthogonalized_nesterov_momentum(dtype):
    """Two steps of Muon on two same-shaped matrices (orthogonalized as one batch), a tall one and
    two convolution kernels equal a recomputation, matrix by matrix, a kernel (out, in, kh, kw) as
    its (out, in*kh*kw) matrix: m = 0.95 m + g; w -= lr * orth(g + 0.95 m) * sqrt(max(1, out/in)),
    with orth in fp32 or in bf16 (to bf16 precision, then)."""
    torch.manual_seed(0)
    weights = [torch.randn(8, 8), torch.randn(8, 8), torch.randn(24, 8),      # matrices: two of one shape, a tall one
               torch.randn(4, 2, 3, 3), torch.randn(24, 2, 1, 1)]             # kernels: (4, 18) and a tall (24, 2)
    params = [torch.nn.Parameter(w.clone()) for w in weights]
    optimizer = Muon(params, lr=0.1, dtype=dtype)
    momenta = [torch.zeros_like(w) for w in weights]
    for _ in range(2):
        grads = [torch.randn_like(w) for w in weights]
        for p, g in zip(params, grads):
            p.grad = g.clone()
        optimizer.step()
        for i, g in enumerate(grads):
            momenta[i] = 0.95 * momenta[i] + g
            matrix = (g + 0.95 * momenta[i]).flatten(1)                   # (out, in) or (out, in*kh*kw)
            scale = max(1.0, matrix.shape[0] / matrix.shape[1]) ** 0.5
            weights[i] = weights[i] - 0.1 * orthogonalize(matrix.to(dtype)).float().view_as(g) * scale
    tolerance = 1e-6 if dtype == torch.float32 else 2e-3  # bf16: 2e-4 off here; orthogonalizing in fp32, 6e-3
    for p, w in zip(params, weights):
        assert p.dtype == torch.float32, p.dtype
        torch.testing.assert_close(p.detach(), w, atol=tolerance, rtol=1e-5,
                                   msg=lambda m: f"{tuple(w.shape)} weight vs its recomputation, {dtype}: {m}")


def test_muon_refuses_vectors_and_scalars():
    """A bias or a scalar given to Muon is refused at once, not orthogonalized as an (n, 1) matrix
    (or failing inside step())."""
    for shape in ((6,), ()):
        with pytest.raises(ValueError, match="Muon trains matrices and convolution kernels"):
            Muon([torch.nn.Parameter(torch.randn(4, 4)), torch.nn.Parameter(torch.randn(shape))], lr=0.1)


def test_muon_step_takes_a_closure_as_torch_optimizers_do():
    """step(closure) evaluates the closure with gradients on (step itself runs without), returns
    its loss, and makes the update that step() makes from the same gradients."""
    torch.manual_seed(0)
    weight, target = torch.nn.Parameter(torch.randn(6, 4)), torch.randn(6, 4)
    start = weight.detach().clone()
    twin = torch.nn.Parameter(start.clone())
    optimizer, twin_optimizer = Muon([weight], lr=0.1), Muon([twin], lr=0.1)

    def closure():
        optimizer.zero_grad()
        loss = ((weight - target) ** 2).sum()
        loss.backward()
        return loss
    loss = optimizer.step(closure)
    twin_loss = ((twin - target) ** 2).sum()
    twin_loss.backward()
    assert twin_optimizer.step() is None, "a step without a closure should return None"
    assert loss is not None and loss.item() == twin_loss.item(), (loss, twin_loss)
    assert torch.equal(weight, twin) and not torch.equal(weight, start), "not the same update, or none"
