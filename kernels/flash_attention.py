"""Fused causal attention (flash attention) in Triton: forward and backward.

Read in this order:
  1. attention_reference   plain PyTorch; the definition every kernel below must match
  2. the @triton.jit kernels
       _attn_fwd_kernel             O and the log-sum-exp, one pass over the K/V blocks
       _attn_bwd_preprocess_kernel  D = rowsum(dO * O)
       _attn_bwd_dkdv_kernel        dK, dV   (one program per block of keys)
       _attn_bwd_dq_kernel          dQ       (one program per block of queries)
  3. the host wrappers that check the inputs and launch the kernels
  4. _FlashAttention (torch.autograd.Function) and flash_attention, the public entry point

Shapes: q is (B, nh, Tq, hs), k and v are (B, nh, Tk, hs), with Tq <= Tk. The queries are the LAST Tq
positions of the sequence: query i sits at absolute position Tk - Tq + i. Tq == Tk is training and
prefill; Tq == 1 is one decoding step with a KV cache; 1 < Tq < Tk is chunked prefill.

Why fuse: the naive reference writes the (B, nh, Tq, Tk) score matrix to memory, reads it back for the
softmax, writes the probabilities, and reads them again for P @ V. At T = 4096, B * nh = 16 that is
16 * 4096 * 4096 * 2 bytes = 512 MiB per pass in bf16. The kernels below keep each (BLOCK_M, BLOCK_N)
tile of scores in registers and never write the matrix at all: memory drops from O(T^2) to O(T), and
the time becomes bound by the matmuls (so the benchmark reports TFLOP/s).
Source: Dao et al. 2022, "FlashAttention" (arXiv:2205.14135), Algorithm 1 (forward) and Algorithm 2
(backward); the Triton tutorial 06-fused-attention follows the same plan.
"""

import math
import os

import torch
import triton
import triton.language as tl

SUPPORTED_HEAD_DIMS = (32, 64, 128)
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# Triton kernels may only read globals that are constexpr.
LOG2E = tl.constexpr(1.4426950408889634)  # log2(e): exp(x) == exp2(x * LOG2E)


# ----------------------------------------------------------------------------------------------------
# 1. The plain PyTorch reference


def attention_reference(q, k, v, causal=True, kv_start=None, sm_scale=None):
    """softmax(q @ k^T * sm_scale + mask) @ v, materialising the full (B, nh, Tq, Tk) matrix.

    With causal=True, query i may attend key j iff j <= Tk - Tq + i (queries aligned to the END of the
    keys). kv_start (B,) masks keys j < kv_start[b] for left-padded sequence b. A query row with no
    allowed key outputs zeros and gets zero gradient.
    """
    B, nh, Tq, hs = q.shape
    Tk = k.shape[2]
    if sm_scale is None:
        sm_scale = 1.0 / math.sqrt(hs)
    scores = (q @ k.transpose(-2, -1)) * sm_scale  # (B, nh, Tq, Tk)

    q_pos = torch.arange(Tk - Tq, Tk, device=q.device)  # (Tq,) absolute position of each query
    k_pos = torch.arange(Tk, device=q.device)  # (Tk,)
    allowed = torch.ones(Tq, Tk, dtype=torch.bool, device=q.device)  # (Tq, Tk)
    if causal:
        allowed = k_pos[None, :] <= q_pos[:, None]  # (Tq, Tk)
    allowed = allowed.expand(B, 1, Tq, Tk)  # (B, 1, Tq, Tk)
    if kv_start is not None:
        not_pad = k_pos[None, :] >= kv_start.to(q.device)[:, None]  # (B, Tk)
        allowed = allowed & not_pad[:, None, None, :]  # (B, 1, Tq, Tk)

    # A row with every key masked would be softmax(-inf, ..., -inf) = 0/0 = NaN, and the NaN would
    # flow into the gradients too. So mask with the most negative finite number instead (that row then
    # softmaxes to uniform weights, every other row is unchanged because exp(min - max) == 0) and zero
    # the masked weights afterwards: the empty row becomes all zeros, with zero gradient.
    scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
    att = torch.softmax(scores, dim=-1)  # (B, nh, Tq, Tk)
    att = att.masked_fill(~allowed, 0.0)
    return att @ v  # (B, nh, Tq, hs)


