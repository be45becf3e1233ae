"""Fused per-token log-probs and entropy over a large vocabulary, in Triton, forward and backward.

PPO needs, for each token of a rollout, log p(token) under the policy and again under the reference
model, and the entropy of the policy. The textbook way builds log_softmax over the whole vocabulary
first. At V = 50257 that is huge: for N = B * T = 16384 tokens, one fp32 (N, V) tensor is
16384 * 50257 * 4 bytes = 3.3 GB. logprobs_reference below keeps two of them for its backward
(log_softmax and its exp), and its forward + backward peaks at about five (the gradients of those, the
gradient of the logits): ~16 GB for numbers we only need N of.

The kernels read each row of logits once, keep a running max and sums in registers (the online
log-sum-exp), and write a few floats per row. The backward reads the row once more and rebuilds the
softmax from two saved floats per row. Nothing of size (N, V) is stored except the gradient itself.

Read in this order:
  1. log-prob and entropy of the target:  logprobs_reference, _logprobs_fwd_kernel,
     _logprobs_bwd_kernel, their host wrappers, _LogProbs, logprobs_triton
  2. from hidden states and the LM head, never holding all (N, V) logits: linear_logprobs_reference,
     _LinearLogProbs (chunks + part 1's kernels), _linear_logprobs_torch (chunks + checkpoint),
     linear_logprobs (what train_ppo.py calls)
  3. _use_kernel, the one place that chooses the kernels or the PyTorch path (impl="auto" | "triton" |
     "torch"), for linear_logprobs and for token_logprobs, the entry point for logits a caller holds

Shapes: logits (N, V) -- callers flatten (B, T, V) with logits.reshape(-1, V) -- targets int64 (N,),
hidden (N, C), LM-head weight (V, C). Inputs fp32, fp16 or bf16; all math in fp32; outputs fp32;
gradients come back in the dtype of the input they belong to. temperature divides the logits before
the softmax, exactly as sampling did, so log-probs score the tokens under the distribution they were
drawn from.

Masked vocabularies: a logit may be -inf (or so negative that logit / temperature overflows to -inf,
e.g. torch.finfo(dtype).min at a temperature below 1). That token has p = 0, and kernels and references
agree on the limits:
  - the entropy term of a token with p = 0 is 0 (0 log 0 = 0), and every gradient stays finite;
  - a target whose logit is -inf has logp = -inf, with the finite gradient (onehot - p) / tau;
  - a row whose every logit is -inf has no distribution: logp = -inf, entropy 0, zero gradient.
+inf and nan logits are not checked (that would need a GPU->CPU sync on every call): their rows come
out nan. From hidden states (part 2) the logits are a matmul of finite numbers, so none of this arises
unless the weights themselves are not finite.

References: the online softmax of Milakov & Gimelshein 2018 ("Online normalizer calculation for
softmax", arXiv:1805.02867); the layout follows Liger-Kernel's ops/cross_entropy.py and
fused_linear_cross_entropy.py, without their in-place overwrite of the caller's logits.
"""

import os
import warnings

import torch
import triton
import triton.language as tl
from torch.utils.checkpoint import checkpoint

from kernels import gpu_path

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# ----------------------------------------------------------------------------------------------------
# 1. Log-prob of the target and entropy of each row
#
# Notation for one row: z (V,) the logits, tau the temperature, s = z / tau, p = softmax(s), y the target.
#   m = max_j s_j,   d = sum_j exp(s_j - m),   lse = log sum_j exp(s_j) = m + log d
#   logp_y = s_y - lse = (s_y - m) - log d
#   H = -sum_j p_j log p_j,  with log p_j = (s_j - m) - log d,
#     = log d - (1/d) sum_j exp(s_j - m) (s_j - m)  =  log d - w / d


def _log_softmax_rows(logits, temperature):
    """log_softmax(logits / temperature) (N, V) fp32, and empty (N,) bool: the rows whose every logit is
    -inf. Such a row has no distribution, and log_softmax would give -inf - -inf = nan in the forward
    and the backward; here it becomes a row of zeros (finite, uniform), and the callers overwrite what
    that row returns, which also gives it zero gradient."""
    scaled = logits.float() / temperature  # (N, V) 4NV bytes (8NV while a bf16 input's fp32 copy lives)
    empty = scaled.detach().amax(dim=-1) == float("-inf")  # (N,)
    scaled.masked_fill_(empty[:, None], 0.0)  # in place: our own copy, and no second (N, V) tensor
    return torch.log_softmax(scaled, dim=-1), empty  # (N, V) 4NV bytes, kept for the backward


