"""Makes the tiny models of the golden files with transformers (run by tests/parity/regenerate.sh):

  make_models.py GOLDEN -> GOLDEN/roberta/{base,classifier}/  a random RobertaModel with a byte-level BPE
                                                              tokenizer, and RobertaForSequenceClassification
                                                              made from it (a seeded head)
                           GOLDEN/electra/{base,classifier}/  a random ElectraModel (embedding_size 16 under a
                                                              hidden size of 32) with a WordPiece tokenizer, and
                                                              ElectraForSequenceClassification made from it
                           GOLDEN/bert/{base,classifier}/     a random BertModel with a WordPiece tokenizer, and
                                                              BertForSequenceClassification made from it
                           GOLDEN/xlm-roberta/{base,classifier}/  a random XLMRobertaModel with a SentencePiece
                                                              Unigram tokenizer, and XLMRobertaForSequenceClassification
                           GOLDEN/distilbert/{base,classifier}/  a random DistilBertModel with a WordPiece
                                                              tokenizer, and DistilBertForSequenceClassification
                           GOLDEN/camembert/{base,classifier}/  a random CamembertModel with a SentencePiece Unigram
                                                              tokenizer in CamemBERT's layout (<s>NOTUSED … first,
                                                              <s> and </s> at 5 and 6), and CamembertForSequenceClassification

                           GOLDEN/modernbert/{base,classifier}/  a random ModernBertModel (4 layers: global, two
                                                              local over 16 tokens, global; no biases, as the
                                                              released ones; weights 10× the usual scale, so
                                                              that its logits depend on every detail) with a byte-level BPE tokenizer and
                                                              [CLS] a [SEP], and ModernBertForSequenceClassification,
                                                              ModernBertForTokenClassification and ModernBertForMaskedLM
                                                              made from it

  make_models.py GOLDEN NAME...  makes only the named ones (roberta, electra, distilbert, bert,
                                 xlm-roberta, camembert, modernbert).

The tokenizers are trained here on the `tiny` data set's texts, so the golden files need nothing
from a hub.
"""
import json
import os
import shutil
import sys
import tempfile

import torch
from tokenizers import BertWordPieceTokenizer, ByteLevelBPETokenizer, SentencePieceUnigramTokenizer
from transformers import (AutoTokenizer, BertConfig, CamembertConfig, CamembertForSequenceClassification, CamembertModel,
                          CamembertTokenizerFast, BertForSequenceClassification, BertModel, BertTokenizerFast, XLMRobertaConfig,
                          XLMRobertaForSequenceClassification, XLMRobertaModel, XLMRobertaTokenizerFast,
                          DistilBertConfig, DistilBertForSequenceClassification, DistilBertModel, DistilBertTokenizerFast,
                          ElectraConfig, ElectraForSequenceClassification, ElectraModel, ElectraTokenizerFast, RobertaConfig,
                          RobertaForSequenceClassification, RobertaModel, RobertaTokenizerFast)

SHARED = os.path.join(os.path.dirname(__file__), "..", "..", "..", "shared")
LABELS = dict(num_labels=2, id2label={0: "negative", 1: "positive"}, label2id={"negative": 0, "positive": 1})


def texts():
    return [json.loads(l)["text"] for l in open(os.path.join(SHARED, "datasets/tiny/train.jsonl"))]


def save(out, model_cls, config, classifier_cls, tok):
    """Saves a seeded random `model_cls` and its tokenizer as `out/base`, and `classifier_cls`
    made from it (a seeded head) as `out/classifier`."""
    shutil.rmtree(out, ignore_errors=True)
    base, classifier = os.path.join(out, "base"), os.path.join(out, "classifier")
    torch.manual_seed(0)
    model_cls(config).save_pretrained(base, safe_serialization=True)
    tok.save_pretrained(base)
    torch.manual_seed(1)
    classifier_cls.from_pretrained(base, **LABELS).save_pretrained(classifier, safe_serialization=True)
    tok.save_pretrained(classifier)