# ----------------------------------------------------------------------------------------------------
# 2. The Triton kernels
#
# Every kernel sees one (batch, head) pair per program along grid axis 1, and one block of rows along
# axis 0. Tensors are contiguous (B, nh, T, hs), so the (b, h) slice starts at bh * T * hs and row t,
# column d of it sits at t * hs + d.
#
# Notation, for one (b, h): S = sm_scale * Q K^T (Tq, Tk), P = softmax(S) row by row, O = P V.
#
# Triton compiles a kernel anew for every integer argument that is 1 or divisible by 16 where the last
# one was not. The number of heads and the query length only bound loops and masks (the row addresses
# stay aligned through the constexpr HEAD_DIM), so they are not specialised: a decoding step (Tq = 1)
# reuses the prefill's kernel. Tk stays specialised: with it unknown, ptxas spills registers in the
# fp16 / bf16 backward on sm_80 (tests/test_kernels_compile.py).
LENGTHS = ["n_heads", "Tq"]


@triton.jit
def _dot(a, b, UPCAST_BF16_DOT: tl.constexpr):
    """a @ b with an fp32 result.

    Under TRITON_INTERPRET=1, triton 3.9.0's tl.dot returns garbage for bf16 operands (bf16 loads,
    stores and fp16/fp32 dots are all right), so the host sets UPCAST_BF16_DOT when interpreting and we
    multiply in fp32 instead. On a GPU the flag is off and bf16 goes to the tensor cores as it should.
    input_precision="ieee" means fp32 inputs really get fp32 products, not TF32 (a 10-bit mantissa);
    the option is ignored for fp16/bf16 operands.
    """
    if UPCAST_BF16_DOT:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, input_precision="ieee")