def logprobs_reference(logits, targets, temperature=1.0):
    """(logp (N,), entropy (N,)) in fp32: log_softmax(logits / temperature) gathered at targets, and
    the entropy of each row. The definition the kernels must match, -inf logits included (see the
    module docstring); the memory of each line is noted for logits (N, V), and the backward allocates
    as much again for the gradients."""
    logp_all, empty = _log_softmax_rows(logits, temperature)  # (N, V), (N,)
    logp = logp_all.gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # (N,) -inf at a -inf target logit
    p = logp_all.exp()  # (N, V) 4NV bytes, kept for the backward
    # 0 log 0 = 0, the limit: a token with p = 0 adds nothing, where p * log p would be 0 * -inf = nan
    # (torch.where, not a product with a mask: its backward sends no 0 * inf into the gradient).
    entropy = -(p * torch.where(p > 0, logp_all, 0.0)).sum(dim=-1)  # (N,) through ~9NV bytes of temporaries
    # A row with no finite logit: logp -inf, entropy 0, and (masked_fill) zero gradient.
    return logp.masked_fill(empty, float("-inf")), entropy.masked_fill(empty, 0.0)


@triton.jit
def _logprobs_fwd_kernel(
    logits_ptr, targets_ptr,  # inputs: (N, V) contiguous in any float dtype, (N,) int64
    logp_ptr, entropy_ptr, row_max_ptr, row_log_d_ptr,  # outputs: (N,) fp32 each
    V, temperature,
    BLOCK_V: tl.constexpr,
):
    # One program per row. It walks the row BLOCK_V columns at a time, keeping for the columns seen
    # so far (the online log-sum-exp):
    #   m = max s_j,   d = sum exp(s_j - m),   w = sum exp(s_j - m) (s_j - m)
    # When a block raises the max from m to m_new, every old exp(s_j - m) becomes
    # exp(s_j - m_new) = alpha exp(s_j - m) with alpha = exp(m - m_new), and every old (s_j - m)
    # becomes (s_j - m) + (m - m_new). So:
    #   d <- alpha d + sum_block exp(s_j - m_new)
    #   w <- alpha (w + (m - m_new) d) + sum_block exp(s_j - m_new) (s_j - m_new)
    # All three stay shift-free: H = log d - w / d keeps full fp32 precision even for logits near 1e4,
    # where the textbook H = lse - sum p s would subtract two numbers of size 1e4 (fp32 spacing there
    # is ~1e-3). Memory traffic: the row is read once (V elements); four floats are written.
    row = tl.program_id(0).to(tl.int64)
    # int64: row * V reaches 65536 * 50257 = 3.3e9 at N = 65536, past int32's 2.1e9, and
    # program_id is int32, so the pointer arithmetic would wrap around to another row.
    row_ptr = logits_ptr + row * V

    # The sums are kept relative to `shift`: the running max m, or 0 while m is still -inf (every logit
    # so far -inf, i.e. masked). Shifting by -inf would give exp(-inf - -inf) = nan; shifting by 0
    # gives exp(-inf) = 0, which counts nothing. Once a finite logit is seen, d >= 1 (the max itself
    # adds exp(0) = 1), so d > 0 says "this row has a distribution".
    m = float("-inf")
    shift = 0.0
    d = 0.0
    w = 0.0
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)  # (BLOCK_V,)
        # -inf in the padding (the last block sticks out past V unless V is a multiple of BLOCK_V):
        # a padded column is then exactly a masked token, which adds nothing.
        s = tl.load(row_ptr + cols, mask=cols < V, other=float("-inf")).to(tl.float32) / temperature
        # exercise logprob_lse: update m, shift, d, w as derived above; check: against logprobs_reference
        m_new = tl.maximum(m, tl.max(s, axis=0))
        shift_new = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m - shift_new)  # 0 while m = -inf: nothing to rescale yet
        e = tl.exp(s - shift_new)  # (BLOCK_V,) exactly 0 for a -inf logit
        # p_j log p_j -> 0 as p_j -> 0: a token with e = 0 adds 0 to w, not 0 * -inf = nan
        shifted = tl.where(e > 0.0, s - shift_new, 0.0)  # (BLOCK_V,)
        w = alpha * (w + (shift - shift_new) * d) + tl.sum(e * shifted, axis=0)
        d = alpha * d + tl.sum(e, axis=0)
        m = m_new
        shift = shift_new
        # end exercise

    # A row with no finite logit (d = 0) has no distribution: logp -inf, entropy 0 and, in the
    # backward, zero gradient. log_d = log 0 = -inf is saved for the backward to recognise it.
    has_mass = d > 0.0
    log_d = tl.log(d)
    y = tl.load(targets_ptr + row)
    # An out-of-range target would read another row's memory; we read nothing and return nan instead.
    # (Rejecting it in the host wrapper would need targets.max().item(), a GPU->CPU sync every call.)
    s_y = tl.load(row_ptr + y, mask=(y >= 0) & (y < V), other=float("nan")).to(tl.float32) / temperature
    # (s_y - m) - log d is -inf for a -inf target logit, as it should be. With no mass it would be
    # -inf + inf = nan, so we take s_y itself: -inf (every logit is), or nan for an out-of-range target.
    tl.store(logp_ptr + row, tl.where(has_mass, (s_y - shift) - log_d, s_y))
    tl.store(entropy_ptr + row, tl.where(has_mass, log_d - w / tl.where(has_mass, d, 1.0), 0.0))
    # The backward rebuilds log p_j = (s_j - m) - log d from these two; saving lse = m + log d alone
    # would make it compute s_j - lse, again a difference of two numbers of size 1e4 for large logits.
    tl.store(row_max_ptr + row, shift)  # the max, or 0 for a row with no finite logit
    tl.store(row_log_d_ptr + row, log_d)