def roberta(out):
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts(), vocab_size=512, min_frequency=2, special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"])
    with tempfile.TemporaryDirectory() as tmp:
        bpe.save_model(tmp)
        tok = RobertaTokenizerFast(os.path.join(tmp, "vocab.json"), os.path.join(tmp, "merges.txt"), model_max_length=128)
    config = RobertaConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                           max_position_embeddings=130, type_vocab_size=1, pad_token_id=1, bos_token_id=0, eos_token_id=2)
    save(out, RobertaModel, config, RobertaForSequenceClassification, tok)


def wordpiece(cls):
    wp = BertWordPieceTokenizer(lowercase=True)
    wp.train_from_iterator(texts(), vocab_size=600, min_frequency=2, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"])
    with tempfile.TemporaryDirectory() as tmp:
        wp.save_model(tmp)
        return cls(os.path.join(tmp, "vocab.txt"), do_lower_case=True, model_max_length=128)


def electra(out):
    tok = wordpiece(ElectraTokenizerFast)
    config = ElectraConfig(vocab_size=len(tok), embedding_size=16, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=64, max_position_embeddings=128, pad_token_id=0)
    save(out, ElectraModel, config, ElectraForSequenceClassification, tok)


def distilbert(out):
    tok = wordpiece(DistilBertTokenizerFast)
    config = DistilBertConfig(vocab_size=len(tok), dim=32, n_layers=2, n_heads=4, hidden_dim=64, max_position_embeddings=128,
                              pad_token_id=0)
    save(out, DistilBertModel, config, DistilBertForSequenceClassification, tok)


def bert(out):
    tok = wordpiece(BertTokenizerFast)
    config = BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                        max_position_embeddings=128, pad_token_id=0)
    save(out, BertModel, config, BertForSequenceClassification, tok)


def xlm_roberta(out):
    # XLM-R's vocabulary begins <s>, <pad>, </s>, <unk>, as fairseq's; <mask> is its last entry.
    sp = SentencePieceUnigramTokenizer()
    sp.train_from_iterator(texts(), vocab_size=400, special_tokens=["<s>", "<pad>", "</s>", "<unk>"], unk_token="<unk>")
    sp.add_special_tokens(["<mask>"])
    tok = XLMRobertaTokenizerFast(tokenizer_object=sp, bos_token="<s>", eos_token="</s>", sep_token="</s>", cls_token="<s>",
                                  unk_token="<unk>", pad_token="<pad>", mask_token="<mask>", model_max_length=128)
    # Saved and read back, so that tokenizer.json holds the pipeline transformers' XLMRobertaTokenizer builds
    # (whitespace split, then Metaspace; the trainer's NMT normalizer is not one it keeps).
    with tempfile.TemporaryDirectory() as tmp:
        tok.save_pretrained(tmp)
        tok = AutoTokenizer.from_pretrained(tmp)
    config = XLMRobertaConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                              max_position_embeddings=130, type_vocab_size=1, pad_token_id=1, bos_token_id=0, eos_token_id=2)
    save(out, XLMRobertaModel, config, XLMRobertaForSequenceClassification, tok)


def camembert(out):
    # camembert-base's vocabulary begins <s>NOTUSED, <pad>, </s>NOTUSED, <unk>, <unk>NOTUSED, then the
    # <s> and </s> it uses (ids 5 and 6); <mask> is its last entry.
    sp = SentencePieceUnigramTokenizer()
    sp.train_from_iterator(texts(), vocab_size=400, unk_token="<unk>",
                           special_tokens=["<s>NOTUSED", "<pad>", "</s>NOTUSED", "<unk>", "<unk>NOTUSED", "<s>", "</s>"])
    sp.add_special_tokens(["<mask>"])
    tok = CamembertTokenizerFast(tokenizer_object=sp, bos_token="<s>", eos_token="</s>", sep_token="</s>", cls_token="<s>",
                                 unk_token="<unk>", pad_token="<pad>", mask_token="<mask>", model_max_length=128,
                                 additional_special_tokens=["<s>NOTUSED", "</s>NOTUSED", "<unk>NOTUSED"])
    with tempfile.TemporaryDirectory() as tmp:
        tok.save_pretrained(tmp)
        tok = AutoTokenizer.from_pretrained(tmp)
    config = CamembertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                             max_position_embeddings=130, type_vocab_size=1, pad_token_id=1, bos_token_id=5, eos_token_id=6)
    save(out, CamembertModel, config, CamembertForSequenceClassification, tok)


