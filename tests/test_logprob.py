"""kernels/logprob.py against its PyTorch references, under the Triton interpreter on CPU tensors (or,
with TRITON_INTERPRET=0 and a GPU, the compiled kernels on CUDA tensors).

Values and gradients on odd vocabularies (not a multiple of the block), temperatures 1 and 0.7, logits
offset by +-1e4, masked (-inf) logits, fp32 / fp16 / bf16 each with its own tolerance, with the
interpreter's small blocks and with the GPU's BLOCK_V; the chunked linear variant against
log_softmax(h @ W.T / tau) written out here; the impl switch; the errors for unsupported inputs.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported: it decides at import time

import functools
import math
import warnings
import zlib

import pytest
import torch

from kernels import logprob
from kernels.logprob import (
    linear_logprobs, linear_logprobs_reference, logprobs_reference, logprobs_triton, token_logprobs,
)

# Under TRITON_INTERPRET=1 (tests/conftest.py sets it unless told otherwise) the kernels run as numpy on
# CPU tensors. With TRITON_INTERPRET=0 on a machine with a GPU (bench/gpu_check.sh) the same tests run
# the compiled kernels on CUDA tensors. Inputs are made on the CPU either way (same seeds, same
# numbers) and moved to DEVICE; results come back to the CPU for the checks.
INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cpu" if INTERPRETING else "cuda"
if not INTERPRETING and not torch.cuda.is_available():
    pytest.skip("TRITON_INTERPRET is not 1 and there is no CUDA device: nothing can run the kernels",
                allow_module_level=True)

# The interpreter runs the kernels as numpy, which warns about arithmetic the kernels do on purpose:
# nan in lanes that a tl.where then discards (the padding past V, 0 * -inf at masked tokens), log(0) =
# -inf for a row with no finite logit, finfo.min / 0.7 overflowing to -inf. A GPU does not warn.
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning:triton.runtime.interpreter")

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


def _on_device(x):
    """x on DEVICE, a leaf that requires grad as x did (x itself when it is already there, so a strided
    view stays strided); anything that is not a tensor unchanged."""
    if not isinstance(x, torch.Tensor) or x.device.type == DEVICE:
        return x
    return x.detach().to(DEVICE).requires_grad_(x.requires_grad)


def _value_and_grads(fn, inputs, gen):
    """Outputs of fn(*inputs) (a tensor or a tuple of (N,) tensors), and the gradients of a random
    weighted sum of them wrt each input (None for inputs without requires_grad); on the CPU."""
    inputs = [_on_device(x) for x in inputs]
    outs = fn(*inputs)
    outs = outs if isinstance(outs, tuple) else (outs,)
    loss = sum((torch.randn(o.shape, generator=gen).to(o.device) * o).sum() for o in outs)
    needs_grad = [isinstance(x, torch.Tensor) and x.requires_grad for x in inputs]
    grads = iter(torch.autograd.grad(loss, [x for x, n in zip(inputs, needs_grad) if n]))
    return [o.detach().cpu() for o in outs], [next(grads).cpu() if n else None for n in needs_grad]


def _compare(fn, fn_ref, inputs, params, value_tol, grad_tol):
    """fn and fn_ref agree on the outputs and on the gradients of the same random loss, on DEVICE;
    returns fn's, on the CPU."""
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
    wide = torch.randn(N, V + 7, generator=gen).half().to(DEVICE)  # (N, V + 7)
    logits = wide[:, :V].requires_grad_()  # (N, V) a view whose rows are V + 7 apart
    targets = torch.randint(0, V, (N,), generator=gen).to(DEVICE)
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
    logits = torch.full((N, V), 1e4, device=DEVICE).requires_grad_()
    targets = torch.tensor([0, 150, 299], device=DEVICE)
    logp, entropy = token_logprobs(logits, targets, tau, impl=impl)
    torch.testing.assert_close(logp.cpu(), torch.full((N,), -math.log(V)))
    torch.testing.assert_close(entropy.cpu(), torch.full((N,), math.log(V)))
    logp.sum().backward()  # entropy unused: its upstream gradient is zero
    expected = (torch.nn.functional.one_hot(targets.cpu(), V) - 1.0 / V) / tau  # (N, V)
    torch.testing.assert_close(logits.grad.cpu(), expected)


