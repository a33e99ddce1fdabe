"""Tiny random models of the paper's architectures (BART, DeBERTa-v2/v3, Llama), saved to a folder with
a word-level tokenizer built offline from the test's own text, and data files in the real datasets'
formats (GLUE columns, XSum document/summary, GSM8K question/answer)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

SPECIALS = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]  # ids 0..4: BART's and our Llama's bos/pad/eos


def save_tokenizer(folder: Path, texts: list[str], causal: bool = False) -> int:
    """A word-level fast tokenizer over `texts` saved to `folder`; returns the vocabulary size."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = sorted({w for t in texts for w in re.findall(r"\w+|[^\w\s]", t.lower())})
    vocab = {tok: i for i, tok in enumerate(SPECIALS + words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    if causal:  # a prompt must not end with </s>: generation continues right after it
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    else:
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A </s>", pair="<s> $A </s> </s> $B:1 </s>:1", special_tokens=[("<s>", 0), ("</s>", 2)]
        )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        pad_token="<pad>",
        eos_token="</s>",
        unk_token="<unk>",
        mask_token="<mask>",
    )
    fast.save_pretrained(folder)
    return len(vocab)


def tiny_bart(folder: Path, texts: list[str]) -> Path:
    from transformers import BartConfig, BartForConditionalGeneration

    vocab = save_tokenizer(folder, texts)
    cfg = BartConfig(
        vocab_size=vocab,
        d_model=32,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        max_position_embeddings=256,
        bos_token_id=0,
        pad_token_id=1,
        eos_token_id=2,
        decoder_start_token_id=2,
        forced_eos_token_id=2,
    )
    torch.manual_seed(0)
    BartForConditionalGeneration(cfg).save_pretrained(folder)
    return folder


def tiny_deberta(folder: Path, texts: list[str]) -> Path:
    from transformers import DebertaV2Config, DebertaV2Model

    vocab = save_tokenizer(folder, texts)
    cfg = DebertaV2Config(  # v3-base's layout: relative attention, p2c + c2p, no token-type embeddings
        vocab_size=vocab,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=256,
        relative_attention=True,
        position_buckets=16,
        max_relative_positions=-1,
        pos_att_type=["p2c", "c2p"],
        norm_rel_ebd="layer_norm",
        share_att_key=True,
        type_vocab_size=0,
        pad_token_id=1,
    )
    torch.manual_seed(0)
    DebertaV2Model(cfg).save_pretrained(folder)
    return folder


def tiny_llama(folder: Path, texts: list[str]) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    vocab = save_tokenizer(folder, texts, causal=True)
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=0,
        pad_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    return folder


XSUM = [
    {
        "document": f"The council of town {i} voted on {d} to fund a new library and two parks near the river.",
        "summary": f"Town {i} will build a library.",
        "id": str(i),
    }
    for i, d in enumerate(["monday", "tuesday", "friday", "sunday"] * 4)
]
GSM8K = [
    {
        "question": f"Tom has {a} apples and buys {b} more. How many apples does he have?",
        "answer": f"Tom has {a} + {b} = {a + b} apples.\n#### {a + b}",
    }
    for a, b in [(1, 2), (3, 4), (5, 6), (7, 8), (2, 2), (4, 1), (6, 3), (9, 1)] * 2
]
SENTENCES = ["the movie was great fun", "a dull and boring film", "i loved every minute", "what a waste of time"]
GLUE_PAIRS = [("the cat sat on the mat", "a cat is sitting"), ("he went home early", "nobody left the house")]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def all_text(rows: list[dict]) -> list[str]:
    return [str(v) for r in rows for v in r.values()]