@triton.jit
def _logprobs_bwd_kernel(
    logits_ptr, targets_ptr, row_max_ptr, row_log_d_ptr, entropy_ptr,  # the inputs and forward's saves
    grad_logp_ptr, grad_entropy_ptr,  # (N,) fp32 upstream gradients g_logp, g_H
    grad_logits_ptr,  # (N, V) output in the logits' dtype: a new buffer, or the logits' own (in place)
    V, temperature,
    BLOCK_V: tl.constexpr,
):
    # The gradient, with s = z / tau and p = softmax(s), so that d lse / d s_j = p_j and
    # d p_i / d s_j = p_i (onehot_i(j) - p_j):
    #   logp_y = s_y - lse            =>  d logp_y / d s_j = onehot_j(y) - p_j
    #   H = lse - sum_i p_i s_i       =>  d(sum_i p_i s_i) / d s_j = p_j + sum_i s_i p_i (onehot_i(j) - p_j)
    #                                                               = p_j + p_j s_j - p_j sum_i p_i s_i
    #                                 =>  dH / d s_j = p_j - p_j - p_j (s_j - sum_i p_i s_i)
    #                                                = -p_j (s_j - lse + H) = -p_j (log p_j + H)
    # (sum_i p_i s_i = lse - H). The chain rule through s = z / tau divides by tau. For one row:
    #   dL/dz_j = (g_logp (onehot_j(y) - p_j) - g_H p_j (log p_j + H)) / tau
    # Memory traffic: the row is read once more and its gradient written once; no (N, V) softmax was
    # stored by the forward, p_j is rebuilt from the saved m and log d.
    row = tl.program_id(0).to(tl.int64)  # int64 for row * V, as in the forward
    row_ptr = logits_ptr + row * V
    grad_row_ptr = grad_logits_ptr + row * V
    m = tl.load(row_max_ptr + row)
    log_d = tl.load(row_log_d_ptr + row)
    H = tl.load(entropy_ptr + row)
    # A row with no finite logit (log d = -inf, see the forward) gets zero gradient; log d = 0 there
    # keeps the arithmetic below free of -inf - -inf.
    has_mass = log_d > float("-inf")
    log_d = tl.where(has_mass, log_d, 0.0)
    g_logp = tl.where(has_mass, tl.load(grad_logp_ptr + row), 0.0)
    g_H = tl.where(has_mass, tl.load(grad_entropy_ptr + row), 0.0)
    y = tl.load(targets_ptr + row)

    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)  # (BLOCK_V,)
        mask = cols < V
        # -inf in the padding, as in the forward: p = 0 there (computed, never stored).
        s = tl.load(row_ptr + cols, mask=mask, other=float("-inf")).to(tl.float32) / temperature
        log_p = (s - m) - log_d  # (BLOCK_V,) -inf for a -inf logit
        p = tl.exp(log_p)
        onehot = tl.where(cols == y, 1.0, 0.0)
        # p_j (log p_j + H) -> 0 as p_j -> 0: a -inf logit gets 0, not 0 * -inf = nan. (A -inf target
        # keeps its finite g_logp * (1 - 0): d logp_y / d z_y = 1 - p_y whatever p_y is.)
        p_log_p_H = tl.where(p > 0.0, p * (log_p + H), 0.0)  # (BLOCK_V,)
        grad = (g_logp * (onehot - p) - g_H * p_log_p_H) / temperature
        tl.store(grad_row_ptr + cols, grad.to(grad_logits_ptr.dtype.element_ty), mask=mask)


