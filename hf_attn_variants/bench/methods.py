"""What the benchmark measures: our variants (from the variant registry), our variants at a peer's settings, the
peers themselves, and the FLOP model that gives each method's floor."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
from transformers import BertConfig, BertModel

from ..conversion import convert_model
from ..modeling import VARIANTS, get_variant, resolve_settings

HIDDEN, HEADS, HEAD_DIM = 768, 12, 64
LENGTHS = (512, 1024, 2048, 4096, 8192, 16384)
OURS = tuple(VARIANTS)
MATCHED = {"lsh-1": ("lsh", {"num_hashes": 1}), "lsh-4": ("lsh", {"num_hashes": 4}),
           "linformer-plain": ("linformer", {"exact_first": 0})}
"""Our variants at a peer's setting (Reformer's 1 and 4 hashes, LSH's default being 2; lucidrains' Linformer, which
has no exactly attended first token): method -> (variant, settings)."""
PEER_PAIRS = (("lsh-1", "hf-reformer-1"), ("lsh", "hf-reformer-2"), ("lsh-4", "hf-reformer-4"),
              ("linformer-plain", "lucidrains-linformer"), ("linformer", "lucidrains-linformer"),
              ("performer", "lucidrains-performer"), ("bigbird", "hf-bigbird"))
"""(ours, its peer at the same settings) for the peers table; the defaults' rows (linformer) for reference."""


@dataclasses.dataclass(frozen=True)
class Peer:
    """Another implementation of one of our variants' ideas: whether it runs causally, the longest length it
    manages here (BigBird builds N x N; lucidrains' causal Performer keeps an N x m x d tensor per position), and
    the keys each query costs (its FLOP model)."""

    causal: bool
    keys: Callable[[int, bool], float]  # (length, causal) -> keys each query attends
    max_length: dict = dataclasses.field(default_factory=dict)  # causal -> longest length


def _like(variant: str, **settings):
    return lambda length, causal: resolve_settings(variant, settings).keys_attended(length, causal)


PEERS = {
    "hf-bigbird": Peer(False, _like("bigbird"), {False: 8192}),
    # Reformer at 1, 2 and 4 hashes: its own and the previous chunk of 64 per hash
    **{f"hf-reformer-{n}": Peer(True, lambda length, causal, n=n: min(length, 2 * 64 * n)) for n in (1, 2, 4)},
    "lucidrains-performer": Peer(True, _like("performer"), {True: 4096}),
    "lucidrains-linformer": Peer(False, _like("linformer")),
}
assert {p for v in VARIANTS.values() for p in v.peers} == set(PEERS), "every variant's peer has a row here"
ALL_METHODS = (*OURS, *MATCHED, *PEERS)


def variant_and_settings(method: str) -> tuple[str, dict]:
    """(variant, settings) of one of our methods."""
    return MATCHED.get(method, (method, {}))


def is_ours(method: str) -> bool:
    return method in VARIANTS or method in MATCHED


def causal_capable(method: str) -> bool:
    """Whether ``method`` runs causally (our variants: the registry says)."""
    if is_ours(method):
        return get_variant(variant_and_settings(method)[0]).causal
    return PEERS[method].causal


def max_length(method: str, causal: bool) -> int:
    """The longest length ``method`` is run at."""
    return PEERS[method].max_length.get(causal, 1 << 30) if method in PEERS else 1 << 30


def attended_keys(method: str, length: int, causal: bool) -> float:
    """Keys each query attends in the method's algorithm (its FLOP-defining width), at its settings."""
    if is_ours(method):
        variant, settings = variant_and_settings(method)
        return resolve_settings(variant, settings).keys_attended(length, causal)
    return PEERS[method].keys(length, causal)


def flops(method: str, length: int, causal: bool, mode: str) -> float:
    """Forward FLOPs of projections (4 x 2 N h^2) and attention core (4 N keys h); x3 with the backward."""
    forward = 4 * 2 * length * HIDDEN**2 + 4 * length * attended_keys(method, length, causal) * HIDDEN
    return forward * (3 if mode != "forward" else 1)


