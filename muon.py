"""
Muon, the optimizer of the weight matrices in the CPU recipes: orthogonalized momentum.

Muon (Jordan et al., 2024) is not in the paper. Both short CPU trainings use it, because in a few
minutes it learns more than AdamW does: train.py for the matrices of the tiny ARPG's two passes,
tokenizer.py for the convolution kernels of the small VQ tokenizer (a kernel (out, in, kh, kw)
is the (out, in * kh * kw) matrix it multiplies its input patches by). Everything else (embeddings,
norms, biases, the codebook, the first and last layers) stays with AdamW.
"""

import torch


def orthogonalize(updates, steps=5):
    """Roughly the nearest semi-orthogonal matrix to each of `updates` (..., m, n): the same
    singular vectors, with singular values moved near 1 (about 0.7-1.2, which is all Muon needs).

    After dividing by the Frobenius norm every singular value s is in (0, 1]; each iteration maps
    X to a X + b (X X^T) X + c (X X^T)^2 X, which applies the odd polynomial a s + b s^3 + c s^5
    to every singular value. Muon's coefficients make that polynomial steep near 0, so five rounds
    bring every singular value above ~0.0015 of the Frobenius norm into 0.7-1.2; they were tuned
    for speed, not to converge exactly to 1. (Directions far weaker than that stay weak.)
    """
    x = updates.reshape(-1, *updates.shape[-2:])                         # (batch, m, n): baddbmm wants 3-D
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + 1e-7)
    tall = x.shape[-2] > x.shape[-1]
    if tall:                                                              # iterate on the smaller Gram matrix
        x = x.mT
    for _ in range(steps):
        gram = x @ x.mT                                                   # (batch, k, k), k = min(m, n)
        # x <- 3.4445 x + (-4.7750 gram + 2.0315 gram @ gram) @ x, each scaled sum folded into a
        # multiply (baddbmm(c, a, b, beta, alpha) = beta * c + alpha * a @ b): 25.5 -> 18.3 ms of
        # orthogonalizing in a ~200 ms tiny training step
        polynomial = torch.baddbmm(gram, gram, gram, beta=-4.7750, alpha=2.0315)
        x = torch.baddbmm(x, polynomial, x, beta=3.4445)
    return (x.mT if tall else x).reshape(updates.shape)


class Muon(torch.optim.Optimizer):
    """Muon for weight matrices and convolution kernels: Nesterov momentum, then the update matrix
    is orthogonalized, so that it moves the weights by the same amount in every direction it spans.

    Plain momentum updates of a network's matrices are dominated by a few directions; making
    every singular value ~1 lets the rare directions learn as fast as the common ones. In a
    600-step run of the tiny ARPG (an early recipe) the final loss fell from 1.203 (AdamW) to
    1.085 (train.py, RECIPES); the small tokenizer's held-out PSNR rose by 1.3-2.0 dB in 1200-step
    runs (tokenizer.py, make_tokenizer_optimizers). No weight decay: the matrices it trains get
    none (train.py, make_optimizers). The update of an (out, in) matrix is scaled by
    sqrt(max(1, out / in)), Muon's usual correction for tall matrices. Parameters of one shape are
    orthogonalized together, as one batch, in `dtype`: bf16 is enough for singular values that only
    need to land in 0.7-1.2 (Muon's own code uses it), and on a CPU with bf16 instructions it made
    the `tiny` step 8% faster (2-core AMD EPYC: 195 -> 178 ms).
    """

    def __init__(self, params, lr, momentum=0.95, dtype=torch.float32):
        super().__init__(params, dict(lr=lr, momentum=momentum))
        if any(p.ndim < 2 for group in self.param_groups for p in group["params"]):
            raise ValueError("Muon trains matrices and convolution kernels (2 or more dims); give vectors and "
                             "scalars to AdamW")
        self.dtype = dtype

    @torch.no_grad()
    def step(self, closure=None):
        """One update; `closure`, as for torch's optimizers, recomputes the loss and its gradients
        first (with gradients on) and its loss is returned."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            by_shape = {}
            for p in group["params"]:
                if p.grad is not None:
                    by_shape.setdefault(p.shape, []).append(p)
            for shape, params in by_shape.items():
                rows, cols = shape[0], params[0][0].numel()              # a kernel (out, in, kh, kw): (out, in*kh*kw)
                nesterov = []
                for p in params:
                    if "momentum" not in self.state[p]:
                        self.state[p]["momentum"] = torch.zeros_like(p)
                    momentum = self.state[p]["momentum"].mul_(group["momentum"]).add_(p.grad)
                    nesterov.append((p.grad + group["momentum"] * momentum).reshape(rows, cols))
                updates = orthogonalize(torch.stack(nesterov).to(self.dtype)) * max(1.0, rows / cols) ** 0.5
                for p, update in zip(params, updates):
                    p.add_(update.view(shape).to(p.dtype), alpha=-group["lr"])
        return loss