def _interpreting():
    # Triton itself decides at import time (in @triton.jit) whether to interpret, from this same
    # variable; we read it again only to pick small blocks and to allow CPU tensors.
    return os.environ.get("TRITON_INTERPRET") == "1"


def _launch_config(V, interpreting=None):
    """BLOCK_V and num_warps for the row kernels.

    interpreting=None reads TRITON_INTERPRET; False gives the GPU configuration whatever the variable
    says (tests/test_kernels_compile.py compiles it, the interpreter tests run its block size).

    Under the interpreter every program runs as numpy on the CPU, so small blocks keep the tests fast
    and still cross block boundaries (V = 1000 is 4 blocks of 256, the last one 232 wide; V = 257 is
    a full block and one of width 1).
    On a GPU a row of V = 50257 is 13 blocks of 4096: a 16 KiB fp32 load per step across 8 warps
    (256 threads, 16 elements each) is enough in flight to keep HBM busy. A starting point for an
    H100; time it with bench/bench_logprob.py before trusting it. With V = 50257 the rows do not start
    on 16-byte boundaries, so Triton emits one load per element (still coalesced across a warp); when
    V % 16 == 0 (e.g. a vocabulary padded to 50304) it emits 16-byte vector loads, 8x fewer for bf16.
    """
    if _interpreting() if interpreting is None else interpreting:
        return dict(BLOCK_V=min(256, triton.next_power_of_2(V)))
    block_v = min(4096, triton.next_power_of_2(V))
    return dict(BLOCK_V=block_v, num_warps=8 if block_v >= 4096 else 4)


def _check_temperature(temperature, name):
    # A tensor here would need .item(), a CPU-GPU sync point, on every call.
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0:
        raise ValueError(f"{name}: temperature must be a positive Python number, got {temperature!r}")


def _check_logits(logits, name, what="logits"):
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
        raise ValueError(f"{name}: {what} must be a 2-D tensor (N, V); flatten (B, T, V) with "
                         f"{what}.reshape(-1, V) first, got shape {tuple(getattr(logits, 'shape', ()))}")
    if logits.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"{name}: {what} dtype {logits.dtype} is not supported, only {SUPPORTED_DTYPES}")
    if logits.numel() == 0:
        raise ValueError(f"{name}: {what} is empty, shape {tuple(logits.shape)}")


def _check_targets(targets, N, device, name):
    if not isinstance(targets, torch.Tensor) or targets.shape != (N,):
        raise ValueError(f"{name}: targets must be a tensor of shape (N,) = ({N},), one token id per row, "
                         f"got shape {tuple(getattr(targets, 'shape', ()))}")
    if targets.dtype != torch.int64:
        raise ValueError(f"{name}: targets must be int64 token ids, got {targets.dtype}")
    if targets.device != device:
        raise ValueError(f"{name}: targets are on {targets.device}, the logits on {device}")