@triton.jit(do_not_specialize=LENGTHS)
def _attn_fwd_kernel(
    Q, K, V, O, LSE, KV_START,  # noqa: E741 (O: the paper's name). LSE fp32 (B, nh, Tq), KV_START int32 (B,)
    sm_scale, n_heads, Tq, Tk,
    CAUSAL: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, UPCAST_BF16_DOT: tl.constexpr,
):
    # One program computes BLOCK_M rows of O. It walks over the keys BLOCK_N at a time and keeps, for
    # each row i, the online-softmax state (Milakov & Gimelshein 2018):
    #   m_i   = max of the scores seen so far            (the running max)
    #   l_i   = sum_j exp(s_ij - m_i) over keys seen      (the running sum)
    #   acc_i = sum_j exp(s_ij - m_i) v_j over keys seen  (the unnormalised output)
    # When a new block raises the max from m_i to m_new, the old terms were scaled by exp(-m_i) and
    # must now be scaled by exp(-m_new), so l_i and acc_i are multiplied by alpha = exp(m_i - m_new).
    # After the last block: o_i = acc_i / l_i, and the log-sum-exp  lse_i = m_i + log(l_i)  is saved so
    # the backward can rebuild any P_ij = exp(s_ij - lse_i) without redoing the max and the sum.
    #
    # exp2 instead of exp: exp2 is one hardware instruction (MUFU.EX2); exp(x) costs a multiply more.
    # We fold log2(e) into the scale once, qk_scale = sm_scale * log2(e), so every score below is in
    # base-2 units: exp(s) == exp2(s * log2(e)). m_i and l_i are kept in those units; only the saved
    # lse is converted back to natural log, so it means what the lecture's lse means.
    start_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // n_heads
    # int64: bh * Tk * HEAD_DIM passes 2**31 (int32 overflow) for e.g. B * nh = 256, Tk = 65536, hs = 128.
    q_base = Q + bh.to(tl.int64) * Tq * HEAD_DIM
    k_base = K + bh.to(tl.int64) * Tk * HEAD_DIM
    v_base = V + bh.to(tl.int64) * Tk * HEAD_DIM
    o_base = O + bh.to(tl.int64) * Tq * HEAD_DIM

    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)  # (BLOCK_M,) query rows
    offs_n = tl.arange(0, BLOCK_N)  # (BLOCK_N,)
    offs_d = tl.arange(0, HEAD_DIM)  # (HEAD_DIM,)
    q_pos = Tk - Tq + offs_m  # (BLOCK_M,) absolute positions of the queries
    kv_lo = tl.load(KV_START + b)  # keys j < kv_lo are left padding

    q = tl.load(q_base + offs_m[:, None] * HEAD_DIM + offs_d[None, :],
                mask=offs_m[:, None] < Tq, other=0.0)  # (BLOCK_M, HEAD_DIM), stays in registers
    qk_scale = sm_scale * LOG2E

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)  # (BLOCK_M,)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)  # (BLOCK_M,)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)  # (BLOCK_M, HEAD_DIM)

    # Only visit key blocks that hold an allowed key: none before the padding, and with causal=True
    # none after the last query of this block. For Tq == Tk this skips about half the work.
    # Rounding lo down to a multiple of BLOCK_N is not needed for correctness (the mask handles any
    # start); it lets the compiler prove the loads are block-aligned, so they vectorise on the GPU.
    lo = (kv_lo // BLOCK_N) * BLOCK_N
    hi = Tk
    if CAUSAL:
        hi = tl.minimum(Tk, Tk - Tq + (start_m + 1) * BLOCK_M)
    for start_n in range(lo, hi, BLOCK_N):
        k_pos = start_n + offs_n  # (BLOCK_N,)
        k = tl.load(k_base + k_pos[:, None] * HEAD_DIM + offs_d[None, :],
                    mask=k_pos[:, None] < Tk, other=0.0)  # (BLOCK_N, HEAD_DIM)
        v = tl.load(v_base + k_pos[:, None] * HEAD_DIM + offs_d[None, :],
                    mask=k_pos[:, None] < Tk, other=0.0)  # (BLOCK_N, HEAD_DIM)

        s = _dot(q, tl.trans(k), UPCAST_BF16_DOT) * qk_scale  # (BLOCK_M, BLOCK_N), base-2 units
        allowed = (k_pos[None, :] < Tk) & (k_pos[None, :] >= kv_lo)  # (1, BLOCK_N)
        if CAUSAL:
            allowed = allowed & (k_pos[None, :] <= q_pos[:, None])  # (BLOCK_M, BLOCK_N)
        s = tl.where(allowed, s, float("-inf"))

        # exercise online_softmax: the update derived above; mind all -inf rows; check: attention_reference
        m_new = tl.maximum(m_i, tl.max(s, 1))  # (BLOCK_M,)
        # A row that has seen no allowed key yet has m_new = -inf, and exp2(-inf - (-inf)) = NaN.
        # Subtracting 0 instead gives p = exp2(-inf) = 0 and alpha = 0: the row stays empty.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # (BLOCK_M,)
        p = tl.exp2(s - m_safe[:, None])  # (BLOCK_M, BLOCK_N) unnormalised probabilities
        alpha = tl.exp2(m_i - m_safe)  # (BLOCK_M,) rescales what we summed under the old max
        l_i = l_i * alpha + tl.sum(p, 1)
        # P is rounded to the input dtype for the tensor-core matmul; the sum above used fp32 p.
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, UPCAST_BF16_DOT)  # (BLOCK_M, HEAD_DIM)
        m_i = m_new
        # end exercise

    # Rows with no allowed key (left padding) have l_i == 0 and acc == 0: output 0, lse 0 (any finite
    # value works, the backward masks those scores to -inf before using lse).
    has_key = l_i > 0.0
    l_safe = tl.where(has_key, l_i, 1.0)
    o = acc / l_safe[:, None]  # (BLOCK_M, HEAD_DIM)
    lse = tl.where(has_key, (m_i + tl.log2(l_safe)) / LOG2E, 0.0)  # (BLOCK_M,) natural-log units
    tl.store(o_base + offs_m[:, None] * HEAD_DIM + offs_d[None, :], o.to(O.dtype.element_ty),
             mask=offs_m[:, None] < Tq)
    tl.store(LSE + bh * Tq + offs_m, lse, mask=offs_m < Tq)


