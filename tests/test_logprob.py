"""kernels/logprob.py against its PyTorch references, under the Triton interpreter on CPU tensors.

Values and gradients on odd vocabularies (not a multiple of the block), temperatures 1 and 0.7, logits
offset by +-1e4, fp32 / fp16 / bf16 each with its own tolerance; the chunked linear variant against
log_softmax(h @ W.T / tau) written out here; the impl switch; the errors for unsupported inputs.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported: it decides at import time

import math
import warnings
import zlib

import pytest
import torch

from kernels import logprob
from kernels.logprob import (
    kl_reference,
    kl_triton,
    linear_logprobs,
    linear_logprobs_reference,
    logprobs_reference,
    logprobs_triton,
    token_kl,
    token_logprobs,
)

# Inputs keep their dtype and both sides compute in fp32 from the same values, so the forward outputs
# agree to fp32 rounding for every dtype. The gradients are rounded to the input dtype at the end:
# one ulp is 2**-8 relative in bf16 and 2**-11 in fp16, and the two sides may round a value apart.
VALUE_TOL = dict(atol=2e-5, rtol=1e-5)
GRAD_TOL = {
    torch.float32: dict(atol=1e-6, rtol=1e-4),
    torch.float16: dict(atol=1e-6, rtol=2e-3),
    torch.bfloat16: dict(atol=1e-5, rtol=1e-2),
}
# The bf16 gradients of hidden and weight are bf16 matmuls over bf16-rounded logit gradients, summed
# over V (grad hidden) or over chunks (grad weight: in fp32 in the kernel path, inside one matmul in the
# written-out one): a few bf16 ulps apart for values of O(1).
BF16_MATMUL_GRAD_TOL = dict(atol=1e-2, rtol=2e-2)


def _generator(*params):
    """A fresh seed for every test case, derived from its parameters so that a failure reproduces."""
    return torch.Generator().manual_seed(zlib.crc32(repr(params).encode()))


def _logits(N, V, dtype, gen, scale=3.0):
    return (torch.randn(N, V, generator=gen) * scale).to(dtype).requires_grad_()  # (N, V)


def _value_and_grads(fn, inputs, gen):
    """Outputs of fn(*inputs) (a tensor or a tuple of (N,) tensors), and the gradients of a random
    weighted sum of them wrt each input (None for inputs without requires_grad)."""
    outs = fn(*inputs)
    outs = outs if isinstance(outs, tuple) else (outs,)
    loss = sum((torch.randn(o.shape, generator=gen) * o).sum() for o in outs)
    needs_grad = [isinstance(x, torch.Tensor) and x.requires_grad for x in inputs]
    grads = iter(torch.autograd.grad(loss, [x for x, n in zip(inputs, needs_grad) if n]))
    return [o.detach() for o in outs], [next(grads) if n else None for n in needs_grad]


def _compare(fn, fn_ref, inputs, params, value_tol, grad_tol):
    """fn and fn_ref agree on the outputs and on the gradients of the same random loss; returns fn's."""
    outs, grads = _value_and_grads(fn, inputs, _generator("loss", *params))
    outs_ref, grads_ref = _value_and_grads(fn_ref, inputs, _generator("loss", *params))
    for out, out_ref in zip(outs, outs_ref):
        assert out.dtype == torch.float32
        torch.testing.assert_close(out, out_ref, **value_tol)
    for x, grad, grad_ref in zip(inputs, grads, grads_ref):
        if grad_ref is not None:
            assert grad.dtype == x.dtype  # the gradient comes back in the input's dtype
            torch.testing.assert_close(grad, grad_ref, **grad_tol)
    return outs, grads


# ----------------------------------------------------------------------------------------------------
# 1. logp and entropy


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("V", [1000, 257])
def test_logprobs_matches_reference(V, temperature, dtype):
    params = ("logprobs", V, temperature, dtype)
    gen = _generator(*params)
    N = 8
    logits = _logits(N, V, dtype, gen)
    targets = torch.randint(0, V, (N,), generator=gen)
    _compare(logprobs_triton, logprobs_reference, (logits, targets, temperature), params,
             VALUE_TOL, GRAD_TOL[dtype])


