"""Train a small Llama-shaped decoder on Wikipedia, so the causal variants have a real model to be measured on.

    python scripts/train_wiki_decoder.py [--output outputs/wiki-llama] [--minutes 15]

No real GPT-2/Llama weights can be downloaded here. This trains one from scratch on the training articles of
hf_attn_variants.corpora (gensim's Wikipedia sample, split by article): a byte-level BPE tokenizer (8192 tokens),
then a 4-layer Llama (hidden 256, 4 heads, 1024 positions, RoPE) with transformers' Trainer on packed 512-token
blocks for a wall-clock budget. Its attention patterns are learned from real text; it is a measuring instrument,
not a useful language model. The held-out articles are never seen.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch
from tokenizers import ByteLevelBPETokenizer
from transformers import (
    GPT2TokenizerFast,
    LlamaConfig,
    LlamaForCausalLM,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

from hf_attn_variants.corpora import load_articles, prepare_wikipedia


class TimeBudget(TrainerCallback):
    """Stop training once ``seconds`` of wall time have passed."""

    def __init__(self, seconds: float):
        self.deadline = time.monotonic() + seconds

    def on_step_end(self, args, state, control, **kwargs):
        if time.monotonic() > self.deadline:
            control.should_training_stop = True
        return control


def packed_blocks(tokenizer, texts: list[str], length: int) -> torch.Tensor:
    """All texts tokenised, joined with EOS, cut into [n, length] blocks."""
    ids: list[int] = []
    for text in texts:
        ids += tokenizer(text)["input_ids"] + [tokenizer.eos_token_id]
    usable = len(ids) // length * length
    return torch.tensor(ids[:usable]).view(-1, length)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default="outputs/wiki-llama")
    parser.add_argument("--minutes", type=float, default=15.0)
    parser.add_argument("--block", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    paths = prepare_wikipedia()
    train_texts = [a["text"] for a in load_articles(paths["train"])]
    eval_texts = [a["text"] for a in load_articles(paths["eval"])]
    output = Path(args.output)
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(train_texts, vocab_size=8192, min_frequency=2, special_tokens=["<|endoftext|>"])
    tokenizer = GPT2TokenizerFast(tokenizer_object=bpe._tokenizer, eos_token="<|endoftext|>",
                                  bos_token="<|endoftext|>", pad_token="<|endoftext|>")
    train = packed_blocks(tokenizer, train_texts, args.block)
    held_out = packed_blocks(tokenizer, eval_texts, args.block)[:64]
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=1024,
                         bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.eos_token_id, tie_word_embeddings=True)
    model = LlamaForCausalLM(config)
    dataset = [{"input_ids": row, "labels": row} for row in train]
    training = TrainingArguments(
        output_dir=str(output / "trainer"), per_device_train_batch_size=args.batch_size, learning_rate=args.lr,
        num_train_epochs=20, lr_scheduler_type="cosine", warmup_steps=50, weight_decay=0.1, logging_steps=25,
        save_strategy="no", report_to=[], use_cpu=not torch.cuda.is_available(), seed=0,
    )
    trainer = Trainer(model=model, args=training, train_dataset=dataset, callbacks=[TimeBudget(args.minutes * 60)])
    start = time.process_time()
    trainer.train()
    model.eval()
    with torch.no_grad():
        losses = [model(input_ids=b[None], labels=b[None]).loss.item() for b in held_out]
    model.save_pretrained(output)
    tokenizer.save_pretrained(output)
    perplexity = math.exp(sum(losses) / len(losses))
    summary = (f"trained {trainer.state.global_step} steps ({trainer.state.global_step * args.batch_size} blocks of "
               f"{args.block} tokens, {train.numel()} training tokens) in {(time.process_time() - start) / 60:.1f} "
               f"CPU-min; held-out perplexity {perplexity:.1f} on {len(held_out)} blocks of unseen articles")
    (output / "TRAINING.md").write_text(summary + "\n")
    print(summary)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