# The backward. With S = sm_scale * Q K^T, P = softmax(S), O = P V and the incoming dO:
#   dV = P^T dO                         (Tk, hs)
#   dP = dO V^T                         (Tq, Tk)
#   dS = P * (dP - D[:, None])          softmax backward, with D_i = sum_j P_ij dP_ij
#   dQ = sm_scale * dS K                (Tq, hs)
#   dK = sm_scale * dS^T Q              (Tk, hs)
# D_i = sum_j P_ij (dO_i . v_j) = dO_i . (sum_j P_ij v_j) = dO_i . o_i, so D = rowsum(dO * O) costs
# O(T * hs) and needs no P: that is the preprocessing kernel. P itself is never stored; each program
# recomputes its tiles as P_ij = exp(s_ij - lse_i) from the lse saved by the forward.
#
# dK, dV sum over queries (columns of P) while dQ sums over keys (rows of P). Summing both in one
# program would need atomics, so there are two kernels: one program per key block for dK, dV and one
# per query block for dQ. The price is computing S and dP twice.


@triton.jit(do_not_specialize=["Tq"])
def _attn_bwd_preprocess_kernel(O, DO, D, Tq, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr):  # noqa: E741
    start_m = tl.program_id(0)
    bh = tl.program_id(1)
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)  # (BLOCK_M,)
    offs_d = tl.arange(0, HEAD_DIM)  # (HEAD_DIM,)
    base = bh.to(tl.int64) * Tq * HEAD_DIM
    rows = base + offs_m[:, None] * HEAD_DIM + offs_d[None, :]  # (BLOCK_M, HEAD_DIM)
    o = tl.load(O + rows, mask=offs_m[:, None] < Tq, other=0.0).to(tl.float32)
    do = tl.load(DO + rows, mask=offs_m[:, None] < Tq, other=0.0).to(tl.float32)
    delta = tl.sum(o * do, 1)  # (BLOCK_M,)
    tl.store(D + bh * Tq + offs_m, delta, mask=offs_m < Tq)


