"""Tests for kernels/flash_attention.py: the Triton kernels against attention_reference.

Everything runs on the CPU under TRITON_INTERPRET=1 (the interpreter executes each Triton program as
numpy; with TRITON_INTERPRET=0 and a GPU the same tests run the compiled kernels on CUDA), which is
slow, so the shapes are small but odd: lengths that are not multiples of the 16-wide interpreter
blocks, so every masked edge is crossed; then once more with the GPU's block sizes. The reference is
evaluated in float64 on the same inputs; each dtype gets its own tolerance.
"""

import functools
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # must be set before triton is imported

import pytest
import torch
import torch.nn.functional as F

from kernels import flash_attention as fa
from kernels.flash_attention import attention_reference, flash_attention

# Under TRITON_INTERPRET=1 (tests/conftest.py sets it unless told otherwise) the kernels run as numpy on
# CPU tensors. With TRITON_INTERPRET=0 on a machine with a GPU (bench/gpu_check.sh) the same tests run
# the compiled kernels on CUDA tensors. The inputs are made on the CPU either way (same seeds, same
# numbers) and moved to DEVICE in _check_against_reference.
INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cpu" if INTERPRETING else "cuda"
if not INTERPRETING and not torch.cuda.is_available():
    pytest.skip("TRITON_INTERPRET is not 1 and there is no CUDA device: nothing can run the kernels",
                allow_module_level=True)

# fp32: the interpreter multiplies in exact fp32, so only summation order differs from float64.
# fp16 / bf16: inputs, P and dS are rounded to 10 / 7 mantissa bits before each matmul (as on the
# GPU); observed max errors are about 1.5e-3 (fp16) and 4e-2 (bf16) on values of size ~1-10.
TOLERANCES = {
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.float16: dict(atol=5e-3, rtol=5e-3),
    torch.bfloat16: dict(atol=6e-2, rtol=3e-2),
}


def _random_inputs(seed, B, nh, Tq, Tk, hs, dtype):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, nh, Tq, hs, generator=g).to(dtype)  # (B, nh, Tq, hs)
    k = torch.randn(B, nh, Tk, hs, generator=g).to(dtype)  # (B, nh, Tk, hs)
    v = torch.randn(B, nh, Tk, hs, generator=g).to(dtype)  # (B, nh, Tk, hs)
    do = torch.randn(B, nh, Tq, hs, generator=g).to(dtype)  # (B, nh, Tq, hs) upstream gradient
    return q, k, v, do


def _check_against_reference(q, k, v, do, causal, kv_start=None, sm_scale=None):
    """Forward and all three gradients of flash_attention vs the float64 reference on the same inputs,
    on DEVICE. Returns the output and dq, on the CPU."""
    q, k, v, do = (t.to(DEVICE) for t in (q, k, v, do))
    kv_start = None if kv_start is None else kv_start.to(DEVICE)
    inputs_before = [t.clone() for t in (q, k, v, do)]

    q1, k1, v1 = (t.detach().clone().requires_grad_() for t in (q, k, v))
    o = flash_attention(q1, k1, v1, causal=causal, kv_start=kv_start, sm_scale=sm_scale)
    o.backward(do)

    q2, k2, v2 = (t.detach().double().requires_grad_() for t in (q, k, v))
    o_ref = attention_reference(q2, k2, v2, causal=causal, kv_start=kv_start, sm_scale=sm_scale)
    o_ref.backward(do.double())

    assert o.dtype == q.dtype and o.shape == q.shape
    tol = TOLERANCES[q.dtype]
    for name, ours, ref in (("o", o, o_ref), ("dq", q1.grad, q2.grad), ("dk", k1.grad, k2.grad),
                            ("dv", v1.grad, v2.grad)):
        assert torch.isfinite(ours).all(), f"{name} has NaN or inf"
        torch.testing.assert_close(ours.double(), ref, **tol, msg=lambda m: f"{name}: {m}")
    for before, after in zip(inputs_before, (q, k, v, do)):
        assert torch.equal(before, after), "an input was modified"
    return o.cpu(), q1.grad.cpu()


