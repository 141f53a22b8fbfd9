"""Makes the RoBERTa golden files with transformers (run by tests/parity/regenerate.sh):

  make_roberta.py OUT   -> OUT/base/        a tiny random RobertaModel (seeded) and its byte-level BPE
                                            tokenizer, as transformers saves them
                           OUT/classifier/  RobertaForSequenceClassification from it (a seeded head)

The tokenizer is trained here on the `tiny` data set's texts (ByteLevel BPE, RoBERTa's special
tokens and template), so the golden files need nothing from a hub.
"""
import json
import os
import shutil
import sys
import tempfile

import torch
from tokenizers import ByteLevelBPETokenizer
from transformers import RobertaConfig, RobertaForSequenceClassification, RobertaModel, RobertaTokenizerFast

SHARED = os.path.join(os.path.dirname(__file__), "..", "..", "..", "shared")


def main(out):
    shutil.rmtree(out, ignore_errors=True)
    base, classifier = os.path.join(out, "base"), os.path.join(out, "classifier")
    texts = [json.loads(l)["text"] for l in open(os.path.join(SHARED, "datasets/tiny/train.jsonl"))]
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts, vocab_size=512, min_frequency=2, special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"])
    with tempfile.TemporaryDirectory() as tmp:
        bpe.save_model(tmp)
        tok = RobertaTokenizerFast(os.path.join(tmp, "vocab.json"), os.path.join(tmp, "merges.txt"), model_max_length=128)
    torch.manual_seed(0)
    config = RobertaConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                           max_position_embeddings=130, type_vocab_size=1, pad_token_id=1, bos_token_id=0, eos_token_id=2)
    RobertaModel(config).save_pretrained(base, safe_serialization=True)
    tok.save_pretrained(base)
    torch.manual_seed(1)
    model = RobertaForSequenceClassification.from_pretrained(
        base, num_labels=2, id2label={0: "negative", 1: "positive"}, label2id={"negative": 0, "positive": 1})
    model.save_pretrained(classifier, safe_serialization=True)
    tok.save_pretrained(classifier)


if __name__ == "__main__":
    main(sys.argv[1])