def _check_logits_targets(logits, targets, temperature, name):
    """Raise ValueError for every input that token_logprobs does not accept, whichever impl runs."""
    _check_logits(logits, name)
    _check_targets(targets, logits.shape[0], logits.device, name)
    _check_temperature(temperature, name)


def _check_kernel_device(tensor, name):
    """The extra condition of the Triton path: CUDA tensors (or the interpreter)."""
    if not tensor.is_cuda and not _interpreting():
        raise ValueError(f"{name}: the Triton kernels need CUDA tensors; to run them on the CPU (slowly, "
                         "for tests) set TRITON_INTERPRET=1 before importing triton, or use impl='torch'")


def _logprobs_forward(logits, targets, temperature):
    """Launch the forward kernel on checked inputs. Returns logp, entropy, row_max, row_log_d, (N,) fp32."""
    N, V = logits.shape
    logits = logits.contiguous()  # a no-op for the usual (N, V) tensor; a strided view is copied once
    logp = torch.empty(N, device=logits.device, dtype=torch.float32)  # (N,)
    entropy = torch.empty_like(logp)  # (N,)
    row_max = torch.empty_like(logp)  # (N,)
    row_log_d = torch.empty_like(logp)  # (N,)
    _logprobs_fwd_kernel[(N,)](
        logits, targets.contiguous(), logp, entropy, row_max, row_log_d, V, float(temperature),
        **_launch_config(V),
    )
    return logp, entropy, row_max, row_log_d


def _logprobs_backward(grad_logp, grad_entropy, logits, targets, row_max, row_log_d, entropy, temperature,
                       in_place=False):
    """Launch the backward kernel. Returns the gradient wrt logits (N, V) in the logits' dtype; in_place
    writes it over the logits (each element is read by the program that then overwrites it), for a
    caller that made the logits only to differentiate them (part 2)."""
    N, V = logits.shape
    logits = logits.contiguous()
    grad_logits = logits if in_place else torch.empty_like(logits)  # (N, V)
    # .contiguous(): the gradient of a .sum() arrives as an expanded tensor with stride 0
    _logprobs_bwd_kernel[(N,)](
        logits, targets.contiguous(), row_max, row_log_d, entropy,
        grad_logp.float().contiguous(), grad_entropy.float().contiguous(), grad_logits,
        V, float(temperature), **_launch_config(V),
    )
    return grad_logits


class _LogProbs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, temperature):
        logp, entropy, row_max, row_log_d = _logprobs_forward(logits, targets, temperature)
        # Saved: the logits (the caller holds them anyway) and three floats per row -- not the softmax.
        ctx.save_for_backward(logits, targets, row_max, row_log_d, entropy)
        ctx.temperature = temperature
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        # autograd passes zeros for an output that did not reach the loss (e.g. entropy unused)
        logits, targets, row_max, row_log_d, entropy = ctx.saved_tensors
        grad_logits = _logprobs_backward(grad_logp, grad_entropy, logits, targets, row_max, row_log_d,
                                         entropy, ctx.temperature)
        return grad_logits, None, None  # no gradient for targets, temperature


def logprobs_triton(logits, targets, temperature=1.0):
    """(logp (N,), entropy (N,)) fp32, the same as logprobs_reference, in one pass over the logits;
    differentiable wrt logits through both outputs. Needs CUDA tensors, or TRITON_INTERPRET=1."""
    _check_logits_targets(logits, targets, temperature, "logprobs_triton")
    _check_kernel_device(logits, "logprobs_triton")
    return _LogProbs.apply(logits, targets, float(temperature))


