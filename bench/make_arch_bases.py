#!/usr/bin/env python3
"""Random-init weights of real shapes, saved once by transformers, for the architecture speed
benchmark (bench/architectures.sh): both sides load the same files.

  ~/refbench-venv/bin/python bench/make_arch_bases.py OUT_DIR [NAME ...]

writes OUT_DIR/{roberta-base, xlm-roberta-base, distilbert-base-uncased, electra-base-discriminator,
modernbert-base} (or the NAMEs given): each
its architecture's default shape (roberta-base's 50,265-token vocabulary and 514 positions; xlm-roberta-base's
250,002; distilbert-base-uncased's 6 layers; electra-base-discriminator's 12 layers of 768). No hub here, so
the tokenizers are made locally: bert-base-uncased's WordPiece (from all-MiniLM-L6-v2, the same 30,522
tokens) for DistilBERT and ELECTRA, and a byte-level BPE and a SentencePiece Unigram trained on SST-2's
texts for RoBERTa and XLM-R (their ids fit the real vocabularies; texts come out a little longer), and a
byte-level BPE with ModernBERT's special tokens and `[CLS] a [SEP]` for ModernBERT-base (22 layers of 768,
global attention every third, 128-token local windows), and a SentencePiece Unigram with DeBERTa-v3's special
tokens for deberta-v3-small and deberta-v3-base (12 layers).
"""
import json
import os
import sys
import tempfile

import torch
from tokenizers import ByteLevelBPETokenizer, SentencePieceUnigramTokenizer
from transformers import (AutoTokenizer, DistilBertConfig, DistilBertModel, DistilBertTokenizerFast, ElectraConfig, ElectraModel,
                          ElectraTokenizerFast, RobertaConfig, RobertaModel, RobertaTokenizerFast, XLMRobertaConfig, XLMRobertaModel,
                          XLMRobertaTokenizerFast)

SHARED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared")
MINILM = os.path.join(SHARED, "models", "all-minilm-l6-v2")


def texts():
    return [json.loads(l)["text"] for l in open(os.path.join(SHARED, "datasets", "sst2", "train.jsonl"))]


def save(out, model, tok):
    torch.manual_seed(0)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    print(out, sum(p.numel() for p in model.parameters()) / 1e6, "M parameters")


def roberta(out):
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts(), vocab_size=16000, special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"])
    with tempfile.TemporaryDirectory() as tmp:
        bpe.save_model(tmp)
        tok = RobertaTokenizerFast(os.path.join(tmp, "vocab.json"), os.path.join(tmp, "merges.txt"), model_max_length=512)
    torch.manual_seed(0)
    save(out, RobertaModel(RobertaConfig()), tok)


def xlm_roberta(out):
    sp = SentencePieceUnigramTokenizer()
    sp.train_from_iterator(texts(), vocab_size=16000, special_tokens=["<s>", "<pad>", "</s>", "<unk>"], unk_token="<unk>")
    sp.add_special_tokens(["<mask>"])
    tok = XLMRobertaTokenizerFast(tokenizer_object=sp, model_max_length=512)
    with tempfile.TemporaryDirectory() as tmp:
        tok.save_pretrained(tmp)
        tok = AutoTokenizer.from_pretrained(tmp)
    torch.manual_seed(0)
    save(out, XLMRobertaModel(XLMRobertaConfig(vocab_size=250002)), tok)


def distilbert(out):
    tok = DistilBertTokenizerFast(tokenizer_file=os.path.join(MINILM, "tokenizer.json"), model_max_length=512)
    torch.manual_seed(0)
    save(out, DistilBertModel(DistilBertConfig()), tok)


def electra(out):
    tok = ElectraTokenizerFast(tokenizer_file=os.path.join(MINILM, "tokenizer.json"), model_max_length=512)
    config = ElectraConfig(embedding_size=768, hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072)
    torch.manual_seed(0)
    save(out, ElectraModel(config), tok)


def modernbert(out):
    from tokenizers import processors
    from transformers import ModernBertConfig, ModernBertModel, PreTrainedTokenizerFast
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts(), vocab_size=16000, special_tokens=["[UNK]", "[CLS]", "[SEP]", "[PAD]", "[MASK]"])
    bpe.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]",
                                                       special_tokens=[("[CLS]", 1), ("[SEP]", 2)])
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]", pad_token="[PAD]",
                                  mask_token="[MASK]", model_max_length=8192)
    torch.manual_seed(0)
    save(out, ModernBertModel(ModernBertConfig(pad_token_id=3, cls_token_id=1, sep_token_id=2, bos_token_id=1, eos_token_id=2)), tok)


def deberta_v3_small(out, layers=6):
    # deberta-v3-small's shape: 6 layers of 768, 128,100-token vocabulary, 256 log buckets over 512
    # positions, both attention terms with shared keys, no absolute positions or token types
    # (deberta-v3-base: the same with 12 layers).
    from transformers import DebertaV2Config, DebertaV2Model, DebertaV2TokenizerFast
    sp = SentencePieceUnigramTokenizer()
    sp.train_from_iterator(texts(), vocab_size=16000, special_tokens=["[PAD]", "[CLS]", "[SEP]", "[UNK]"], unk_token="[UNK]")
    sp.add_special_tokens(["[MASK]"])
    tok = DebertaV2TokenizerFast(tokenizer_object=sp, bos_token="[CLS]", eos_token="[SEP]", sep_token="[SEP]", cls_token="[CLS]",
                                 unk_token="[UNK]", pad_token="[PAD]", mask_token="[MASK]", model_max_length=512)
    with tempfile.TemporaryDirectory() as tmp:
        tok.save_pretrained(tmp)
        tok = AutoTokenizer.from_pretrained(tmp)
    config = DebertaV2Config(vocab_size=128100, hidden_size=768, num_hidden_layers=layers, num_attention_heads=12, intermediate_size=3072,
                             max_position_embeddings=512, relative_attention=True, position_buckets=256, max_relative_positions=-1,
                             pos_att_type=["p2c", "c2p"], share_att_key=True, norm_rel_ebd="layer_norm", position_biased_input=False,
                             type_vocab_size=0, pad_token_id=0, layer_norm_eps=1e-7, hidden_act="gelu", pooler_hidden_size=768,
                             pooler_hidden_act="gelu", pooler_dropout=0.0)
    torch.manual_seed(0)
    save(out, DebertaV2Model(config), tok)


MAKERS = {"roberta-base": roberta, "xlm-roberta-base": xlm_roberta, "distilbert-base-uncased": distilbert,
          "electra-base-discriminator": electra, "modernbert-base": modernbert, "deberta-v3-small": deberta_v3_small,
          "deberta-v3-base": lambda out: deberta_v3_small(out, layers=12)}

if __name__ == "__main__":
    root = sys.argv[1]
    for name in sys.argv[2:] or MAKERS:
        MAKERS[name](os.path.join(root, name))