def test_out_of_range_target_gives_nan():
    # The kernel does not read past the row: it returns nan (the host cannot check without a sync).
    logits = torch.randn(3, 100, device=DEVICE)
    logp, entropy = logprobs_triton(logits, torch.tensor([100, -1, 7], device=DEVICE))
    assert logp[:2].isnan().all() and torch.isfinite(logp[2]) and torch.isfinite(entropy).all()


# Masked vocabularies: -inf logits, or torch.finfo(dtype).min, which / 0.7 overflows to -inf in fp32.
MASKS = [  # (dtype, mask value, temperature)
    (torch.float32, float("-inf"), 1.0),
    (torch.bfloat16, float("-inf"), 0.7),
    (torch.float32, "finfo.min", 0.7),
    (torch.bfloat16, "finfo.min", 0.7),
]


def _masked_logits(N, V, dtype, mask_value, gen):
    """(N, V) random logits and the bool (N, V) positions to mask, set to mask_value."""
    logits = torch.randn(N, V, generator=gen) * 3  # (N, V)
    masked = torch.zeros(N, V, dtype=torch.bool)  # (N, V)
    masked[1, ::2] = True  # every other token
    masked[2, :300] = True  # the first 256-wide interpreter block entirely (the max starts at -inf)
    masked[3, :-1] = True  # all but the last token: p = 1 there, entropy 0
    masked[4, 7] = True  # the target of this row (see _MASKED_TARGETS): logp = -inf
    masked[5, :] = True  # every token: a row with no distribution
    masked[6, 10:20] = True  # a few
    value = torch.finfo(dtype).min if mask_value == "finfo.min" else mask_value
    return logits.masked_fill(masked, value).to(dtype).requires_grad_(), masked


_MASKED_TARGETS = [3, 5, 301, 599, 7, 0, 12]  # row 6: 12 is masked too; logp -inf there


@pytest.mark.parametrize("dtype, mask_value, temperature", MASKS)
def test_logprobs_with_masked_logits(dtype, mask_value, temperature):
    params = ("masked", dtype, mask_value, temperature)
    gen = _generator(*params)
    logits, masked = _masked_logits(7, 600, dtype, mask_value, gen)
    targets = torch.tensor(_MASKED_TARGETS)
    inputs = (logits, targets, temperature)
    (logp, entropy), (grad, *_) = _compare(logprobs_triton, logprobs_reference, inputs, params, VALUE_TOL,
                                           GRAD_TOL[dtype])
    assert torch.isfinite(grad).all()  # both sides (_compare checked that they agree)
    target_masked = masked[torch.arange(7), targets]
    assert (logp[target_masked] == float("-inf")).all() and torch.isfinite(logp[~target_masked]).all()
    assert torch.isfinite(entropy).all()
    assert entropy[3] == 0 and logp[3] == 0  # one token left: p = 1
    assert entropy[5] == 0 and (grad[5] == 0).all()  # no distribution: entropy 0, no gradient
    # A masked token gets exactly 0, except a masked target in a row that has a distribution:
    # d logp_y / d z_y = (1 - p_y) / tau with p_y = 0.
    is_target = torch.nn.functional.one_hot(targets, 600).bool()  # (N, V)
    is_target[5] = False  # row 5 has no distribution (checked above)
    assert (grad[masked & ~is_target] == 0).all() and (grad[masked & is_target] != 0).all()