def attention_layer(
    attention: str, hidden: int = 768, heads: int = 12, max_positions: int = 16384, **settings
) -> torch.nn.Module:
    """A BERT attention block (self-attention + output projection) running ``attention``, in training mode."""
    source = BertModel(
        BertConfig(
            vocab_size=8, hidden_size=hidden, num_attention_heads=heads, num_hidden_layers=1,
            intermediate_size=8, max_position_embeddings=max_positions, attention_probs_dropout_prob=0.0,
            hidden_dropout_prob=0.0,
        ),
        add_pooling_layer=False,
    )
    model = convert_model(source, attention, resolve_settings(attention, settings).to_dict())
    return model.encoder.layer[0].attention.train()


def build(method: str, length: int, causal: bool) -> torch.nn.Module:
    """The layer for ``method``: a function of x [1, N, 768] returning [1, N, 768]."""
    if is_ours(method):
        variant, settings = variant_and_settings(method)
        layer = attention_layer(variant, HIDDEN, HEADS, max_positions=max(length, 512), **settings)
        layer.self.is_causal = causal
        return lambda x: layer(x)[0]
    if method == "hf-bigbird":
        from transformers import BigBirdConfig, BigBirdModel

        config = BigBirdConfig(hidden_size=HIDDEN, num_attention_heads=HEADS, num_hidden_layers=1,
                               intermediate_size=8, attention_type="block_sparse", block_size=64,
                               num_random_blocks=3, max_position_embeddings=length, attention_probs_dropout_prob=0.0,
                               hidden_dropout_prob=0.0)
        model = BigBirdModel(config)
        attention = model.encoder.layer[0].attention.train()
        masks = model.create_masks_for_block_sparse_attn(torch.ones(1, length), 64)
        names = ("blocked_encoder_mask", "band_mask", "from_mask", "to_mask")
        kwargs = dict(zip(names, masks, strict=True))
        return lambda x: attention(x, band_mask=kwargs["band_mask"], from_mask=kwargs["from_mask"],
                                   to_mask=kwargs["to_mask"], from_blocked_mask=kwargs["blocked_encoder_mask"],
                                   to_blocked_mask=kwargs["blocked_encoder_mask"])[0]
    if method.startswith("hf-reformer"):
        from transformers import ReformerConfig
        from transformers.models.reformer.modeling_reformer import ReformerAttention

        hashes = int(method.rsplit("-", 1)[1])
        config = ReformerConfig(hidden_size=HIDDEN, num_attention_heads=HEADS, attention_head_size=HEAD_DIM,
                                attn_layers=["lsh"], lsh_attn_chunk_length=64, num_hashes=hashes,
                                num_buckets=max(2, 2 * length // 64), is_decoder=causal,
                                lsh_attention_probs_dropout_prob=0.0, hidden_dropout_prob=0.0,
                                axial_pos_embds=False, max_position_embeddings=length)
        attention = ReformerAttention(config, layer_id=0).train()
        return lambda x: attention(x).hidden_states
    if method == "lucidrains-performer":
        from performer_pytorch import SelfAttention

        return with_bert_output(SelfAttention(dim=HIDDEN, heads=HEADS, dim_head=HEAD_DIM, nb_features=256,
                                              causal=causal))
    if method == "lucidrains-linformer":
        from linformer import LinformerSelfAttention

        return with_bert_output(LinformerSelfAttention(dim=HIDDEN, seq_len=length, k=256, heads=HEADS,
                                                       dim_head=HEAD_DIM))
    raise ValueError(f"unknown method {method!r}")


def with_bert_output(attention: torch.nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """A lucidrains attention module (Q/K/V projections, attention, output projection) followed by the rest of
    BERT's attention block, LayerNorm(x + attention(x)), so that the peer's layer does the same work as ours
    (BertAttention: the same projections, then the residual and LayerNorm of BertSelfOutput)."""
    norm = torch.nn.LayerNorm(HIDDEN, eps=1e-12)
    return lambda x: norm(x + attention(x))


def build_model(name: str, variant: str, length: int):
    """A whole model as a function of input ids: a 2-layer BERT-base-shaped model, or the real all-MiniLM-L6-v2
    extended to ``length`` positions, converted to ``variant``."""
    from ..conversion import convert

    if name == "bert-base-2-layers":
        source = BertModel(BertConfig(num_hidden_layers=2, max_position_embeddings=length,
                                      attention_probs_dropout_prob=0.0, hidden_dropout_prob=0.0))
    else:
        from ..demo import minilm_path

        source = minilm_path()
    model = convert(source, attention=variant, max_position_embeddings=max(length, 512)).train()
    model.config.hidden_dropout_prob = 0.0
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    return lambda ids: model(input_ids=ids).last_hidden_state