def test_logprobs_fp16_and_strided_input():
    gen = _generator("fp16")
    N, V = 6, 300
    wide = torch.randn(N, V + 7, generator=gen).half()  # (N, V + 7)
    logits = wide[:, :V].requires_grad_()  # (N, V) a view whose rows are V + 7 apart
    targets = torch.randint(0, V, (N,), generator=gen)
    _compare(logprobs_triton, logprobs_reference, (logits, targets, 0.7), ("fp16",),
             VALUE_TOL, GRAD_TOL[torch.float16])


def _extreme_logits(V, gen):
    """Rows that break a naive exp or a naive entropy: offsets of +1e4 and -1e4 (exp overflows /
    underflows, and fp32 spacing there is ~1e-3), a row where half the vocabulary sits 1e4 below the
    rest (p == 0 exactly), and a row with one token 50 above the others (p ~ 1, entropy ~ 0)."""
    base = torch.randn(4, V, generator=gen) * 3  # (4, V)
    base[0] += 1e4
    base[1] -= 1e4
    base[2, ::2] -= 1e4
    base[3, 5] += 50.0
    return base.requires_grad_()


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_logprobs_extreme_logits(temperature):
    params = ("extreme", temperature)
    logits = _extreme_logits(1000, _generator(*params))
    targets = torch.tensor([3, 999, 4, 5])  # row 2: an even index, a token whose p is exactly 0
    # logp of row 2 is about -1.4e4, where one fp32 step is ~1e-3
    inputs = (logits, targets, temperature)
    (logp, entropy), (grad, *_) = _compare(logprobs_triton, logprobs_reference, inputs, params,
                                           dict(atol=1e-4, rtol=1e-5), GRAD_TOL[torch.float32])
    assert torch.isfinite(logp).all() and torch.isfinite(entropy).all() and torch.isfinite(grad).all()
    assert entropy[3] < 1e-6  # one token has all the mass


@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_uniform_logits_by_hand(impl):
    # Equal logits c: p = 1/V, so logp = -log V and H = log V whatever c and tau, and
    # d logp_y / dz_j = (onehot_j(y) - 1/V) / tau.
    N, V, tau = 3, 300, 0.7
    logits = torch.full((N, V), 1e4).requires_grad_()
    targets = torch.tensor([0, 150, 299])
    logp, entropy = token_logprobs(logits, targets, tau, impl=impl)
    torch.testing.assert_close(logp, torch.full((N,), -math.log(V)))
    torch.testing.assert_close(entropy, torch.full((N,), math.log(V)))
    logp.sum().backward()  # entropy unused: its upstream gradient is zero
    expected = (torch.nn.functional.one_hot(targets, V) - 1.0 / V) / tau  # (N, V)
    torch.testing.assert_close(logits.grad, expected)


def test_out_of_range_target_gives_nan():
    # The kernel does not read past the row: it returns nan (the host cannot check without a sync).
    logits = torch.randn(3, 100)
    logp, entropy = logprobs_triton(logits, torch.tensor([100, -1, 7]))
    assert logp[:2].isnan().all() and torch.isfinite(logp[2]) and torch.isfinite(entropy).all()


# ----------------------------------------------------------------------------------------------------
# 2. KL(p || q)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("V", [1000, 257])
def test_kl_matches_reference(V, temperature, dtype):
    params = ("kl", V, temperature, dtype)
    gen = _generator(*params)
    N = 8
    logits_p = _logits(N, V, dtype, gen)
    logits_q = (logits_p.detach().float() + torch.randn(N, V, generator=gen)).to(dtype).requires_grad_()
    (kl,), _ = _compare(kl_triton, kl_reference, (logits_p, logits_q, temperature), params,
                        VALUE_TOL, GRAD_TOL[dtype])
    assert (kl > 0).all()