# ----------------------------------------------------------------------------------------------------
# 2. From hidden states: logp and entropy of (hidden @ weight.T), chunk by chunk
#
# Even the kernels of part 1 need the (N, V) logits as input, and the LM head writes all of them. Here
# the host walks over chunks of Nc rows: it computes one (Nc, V) block of logits with a cuBLAS matmul,
# runs part 1's kernel on it (which walks the vocabulary BLOCK_V columns at a time), keeps the three
# floats per row, and drops the block. The backward recomputes each block, turns it into its gradient
# in place with part 1's backward kernel, and multiplies that into the gradients of hidden and weight.
#
# What is live at the worst moment, a chunk of the backward (itemsize b of hidden and weight):
#   grad_weight   (V, C) fp32      4 V C   every variant holds the weight's gradient; addmm_ adds each
#                                          chunk's grad_logits^T @ h into it without a (V, C) temporary
#                                          (bf16 / fp16: the product is made in b V C bytes first)
#   the block     (Nc, V)          b Nc V  one buffer for every chunk: the logits, then their gradient
#   grad_hidden   (N, C)           b N C   and the saved (N,) floats: small
# So the peak is 4 V C + b Nc V + b N C, and the chunk is chosen from a byte budget for the block:
# Nc = max_chunk_bytes // (b V). The default budget is half the LM head's own bytes (b V C / 2), i.e.
# Nc = C / 2 rows, but never less than 32 MiB, which tiny models never fill (one chunk).
# A worked example: GPT-2 small in fp32, N = 2048, C = 768, V = 50257. grad_weight 147 MiB; Nc = 384,
# the block 74 MiB; grad_hidden 6 MiB: about 227 MiB, against all (N, V) logits at once, 393 MiB for
# each fp32 copy, several of which autograd keeps (bench/RESULTS.md has the measured peaks).
# The cost: the backward redoes the (Nc, V) matmul of every chunk, so 4 matmuls of 2 N V C FLOPs instead
# of 3 (forward, grad hidden, grad weight), about 1/3 more matmul time.
#
# Why not tl.dot inside a kernel, never writing the block at all: the backward needs grad_logits @ W
# and grad_logits^T @ h anyway, cuBLAS is as fast as a matmul gets, and the block lives in memory only
# for one chunk. (It also avoids triton 3.9's interpreter bug where tl.dot on bf16 returns garbage.)


def linear_logprobs_reference(hidden, weight, targets, temperature=1.0):
    """logprobs_reference(hidden @ weight.T, targets, temperature), holding all (N, V) logits."""
    return logprobs_reference(hidden @ weight.T, targets, temperature)  # (N, V) logits


# Bytes each logit of a chunk costs: the Triton path keeps the block in the inputs' dtype (the gradient
# overwrites it); the PyTorch path keeps several fp32 (Nc, V) tensors while it differentiates a chunk (the
# fp32 logits, log_softmax, its exp, the entropy's product, their gradients): 17 to 21 bytes a logit
# measured (bench/RESULTS.md), 24 to be safe.
TORCH_BYTES_PER_LOGIT = 24
MIN_BUDGET = 32 * 2**20