@triton.jit(do_not_specialize=LENGTHS)
def _attn_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, D, DK, DV, KV_START,
    sm_scale, n_heads, Tq, Tk,
    CAUSAL: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, UPCAST_BF16_DOT: tl.constexpr,
):
    # One program owns BLOCK_N keys: it keeps k, v, dk, dv in registers and walks over the queries.
    start_n = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // n_heads
    q_base = bh.to(tl.int64) * Tq * HEAD_DIM  # int64: see the forward
    k_base = bh.to(tl.int64) * Tk * HEAD_DIM

    offs_n = start_n * BLOCK_N + tl.arange(0, BLOCK_N)  # (BLOCK_N,) key positions
    offs_d = tl.arange(0, HEAD_DIM)  # (HEAD_DIM,)
    kv_lo = tl.load(KV_START + b)
    kv_rows = k_base + offs_n[:, None] * HEAD_DIM + offs_d[None, :]  # (BLOCK_N, HEAD_DIM)
    k = tl.load(K + kv_rows, mask=offs_n[:, None] < Tk, other=0.0)  # (BLOCK_N, HEAD_DIM)
    v = tl.load(V + kv_rows, mask=offs_n[:, None] < Tk, other=0.0)  # (BLOCK_N, HEAD_DIM)
    qk_scale = sm_scale * LOG2E

    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)

    # With causal=True, key j is seen only by queries at position >= j, i.e. query rows
    # i >= j - (Tk - Tq); start at the query block that holds the first of them (rounded down to a
    # multiple of BLOCK_M for aligned loads, as in the forward).
    lo = 0
    if CAUSAL:
        lo = tl.maximum(start_n * BLOCK_N - (Tk - Tq), 0)
        lo = (lo // BLOCK_M) * BLOCK_M
    for start_m in range(lo, Tq, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)  # (BLOCK_M,) query rows
        q_rows = q_base + offs_m[:, None] * HEAD_DIM + offs_d[None, :]  # (BLOCK_M, HEAD_DIM)
        q = tl.load(Q + q_rows, mask=offs_m[:, None] < Tq, other=0.0)  # (BLOCK_M, HEAD_DIM)
        do = tl.load(DO + q_rows, mask=offs_m[:, None] < Tq, other=0.0)  # (BLOCK_M, HEAD_DIM)
        lse2 = tl.load(LSE + bh * Tq + offs_m, mask=offs_m < Tq, other=0.0) * LOG2E  # (BLOCK_M,)
        delta = tl.load(D + bh * Tq + offs_m, mask=offs_m < Tq, other=0.0)  # (BLOCK_M,)

        # Recompute this tile of P exactly as the forward defined it (same mask, same scale).
        s = _dot(q, tl.trans(k), UPCAST_BF16_DOT) * qk_scale  # (BLOCK_M, BLOCK_N), base-2 units
        allowed = (offs_m[:, None] < Tq) & (offs_n[None, :] < Tk) & (offs_n[None, :] >= kv_lo)
        if CAUSAL:
            allowed = allowed & (offs_n[None, :] <= (Tk - Tq + offs_m)[:, None])
        p = tl.exp2(tl.where(allowed, s, float("-inf")) - lse2[:, None])  # (BLOCK_M, BLOCK_N)

        dv += _dot(tl.trans(p.to(do.dtype)), do, UPCAST_BF16_DOT)  # (BLOCK_N, HEAD_DIM)
        dp = _dot(do, tl.trans(v), UPCAST_BF16_DOT)  # (BLOCK_M, BLOCK_N)
        ds = p * (dp - delta[:, None])  # (BLOCK_M, BLOCK_N)
        dk += _dot(tl.trans(ds.to(q.dtype)), q, UPCAST_BF16_DOT)  # (BLOCK_N, HEAD_DIM)

    dk = dk * sm_scale
    tl.store(DK + kv_rows, dk.to(DK.dtype.element_ty), mask=offs_n[:, None] < Tk)
    tl.store(DV + kv_rows, dv.to(DV.dtype.element_ty), mask=offs_n[:, None] < Tk)


@triton.jit(do_not_specialize=LENGTHS)
def _attn_bwd_dq_kernel(
    Q, K, V, DO, LSE, D, DQ, KV_START,
    sm_scale, n_heads, Tq, Tk,
    CAUSAL: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, UPCAST_BF16_DOT: tl.constexpr,
):
    # One program owns BLOCK_M queries: it keeps q, dO, dq in registers and walks over the keys with
    # the same bounds as the forward.
    start_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // n_heads
    q_base = bh.to(tl.int64) * Tq * HEAD_DIM  # int64: see the forward
    k_base = bh.to(tl.int64) * Tk * HEAD_DIM

    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)  # (BLOCK_M,) query rows
    offs_n = tl.arange(0, BLOCK_N)  # (BLOCK_N,)
    offs_d = tl.arange(0, HEAD_DIM)  # (HEAD_DIM,)
    q_pos = Tk - Tq + offs_m  # (BLOCK_M,)
    kv_lo = tl.load(KV_START + b)
    q_rows = q_base + offs_m[:, None] * HEAD_DIM + offs_d[None, :]  # (BLOCK_M, HEAD_DIM)
    q = tl.load(Q + q_rows, mask=offs_m[:, None] < Tq, other=0.0)  # (BLOCK_M, HEAD_DIM)
    do = tl.load(DO + q_rows, mask=offs_m[:, None] < Tq, other=0.0)  # (BLOCK_M, HEAD_DIM)
    lse2 = tl.load(LSE + bh * Tq + offs_m, mask=offs_m < Tq, other=0.0) * LOG2E  # (BLOCK_M,)
    delta = tl.load(D + bh * Tq + offs_m, mask=offs_m < Tq, other=0.0)  # (BLOCK_M,)
    qk_scale = sm_scale * LOG2E

    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    lo = (kv_lo // BLOCK_N) * BLOCK_N  # same key range as the forward
    hi = Tk
    if CAUSAL:
        hi = tl.minimum(Tk, Tk - Tq + (start_m + 1) * BLOCK_M)
    for start_n in range(lo, hi, BLOCK_N):
        k_pos = start_n + offs_n  # (BLOCK_N,)
        k = tl.load(K + k_base + k_pos[:, None] * HEAD_DIM + offs_d[None, :],
                    mask=k_pos[:, None] < Tk, other=0.0)  # (BLOCK_N, HEAD_DIM)
        v = tl.load(V + k_base + k_pos[:, None] * HEAD_DIM + offs_d[None, :],
                    mask=k_pos[:, None] < Tk, other=0.0)  # (BLOCK_N, HEAD_DIM)

        s = _dot(q, tl.trans(k), UPCAST_BF16_DOT) * qk_scale  # (BLOCK_M, BLOCK_N), base-2 units
        allowed = (offs_m[:, None] < Tq) & (k_pos[None, :] < Tk) & (k_pos[None, :] >= kv_lo)
        if CAUSAL:
            allowed = allowed & (k_pos[None, :] <= q_pos[:, None])
        p = tl.exp2(tl.where(allowed, s, float("-inf")) - lse2[:, None])  # (BLOCK_M, BLOCK_N)

        dp = _dot(do, tl.trans(v), UPCAST_BF16_DOT)  # (BLOCK_M, BLOCK_N)
        ds = p * (dp - delta[:, None])  # (BLOCK_M, BLOCK_N)
        dq += _dot(ds.to(k.dtype), k, UPCAST_BF16_DOT)  # (BLOCK_M, HEAD_DIM)

    dq = dq * sm_scale
    tl.store(DQ + q_rows, dq.to(DQ.dtype.element_ty), mask=offs_m[:, None] < Tq)


# ----------------------------------------------------------------------------------------------------
# 3. Host wrappers: check the inputs, choose block sizes, launch


def _interpreting():
    # Triton itself decides at import time (in @triton.jit) whether to interpret, from this same
    # variable; we read it again here only to pick small blocks and the bf16 workaround in _dot.
    return os.environ.get("TRITON_INTERPRET") == "1"


def _launch_config(pass_name, head_dim, dtype, interpreting=None):
    """Block sizes and launch settings for the 'fwd' or 'bwd' kernels.

    interpreting=None reads TRITON_INTERPRET; False gives the GPU configuration whatever the variable
    says, which is how tests/test_kernels_compile.py compiles the GPU launches and how the interpreter
    tests run the kernels with the GPU's block sizes: one definition for the launcher and the tests.

    Under the interpreter every program runs as numpy on the CPU, so small blocks keep the tests fast
    and still cross several block boundaries on short odd lengths. The GPU numbers are a starting
    point for an H100 (228 KiB of shared memory per SM): K and V tiles for num_stages loop iterations
    are kept in flight in shared memory, so fp32 (twice the bytes) gets smaller tiles. Time them with
    bench/bench_attention.py before trusting them.
    """
    if _interpreting() if interpreting is None else interpreting:
        return dict(BLOCK_M=16, BLOCK_N=16)
    # Each setting is the first found that spills no register on sm_80 and sm_90 (ptxas, through
    # tests/test_kernels_compile.py; the table is in bench/RESULTS.md): a spill goes to local memory, i.e.
    # to L1/L2 and HBM, and costs far more than a smaller tile.
    # - fp32 matmuls do not use tensor cores (ieee fp32, see _dot), and fp32 tiles take twice the registers:
    #   the fp32 forward runs 32x64 tiles on 8 warps (one stage at hs=128: no prefetch of the next k / v
    #   tile); the fp32 backward one stage (no prefetch of the next q / dO tile), 8 warps and 16x16 tiles.
    # - a fp16/bf16 dK/dV program keeps four (BLOCK_N, hs) tiles in registers (k, v and the fp32 dk, dv),
    #   so BLOCK_N=32 at hs=128 halves its largest load; the pipelining (num_stages=2) stays.
    # No spill is not the same as fast: bench/gpu_check.sh times these on a GPU.
    fp32 = dtype == torch.float32
    if pass_name == "fwd":
        if fp32:
            return dict(BLOCK_M=32, BLOCK_N=64, num_warps=8, num_stages=1 if head_dim == 128 else 2)
        # e.g. hs=128, bf16: q tile 128*128*2 = 32 KiB + 3 stages * (k, v) 2*64*128*2 = 96 KiB.
        return dict(BLOCK_M=128, BLOCK_N=64, num_warps=8 if head_dim == 128 else 4, num_stages=3)
    # Backward programs hold two fp32 accumulators (dk and dv, or dq) plus two input tiles.
    if fp32:
        return dict(BLOCK_M=16, BLOCK_N=16, num_warps=8, num_stages=1)
    return dict(BLOCK_M=64, BLOCK_N=32 if head_dim == 128 else 64,
                num_warps=8 if head_dim == 128 else 4, num_stages=2)


def _check_inputs(q, k, v, kv_start, sm_scale):
    """Raise ValueError for every case the kernels do not support, before anything is launched."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"flash_attention: {name} must be a 4-D tensor (B, nh, T, hs), "
                             f"got {getattr(t, 'shape', type(t))}")
    if k.shape != v.shape:
        raise ValueError(f"flash_attention: k and v must have the same shape, got {tuple(k.shape)} "
                         f"and {tuple(v.shape)}")
    B, nh, Tq, hs = q.shape
    if k.shape[0] != B or k.shape[1] != nh or k.shape[3] != hs:
        raise ValueError(f"flash_attention: q {tuple(q.shape)} and k {tuple(k.shape)} must agree on "
                         "B, nh and hs")
    Tk = k.shape[2]
    if B * nh == 0 or Tq == 0:
        raise ValueError(f"flash_attention: empty input, q {tuple(q.shape)}")
    if Tq > Tk:
        raise ValueError(f"flash_attention: Tq={Tq} > Tk={Tk}; the queries must be the last Tq of "
                         "the Tk positions (pass the whole KV cache as k, v)")
    if hs not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"flash_attention: head dim {hs} is not supported, only "
                         f"{SUPPORTED_HEAD_DIMS} (the kernels load whole rows as one power-of-two "
                         "block); use attention_reference")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"flash_attention: q, k, v must share a dtype, got {q.dtype}, {k.dtype}, "
                         f"{v.dtype}")
    if q.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"flash_attention: dtype {q.dtype} is not supported, only "
                         f"{SUPPORTED_DTYPES}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"flash_attention: q, k, v must be on one device, got {q.device}, "
                         f"{k.device}, {v.device}")
    if not q.is_cuda and not _interpreting():
        raise ValueError("flash_attention: the Triton kernels need CUDA tensors; to run them on the "
                         "CPU (slowly, for tests) set TRITON_INTERPRET=1 before importing triton")
    if kv_start is not None:
        if not isinstance(kv_start, torch.Tensor) or kv_start.shape != (B,):
            raise ValueError(f"flash_attention: kv_start must be a tensor of shape ({B},), got "
                             f"{getattr(kv_start, 'shape', type(kv_start))}")
        if kv_start.dtype.is_floating_point or kv_start.dtype.is_complex or kv_start.dtype == torch.bool:
            raise ValueError(f"flash_attention: kv_start must be an integer tensor, got {kv_start.dtype}")
        if kv_start.device != q.device:
            raise ValueError(f"flash_attention: kv_start is on {kv_start.device}, q on {q.device}")
    if sm_scale is not None and (isinstance(sm_scale, bool) or not isinstance(sm_scale, (int, float))):
        # A tensor here would need .item(), a CPU-GPU sync point, on every call.
        raise ValueError(f"flash_attention: sm_scale must be a Python float or None, got {type(sm_scale)}")


def _flash_attn_forward(q, k, v, causal, kv_start, sm_scale):
    """Launch the forward kernel on contiguous, checked inputs. Returns o and lse (B, nh, Tq) fp32."""
    B, nh, Tq, hs = q.shape
    Tk = k.shape[2]
    o = torch.empty_like(q)  # (B, nh, Tq, hs)
    lse = torch.empty(B, nh, Tq, device=q.device, dtype=torch.float32)  # (B, nh, Tq)
    cfg = _launch_config("fwd", hs, q.dtype)
    grid = (triton.cdiv(Tq, cfg["BLOCK_M"]), B * nh)
    _attn_fwd_kernel[grid](
        q, k, v, o, lse, kv_start, sm_scale, nh, Tq, Tk,
        CAUSAL=causal, HEAD_DIM=hs, UPCAST_BF16_DOT=_interpreting() and q.dtype == torch.bfloat16,
        **cfg,
    )
    return o, lse


def _flash_attn_backward(do, q, k, v, o, lse, causal, kv_start, sm_scale):
    """Launch the three backward kernels. Returns dq, dk, dv in the input dtype."""
    B, nh, Tq, hs = q.shape
    Tk = k.shape[2]
    upcast = _interpreting() and q.dtype == torch.bfloat16
    cfg = _launch_config("bwd", hs, q.dtype)

    delta = torch.empty(B, nh, Tq, device=q.device, dtype=torch.float32)  # (B, nh, Tq) D = rowsum(dO*O)
    grid_m = (triton.cdiv(Tq, cfg["BLOCK_M"]), B * nh)
    _attn_bwd_preprocess_kernel[grid_m](o, do, delta, Tq, HEAD_DIM=hs, BLOCK_M=cfg["BLOCK_M"])

    dq = torch.empty_like(q)  # (B, nh, Tq, hs)
    dk = torch.empty_like(k)  # (B, nh, Tk, hs)
    dv = torch.empty_like(v)  # (B, nh, Tk, hs)
    grid_n = (triton.cdiv(Tk, cfg["BLOCK_N"]), B * nh)
    _attn_bwd_dkdv_kernel[grid_n](
        q, k, v, do, lse, delta, dk, dv, kv_start, sm_scale, nh, Tq, Tk,
        CAUSAL=causal, HEAD_DIM=hs, UPCAST_BF16_DOT=upcast, **cfg,
    )
    _attn_bwd_dq_kernel[grid_m](
        q, k, v, do, lse, delta, dq, kv_start, sm_scale, nh, Tq, Tk,
        CAUSAL=causal, HEAD_DIM=hs, UPCAST_BF16_DOT=upcast, **cfg,
    )
    return dq, dk, dv


# ----------------------------------------------------------------------------------------------------
# 4. The autograd Function and the public entry point


class _FlashAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, causal, kv_start, sm_scale):
        o, lse = _flash_attn_forward(q, k, v, causal, kv_start, sm_scale)
        # Saved: the inputs, O (for D) and lse (B, nh, Tq) -- O(T) memory, never the (Tq, Tk) matrix.
        ctx.save_for_backward(q, k, v, o, lse, kv_start)
        ctx.causal = causal
        ctx.sm_scale = sm_scale
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, kv_start = ctx.saved_tensors
        dq, dk, dv = _flash_attn_backward(do.contiguous(), q, k, v, o, lse, ctx.causal, kv_start,
                                          ctx.sm_scale)
        return dq, dk, dv, None, None, None  # no gradient for causal, kv_start, sm_scale


def flash_attention(q, k, v, causal=True, kv_start=None, sm_scale=None):
    """Fused attention with the same meaning as attention_reference; differentiable in q, k, v.

    q (B, nh, Tq, hs), k and v (B, nh, Tk, hs) with Tq <= Tk; hs in (32, 64, 128); fp32, fp16 or bf16
    (accumulation is fp32 either way, the output has the input dtype). kv_start: optional integer
    tensor (B,) on q's device. Needs CUDA tensors, or TRITON_INTERPRET=1 for CPU tensors.
    """
    _check_inputs(q, k, v, kv_start, sm_scale)
    B, nh, Tq, hs = q.shape
    Tk = k.shape[2]
    sm_scale = 1.0 / math.sqrt(hs) if sm_scale is None else float(sm_scale)
    # The kernels index (B, nh, T, hs) as a contiguous block. A transposed view (the usual
    # x.view(B, T, nh, hs).transpose(1, 2)) is copied here; the copy is differentiable, so the
    # gradients still reach the caller's tensors. Passing strides would avoid the copy at the cost of
    # twelve more kernel arguments.
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    # One int32 start per sequence; "no padding" is all zeros, so the kernels need no second code
    # path. Clamping to [0, Tk] on the device costs no sync: a start past the end masks every key
    # (the rows become zeros), a negative start means no padding.
    if kv_start is None:
        kv_start = torch.zeros(B, device=q.device, dtype=torch.int32)  # (B,)
    else:
        kv_start = kv_start.clamp(0, Tk).to(torch.int32).contiguous()  # (B,) a new tensor
    return _FlashAttention.apply(q, k, v, bool(causal), kv_start, sm_scale)
