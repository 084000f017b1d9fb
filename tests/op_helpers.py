"""Shared helpers for the op tests: random inputs, the fp64 reference run, a verbose allclose."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from steer_fast.ops import reference_post_block_steer

# Errors are measured relative to the largest magnitude of the reference tensor, so that one
# tolerance serves values of every size. fp32: 1e-5 (observed up to ~1.3e-6).
# bf16 / fp16: the inputs are rounded to the low precision and the reference runs in fp64 on the
# rounded values, without rounding h = residual + hidden (a real low-precision block stores h
# rounded, and so does the op). Observed worst cases over the parametrised shapes: bf16 1.2e-2
# (dD on the Triton path; h and out carry a bf16 ulp, 2^-8 relative), fp16 9e-4. The bounds
# leave about 2x headroom.
TOLERANCES = {
    torch.float32: 1e-5,
    torch.float16: 2e-3,
    torch.bfloat16: 2.5e-2,
}


@dataclass
class OpInputs:
    hidden: torch.Tensor
    down_weight: torch.Tensor
    up_weight: torch.Tensor
    down_bias: torch.Tensor | None
    up_bias: torch.Tensor | None
    residual: torch.Tensor | None

    def tensors(self) -> list[torch.Tensor | None]:
        return [
            self.hidden,
            self.down_weight,
            self.up_weight,
            self.down_bias,
            self.up_bias,
            self.residual,
        ]

    def converted(self, dtype: torch.dtype) -> OpInputs:
        """Detached leaf copies in ``dtype`` that require grad."""

        def leaf(t):
            return None if t is None else t.detach().to(dtype).requires_grad_()

        return OpInputs(*[leaf(t) for t in self.tensors()])


def make_inputs(
    shape: tuple[int, ...],
    rank: int,
    *,
    down_bias: bool = True,
    up_bias: bool = True,
    residual: bool = True,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> OpInputs:
    """Random inputs at a realistic scale: z = O(1), a U^T = O(1)."""
    hidden_size = shape[-1]

    def randn(*size, scale=1.0):
        return (torch.randn(*size, dtype=torch.float64) * scale).to(device=device, dtype=dtype)

    return OpInputs(
        hidden=randn(*shape),
        down_weight=randn(rank, hidden_size, scale=hidden_size**-0.5),
        up_weight=randn(hidden_size, rank, scale=rank**-0.5),
        down_bias=randn(rank, scale=0.5) if down_bias else None,
        up_bias=randn(hidden_size, scale=0.5) if up_bias else None,
        residual=randn(*shape) if residual else None,
    ).converted(dtype)


def run_op(fn, inputs: OpInputs, grad_out: torch.Tensor, **kwargs):
    """Forward ``fn`` on ``inputs``, backward with ``grad_out``; (out, [grads or None])."""
    out = fn(
        inputs.hidden,
        inputs.down_weight,
        inputs.up_weight,
        inputs.down_bias,
        inputs.up_bias,
        residual=inputs.residual,
        **kwargs,
    )
    out.backward(grad_out)
    grads = [None if t is None else t.grad for t in inputs.tensors()]
    return out, grads


def run_reference(inputs: OpInputs, grad_out: torch.Tensor, activation: str, scale: float):
    """The fp64 eager reference on the same (possibly low-precision) input values."""
    return run_op(
        reference_post_block_steer,
        inputs.converted(torch.float64),
        grad_out.double(),
        activation=activation,
        scale=scale,
    )


NAMES = ["out", "hidden", "down_weight", "up_weight", "down_bias", "up_bias", "residual"]


def assert_close(name: str, got: torch.Tensor, want: torch.Tensor, rel: float) -> None:
    """max |got - want| <= rel * max(max |want|, 1), with the worst entries in the message.

    Test inputs are O(1), so the floor of 1 judges a sum that cancels to a small value (a bias
    gradient at rank 1, say) against the size of its terms rather than of its result.
    """
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    got64, want64 = got.detach().double().cpu(), want.detach().double().cpu()
    scale = want64.abs().max().clamp_min(1.0) if want64.numel() else torch.tensor(1.0)
    err = (got64 - want64).abs()
    worst = err.max() / scale
    if worst > rel:
        flat = err.flatten().topk(min(5, err.numel())).indices
        rows = [
            f"  at {tuple(int(i) for i in torch.unravel_index(idx, err.shape))}: "
            f"got {got64.flatten()[idx]:.6g}, want {want64.flatten()[idx]:.6g}"
            for idx in flat
        ]
        raise AssertionError(
            f"{name}: max error {worst:.3e} of max |ref| {scale:.3e} exceeds {rel:.1e}\n"
            + "\n".join(rows)
        )


def assert_matches_reference(out, grads, ref_out, ref_grads, rel: float) -> None:
    assert_close("out", out, ref_out, rel)
    for name, got, want in zip(NAMES[1:], grads, ref_grads):
        assert (got is None) == (want is None), f"{name}: gradient presence differs"
        if got is not None:
            assert_close(f"grad {name}", got, want, rel)