@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_masked_logits_by_hand(impl):
    # k equal logits, the rest -inf: p = 1/k on the k tokens, so logp = -log k, H = log k, and
    # d logp_y / dz_j = (onehot_j(y) - 1/k) / tau on them, 0 on the masked tokens, except at a masked
    # target: d logp_y / d z_y = 1 - p_y = 1 (its logp is -inf).
    V, k, tau = 300, 10, 0.7
    logits = torch.full((3, V), float("-inf"))
    logits[:, 100:100 + k] = 2.0
    logits = logits.to(DEVICE).requires_grad_()
    targets = torch.tensor([100, 105, 7], device=DEVICE)  # row 2: a masked target
    logp, entropy = token_logprobs(logits, targets, tau, impl=impl)
    logp, entropy = logp.cpu(), entropy.cpu()
    torch.testing.assert_close(logp[:2], torch.full((2,), -math.log(k)))
    assert logp[2] == float("-inf")
    torch.testing.assert_close(entropy, torch.full((3,), math.log(k)))
    # the -inf logp is left out of the loss (its gradient is still finite, but -inf * 0 = nan)
    (logp[:2].sum() + entropy.sum()).backward()
    # entropy's gradient -p_j (log p_j + H) / tau is 0 here (log p_j = -log k = -H on the support)
    expected = torch.zeros(3, V)
    expected[:, 100:100 + k] = -1.0 / k / tau
    expected[0, 100] += 1 / tau
    expected[1, 105] += 1 / tau
    expected[2] = 0.0  # row 2's logp is not in the loss, and its entropy gradient is 0
    torch.testing.assert_close(logits.grad.cpu(), expected)


@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_masked_target_gradient_is_finite(impl):
    logits = torch.randn(2, 300, generator=_generator("masked target", impl))
    logits[:, 7] = float("-inf")
    logits = logits.to(DEVICE).requires_grad_()
    logp, _ = token_logprobs(logits, torch.tensor([7, 8], device=DEVICE), impl=impl)
    assert logp[0] == float("-inf")
    logp.sum().backward()  # d logp_y / dz = onehot_y - p, with p_y = 0
    p = torch.softmax(logits.detach().cpu(), dim=-1)  # (2, V)
    expected = torch.nn.functional.one_hot(torch.tensor([7, 8]), 300) - p
    torch.testing.assert_close(logits.grad.cpu(), expected)


def test_kernels_do_not_modify_inputs():
    gen = _generator("inputs")
    logits = _on_device(_logits(4, 300, torch.bfloat16, gen))
    targets = torch.randint(0, 300, (4,), generator=gen).to(DEVICE)
    before = [logits.detach().clone(), targets.clone()]
    logp, entropy = logprobs_triton(logits, targets)
    (logp.sum() + entropy.sum()).backward()
    for x, x0 in zip((logits, targets), before):
        assert torch.equal(x.detach(), x0)


# ----------------------------------------------------------------------------------------------------
# The GPU's block size, under the interpreter
#
# The tests above run the interpreter's blocks of at most 256 columns. On a GPU a row of V = 50257 is
# 13 blocks of 4096, the last one 1105 wide; here the kernels run with exactly that configuration.


@pytest.fixture
def gpu_launch_config(monkeypatch):
    """Make the launchers use _launch_config(V, interpreting=False): the GPU's BLOCK_V (and num_warps,
    which the interpreter ignores)."""
    gpu_config = functools.partial(logprob._launch_config, interpreting=False)
    monkeypatch.setattr(logprob, "_launch_config", gpu_config)