def chunk_rows(weight, triton, max_chunk_bytes=None):
    """Rows of logits per chunk: as many as fit in max_chunk_bytes (default: half the LM head's bytes, at
    least MIN_BUDGET), at least one."""
    V, C = weight.shape
    if max_chunk_bytes is None:
        max_chunk_bytes = max(weight.element_size() * V * C // 2, MIN_BUDGET)
    per_row = V * (weight.element_size() if triton else TORCH_BYTES_PER_LOGIT)
    return max(1, max_chunk_bytes // per_row)


def _check_linear_inputs(hidden, weight, targets, temperature, max_chunk_bytes, name):
    """Raise ValueError for every input that linear_logprobs does not accept, whichever impl runs."""
    if not isinstance(hidden, torch.Tensor) or hidden.dim() != 2:
        raise ValueError(f"{name}: hidden must be a 2-D tensor (N, C); flatten (B, T, C) with "
                         f"hidden.reshape(-1, C) first, got shape {tuple(getattr(hidden, 'shape', ()))}")
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or weight.shape[1] != hidden.shape[1]:
        raise ValueError(f"{name}: weight must be the LM head's (V, C) = (V, {hidden.shape[1]}), "
                         f"got shape {tuple(getattr(weight, 'shape', ()))}")
    if hidden.dtype != weight.dtype or hidden.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"{name}: hidden ({hidden.dtype}) and weight ({weight.dtype}) must share one "
                         f"dtype out of {SUPPORTED_DTYPES}")
    if hidden.device != weight.device:
        raise ValueError(f"{name}: hidden is on {hidden.device}, weight on {weight.device}")
    if hidden.numel() == 0 or weight.numel() == 0:
        raise ValueError(f"{name}: empty input, hidden {tuple(hidden.shape)}, weight {tuple(weight.shape)}")
    _check_targets(targets, hidden.shape[0], hidden.device, name)
    _check_temperature(temperature, name)
    if max_chunk_bytes is not None and (isinstance(max_chunk_bytes, bool) or not isinstance(max_chunk_bytes, int)
                                        or max_chunk_bytes <= 0):
        raise ValueError(f"{name}: max_chunk_bytes must be a positive int (bytes for one chunk of logits) or "
                         f"None, got {max_chunk_bytes!r}")


class _LinearLogProbs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, temperature, chunk_size):
        N = hidden.shape[0]
        logp = torch.empty(N, device=hidden.device, dtype=torch.float32)  # (N,)
        entropy = torch.empty_like(logp)  # (N,)
        row_max = torch.empty_like(logp)  # (N,)
        row_log_d = torch.empty_like(logp)  # (N,)
        block = torch.empty(min(chunk_size, N), weight.shape[0], device=hidden.device, dtype=hidden.dtype)
        for start in range(0, N, chunk_size):  # every chunk's logits in the one (Nc, V) block
            rows = slice(start, start + chunk_size)
            # (Nc, V) in hidden's dtype, fp32 accumulation in cuBLAS
            logits = torch.mm(hidden[rows], weight.T, out=block[: min(chunk_size, N - start)])
            logp[rows], entropy[rows], row_max[rows], row_log_d[rows] = _logprobs_forward(
                logits, targets[rows], temperature)
        ctx.save_for_backward(hidden, weight, targets, row_max, row_log_d, entropy)
        ctx.temperature = temperature
        ctx.chunk_size = chunk_size
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        hidden, weight, targets, row_max, row_log_d, entropy = ctx.saved_tensors
        need_grad_hidden, need_grad_weight = ctx.needs_input_grad[:2]
        N = hidden.shape[0]
        grad_hidden = torch.empty_like(hidden) if need_grad_hidden else None  # (N, C)
        # fp32: the weight's gradient is a sum over every chunk, which bf16 would round at each step
        grad_weight = None
        if need_grad_weight:
            grad_weight = torch.zeros(weight.shape, device=weight.device, dtype=torch.float32)  # (V, C)
        block = torch.empty(min(ctx.chunk_size, N), weight.shape[0], device=hidden.device, dtype=hidden.dtype)
        for start in range(0, N, ctx.chunk_size):
            rows = slice(start, start + ctx.chunk_size)
            # (Nc, V) recomputed, in the one block: the price of not storing them
            logits = torch.mm(hidden[rows], weight.T, out=block[: min(ctx.chunk_size, N - start)])
            grad_logits = _logprobs_backward(grad_logp[rows], grad_entropy[rows], logits, targets[rows],
                                             row_max[rows], row_log_d[rows], entropy[rows], ctx.temperature,
                                             in_place=True)  # (Nc, V), in the logits' memory
            if need_grad_hidden:
                torch.mm(grad_logits, weight, out=grad_hidden[rows])  # (Nc, C) <- (Nc, V) @ (V, C)
            if need_grad_weight:  # (V, C) += (V, Nc) @ (Nc, C)
                if grad_logits.dtype == grad_weight.dtype:
                    grad_weight.addmm_(grad_logits.T, hidden[rows])  # in place: no (V, C) temporary
                else:
                    grad_weight += grad_logits.T @ hidden[rows]  # the bf16 / fp16 product, added in fp32
        if need_grad_weight:
            grad_weight = grad_weight.to(weight.dtype)
        return grad_hidden, grad_weight, None, None, None  # none for targets, temperature, chunk_size


def _linear_logprobs_torch(hidden, weight, targets, temperature, chunk_size):
    """The same chunking in plain PyTorch, so CPU users get the memory saving too.

    torch.utils.checkpoint keeps only each chunk's inputs; the backward re-runs that chunk's forward
    (one more (Nc, V) matmul and log_softmax, about 1/3 more matmul time) and frees it before the next
    chunk. Peak memory is then logprobs_reference's few fp32 (Nc, V) tensors for one chunk of Nc rows
    (TORCH_BYTES_PER_LOGIT each), instead of the same for all N rows, plus autograd's (V, C) gradient of
    the weight and the one of each chunk it adds into it.
    """
    logps, entropies = [], []
    for start in range(0, hidden.shape[0], chunk_size):
        rows = slice(start, start + chunk_size)
        logp, entropy = checkpoint(linear_logprobs_reference, hidden[rows], weight, targets[rows],
                                   temperature, use_reentrant=False)  # (Nc,), (Nc,)
        logps.append(logp)
        entropies.append(entropy)
    return torch.cat(logps), torch.cat(entropies)  # (N,), (N,)


