"""BigBird-style block-sparse attention (Zaheer et al. 2020): sliding window + global + random blocks.

Keys are cut into blocks of b tokens. Query block i attends key blocks i-w..i+w (i-w..i when causal), the first g
(global) blocks and r random blocks; when not causal the global query blocks also attend every key. Each query
block gathers only its S = (2w+1) + g + r key blocks, so memory is O(N S b), never N x N. Any length works (keys
and queries are padded to a block multiple and stripped). Random blocks for query block i are drawn from a saved
uniform table row i, stratified over the blocks i may pick (so they never repeat the window or global blocks and
in causal mode depend on i alone: decoding with a cache gives what the full sequence gives).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn
from transformers.utils import logging

from .attention_common import (
    SettingsBase,
    VariantState,
    compute_dtype,
    exact_attention,
    interface_output,
    per_unpadded_row,
    prepare_call,
)
from .gathered_attention import GROUP_ELEMENTS, gathered_attention

logger = logging.get_logger(__name__)


@dataclasses.dataclass
class BigBirdSettings(SettingsBase):
    """block_size: b tokens per block; window_blocks: w blocks each side; global_blocks: g leading blocks every
    token attends (and that attend everything when not causal); random_blocks: r random blocks per query block."""

    variant = "bigbird"
    block_size: int = dataclasses.field(default=64, metadata={"positive_int": True})
    window_blocks: int = dataclasses.field(default=1, metadata={"non_negative_int": True})
    global_blocks: int = dataclasses.field(default=2, metadata={"non_negative_int": True})
    random_blocks: int = dataclasses.field(default=3, metadata={"non_negative_int": True})

    def dense_below(self, is_causal: bool) -> int:
        """Key-block count up to which the sparse pattern covers (almost) every block: exact attention is used."""
        window = self.window_blocks + 1 if is_causal else 2 * self.window_blocks + 1
        return window + self.global_blocks + self.random_blocks

    def keys_attended(self, length: int, causal: bool) -> float:
        """The window, global and random blocks of each query block."""
        return min(length, self.dense_below(causal) * self.block_size)


class BigBirdState(VariantState):
    """random_table: [max_blocks, r] uniforms in [0, 1) choosing each query block's random key blocks."""

    settings_class = BigBirdSettings

    def __init__(self, settings: BigBirdSettings, num_heads: int, head_dim: int, max_positions: int, seed: int):
        super().__init__(settings, num_heads, head_dim, max_positions, seed)
        rows = -(-max_positions // settings.block_size) + 1
        self.register_buffer("random_table", torch.empty(rows, settings.random_blocks))

    @torch.no_grad()
    def reset_parameters(self) -> None:
        # float32 whatever the default dtype, so a bf16 build draws the same blocks
        values = torch.rand(self.random_table.shape, generator=self.generator(), dtype=torch.float32)
        self.random_table.copy_(values.to(self.random_table.device, self.random_table.dtype))

    def last_block_keys(self, num_blocks: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``last_block_selection`` for this state's random blocks. A step's selection depends on the block count
        alone, so it is computed once per block of b decoded tokens and kept (keyed on the table's identity and
        version: loading new weights recomputes it)."""
        table = self.random_table
        key = (num_blocks, table.data_ptr(), table._version, table.device)
        if getattr(self, "_last_block_memo", (None,))[0] != key:
            self._last_block_memo = (key, *last_block_selection(num_blocks, self.settings, self.table(num_blocks),
                                                                  table.device))
        return self._last_block_memo[1], self._last_block_memo[2]

    def table(self, num_blocks: int) -> torch.Tensor:
        """The first ``num_blocks`` rows; rows past the saved table continue the same seeded stream."""
        rows = self.random_table.shape[0]
        if num_blocks <= rows:
            return self.random_table[:num_blocks]
        shape = (num_blocks, self.settings.random_blocks)
        extra = torch.rand(shape, generator=self.generator(1), dtype=torch.float32)[rows:]
        return torch.cat([self.random_table, extra.to(self.random_table.device, self.random_table.dtype)])


def block_selection(
    query_blocks: torch.Tensor,
    num_key_blocks: int,
    settings: BigBirdSettings,
    random_table: torch.Tensor,
    is_causal: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Key blocks each query block attends. query_blocks [nq] (absolute block ids); random_table [>= max id + 1, r].

    Returns (selected [nq, S] block ids, valid [nq, S] bool); invalid slots (out of range or duplicates) are masked.
    """
    w, g = settings.window_blocks, settings.global_blocks
    device = query_blocks.device
    qb = query_blocks[:, None]
    after = 0 if is_causal else w
    window = qb + torch.arange(-w, after + 1, device=device)
    window_valid = (window >= 0) & (window < num_key_blocks)
    lo, hi = qb - w, qb + after  # window span, inclusive
    glob = torch.arange(g, device=device).expand(len(query_blocks), g)
    glob_valid = (glob < num_key_blocks) & ((glob < lo) | (glob > hi))
    # Random blocks come from [g, lo) and, when not causal, [max(hi + 1, g), num_key_blocks).
    first_len = (lo - g).clamp_min(0)
    second_start = torch.clamp(hi + 1, min=g)
    second_len = torch.zeros_like(first_len) if is_causal else (num_key_blocks - second_start).clamp_min(0)
    allowed = first_len + second_len
    r = random_table.shape[-1]
    strata = torch.arange(r, device=device)
    stratum_lo = strata * allowed // r
    stratum_hi = (strata + 1) * allowed // r
    uniforms = random_table[query_blocks].to(device, torch.float32)
    pick = stratum_lo + (uniforms * (stratum_hi - stratum_lo)).long()
    pick = torch.minimum(pick, (stratum_hi - 1).clamp_min(0))
    rand = torch.where(pick < first_len, g + pick, second_start + pick - first_len)
    rand_valid = stratum_hi > stratum_lo
    selected = torch.cat([window, glob, rand], dim=1).clamp(0, max(num_key_blocks - 1, 0))
    valid = torch.cat([window_valid, glob_valid, rand_valid], dim=1)
    return selected, valid


def last_block_selection(num_blocks: int, settings: BigBirdSettings, random_table: torch.Tensor, device
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """Key positions [S*b] (may run past the keys) and slot validity [S*b] of a causal query in the last of
    ``num_blocks`` key blocks."""
    b = settings.block_size
    selected, slot_valid = block_selection(torch.tensor([num_blocks - 1], device=device), num_blocks, settings,
                                           random_table, True)
    key_pos = (selected[:, :, None] * b + torch.arange(b, device=device)).flatten()
    return key_pos, slot_valid[0].repeat_interleave(b)


class BlockMask:
    """Which gathered keys each query of a group of query blocks may attend: [B or 1, 1, G, b, S*b] bool (the slot
    is valid - in range, not a duplicate -, the key exists and is not padding, and, when causal, not in the
    future)."""

    def __init__(self, key_pos, slot_valid, key_valid, key_length: int, query_blocks, block_size: int,
                 is_causal: bool):
        self.key_pos, self.slot_valid, self.key_valid = key_pos, slot_valid, key_valid  # [nq, S*b], [nq, S], [B, Lk]
        self.key_length, self.query_blocks = key_length, query_blocks
        self.block_size, self.is_causal = block_size, is_causal

    def __call__(self, lo: int, hi: int) -> torch.Tensor:
        rows, b = slice(lo, hi), self.block_size
        key_pos = self.key_pos[rows]  # (G, S*b)
        allowed = (self.slot_valid[rows].repeat_interleave(b, dim=1) & (key_pos < self.key_length))[None]
        if self.key_valid is not None:
            allowed = allowed & self.key_valid[:, key_pos.clamp_max(self.key_length - 1)]
        allowed = allowed[:, None, :, None, :]  # (B or 1, 1, G, 1, S*b)
        if self.is_causal:
            query_pos = self.query_blocks[rows, None] * b + torch.arange(b, device=key_pos.device)  # (G, b)
            allowed = allowed & (key_pos[:, None, :] <= query_pos[:, :, None])[None, None]
        return allowed


def block_sparse_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    key_mask: torch.Tensor | None,
    is_causal: bool,
    scaling: float,
    settings: BigBirdSettings,
    random_table: torch.Tensor,
    dropout: float = 0.0,
    group_elements: int = GROUP_ELEMENTS,
    selection: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Functional core (always sparse). query [B, H, Lq, D] at positions Lk-Lq.., key/value [B, H, Lk, D],
    key_mask [B, Lk] bool or None, random_table [>= number of key blocks, r]. Returns [B, H, Lq, D].

    Keys are never copied or padded: each query block gathers its S*b key rows (positions past the end are clamped
    and masked), so decoding one token costs O(S b) whatever the context length."""
    bsz, heads, lq, dim = query.shape
    lk = key.shape[2]
    b = settings.block_size
    device = query.device
    nk = -(-lk // b)

    offset = lk - lq
    first_qb = offset // b
    if is_causal and first_qb == nk - 1:  # decoding: every query is in the last block
        return last_block_attention(query, key, value, key_mask, scaling, settings, random_table, dropout,
                                    selection)
    nq = nk - first_qb
    q_lead = offset - first_qb * b  # query rows before the first real query in its block
    query = nn.functional.pad(query, (0, 0, q_lead, nq * b - q_lead - lq)).view(bsz, heads, nq, b, dim)
    query_blocks = torch.arange(first_qb, nk, device=device)

    selected, slot_valid = block_selection(query_blocks, nk, settings, random_table, is_causal)  # (nq, S)
    key_pos = (selected[:, :, None] * b + torch.arange(b, device=device)).flatten(1)  # (nq, S*b)
    mask = BlockMask(key_pos, slot_valid, key_mask, lk, query_blocks, b, is_causal)
    dtype = compute_dtype(query.dtype)
    out, _ = gathered_attention(query.to(dtype), key.to(dtype), value.to(dtype), key_pos.clamp_max(lk - 1), mask,
                                scaling, dropout, group_elements)
    out = out.to(query.dtype).view(bsz, heads, nq * b, dim)

    global_rows = settings.global_blocks * b - (first_qb * b)
    if not is_causal and global_rows > 0:
        # Global query blocks attend every key (rows [g*b, N] only: linear in N).
        dense = exact_attention(query.view(bsz, heads, nq * b, dim)[:, :, :global_rows], key, value, key_mask,
                                False, scaling, dropout)
        out = torch.cat([dense, out[:, :, global_rows:]], dim=2)
    return out[:, :, q_lead : q_lead + lq]


def last_block_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    key_mask: torch.Tensor | None,
    scaling: float,
    settings: BigBirdSettings,
    random_table: torch.Tensor,
    dropout: float = 0.0,
    selection: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Causal queries that all lie in the last key block (a decoding step): the block's S*b selected keys are
    gathered once and the Lq real queries attend them directly, instead of padding the queries to a whole block.
    Same arguments and result as ``block_sparse_attention``; O(Lq S b) whatever the context length. selection:
    ``BigBirdState.last_block_keys`` (key positions, slot validity), computed here when not given."""
    lq, lk = query.shape[2], key.shape[2]
    b = settings.block_size
    nk = -(-lk // b)
    device = query.device
    key_pos, slot_ok = selection or last_block_selection(nk, settings, random_table, device)
    query_pos = torch.arange(lk - lq, lk, device=device)
    allowed = slot_ok & (key_pos[None, :] <= query_pos[:, None])  # (Lq, S*b); also refuses positions >= lk
    index = key_pos.clamp_max(lk - 1)
    if key_mask is not None:
        allowed = allowed[None] & key_mask[:, index][:, None, :]  # (B, Lq, S*b)
    dtype = compute_dtype(query.dtype)
    keys, values = select_positions(key, index).to(dtype), select_positions(value, index).to(dtype)
    scores = torch.matmul(query.to(dtype), keys.transpose(-1, -2)) * scaling  # [B, H, Lq, S*b]
    scores = scores.masked_fill(~allowed.unsqueeze(-3), float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num_(0.0)  # a row without keys (all padding) gives zeros
    if dropout > 0.0:
        probs = nn.functional.dropout(probs, p=dropout)
    return torch.matmul(probs, values).to(query.dtype)


def select_positions(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x[:, :, index] for x [B, H, L, D] and index [K]. A decoding cache's keys are a strided view of a larger
    buffer; rows of that buffer are gathered directly (one index_select over [rows, D], ~3x faster here than
    index_select along dim 2 of the view), without copying the view."""
    bsz, heads, _, dim = x.shape
    strides = x.stride()
    if strides[3] != 1 or strides[2] != dim or strides[0] % dim or strides[1] % dim:
        return x.index_select(2, index)
    first = torch.arange(bsz, device=x.device)[:, None] * (strides[0] // dim) + torch.arange(
        heads, device=x.device) * (strides[1] // dim)  # (B, H) first row of each (b, h)
    rows = (first[..., None] + index).reshape(-1)
    span = (bsz - 1) * (strides[0] // dim) + (heads - 1) * (strides[1] // dim) + x.shape[2]  # rows the view spans
    flat = x.as_strided((span, dim), (dim, 1))  # from the view's own storage offset
    return flat.index_select(0, rows).view(bsz, heads, index.shape[0], dim)


def bigbird_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers attention interface: q/k/v [B, H, L, D] -> ([B, Lq, H, D], None)."""
    call = prepare_call(module, BigBirdState, query, key, value, attention_mask, scaling, kwargs.get("is_causal"))
    settings, is_causal = call.state.settings, call.is_causal

    def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:  # one row, no padding
        num_key_blocks = -(-k.shape[2] // settings.block_size)
        if num_key_blocks <= settings.dense_below(is_causal):
            logger.warning_once(
                f"bigbird: inputs of at most {settings.dense_below(is_causal) * settings.block_size} tokens are "
                "covered by the sparse pattern, so they use exact attention (this call only; longer inputs stay "
                "sparse)."
            )
            return exact_attention(q, k, v, None, is_causal, call.scaling, dropout)
        table = call.state.table(num_key_blocks)
        decoding = is_causal and (k.shape[2] - q.shape[2]) // settings.block_size == num_key_blocks - 1
        selection = call.state.last_block_keys(num_key_blocks) if decoding else None
        return block_sparse_attention(q, k, v, None, is_causal, call.scaling, settings, table, dropout,
                                      selection=selection)

    # The block grid, global and random blocks are counted over real tokens only: padding cannot move an output.
    return interface_output(per_unpadded_row(attend, query, call.key, call.value, call.key_mask))