@pytest.mark.parametrize("V", [50257, 1000])  # 13 blocks of 4096; one block of 1024 with 24 padded columns
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_gpu_launch_configuration_matches_reference(gpu_launch_config, dtype, V):
    assert logprob._launch_config(V)["BLOCK_V"] == min(4096, 1 << (V - 1).bit_length())
    params = ("gpu blocks", dtype, V)
    gen = _generator(*params)
    N, tau = 4, 0.7
    base = torch.randn(N, V, generator=gen) * 3  # (N, V)
    base[1, : V // 2 + 7] = float("-inf")  # masked tokens across whole blocks, and a block boundary
    base[2, ::3] = float("-inf")
    base[3] += 1e4
    logits = base.to(dtype).requires_grad_()
    targets = torch.tensor([0, V - 1, 1, V // 2])
    _compare(logprobs_triton, logprobs_reference, (logits, targets, tau), params, dict(atol=1e-4, rtol=1e-5),
             GRAD_TOL[dtype])


def test_gpu_launch_configuration_linear(gpu_launch_config):
    params = ("gpu blocks linear",)
    gen = _generator(*params)
    N, C, V = 6, 16, 50257
    hidden = torch.randn(N, C, generator=gen).requires_grad_()  # (N, C)
    weight = (torch.randn(V, C, generator=gen) / C**0.5).requires_grad_()  # (V, C)
    targets = torch.randint(0, V, (N,), generator=gen)
    _compare(lambda *x: linear_logprobs(*x, 0.7, max_chunk_bytes=_budget(4, weight, "triton"), impl="triton"),
             lambda *x: linear_logprobs_reference(*x, 0.7), (hidden, weight, targets), params, VALUE_TOL,
             dict(atol=1e-5, rtol=1e-4))  # grad hidden sums 50257 fp32 products, in a different order


# ----------------------------------------------------------------------------------------------------
# 2. The fused linear variant


def _budget(rows, weight, impl, dtype=None):
    """The max_chunk_bytes that gives chunks of `rows` rows of logits."""
    itemsize = (dtype or weight.dtype).itemsize if impl == "triton" else logprob.TORCH_BYTES_PER_LOGIT
    return rows * weight.shape[0] * itemsize


def test_chunk_rows_come_from_the_byte_budget():
    gpt2 = torch.empty(50257, 768, device="meta")  # GPT-2 small's LM head
    assert logprob.chunk_rows(gpt2, triton=True) == 384  # half the head's bytes: C / 2 rows
    assert logprob.chunk_rows(gpt2.bfloat16(), triton=True) == 384
    assert logprob.chunk_rows(gpt2, triton=False) == 64  # 74 MiB at 24 bytes a logit
    tiny = torch.empty(1000, 128, device="meta")  # the built-in task's model: the 32 MiB floor, one chunk
    assert logprob.chunk_rows(tiny, triton=False) == 32 * 2**20 // (24 * 1000)
    assert logprob.chunk_rows(tiny, triton=True, max_chunk_bytes=10 * 4000 + 3999) == 10
    assert logprob.chunk_rows(tiny, triton=True, max_chunk_bytes=1) == 1  # never less than a row


@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_the_byte_budget_bounds_every_buffer(impl):
    gen = _generator("budget", impl)
    N, C, V = 301, 8, 1000  # 301 rows: chunks of 10 (Triton) or 1 (PyTorch) rows, the last one short
    hidden = torch.randn(N, C, generator=gen).requires_grad_()  # (N, C)
    weight = torch.randn(V, C, generator=gen).requires_grad_()  # (V, C), 32 KB
    targets = torch.randint(0, V, (N,), generator=gen)
    budget = 40_000

    def forward_backward():
        logp, entropy = linear_logprobs(hidden, weight, targets, max_chunk_bytes=budget, impl=impl)
        (logp.sum() + entropy.sum()).backward()

    from support.memory import allocated

    assert allocated(forward_backward)[1] <= budget  # all (N, V) logits at once would be 1.2 MB
    logp_ref, entropy_ref = linear_logprobs_reference(hidden, weight, targets)
    logp, entropy = linear_logprobs(hidden, weight, targets, max_chunk_bytes=budget, impl=impl)
    torch.testing.assert_close(logp, logp_ref)
    torch.testing.assert_close(entropy, entropy_ref)


@pytest.mark.parametrize("rows", [4, 16])  # chunks of 4, 4 and 2 rows; one chunk larger than N
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_linear_logprobs(impl, dtype, rows):
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

    def chunked(hidden, weight, targets):
        return linear_logprobs(hidden, weight, targets, tau, max_chunk_bytes=_budget(rows, weight, impl), impl=impl)

    assert logprob.chunk_rows(weight, impl == "triton", _budget(rows, weight, impl)) == rows

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
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        # chunks of 4 rows of the bf16 logits autocast makes
        budget = _budget(4, weight, impl, torch.bfloat16)
        _compare(lambda *x: linear_logprobs(*x, max_chunk_bytes=budget, impl=impl), linear_logprobs_reference,
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
    hidden = torch.randn(N, C, generator=gen).to(DEVICE).requires_grad_()  # (N, C)
    weight = torch.randn(V, C, generator=gen).to(DEVICE).requires_grad_()  # (V, C)
    targets = torch.randint(0, V, (N,), generator=gen).to(DEVICE)
    reference = _saved_bytes(lambda: linear_logprobs_reference(hidden, weight, targets))
    budget = _budget(16, weight, impl)
    chunked = _saved_bytes(lambda: linear_logprobs(hidden, weight, targets, max_chunk_bytes=budget, impl=impl))
    assert reference >= 2 * N * V * 4  # the measurement sees the fp32 (N, V) tensors when they are kept
    assert chunked <= hidden.nbytes + weight.nbytes + 32 * N  # the inputs, targets, a few floats per row


# ----------------------------------------------------------------------------------------------------
# 3. The impl switch and the errors


def test_auto_on_cpu_uses_reference_and_warns_once(monkeypatch):
    def kernel_called(*args, **kwargs):
        raise AssertionError("impl='auto' must not run the Triton kernels on CPU tensors")

    monkeypatch.setattr(logprob, "logprobs_triton", kernel_called)
    monkeypatch.setattr(logprob, "_LinearLogProbs", kernel_called)
    monkeypatch.setattr(logprob, "_warned_reference", False)
    gen = _generator("auto")
    logits = torch.randn(4, 50, generator=gen)
    targets = torch.randint(0, 50, (4,), generator=gen)
    with pytest.warns(UserWarning, match="PyTorch path is used"):
        logp, entropy = token_logprobs(logits, targets, 0.7)
    logp_ref, entropy_ref = logprobs_reference(logits, targets, 0.7)
    assert torch.equal(logp, logp_ref) and torch.equal(entropy, entropy_ref)
    hidden, weight = torch.randn(4, 6, generator=gen), torch.randn(50, 6, generator=gen)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a second warning would raise here
        logp, entropy = linear_logprobs(hidden, weight, targets, 0.7)
    logp_ref, entropy_ref = linear_logprobs_reference(hidden, weight, targets, 0.7)
    torch.testing.assert_close(logp, logp_ref)
    torch.testing.assert_close(entropy, entropy_ref)


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
        ("weight must be", lambda: linear_logprobs(hidden, weight[:, :5], targets, impl=impl)),
        ("targets must be", lambda: linear_logprobs(hidden, weight, targets[:2], impl=impl)),
        ("max_chunk_bytes", lambda: linear_logprobs(hidden, weight, targets, max_chunk_bytes=0, impl=impl)),
        ("impl must be", lambda: token_logprobs(logits, targets, impl=impl + "x")),
    ]
    for match, call in cases:
        with pytest.raises(ValueError, match=match):
            call()


# ----------------------------------------------------------------------------------------------------
# 4. The benchmark's comparison with TRL (only where `pip install -e ".[bench]"` put trl)


@pytest.mark.parametrize("case", ["trl linear", "trl linear 32768", "linear chunked torch", "linear plain"])
def test_the_benchmarks_lm_head_cases_compute_the_same_log_probs(case):
    # bench/bench_logprob.py times these beside ours: each must compute what linear_logprobs computes
    from bench import bench_logprob as bl

    if bl.unavailable(case):
        pytest.skip(bl.unavailable(case))
    gen = _generator("bench", case)
    N, C, V = 37, 16, 1001
    hidden = torch.randn(N, C, generator=gen).requires_grad_()  # (N, C)
    weight = (torch.randn(V, C, generator=gen) / C**0.5).requires_grad_()  # (V, C)
    targets = torch.randint(0, V, (N,), generator=gen)
    loss = bl.LINEAR_CASES[case](hidden, weight, targets, 0)  # sum of logp + entropy over the rows
    loss.backward()
    theirs = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    logp, entropy = linear_logprobs_reference(hidden, weight, targets)
    reference = (logp + entropy).sum()
    reference.backward()
    torch.testing.assert_close(loss, reference, atol=1e-3, rtol=1e-5)
    torch.testing.assert_close(theirs[0], hidden.grad, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(theirs[1], weight.grad, atol=1e-5, rtol=1e-4)
    assert bl.cpu_peak_bytes(case, N, V, C, torch.float32, 0) > 0  # the memory measurement runs on it