def linear_logprobs(hidden, weight, targets, temperature=1.0, max_chunk_bytes=None, impl="auto"):
    """(logp (N,), entropy (N,)) fp32 of log_softmax(hidden @ weight.T / temperature) at targets,
    never holding more than max_chunk_bytes of logits (default: see chunk_rows); differentiable wrt
    hidden and weight.

    hidden (N, C), weight (V, C) (the LM head, no bias), targets int64 (N,). impl as in token_logprobs:
    "triton" (chunks + part 1's kernels), "torch" (chunks + checkpoint), "auto" (triton on CUDA).
    """
    if isinstance(hidden, torch.Tensor) and torch.is_autocast_enabled(hidden.device.type):
        # Do here the cast autocast would do in the matmul (e.g. fp32 weight to bf16), so that the
        # backward, which autocast does not reach, recomputes the very logits the forward saw.
        autocast_dtype = torch.get_autocast_dtype(hidden.device.type)
        hidden, weight = hidden.to(autocast_dtype), weight.to(autocast_dtype)
    _check_linear_inputs(hidden, weight, targets, temperature, max_chunk_bytes, "linear_logprobs")
    if _use_kernel(hidden, impl, "linear_logprobs"):
        _check_kernel_device(hidden, "linear_logprobs")
        rows = chunk_rows(weight, True, max_chunk_bytes)
        return _LinearLogProbs.apply(hidden, weight, targets, float(temperature), rows)
    return _linear_logprobs_torch(hidden, weight, targets, temperature, chunk_rows(weight, False, max_chunk_bytes))


# ----------------------------------------------------------------------------------------------------
# 3. The one place that chooses the kernels or the PyTorch path, and the entry point on (N, V) logits
#
# _use_kernel decides for linear_logprobs (part 2, train_ppo.py's log-probs) and for token_logprobs below,
# which takes logits a caller already holds.

IMPLS = ("auto", "triton", "torch")
_warned_reference = False  # the fallback warning is printed once per process


def _use_kernel(tensor, impl, name):
    """True for the Triton path, False for the PyTorch one.

    "auto" takes Triton when the tensor is on CUDA (or RLHF_CUDA_SHAPED=1, kernels.gpu_path); on any other
    device it takes the PyTorch path (logprobs_reference, or linear_logprobs' chunked one) and says so once
    per process. The interpreter is a correctness tool, far too slow to be chosen by "auto" on its own.
    """
    global _warned_reference
    if impl not in IMPLS:
        raise ValueError(f"{name}: impl must be one of {IMPLS}, got {impl!r}")
    if impl != "auto":
        return impl == "triton"
    if gpu_path(tensor.device):
        return True
    if not _warned_reference:
        warnings.warn(f"kernels.logprob: {name} got tensors on {tensor.device}, so the PyTorch path is "
                      "used (the Triton kernels need CUDA); impl='torch' (train_ppo.py: --logprob_impl torch) "
                      "chooses it without this warning",
                      stacklevel=3)
        _warned_reference = True
    return False


def token_logprobs(logits, targets, temperature=1.0, impl="auto"):
    """(logp (N,), entropy (N,)) fp32: log p(targets) and the entropy of softmax(logits / temperature).

    logits (N, V) fp32/fp16/bf16, targets int64 (N,). impl: "auto" (Triton on CUDA, else the reference
    with a one-time warning), "triton" (CUDA, or CPU tensors under TRITON_INTERPRET=1), "torch".
    """
    _check_logits_targets(logits, targets, temperature, "token_logprobs")
    if _use_kernel(logits, impl, "token_logprobs"):
        return logprobs_triton(logits, targets, temperature)
    return logprobs_reference(logits, targets, temperature)