def test_kl_extreme_logits_and_reference_without_grad():
    # As in RLHF, the reference logits have no gradient (and the kernel skips that half of the work).
    params = ("kl extreme",)
    gen = _generator(*params)
    logits_p = _extreme_logits(1000, gen)
    # p offset by +1e4 against q by -1e4 and back; p's peaked row against q's half-at--1e4 row (KL ~1e4)
    logits_q = _extreme_logits(1000, gen).detach()[[1, 0, 3, 2]]
    # KLs up to ~1e4; the gradient p (log p - log q - KL) subtracts numbers of that size (fp32 step ~1e-3)
    (kl,), (_, grad_q, _) = _compare(kl_triton, kl_reference, (logits_p, logits_q, 0.7), params,
                                     dict(atol=1e-3, rtol=1e-5), dict(atol=1e-5, rtol=1e-4))
    assert grad_q is None and torch.isfinite(kl).all()


@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_kl_of_equal_logits_is_zero(impl):
    logits = torch.randn(4, 257, generator=_generator("kl zero")) * 3
    kl = token_kl(logits, logits.clone(), impl=impl)
    torch.testing.assert_close(kl, torch.zeros(4), atol=1e-6, rtol=0)


def test_kernels_do_not_modify_inputs():
    gen = _generator("inputs")
    logits = _logits(4, 300, torch.bfloat16, gen)
    other = _logits(4, 300, torch.bfloat16, gen)
    targets = torch.randint(0, 300, (4,), generator=gen)
    before = [logits.detach().clone(), other.detach().clone(), targets.clone()]
    logp, entropy = logprobs_triton(logits, targets)
    (logp.sum() + entropy.sum() + kl_triton(logits, other).sum()).backward()
    for x, x0 in zip((logits, other, targets), before):
        assert torch.equal(x.detach(), x0)


# ----------------------------------------------------------------------------------------------------
# 3. The fused linear variant


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_linear_logprobs(impl, dtype):
    params = ("linear", impl, dtype)
    gen = _generator(*params)
    N, C, V, tau = 10, 16, 257, 0.7
    hidden = torch.randn(N, C, generator=gen).to(dtype).requires_grad_()  # (N, C)
    weight = (torch.randn(V, C, generator=gen) / C**0.5).to(dtype).requires_grad_()  # (V, C)
    targets = torch.randint(0, V, (N,), generator=gen)

    def written_out(hidden, weight, targets):
        logp_all = torch.log_softmax((hidden @ weight.T).float() / tau, dim=-1)  # (N, V)
        logp = logp_all.gather(-1, targets[:, None]).squeeze(-1)  # (N,)
        return logp, -(logp_all.exp() * logp_all).sum(-1)

    def chunked(hidden, weight, targets):  # chunks of 4, 4 and 2 rows
        return linear_logprobs(hidden, weight, targets, tau, chunk_size=4, impl=impl)

    grad_tol = GRAD_TOL[dtype] if dtype == torch.float32 else BF16_MATMUL_GRAD_TOL
    _compare(chunked, written_out, (hidden, weight, targets), params, VALUE_TOL, grad_tol)


@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_linear_logprobs_under_autocast(impl):
    # As in the training scripts: fp32 weights under bf16 autocast. The hidden states come in bf16
    # here, so that the two inputs differ, as they may out of a model.
    params = ("autocast", impl)
    gen = _generator(*params)
    N, C, V = 6, 16, 257
    hidden = torch.randn(N, C, generator=gen).bfloat16().requires_grad_()  # (N, C)
    weight = (torch.randn(V, C, generator=gen) / C**0.5).requires_grad_()  # (V, C) fp32
    targets = torch.randint(0, V, (N,), generator=gen)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _compare(lambda *x: linear_logprobs(*x, chunk_size=4, impl=impl), linear_logprobs_reference,
                 (hidden, weight, targets), params, VALUE_TOL, BF16_MATMUL_GRAD_TOL)