@pytest.mark.parametrize("seed, Tq, Tk, hs, causal", [
    # training / prefill shapes, every head dim, both masks
    (1, 37, 37, 32, True),
    (2, 37, 37, 32, False),
    (3, 37, 37, 64, True),
    (4, 37, 37, 64, False),
    (5, 37, 37, 128, True),
    (6, 37, 37, 128, False),
    (7, 50, 50, 64, True),
    (8, 50, 50, 64, False),
    # decoding with a KV cache (Tq=1) and chunked prefill (Tq < Tk): queries sit at the end
    (9, 1, 23, 64, True),
    (10, 1, 23, 128, False),
    (11, 5, 23, 64, True),
    (12, 5, 23, 32, False),
    (13, 16, 40, 64, True),
])
def test_fp32_matches_reference(seed, Tq, Tk, hs, causal):
    q, k, v, do = _random_inputs(seed, 2, 2, Tq, Tk, hs, torch.float32)
    _check_against_reference(q, k, v, do, causal)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("seed, Tq, Tk, hs, causal, kv_start", [
    (21, 37, 37, 64, True, None),
    (22, 50, 50, 32, False, None),
    (23, 5, 23, 128, True, [0, 4, 20]),
])
def test_half_precision_matches_reference(dtype, seed, Tq, Tk, hs, causal, kv_start):
    B = 2 if kv_start is None else len(kv_start)
    q, k, v, do = _random_inputs(seed, B, 2, Tq, Tk, hs, dtype)
    kv_start = None if kv_start is None else torch.tensor(kv_start)
    _check_against_reference(q, k, v, do, causal, kv_start=kv_start)


@pytest.mark.parametrize("seed, Tq, Tk, causal, kv_start", [
    (31, 37, 37, True, [0, 5, 30]),  # rows 0..29 of sequence 2 see no key: zeros
    (32, 37, 37, False, [12, 0, 42]),  # kv_start > Tk: every key of sequence 2 masked
    (33, 5, 23, True, [0, 4, 20]),  # queries at positions 18..22; 18 and 19 are empty in seq 2
    (34, 1, 23, True, [22, 23, 0]),  # decoding: seq 0 sees only its last key, seq 1 nothing
])
def test_left_padding(seed, Tq, Tk, causal, kv_start):
    q, k, v, do = _random_inputs(seed, len(kv_start), 2, Tq, Tk, 64, torch.float32)
    kv_start = torch.tensor(kv_start)
    o, dq = _check_against_reference(q, k, v, do, causal, kv_start=kv_start)

    # Independently of the reference: a query whose every key is masked outputs exactly 0 and gets
    # exactly 0 gradient.
    q_pos = torch.arange(Tk - Tq, Tk)  # (Tq,)
    last_allowed = q_pos if causal else torch.full((Tq,), Tk - 1)  # (Tq,)
    empty = last_allowed[None, :] < kv_start[:, None]  # (B, Tq)
    assert empty.any(), "this case was meant to contain empty rows"
    b_idx, t_idx = empty.nonzero(as_tuple=True)
    assert (o[b_idx, :, t_idx] == 0).all() and (dq[b_idx, :, t_idx] == 0).all()
    assert o.transpose(1, 2)[~empty].abs().sum() > 0  # the rows that do see keys are not zero


def test_non_contiguous_inputs_and_sm_scale():
    # The model produces q, k, v as x.view(B, T, nh, hs).transpose(1, 2): not contiguous.
    g = torch.Generator().manual_seed(41)
    B, T, nh, hs = 2, 29, 3, 32
    q, k, v = (torch.randn(B, T, nh, hs, generator=g).transpose(1, 2) for _ in range(3))
    do = torch.randn(B, nh, T, hs, generator=g)
    assert not q.is_contiguous()
    _check_against_reference(q, k, v, do, causal=True, sm_scale=0.3)


# ----------------------------------------------------------------------------------------------------
# The GPU's block sizes, under the interpreter
#
# The tests above run the interpreter's 16x16 blocks. On a GPU _launch_config picks other sizes, with
# BLOCK_M != BLOCK_N in places (128x64 in the fp16/bf16 forward, 32x64 in the fp32 one, 64x32 in the
# fp16/bf16 backward at hs=128): a bug that mixes the two up, such as a causal loop bound computed
# from BLOCK_N instead of BLOCK_M, passes every 16x16 test. So every kernel runs here with exactly the
# GPU's launch configuration for each dtype and head dim, on short odd shapes that cross those blocks.


@pytest.fixture
def gpu_launch_config(monkeypatch):
    """Make the launchers use _launch_config(..., interpreting=False), the GPU's settings (num_warps and
    num_stages come along; the interpreter ignores them)."""
    monkeypatch.setattr(fa, "_launch_config", functools.partial(fa._launch_config, interpreting=False))


