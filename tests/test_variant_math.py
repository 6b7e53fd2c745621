"""Each variant's functional core against exact softmax attention: exact limits, masks, causality, gradients."""

from __future__ import annotations

import math

import pytest
import torch

from hf_attn_variants.modeling.attention_common import exact_attention
from hf_attn_variants.modeling.bigbird_attention import BigBirdSettings, block_sparse_attention
from hf_attn_variants.modeling.linformer_attention import linformer_attention
from hf_attn_variants.modeling.lsh_attention import LSHSettings, lsh_attention
from hf_attn_variants.modeling.performer_attention import orthogonal_gaussian, performer_attention

B, H, N, D = 2, 2, 50, 16
SCALE = D**-0.5


def qkv(length: int = N, seed: int = 0, dtype=torch.float32, scale: float = 1.0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, length, D, generator=g, dtype=torch.float64).to(dtype) * scale for _ in range(3)]


def right_padding(length: int = N, pad: int = 13) -> torch.Tensor:
    mask = torch.ones(B, length, dtype=torch.bool)
    mask[1, length - pad :] = False
    return mask


def reference(q, k, v, key_mask=None, causal=False, scale=SCALE):
    """Naive softmax attention; query i at position Lk - Lq + i."""
    scores = (q @ k.transpose(-1, -2)) * scale
    lq, lk = q.shape[2], k.shape[2]
    if causal:
        q_pos = torch.arange(lk - lq, lk)[:, None]
        scores = scores.masked_fill(torch.arange(lk)[None] > q_pos, float("-inf"))
    if key_mask is not None:
        scores = scores.masked_fill(~key_mask[:, None, None, :], float("-inf"))
    return torch.softmax(scores, -1) @ v


def sparse_bigbird(block=8, window=1, global_blocks=1, random_blocks=2):
    return BigBirdSettings(block_size=block, window_blocks=window, global_blocks=global_blocks,
                           random_blocks=random_blocks)


def run_bigbird(q, k, v, key_mask, causal, settings, seed=0):
    num_blocks = math.ceil(k.shape[2] / settings.block_size)
    table = torch.rand(num_blocks, settings.random_blocks, generator=torch.Generator().manual_seed(seed))
    return block_sparse_attention(q, k, v, key_mask, causal, SCALE, settings, table)