def _saved_bytes(fn):
    """Bytes that autograd keeps for the backward of fn(), counting each memory block once (the
    weight, or a view of hidden, may be saved by several chunks)."""
    blocks = {}

    def pack(x):
        blocks[x.untyped_storage().data_ptr()] = x.untyped_storage().nbytes()
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        fn()
    return sum(blocks.values())


@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_linear_logprobs_keeps_no_logits(impl):
    gen = _generator("memory", impl)
    N, C, V = 64, 8, 257
    hidden = torch.randn(N, C, generator=gen).requires_grad_()  # (N, C)
    weight = torch.randn(V, C, generator=gen).requires_grad_()  # (V, C)
    targets = torch.randint(0, V, (N,), generator=gen)
    reference = _saved_bytes(lambda: linear_logprobs_reference(hidden, weight, targets))
    chunked = _saved_bytes(lambda: linear_logprobs(hidden, weight, targets, chunk_size=16, impl=impl))
    assert reference >= 2 * N * V * 4  # the measurement sees the fp32 (N, V) tensors when they are kept
    assert chunked <= hidden.nbytes + weight.nbytes + 32 * N  # the inputs, targets, a few floats per row


# ----------------------------------------------------------------------------------------------------
# 4. The impl switch and the errors


def test_auto_on_cpu_uses_reference_and_warns_once(monkeypatch):
    def kernel_called(*args, **kwargs):
        raise AssertionError("impl='auto' must not run the Triton kernels on CPU tensors")

    monkeypatch.setattr(logprob, "logprobs_triton", kernel_called)
    monkeypatch.setattr(logprob, "kl_triton", kernel_called)
    monkeypatch.setattr(logprob, "_warned_reference", False)
    gen = _generator("auto")
    logits = torch.randn(4, 50, generator=gen)
    targets = torch.randint(0, 50, (4,), generator=gen)
    with pytest.warns(UserWarning, match="PyTorch reference path is used"):
        logp, entropy = token_logprobs(logits, targets, 0.7)
    logp_ref, entropy_ref = logprobs_reference(logits, targets, 0.7)
    assert torch.equal(logp, logp_ref) and torch.equal(entropy, entropy_ref)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a second warning would raise here
        assert torch.equal(token_kl(logits, logits.flip(0)), kl_reference(logits, logits.flip(0)))


def test_triton_on_cpu_without_interpreter_is_refused(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="need CUDA tensors"):
        token_logprobs(torch.randn(2, 10), torch.tensor([1, 2]), impl="triton")


@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_bad_inputs_raise(impl):
    logits = torch.randn(4, 10)
    targets = torch.tensor([1, 2, 3, 4])
    hidden, weight = torch.randn(4, 6), torch.randn(10, 6)
    cases = [
        ("2-D tensor", lambda: token_logprobs(logits.view(2, 2, 10), targets, impl=impl)),
        ("targets must be a tensor of shape", lambda: token_logprobs(logits, targets[:3], impl=impl)),
        ("int64", lambda: token_logprobs(logits, targets.int(), impl=impl)),
        ("temperature", lambda: token_logprobs(logits, targets, 0.0, impl=impl)),
        ("dtype", lambda: token_logprobs(logits.double(), targets, impl=impl)),
        ("same shape", lambda: token_kl(logits, logits[:, :9], impl=impl)),
        ("2-D tensor", lambda: token_kl(logits, logits.view(2, 2, 10), impl=impl)),
        ("weight must be", lambda: linear_logprobs(hidden, weight[:, :5], targets, impl=impl)),
        ("targets must be", lambda: linear_logprobs(hidden, weight, targets[:2], impl=impl)),
        ("chunk_size", lambda: linear_logprobs(hidden, weight, targets, chunk_size=0, impl=impl)),
        ("impl must be", lambda: token_logprobs(logits, targets, impl=impl + "x")),
    ]
    for match, call in cases:
        with pytest.raises(ValueError, match=match):
            call()