GPU_BLOCK_SHAPES = [  # (Tq, Tk, causal, kv_start): 130 = 128 + 2 = 2 * 64 + 2 = 4 * 32 + 2
    (130, 130, True, None),  # training / prefill
    (130, 130, False, [3, 129]),  # left padding; sequence 1 has a single key
    (1, 130, True, [0, 120]),  # one decoding step with a KV cache
    (70, 130, True, [0, 65]),  # chunked prefill: queries at positions 60..129
    (40, 130, False, None),
]


@pytest.mark.parametrize("hs", fa.SUPPORTED_HEAD_DIMS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_gpu_launch_configuration_matches_reference(gpu_launch_config, dtype, hs):
    assert "num_warps" in fa._launch_config("fwd", hs, dtype)  # the GPU's settings, not the interpreter's
    for seed, (Tq, Tk, causal, kv_start) in enumerate(GPU_BLOCK_SHAPES):
        q, k, v, do = _random_inputs(60 + seed, 2, 1, Tq, Tk, hs, dtype)  # one head: the other tests have several
        kv_start = None if kv_start is None else torch.tensor(kv_start)
        _check_against_reference(q, k, v, do, causal, kv_start=kv_start)


# ----------------------------------------------------------------------------------------------------
# The reference itself, against PyTorch (no Triton involved)


@pytest.mark.parametrize("Tq, Tk, causal", [(13, 13, True), (13, 13, False), (4, 13, True)])
def test_reference_matches_torch_sdpa(Tq, Tk, causal):
    g = torch.Generator().manual_seed(51)
    q = torch.randn(2, 3, Tq, 16, generator=g, dtype=torch.float64)
    k = torch.randn(2, 3, Tk, 16, generator=g, dtype=torch.float64)
    v = torch.randn(2, 3, Tk, 16, generator=g, dtype=torch.float64)
    kv_start = torch.tensor([0, 3])
    # Built differently from the reference: the causal band as a shifted lower triangle.
    mask = torch.ones(Tq, Tk, dtype=torch.bool)
    if causal:
        mask = mask.tril(diagonal=Tk - Tq)  # query i (position Tk-Tq+i) sees keys <= its position
    pad = torch.arange(Tk)[None, :] >= kv_start[:, None]  # (B, Tk)
    mask = mask[None, None] & pad[:, None, None, :]  # (B, 1, Tq, Tk); every row keeps >= 1 key
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    torch.testing.assert_close(attention_reference(q, k, v, causal, kv_start), expected)


def test_reference_empty_rows_are_zero_without_nan():
    q, k, v = (torch.randn(1, 1, 6, 8, dtype=torch.float64, requires_grad=True) for _ in range(3))
    o = attention_reference(q, k, v, causal=True, kv_start=torch.tensor([4]))  # rows 0..3 empty
    o.sum().backward()
    assert (o[0, 0, :4] == 0).all() and o[0, 0, 4:].abs().sum() > 0
    assert (q.grad[0, 0, :4] == 0).all()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))


# ----------------------------------------------------------------------------------------------------
# Unsupported inputs are refused before any kernel runs

def _qkv(Tq=8, Tk=8, hs=32, dtype=torch.float32):
    def randn(T):
        return torch.randn(2, 2, T, hs, dtype=dtype, device=DEVICE)
    return randn(Tq), randn(Tk), randn(Tk)


@pytest.mark.parametrize("make_args, message", [
    (lambda: _qkv(hs=48), "head dim 48"),
    (lambda: _qkv(Tq=9, Tk=8), "Tq=9 > Tk=8"),
    (lambda: (_qkv()[0], _qkv()[1], _qkv(Tk=7)[2]), "same shape"),
    (lambda: (_qkv()[0], _qkv(hs=64)[1], _qkv(hs=64)[2]), "must agree"),
    (lambda: (_qkv()[0][0], _qkv()[1], _qkv()[2]), "4-D"),
    (lambda: (_qkv()[0].half(), _qkv()[1], _qkv()[2]), "share a dtype"),
    (lambda: _qkv(dtype=torch.float64), "not supported"),
    (lambda: _qkv() + (True, torch.tensor([0, 1, 2])), "kv_start must be a tensor of shape"),
    (lambda: _qkv() + (True, torch.tensor([0.0, 1.0])), "integer"),
    (lambda: _qkv() + (True, None, torch.tensor(0.5)), "sm_scale"),
])
def test_bad_inputs_raise(make_args, message):
    with pytest.raises(ValueError, match=message):
        flash_attention(*make_args())