def run_lsh(q, k, v, key_mask, causal, settings, seed=0, windows_only=False):
    shape = (settings.num_hashes, D, max(settings.num_buckets // 2, 1))
    rotations = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    return lsh_attention(q, k, v, rotations, key_mask, causal, SCALE, settings, exact_when_covered=not windows_only)


def run_performer(q, k, v, key_mask, causal, m=256, seed=0, chunk=16, kernel="softmax"):
    features = orthogonal_gaussian(m, D, torch.Generator().manual_seed(seed)).to(q.dtype)
    return performer_attention(q, k, v, features, key_mask, causal, SCALE, kernel, chunk)


# Every variant (in a setting that really approximates) as f(q, k, v, key_mask, causal) -> [B, H, Lq, D].
APPROXIMATIONS = {
    "performer": run_performer,
    "bigbird": lambda q, k, v, m, c: run_bigbird(q, k, v, m, c, sparse_bigbird()),
    "lsh": lambda q, k, v, m, c: run_lsh(q, k, v, m, c, LSHSettings(bucket_size=4, num_hashes=2, num_buckets=4)),
}
LINFORMER = {
    "linformer": lambda q, k, v, m, c: linformer_attention(
        q, k, v, torch.randn(1, 8, N, generator=torch.Generator().manual_seed(1)) / math.sqrt(8),
        torch.randn(1, 8, N, generator=torch.Generator().manual_seed(2)) / math.sqrt(8), m, SCALE)
}
ALL = {**APPROXIMATIONS, **LINFORMER}


# --- limits in which a variant equals exact attention -------------------------------------------------------


def test_linformer_with_identity_projections_and_k_equal_n_is_exact():
    q, k, v = qkv()
    eye = torch.eye(N)[None]
    out = linformer_attention(q, k, v, eye, eye, None, SCALE)
    torch.testing.assert_close(out, reference(q, k, v), atol=1e-5, rtol=0)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("length", [50, 3])  # not a block multiple; shorter than one block
def test_bigbird_with_window_covering_the_sequence_is_exact(causal, length):
    q, k, v = qkv(length)
    mask = right_padding(length, pad=min(13, length - 1))
    settings = sparse_bigbird(block=8, window=8, global_blocks=1, random_blocks=2)
    out = run_bigbird(q, k, v, mask, causal, settings)
    expected = reference(q, k, v, mask, causal)
    torch.testing.assert_close(out[0], expected[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(out[1, :, : length - 13], expected[1, :, : length - 13], atol=1e-5, rtol=0)


@pytest.mark.parametrize("query_length", [1, 3, 8])
@pytest.mark.parametrize("padded", [False, True])
def test_bigbird_decoding_step_equals_the_full_pass(query_length, padded):
    """Causal queries all in the last key block (a decoding step: the gathered fast path) get what the same rows
    of a full causal pass get (the blocked path), padding included. 59 keys in blocks of 8: the pattern is sparse."""
    length = 59 if query_length < 8 else 64  # 8 queries fill the last block exactly
    q, k, v = qkv(length=length, seed=3)
    mask = None
    if padded:
        mask = torch.ones(B, length, dtype=torch.bool)
        mask[1, :6] = False  # left padding: the decoding case
    settings = sparse_bigbird(block=8)
    full = run_bigbird(q, k, v, mask, True, settings)
    step = run_bigbird(q[:, :, -query_length:], k, v, mask, True, settings)
    torch.testing.assert_close(step, full[:, :, -query_length:], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("query_length", [23, 5])
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_bigbird_hand_written_backward_passes_gradcheck(causal, query_length, dropout):
    """Several groups of query blocks, cached keys before the queries, padding, and attention dropout (the same
    seed in every call, so the backward must regenerate the forward's masks)."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(B, 1, query_length, 2, generator=g, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(B, 1, 23, 2, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2))
    mask = right_padding(23, pad=3)
    table = torch.rand(20, 2, generator=torch.Generator().manual_seed(1))

    def core(q, k, v):
        torch.manual_seed(0)
        return block_sparse_attention(q, k, v, mask, causal, SCALE, sparse_bigbird(block=4), table, dropout,
                                      group_elements=3000)  # several groups of query blocks

    assert torch.autograd.gradcheck(core, (q, k, v), )


@pytest.mark.slow
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_lsh_hand_written_backward_passes_gradcheck(causal, dropout):
    """Gradients through both windows, the per-query fallback and the log-sum-exp weights of the rounds."""
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(B, 1, 18, 4, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3))
    settings = LSHSettings(bucket_size=4, num_hashes=2, num_buckets=4)
    rotations = torch.randn(2, 4, 2, generator=g, dtype=torch.float64)

    def core(q, k, v):
        torch.manual_seed(0)
        # Several groups; blocks of bucket_size queries: with these inputs, 2 queries take the fallback.
        return lsh_attention(q, k, v, rotations, right_padding(18, pad=5), causal, SCALE, settings, dropout,
                             group_elements=100, bucket_block_divisor=1)

    assert torch.autograd.gradcheck(core, (q, k, v))


@pytest.mark.parametrize("dropout", [0.0, 0.3])
@pytest.mark.parametrize("case", ["heads share E, no padding", "E per head, padding, first key exact",
                                  "exact window 4, first key exact"])
def test_linformer_rows_attention_hand_written_backward_passes_gradcheck(monkeypatch, dropout, case):
    """RowsAttention (every query against the same projected rows, by blocks of queries, scores recomputed in the
    backward): gradients of q, k, v and E through it and the length bias, with several query blocks and attention
    dropout (the same seed in every call, so the backward must regenerate the forward's masks); with a window, also
    through the window's extra column (its log-sum-exp and output) and the rows it replaces."""
    from hf_attn_variants.modeling import linformer_attention as la

    # rows: the first key and k = 6, aligned to 16; 2 x 2 heads x 4 queries x 16 rows per block: 4 query blocks
    monkeypatch.setattr(la, "GROUP_ELEMENTS", 2 * 2 * 4 * 16)
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 2, 13, 4, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3))
    per_head = case.startswith("E per head")
    proj = torch.rand(2 if per_head else 1, 6, 16, generator=g, dtype=torch.float64, requires_grad=True)
    mask = right_padding(13, pad=4) if per_head else None
    first = 0 if case.startswith("heads share") else 1
    window = 4 if case.startswith("exact window") else 0

    def core(q, k, v, proj):
        torch.manual_seed(0)
        return la.linformer_attention(q, k, v, proj, proj, mask, SCALE, dropout, exact_first=first, window=window)

    assert len(la.query_blocks(q, la.ROW_ALIGNMENT)) == 4
    assert torch.autograd.gradcheck(core, (q, k, v, proj))


@pytest.mark.parametrize("causal", [False, True])
def test_lsh_with_one_bucket_and_a_chunk_covering_the_sequence_is_exact(causal):
    q, k, v = qkv()
    mask = right_padding()
    settings = LSHSettings(bucket_size=N, num_hashes=1, num_buckets=1)
    out = run_lsh(q, k, v, mask, causal, settings, windows_only=True)  # not the exact short-input path
    expected = reference(q, k, v, mask, causal)
    torch.testing.assert_close(out[0], expected[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(out[1, :, : N - 13], expected[1, :, : N - 13], atol=1e-5, rtol=0)


def test_lsh_rounds_combine_to_exact_when_each_round_is_exact():
    q, k, v = qkv()
    out = run_lsh(q, k, v, None, False, LSHSettings(bucket_size=N, num_hashes=3, num_buckets=1), windows_only=True)
    torch.testing.assert_close(out, reference(q, k, v), atol=1e-5, rtol=0)


# --- Performer: error falls as m grows; the bound at m = 256 ---------------------------------------------------

# Mean relative L2 error per output row, averaged over 4 feature draws, at D=16, N=50, v ~ N(0, 1) and
# q, k ~ N(0, 0.25): measured 0.15 (non-causal) and 0.13 (causal). FAVOR+'s variance grows like exp(|q + k|^2 scale),
# so larger logits need more features (or fine-tuning); the error falls like 1/sqrt(m) (0.55, 0.27, 0.15, 0.09).
PERFORMER_BOUND_M256 = 0.2


@pytest.mark.parametrize("causal", [False, True])
def test_performer_error_shrinks_with_more_features_and_is_bounded_at_256(causal):
    q, k, v = qkv()
    q, k = q * 0.5, k * 0.5
    expected = reference(q, k, v, None, causal)

    def error(m):
        runs = [run_performer(q, k, v, None, causal, m=m, seed=s) for s in range(4)]
        return torch.stack([((o - expected).norm(dim=-1) / expected.norm(dim=-1)).mean() for o in runs]).mean()

    errors = {m: error(m).item() for m in (16, 64, 256, 1024)}
    assert errors[16] > errors[64] > errors[256] > errors[1024], errors
    assert errors[256] < PERFORMER_BOUND_M256, errors


def test_performer_causal_chunking_equals_one_chunk():
    q, k, v = qkv(seed=3)
    one_chunk = run_performer(q, k, v, right_padding(), True, chunk=N)
    chunked = run_performer(q, k, v, right_padding(), True, chunk=7)
    torch.testing.assert_close(chunked, one_chunk, atol=1e-5, rtol=1e-5)


def dense_kernel_attention(q, k, v, features, key_mask, causal, kernel):
    """The same kernel attention with the full Lq x Lk matrix phi(q) phi(k)^T: what the linear-time core must equal."""
    x_q, x_k = q * math.sqrt(SCALE), k * math.sqrt(SCALE)
    w = features.transpose(-1, -2)  # [D, m], or [H, D, m] for per-head (learned) features
    if kernel in ("softmax", "learned"):
        phi_q = torch.exp(x_q @ w - 0.5 * (x_q * x_q).sum(-1, keepdim=True))
        phi_k = torch.exp(x_k @ w - 0.5 * (x_k * x_k).sum(-1, keepdim=True))
    else:
        phi_q = torch.relu(x_q @ w) / math.sqrt(features.shape[-2]) + 1e-3
        phi_k = torch.relu(x_k @ w) / math.sqrt(features.shape[-2]) + 1e-3
    scores = phi_q @ phi_k.transpose(-1, -2)
    lq, lk = q.shape[2], k.shape[2]
    if causal:
        scores = scores.masked_fill(torch.arange(lk)[None] > torch.arange(lk - lq, lk)[:, None], 0.0)
    if key_mask is not None:
        scores = scores * key_mask[:, None, None, :]
    return scores @ v / scores.sum(-1, keepdim=True)


PERFORMER_CASES = [(causal, kernel, lq) for causal in (False, True) for kernel in ("softmax", "relu", "learned")
                   for lq in (11, 4)]


@pytest.mark.parametrize("causal,kernel,query_length", PERFORMER_CASES)
def test_performer_core_equals_dense_kernel_attention_and_its_gradients_are_exact(
    causal, kernel, query_length
):
    """Forward equals the quadratic form of the same kernel (1e-10 in float64); the hand-written backward passes
    gradcheck. Several chunks, several non-causal blocks, cached keys before the queries and padding on both ends.
    The learned kernel has one projection per head and its gradient is checked too."""
    g = torch.Generator().manual_seed(5)
    q = torch.randn(B, H, query_length, 4, generator=g, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(B, H, 11, 4, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2))
    learned = kernel == "learned"
    features = orthogonal_gaussian(6 * (H if learned else 1), 4, g).double()
    features = features.view(H, 6, 4).requires_grad_() if learned else features
    mask = torch.ones(B, 11, dtype=torch.bool)
    mask[0, :2], mask[1, -3:] = False, False

    def core(q, k, v, features=features):
        return performer_attention(q, k, v, features, mask, causal, SCALE, kernel, 3, block_rows=3)

    expected = dense_kernel_attention(q, k, v, features, mask, causal, kernel)
    rows_with_keys = torch.isfinite(expected).all(-1)  # left padding leaves the first causal rows without keys
    torch.testing.assert_close(core(q, k, v)[rows_with_keys], expected[rows_with_keys], atol=1e-10, rtol=1e-10)
    inputs = (q, k, v, features) if learned else (q, k, v)
    assert torch.autograd.gradcheck(core, inputs)  # the full Jacobian: fast_mode missed a wrong lse gradient


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("causal", [False, True])
def test_performer_stays_finite_for_large_logits(dtype, causal):
    q, k, v = qkv(dtype=dtype, scale=30.0)  # logits ~ 30*30*16/4: exp() would overflow unstabilised
    q.requires_grad_(True)
    out = run_performer(q, k, v, right_padding(), causal)
    out.float().sum().backward()
    assert torch.isfinite(out.float()).all() and torch.isfinite(q.grad.float()).all()


# --- masks, causality, decoding: for every variant ------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(ALL))
def test_padded_tokens_content_leaves_real_outputs_unchanged(name):
    q, k, v = qkv()
    mask = right_padding()
    out = ALL[name](q, k, v, mask, False)
    k2, v2 = k.clone(), v.clone()
    k2[1, :, N - 13 :] = torch.randn_like(k2[1, :, N - 13 :]) * 50
    v2[1, :, N - 13 :] = torch.randn_like(v2[1, :, N - 13 :]) * 50
    out2 = ALL[name](q, k2, v2, mask, False)
    torch.testing.assert_close(out2[:, :, : N - 13], out[:, :, : N - 13], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", sorted(APPROXIMATIONS))
def test_padding_count_does_not_move_real_tokens(name):
    """Real rows are the same with 0 or 13 extra padded tokens (LSH buckets, BigBird blocks, Performer max)."""
    q, k, v = qkv()
    short = [t[:, :, : N - 13] for t in (q, k, v)]
    out_short = APPROXIMATIONS[name](*short, None, False)
    mask = torch.ones(B, N, dtype=torch.bool)
    mask[:, N - 13 :] = False
    out_padded = APPROXIMATIONS[name](q, k, v, mask, False)
    if name == "bigbird":  # random blocks are drawn among the blocks present: compare the causal form instead
        out_short = APPROXIMATIONS[name](*short, None, True)
        out_padded = APPROXIMATIONS[name](q, k, v, mask, True)
    torch.testing.assert_close(out_padded[:, :, : N - 13], out_short, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", sorted(APPROXIMATIONS))
def test_future_tokens_leave_past_outputs_unchanged(name):
    q, k, v = qkv()
    out = APPROXIMATIONS[name](q, k, v, None, True)
    q2, k2, v2 = (t.clone() for t in (q, k, v))
    for t in (q2, k2, v2):
        t[:, :, 30:] = torch.randn_like(t[:, :, 30:]) * 10
    out2 = APPROXIMATIONS[name](q2, k2, v2, None, True)
    torch.testing.assert_close(out2[:, :, :30], out[:, :, :30], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", sorted(APPROXIMATIONS))
def test_decoding_last_queries_equals_full_sequence(name):
    """With a KV cache the variant sees only the last queries; they must get what the full pass gives them."""
    q, k, v = qkv()
    mask = right_padding(pad=0) if name != "lsh" else None
    full = APPROXIMATIONS[name](q, k, v, mask, True)
    for last in (1, 5):
        tail = APPROXIMATIONS[name](q[:, :, -last:], k, v, mask, True)
        torch.testing.assert_close(tail, full[:, :, -last:], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", sorted(ALL))
def test_batch_rows_are_independent(name):
    q, k, v = qkv()
    together = ALL[name](q, k, v, None, False)
    alone = ALL[name](q[1:], k[1:], v[1:], None, False)
    torch.testing.assert_close(together[1:], alone, atol=1e-5, rtol=1e-5)


GRADIENT_CASES = [(name, False) for name in sorted(ALL)] + [(name, True) for name in sorted(APPROXIMATIONS)]


@pytest.mark.parametrize("name,causal", GRADIENT_CASES)
def test_gradients_are_finite_and_reach_q_k_v(name, causal):
    q, k, v = (t.requires_grad_(True) for t in qkv())
    out = ALL[name](q, k, v, right_padding(), causal)
    out.sum().backward()
    for t in (q, k, v):
        assert torch.isfinite(t.grad).all() and t.grad.abs().sum() > 0


@pytest.mark.parametrize("name", ["bigbird", "lsh"])
def test_sparse_variants_find_the_keys_that_matter(name):
    """With peaked attention (each query's own key dominates: k = 2q + noise) the sparse variants must do far
    better than a trivial approximation (the mean of v). Measured: bigbird 0.05, lsh 0.29, mean-of-v 0.98."""
    q, k, v = qkv()
    k = 2 * q + 0.3 * k
    expected = reference(q, k, v)

    def relative(out):
        return ((out - expected).norm(dim=-1) / expected.norm(dim=-1)).mean().item()

    trivial = relative(v.mean(2, keepdim=True).expand_as(expected))
    assert relative(APPROXIMATIONS[name](q, k, v, None, False)) < 0.35 * trivial


@pytest.mark.parametrize("length", [64, 32, 16])  # k and its divisors: every key lands in rows of its own
def test_linformer_default_block_pooling_is_exact_up_to_k_tokens_with_padding(length):
    from hf_attn_variants.modeling.linformer_attention import block_pooling

    q, k, v = qkv(length)
    mask = right_padding(length + 7, pad=7)  # row 1: `length` real keys, then 7 padded ones
    k, v, q = (torch.cat([x, torch.randn(B, H, 7, D) * 50], 2) for x in (k, v, q))  # padding: large junk
    pooling = block_pooling(64, 128)[None]  # k = 64, max_length 128: blocks of 2 positions
    out = linformer_attention(q, k, v, pooling, pooling, mask, SCALE)
    expected = reference(q[:, :, :length], k[:, :, :length], v[:, :, :length])
    torch.testing.assert_close(out[1, :, :length], expected[1], atol=1e-5, rtol=0)


def test_linformer_projection_follows_relative_positions_at_any_length_and_padding():
    """E is resampled to each row's real length: at 2k real keys block pooling pools adjacent pairs, whether the
    row is padded on the right, on the left or not at all (and so is the exact first key)."""
    from hf_attn_variants.modeling.linformer_attention import block_pooling, fitted_projection

    pooling = block_pooling(8, 64)[None]  # k = 8, max_length 64
    assert torch.equal(fitted_projection(pooling, 64, None)[0], pooling)
    assert torch.equal(fitted_projection(pooling, 16, None)[0], block_pooling(8, 16)[None])  # adjacent pairs
    q, k, v = qkv(16)
    expected = linformer_attention(q, k, v, block_pooling(8, 16)[None], block_pooling(8, 16)[None], None, SCALE)
    first_exact = linformer_attention(q, k, v, pooling, pooling, None, SCALE, exact_first=1)
    pad = torch.randn(B, H, 5, D) * 50
    for side in ("right", "left"):
        pieces = (lambda x: torch.cat([x, pad], 2)) if side == "right" else (lambda x: torch.cat([pad, x], 2))
        real = slice(0, 16) if side == "right" else slice(5, 21)
        mask = torch.zeros(B, 21, dtype=torch.bool)
        mask[:, real] = True
        out = linformer_attention(pieces(q), pieces(k), pieces(v), pooling, pooling, mask, SCALE)
        torch.testing.assert_close(out[:, :, real], expected, atol=1e-5, rtol=0)
        out = linformer_attention(pieces(q), pieces(k), pieces(v), pooling, pooling, mask, SCALE, exact_first=1)
        torch.testing.assert_close(out[:, :, real], first_exact, atol=1e-5, rtol=0)
    assert not torch.allclose(expected, reference(q, k, v), atol=1e-2)  # pooled pairs: an approximation


def lsh_reference(q, k, v, rotations, key_mask, causal, settings):
    """LSH's definition, densely (N x N masks; small N only): each query attends its positional window and the
    `c` same-bucket keys nearest it in (bucket, position) order; rounds combined by log-sum-exp. Non-causal keys
    are hashed less the mean of the real keys, and the first `exact_first` real keys are in every round's set
    instead of in a bucket."""
    from hf_attn_variants.modeling.lsh_attention import hash_buckets, local_window_start

    lq, lk = q.shape[2], k.shape[2]
    c = min(settings.bucket_size, lk)
    q_pos = torch.arange(lk - lq, lk)
    start = local_window_start(q_pos, key_mask, lk, c, causal)  # (B or 1, Lq)
    keys = torch.arange(lk)
    local = (keys >= start[..., None]) & (keys < start[..., None] + c)  # (B or 1, Lq, Lk)
    real = torch.ones(B, lk, dtype=torch.bool) if key_mask is None else key_mask
    weights = real[:, None, :, None].to(k.dtype)
    hashed = k if causal else k - (k * weights).sum(2, keepdim=True) / weights.sum(2, keepdim=True)
    leading = torch.zeros_like(real) if causal else real & (real.cumsum(-1) <= settings.exact_first)
    outs, lses = [], []
    for rotation in rotations:
        qb = hash_buckets(q, rotation, settings.num_buckets)
        kb = hash_buckets(hashed, rotation, settings.num_buckets).masked_fill(~real[:, None] | leading[:, None],
                                                                              settings.num_buckets)
        allowed = torch.zeros(B, H, lq, lk, dtype=torch.bool)
        for b in range(B):
            for h in range(H):
                for i in range(lq):
                    same = [j for j in range(lk) if kb[b, h, j] == qb[b, h, i]]  # in position order
                    before = [j for j in same if j <= q_pos[i]]
                    if causal:
                        window = before[-c:]
                    else:
                        first = max(min(len(before) - c // 2, len(same) - c), 0)
                        window = same[first : first + c]
                    allowed[b, h, i, window] = True
        allowed = (allowed & ~local[:, None]) | (local[:, None] & real[:, None, None, :]) | leading[:, None, None, :]
        if causal:
            allowed = allowed & (keys[None, :] <= q_pos[:, None])
        scores = (q @ k.transpose(-1, -2) * SCALE).masked_fill(~allowed, float("-inf"))
        lses.append(torch.logsumexp(scores, -1))
        outs.append(torch.softmax(scores, -1) @ v)
    weights = torch.softmax(torch.stack(lses), 0).unsqueeze(-1)
    return (torch.stack(outs) * weights).sum(0)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("divisor", [1, 2])  # queries per bucket block: bucket_size, bucket_size / 2
def test_lsh_blocked_computation_matches_its_definition(seed, causal, divisor):
    """The block/span computation (with its per-query fallback: 184 and 18 queries over these 8 cases) against the
    dense definition, padding included."""
    q, k, v = qkv(seed=seed)
    mask = right_padding(pad=9)
    settings = LSHSettings(bucket_size=6, num_hashes=2, num_buckets=4)
    rotations = torch.randn(2, D, 2, generator=torch.Generator().manual_seed(seed))
    out = lsh_attention(q, k, v, rotations, mask, causal, SCALE, settings, bucket_block_divisor=divisor)
    expected = lsh_reference(q, k, v, rotations, mask, causal, settings)
    torch.testing.assert_close(out[0], expected[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[1, :, : N - 9], expected[1, :, : N - 9], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("divisor", [1, 2])
def test_lsh_chunk_blocks_match_the_definition(monkeypatch, causal, divisor):
    """The other plan for the bucket windows (queries grouped by the key chunk their window starts in: no block
    overflows its span), forced, against the dense definition, padding included."""
    from hf_attn_variants.modeling import lsh_attention as la

    taken = []
    monkeypatch.setattr(la, "prefer_chunk_blocks", lambda chunked, overflow: taken.append(1) or True)
    q, k, v = qkv(seed=5)
    mask = right_padding(pad=9)
    settings = LSHSettings(bucket_size=6, num_hashes=2, num_buckets=4)
    rotations = torch.randn(2, D, 2, generator=torch.Generator().manual_seed(5))
    out = la.lsh_attention(q, k, v, rotations, mask, causal, SCALE, settings, bucket_block_divisor=divisor)
    expected = lsh_reference(q, k, v, rotations, mask, causal, settings)
    assert taken  # these inputs overflow, so the plan was chosen and used
    torch.testing.assert_close(out[0], expected[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[1, :, : N - 9], expected[1, :, : N - 9], atol=1e-5, rtol=1e-5)


def test_lsh_encoder_buckets_do_not_move_when_every_key_shifts():
    """Softmax attention ignores a shift shared by all keys; non-causal LSH hashes centred keys, so its buckets, and
    its output, ignore it too (raw keys moved by a shared bias crowd into the buckets the bias points to). N = 50 >
    c = 6: the bucket windows run."""
    q, k, v = qkv(seed=3)
    mask = right_padding(pad=9)
    settings = LSHSettings(bucket_size=6, num_hashes=2, num_buckets=4)
    rotations = torch.randn(2, D, 2, generator=torch.Generator().manual_seed(3))
    shift = 3.0 * torch.randn(1, H, 1, D, generator=torch.Generator().manual_seed(4))
    padded_keys = torch.randn(B, H, N, D, generator=torch.Generator().manual_seed(5)) * 50  # must not enter the mean
    k_moved = torch.where(mask[:, None, :, None], k + shift, padded_keys)
    out = lsh_attention(q, k, v, rotations, mask, False, SCALE, settings)
    moved = lsh_attention(q, k_moved, v, rotations, mask, False, SCALE, settings)
    torch.testing.assert_close(moved[0], out[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(moved[1, :, : N - 9], out[1, :, : N - 9], atol=1e-5, rtol=1e-5)
    raw = lsh_attention(q, k_moved, v, rotations, mask, True, SCALE, settings)  # causal layers hash raw keys
    assert (raw - lsh_attention(q, k, v, rotations, mask, True, SCALE, settings)).abs().max() > 1e-2


def dense_hybrid_attention(q, k, v, features, causal, window, exact_first=0):
    """The hybrid by its definition, with the full Lq x Lk weight matrix: exp(q.k s) on each query's window blocks
    (its own block, the previous one, and the next one when not causal) and on the first ``exact_first`` keys,
    phi(q).phi(k) elsewhere."""
    lq, lk = q.shape[2], k.shape[2]
    x_q, x_k = q * math.sqrt(SCALE), k * math.sqrt(SCALE)
    w = features.transpose(-1, -2)
    phi_q = torch.exp(x_q @ w - 0.5 * (x_q * x_q).sum(-1, keepdim=True))
    phi_k = torch.exp(x_k @ w - 0.5 * (x_k * x_k).sum(-1, keepdim=True))
    linear = phi_q @ phi_k.transpose(-1, -2) / features.shape[-2]
    exact = torch.exp(q @ k.transpose(-1, -2) * SCALE)
    q_block = (torch.arange(lk - lq, lk) // window)[:, None]
    k_block = (torch.arange(lk) // window)[None, :]
    near = (k_block >= q_block - 1) & (k_block <= (q_block if causal else q_block + 1))
    near = near | (torch.arange(lk) < exact_first)[None, :]
    weights = torch.where(near, exact, linear)
    if causal:
        weights = weights.masked_fill(torch.arange(lk)[None] > torch.arange(lk - lq, lk)[:, None], 0.0)
    return weights @ v / weights.sum(-1, keepdim=True)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("query_length", [23, 5])
@pytest.mark.parametrize("exact_first", [0, 2])
def test_performer_hybrid_equals_its_dense_definition_and_gradients_flow(causal, query_length, exact_first):
    """Several windows (23 keys, blocks of 4: the linear part covers most keys), cached keys (5 queries after 18),
    per-head learned features, with and without the first keys exact; float64 to 1e-10, and gradcheck through q,
    k, v and the features."""
    from hf_attn_variants.modeling.performer_attention import hybrid_attention

    g = torch.Generator().manual_seed(9)
    q = torch.randn(B, H, query_length, 4, generator=g, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(B, H, 23, 4, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2))
    features = orthogonal_gaussian(6 * H, 4, g).double().view(H, 6, 4).requires_grad_()

    def core(q, k, v, features):
        return hybrid_attention(q, k, v, features, causal, SCALE, 4, exact_first)

    expected = dense_hybrid_attention(q, k, v, features, causal, 4, exact_first)
    torch.testing.assert_close(core(q, k, v, features), expected, atol=1e-10, rtol=1e-10)
    assert torch.autograd.gradcheck(core, (q, k, v, features))


@pytest.mark.parametrize("causal", [False, True])
def test_performer_hybrid_is_exact_within_one_window(causal):
    from hf_attn_variants.modeling.performer_attention import hybrid_attention

    q, k, v = qkv(seed=4)
    features = orthogonal_gaussian(8, q.shape[-1], torch.Generator().manual_seed(0))
    out = hybrid_attention(q, k, v, features, causal, SCALE, q.shape[2])
    torch.testing.assert_close(out, exact_attention(q, k, v, None, causal, SCALE), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("heads", [1, H])  # shared by the heads (one matmul over the hidden width), or per head
@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("exact_first", [0, 2])
def test_linformer_equals_its_definition_with_random_projections(heads, padded, exact_first):
    """Length-normalised Linformer, densely: E [k, M] is resampled to a row's n real keys (column i: the mean of
    E's columns floor(i M / n) .. ceil((i + 1) M / n) - 1); row j of E K is the |E|-weighted mean of the real
    keys, its logit gets + log sum_i |E_ji|; k = 8 < N, so the projection really compresses. The first
    ``exact_first`` keys are attended exactly instead, and E covers the keys after them."""
    q, k, v = qkv()
    generator = torch.Generator().manual_seed(3)
    width = N + 5
    proj_k, proj_v = (torch.randn(heads, 8, width, generator=generator) for _ in range(2))
    mask = right_padding(N, pad=9) if padded else None
    real = torch.ones(B, N, dtype=torch.bool) if mask is None else mask

    f = exact_first

    def resampled(proj):  # [B, heads, 8, N]
        rows = []
        for b in range(B):
            n = int(real[b].sum()) - f
            columns = [proj[..., i * width // n : -(-(i + 1) * width // n)].mean(-1) for i in range(n)]
            rows.append(torch.nn.functional.pad(torch.stack(columns, -1), (f, N - n - f)))
        return torch.stack(rows)

    e_k, e_v = resampled(proj_k), resampled(proj_v)
    w_k, w_v = e_k.abs().sum(-1), e_v.abs().sum(-1)  # [B, heads, 8]
    key_low = torch.cat([k[:, :, :f], (e_k @ k) / w_k[..., None]], 2)
    value_low = torch.cat([v[:, :, :f], (e_v @ v) / w_v[..., None]], 2)
    bias = torch.cat([torch.zeros(B, heads, f), torch.log(w_k)], -1)
    scores = (q @ key_low.transpose(-1, -2)) * SCALE + bias[:, :, None, :]
    expected = torch.softmax(scores, -1) @ value_low
    out = linformer_attention(q, k.transpose(1, 2).contiguous().transpose(1, 2), v, proj_k, proj_v, mask, SCALE,
                              exact_first=f)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def windowed_linformer_reference(q, k, v, proj_k, proj_v, first, window):
    """Linformer with an exact window, densely (no padding): query i in block b = i // w attends exactly the
    keys at positions [(b - 1) w, (b + 2) w) after the first ``first`` ones, the first ones as rows of their own,
    and the projected rows (length-normalised as in Linformer) except those whose centre, sum_j |E_rj| j /
    sum_j |E_rj|, lies in that span. One softmax over all three."""
    length = k.shape[2]
    pool = torch.nn.functional.adaptive_avg_pool1d
    e_k, e_v = (torch.nn.functional.pad(pool(p.to(q.dtype), length - first), (first, 0)) for p in (proj_k, proj_v))
    w_k, w_v = e_k.abs().sum(-1), e_v.abs().sum(-1)  # [heads, k]
    key_low, value_low = (e_k @ k) / w_k[..., None], (e_v @ v) / w_v[..., None]
    positions = torch.arange(length, dtype=q.dtype)
    centre = (e_k.abs() @ positions) / w_k  # [heads, k]
    block = torch.arange(length) // window
    lower, upper = ((block - 1) * window)[:, None], ((block + 2) * window)[:, None]  # [L, 1]
    exact = (positions[None] >= lower) & (positions[None] < upper) & (positions[None] >= first)  # [Lq, Lk]
    replaced = (centre[:, None, :] >= lower) & (centre[:, None, :] < upper)  # [heads, Lq, k]
    exact_scores = ((q @ k.transpose(-1, -2)) * SCALE).masked_fill(~exact, float("-inf"))
    row_scores = ((q @ key_low.transpose(-1, -2)) * SCALE + torch.log(w_k)[:, None, :]).masked_fill(replaced,
                                                                                                  float("-inf"))
    first_scores = (q @ k[:, :, :first].transpose(-1, -2)) * SCALE
    probs = torch.softmax(torch.cat([first_scores, exact_scores, row_scores], -1), -1)
    return probs @ torch.cat([v[:, :, :first], v, value_low.expand(B, -1, -1, -1)], 2)


@pytest.mark.parametrize("heads", [1, H])
@pytest.mark.parametrize("exact_first", [0, 2])
@pytest.mark.parametrize("window", [4, 7])  # 7: N = 50 is no multiple of it
def test_linformer_window_equals_its_definition_with_gradients(heads, exact_first, window):
    """The blocked window (gathered_attention, hand-written backward) and the masked projected rows, combined by
    log-sum-exp, equal one dense softmax over the window keys, the first keys and the rows the window leaves,
    values and gradients (float64). k = 8 < N rows of random positive projections: really compressed."""
    q, k, v = (x.double().requires_grad_() for x in qkv())
    generator = torch.Generator().manual_seed(4)
    proj_k, proj_v = (torch.rand(heads, 8, N + 5, generator=generator, dtype=torch.float64) for _ in range(2))
    out = linformer_attention(q, k, v, proj_k, proj_v, None, SCALE, exact_first=exact_first, window=window)
    expected = windowed_linformer_reference(q, k, v, proj_k, proj_v, exact_first, window)
    torch.testing.assert_close(out, expected, atol=1e-10, rtol=1e-10)
    weights = torch.randn(out.shape, generator=generator, dtype=torch.float64)
    grads = torch.autograd.grad((out * weights).sum(), (q, k, v))
    expected_grads = torch.autograd.grad((expected * weights).sum(), (q, k, v))
    for got, want in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10)


def test_linformer_window_recovers_local_attention_that_pooling_blurs():
    """Each query's own key dominates (k = 2q + noise): pooling pairs of keys blurs it; the exact window over
    blocks i-1..i+1 keeps it. With block pooling the window replaces exactly the rows it covers (no double
    count), so the error falls well below the plain projection's."""
    from hf_attn_variants.modeling.linformer_attention import block_pooling

    q, k, v = qkv(64, seed=6)
    k = 2 * q + 0.3 * k
    expected = reference(q, k, v)

    def error(window):
        pooling = block_pooling(32, 64)[None]  # pairs of neighbours
        out = linformer_attention(q, k, v, pooling, pooling, None, SCALE, window=window)
        return ((out - expected).norm(dim=-1) / expected.norm(dim=-1)).mean().item()

    plain, windowed = error(0), error(8)
    assert windowed < 0.2 * plain, (plain, windowed)


def test_bigbird_select_positions_reads_a_cache_view_like_index_select():
    """Decoding gathers keys from a growing cache's strided view by buffer rows; the result must equal
    index_select along the sequence, for views, contiguous tensors and layouts it cannot use (transposed)."""
    from hf_attn_variants.modeling.bigbird_attention import select_positions

    buffer = torch.randn(3, 4, 40, D, generator=torch.Generator().manual_seed(0))
    index = torch.tensor([0, 5, 6, 7, 20, 26, 25])
    for x in (buffer[:, :, :27], buffer[1:, 1:3, 2:29], buffer.clone(),
              buffer.transpose(2, 3).contiguous().transpose(2, 3)[:, :, :27]):
        assert torch.equal(select_positions(x, index), x.index_select(2, index))


def test_bigbird_last_block_selection_is_kept_per_block_and_follows_new_weights():
    """The decoding step's key selection is computed once per key block and equals block_selection's; writing
    new random blocks into the state (as loading weights does) recomputes it."""
    from hf_attn_variants.modeling.bigbird_attention import BigBirdState, block_selection

    settings = sparse_bigbird()
    state = BigBirdState(settings, num_heads=H, head_dim=D, max_positions=200, seed=0)
    state.reset_parameters()

    def expected(nk):
        selected, valid = block_selection(torch.tensor([nk - 1]), nk, settings, state.table(nk), True)
        positions = (selected[:, :, None] * settings.block_size + torch.arange(settings.block_size)).flatten()
        return positions, valid[0].repeat_interleave(settings.block_size)

    first = state.last_block_keys(12)
    assert state.last_block_keys(12)[0] is first[0]  # kept
    assert all(torch.equal(a, b) for a, b in zip(first, expected(12), strict=True))
    with torch.no_grad():
        state.random_table.copy_(torch.rand(state.random_table.shape, generator=torch.Generator().manual_seed(9)))
    renewed = state.last_block_keys(12)
    assert renewed[0] is not first[0] and not torch.equal(renewed[0], first[0])
    assert all(torch.equal(a, b) for a, b in zip(renewed, expected(12), strict=True))


def test_a_heavy_first_key_is_attended_exactly_by_lsh_and_linformer_encoders():
    """An attention sink at position 0 ([CLS]: 10-21% of MiniLM's attention): with exact_first=1 every query
    weighs it exactly, where LSH would find it only in a shared bucket and Linformer would pool it away."""
    from hf_attn_variants.modeling.linformer_attention import block_pooling

    q, k, v = qkv(64, seed=5)
    k[:, :, 0] = 12 * q.mean(2) / q.mean(2).norm(dim=-1, keepdim=True) * D**0.5  # aligned with the mean query
    expected = reference(q, k, v)
    assert (torch.softmax(q @ k.transpose(-1, -2) * SCALE, -1)[..., 0].mean() > 0.5)  # really a sink

    def error(out):
        return ((out - expected).norm(dim=-1) / expected.norm(dim=-1)).mean().item()

    lsh = {f: error(run_lsh(q, k, v, None, False, LSHSettings(bucket_size=8, num_hashes=2, num_buckets=8,
                                                                 exact_first=f))) for f in (0, 1)}
    pooling = block_pooling(16, 64)[None]
    linformer = {f: error(linformer_attention(q, k, v, pooling, pooling, None, SCALE, exact_first=f))
                 for f in (0, 1)}
    assert lsh[1] < 0.8 * lsh[0] and linformer[1] < 0.8 * linformer[0], (lsh, linformer)


def multi_pass_inputs(seed: int = 0):
    """Two KeyPasses over 6 queries (leading dims [2, 2]) and 9 keys: blocks of 3 and blocks of 4 (2 empty slots),
    random key rows (repeats included) and masks, the first pass weighted by log 2."""
    from hf_attn_variants.modeling.gathered_attention import KeyPass

    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, 2, 6, 3, generator=g, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(2, 2, 9, 3, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2))
    passes = []
    for blocks, width, keys, weight in ((2, 3, 4, math.log(2.0)), (2, 4, 5, 0.0)):
        order = torch.stack([torch.randperm(6, generator=g) for _ in range(4)]).view(2, 2, 6)
        slots = torch.cat([order, torch.full((2, 2, blocks * width - 6), 6)], -1).view(2, 2, blocks, width)
        key_index = torch.randint(0, 9, (2, 2, blocks, keys), generator=g)
        allowed = torch.rand(2, 2, blocks, width, keys, generator=g) < 0.6
        passes.append(KeyPass(key_index, lambda lo, hi, allowed=allowed: allowed[:, :, lo:hi], slots, weight))
    return q, k, v, passes


def multi_pass_reference(q, k, v, passes):
    """The definition: each query's softmax over the multiset union of its allowed keys in every pass, a key's
    logit raised by its pass's log_weight; no allowed key: output 0."""
    out = torch.zeros_like(q)
    for b in range(q.shape[0]):
        for h in range(q.shape[1]):
            for i in range(q.shape[2]):
                logits, rows = [], []
                for key_pass in passes:
                    slot = (key_pass.query_index[b, h] == i).nonzero()
                    if len(slot) == 0:
                        continue
                    block, row = slot[0].tolist()
                    allowed = key_pass.mask(block, block + 1)[b, h, 0, row]
                    for j, ok in zip(key_pass.key_index[b, h, block].tolist(), allowed.tolist(), strict=True):
                        if ok:
                            logits.append(q[b, h, i] @ k[b, h, j] * SCALE + key_pass.log_weight)
                            rows.append(j)
                if logits:
                    out[b, h, i] = torch.softmax(torch.stack(logits), 0) @ v[b, h, rows]
    return out


def test_multi_pass_attention_is_one_softmax_over_every_pass_keys_with_its_gradients():
    """GatheredAttention over several KeyPasses (as LSH runs its positional window and its rounds) equals the
    dense definition, outputs and gradients (float64 gradcheck), with groups of one block (passes merged online)."""
    from hf_attn_variants.modeling.gathered_attention import multi_pass_attention

    q, k, v, passes = multi_pass_inputs()
    out, lse = multi_pass_attention(q, k, v, passes, SCALE, group_elements=1)
    torch.testing.assert_close(out, multi_pass_reference(q, k, v, passes), atol=1e-12, rtol=0)
    assert torch.isfinite(lse).all()

    def core(q, k, v):
        return multi_pass_attention(q, k, v, passes, SCALE, group_elements=1)[0]

    assert torch.autograd.gradcheck(core, (q, k, v))


def test_multi_pass_attention_refuses_blocked_queries_among_several_passes():
    """Blocked queries [*, nb, w, D] have no row order to merge passes in: a clear error, not a wrong result."""
    from hf_attn_variants.modeling.gathered_attention import KeyPass, multi_pass_attention

    q, k, v, passes = multi_pass_inputs()
    blocked = KeyPass(passes[0].key_index, passes[0].mask)  # no query_index
    with pytest.raises(ValueError, match="several KeyPasses need query_index"):
        multi_pass_attention(q.view(2, 2, 2, 3, 3), k, v, [blocked, passes[1]], SCALE)