def modernbert(out):
    from tokenizers import processors
    from transformers import ModernBertConfig, ModernBertForSequenceClassification, ModernBertModel, PreTrainedTokenizerFast
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts(), vocab_size=512, min_frequency=2, special_tokens=["[UNK]", "[CLS]", "[SEP]", "[PAD]", "[MASK]"])
    bpe.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]",
                                                       special_tokens=[("[CLS]", 1), ("[SEP]", 2)])
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]", pad_token="[PAD]",
                                  mask_token="[MASK]", model_max_length=512)
    config = ModernBertConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=48, num_hidden_layers=4, num_attention_heads=4,
                              max_position_embeddings=512, local_attention=16, global_attn_every_n_layers=3, pad_token_id=3,
                              cls_token_id=1, sep_token_id=2, bos_token_id=1, eos_token_id=2, global_rope_theta=160000.0,
                              local_rope_theta=10000.0, initializer_range=0.2)
    save(out, ModernBertModel, config, ModernBertForSequenceClassification, tok)
    # Its token classifier (5 tags) and masked LM (the decoder tied to the embeddings), seeded heads.
    from transformers import ModernBertForMaskedLM, ModernBertForTokenClassification
    base = os.path.join(out, "base")
    for name, cls, kwargs in (("token-classifier", ModernBertForTokenClassification, {"num_labels": 5}), ("mlm", ModernBertForMaskedLM, {})):
        torch.manual_seed(2)
        cls.from_pretrained(base, **kwargs).save_pretrained(os.path.join(out, name), safe_serialization=True)
        tok.save_pretrained(os.path.join(out, name))


def deberta_v2(out):
    # deberta-v3's layout: [PAD] [CLS] [SEP] [UNK] first, [MASK] last, a SentencePiece Unigram vocabulary;
    # relative attention (both terms, keys shared, 8 log buckets over 64 positions, normalised
    # relative embeddings), no absolute positions and no token types.
    from transformers import DebertaV2Config, DebertaV2ForSequenceClassification, DebertaV2Model, DebertaV2TokenizerFast
    sp = SentencePieceUnigramTokenizer()
    sp.train_from_iterator(texts(), vocab_size=400, special_tokens=["[PAD]", "[CLS]", "[SEP]", "[UNK]"], unk_token="[UNK]")
    sp.add_special_tokens(["[MASK]"])
    tok = DebertaV2TokenizerFast(tokenizer_object=sp, bos_token="[CLS]", eos_token="[SEP]", sep_token="[SEP]", cls_token="[CLS]",
                                 unk_token="[UNK]", pad_token="[PAD]", mask_token="[MASK]", model_max_length=128)
    with tempfile.TemporaryDirectory() as tmp:
        tok.save_pretrained(tmp)
        tok = AutoTokenizer.from_pretrained(tmp)
    config = DebertaV2Config(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                             max_position_embeddings=128, relative_attention=True, position_buckets=8, max_relative_positions=64,
                             pos_att_type=["p2c", "c2p"], share_att_key=True, norm_rel_ebd="layer_norm", position_biased_input=False,
                             type_vocab_size=0, pad_token_id=0, initializer_range=0.2, hidden_act="gelu", pooler_hidden_size=32,
                             pooler_hidden_act="gelu", pooler_dropout=0.0)
    save(out, DebertaV2Model, config, DebertaV2ForSequenceClassification, tok)


MAKERS = {"roberta": roberta, "electra": electra, "distilbert": distilbert, "bert": bert, "xlm-roberta": xlm_roberta,
          "camembert": camembert, "modernbert": modernbert, "deberta-v2": deberta_v2}

if __name__ == "__main__":
    for name in sys.argv[2:] or MAKERS:
        MAKERS[name](os.path.join(sys.argv[1], name))
