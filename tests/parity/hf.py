"""transformers side of the parity tests (run by tests/parity.rs when transformers is installed).

  hf.py logits MODEL_DIR TEXTS_JSON  -> {"logits", "ids", "loading_info", "versions"}, sequence classification
                                        (an item of TEXTS_JSON is a text or a pair [text, text_pair])
  hf.py crossencoder MODEL_DIR PAIRS_JSON -> {"logits", "ids", "versions"}: sentence-transformers'
                                        CrossEncoder(MODEL_DIR).predict of each pair, one score per row
  hf.py token-logits MODEL_DIR TEXTS_JSON -> {"logits", "ids", "loading_info", "versions"}, token classification
                                        (each text's logits flattened: tokens × tags)
  hf.py words MODEL_DIR SENTENCES_JSON -> {"ids", "word_ids", "versions"}: each sentence (a list of words)
                                        encoded as transformers' run_ner.py does (is_split_into_words; a
                                        byte-level BPE with add_prefix_space=True)
  hf.py ner MODEL_DIR TEXTS_JSON     -> {"entities": {strategy: [entities of each text]}, "versions"}: the
                                        token-classification pipeline with each aggregation strategy
  hf.py mlm MODEL_DIR TEXTS_JSON     -> the same for the masked LM (first 1000 vocabulary entries per token)
  hf.py make MODEL_DIR NUM_LABELS OUT -> saves a BertForSequenceClassification with a seeded head
  hf.py peft-make BASE DATA_JSONL OUT -> trains a LoRA adapter with peft (seeded, a few steps) and saves it
  hf.py peft-logits BASE ADAPTER TEXTS_JSON -> {"logits", "ids", "versions"} of base + adapter in peft
  hf.py tokenize MODEL_DIR INPUTS_JSON -> {"ids", "type_ids", "versions"}: each input (a text, or a pair
                                        [a, b]) encoded by AutoTokenizer with special tokens, no truncation
  hf.py rope SEQ HEAD_DIM GLOBAL_THETA LOCAL_THETA -> {"logits": [full, sliding], "versions"}: transformers'
                                        ModernBERT rotary embedding (ModernBertRotaryEmbedding and
                                        apply_rotary_pos_emb) of x[i][d] = sin(0.37·i + 0.11·d) + 0.01·d, one
                                        head, at positions 0..SEQ, with each layer type's theta, flattened
  hf.py pack-import OUT BASE GOLDEN  -> the golden copy of what `make` saved: its small files, the
                                        tensors that differ from BASE, every tensor's name and shape
"""
import json
import os
import shutil
import sys

import torch
import transformers
from transformers import AutoModelForMaskedLM, AutoModelForSequenceClassification, AutoTokenizer

# Where `logits`, `token-logits` and `mlm` cut a text (tests/modernbert_long.rs asks for 1,024).
MAX_LEN = int(os.environ.get("PARITY_MAX_LEN", "512"))


def _answer(model_dir, texts_path, cls, take):
    texts = json.load(open(texts_path))
    tok = AutoTokenizer.from_pretrained(model_dir)
    model, info = cls.from_pretrained(model_dir, output_loading_info=True)
    model.eval()
    out_logits, out_ids = [], []
    with torch.inference_mode():
        for t in texts:
            # A pair of texts comes as [text, text_pair].
            enc = tok(*t, return_tensors="pt", truncation=True, max_length=MAX_LEN) if isinstance(t, list) else \
                tok(t, return_tensors="pt", truncation=True, max_length=MAX_LEN)
            out_ids.append(enc["input_ids"][0].tolist())
            out_logits.extend(take(model(**enc).logits[0]))
    info = {k: [str(x) for x in v] for k, v in info.items() if isinstance(v, (list, set))}
    versions = {"torch": torch.__version__, "transformers": transformers.__version__}
    print(json.dumps({"logits": out_logits, "ids": out_ids, "loading_info": info, "versions": versions}))


def logits(model_dir, texts_path):
    _answer(model_dir, texts_path, AutoModelForSequenceClassification, lambda x: [x.tolist()])


def crossencoder(model_dir, pairs_path):
    import sentence_transformers
    from sentence_transformers import CrossEncoder
    pairs = json.load(open(pairs_path))
    model = CrossEncoder(model_dir, device="cpu")
    scores = model.predict([tuple(p) for p in pairs], batch_size=len(pairs), convert_to_numpy=True)
    tok = AutoTokenizer.from_pretrained(model_dir)
    ids = [tok(*p, truncation=True, max_length=512)["input_ids"] for p in pairs]
    versions = {"torch": torch.__version__, "transformers": transformers.__version__,
                "sentence_transformers": sentence_transformers.__version__}
    print(json.dumps({"logits": [[float(s)] for s in scores], "ids": ids, "versions": versions}))


def token_logits(model_dir, texts_path):
    from transformers import AutoModelForTokenClassification
    _answer(model_dir, texts_path, AutoModelForTokenClassification, lambda x: [x.flatten().tolist()])


def words(model_dir, sentences_path):
    sentences = json.load(open(sentences_path))
    tok = AutoTokenizer.from_pretrained(model_dir)
    if tok.backend_tokenizer.pre_tokenizer is not None and "ByteLevel" in str(tok.backend_tokenizer.pre_tokenizer.__getstate__()):
        tok = AutoTokenizer.from_pretrained(model_dir, add_prefix_space=True)
        state = json.loads(tok.backend_tokenizer.pre_tokenizer.__getstate__())
        if not state.get("add_prefix_space"):
            # A tokenizer without a class of its own (ModernBERT's) ignores the argument here:
            # its byte-level pre-tokenizer is given the prefix space directly, as RoBERTa's class does.
            from tokenizers import pre_tokenizers
            tok.backend_tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(
                add_prefix_space=True, trim_offsets=state.get("trim_offsets", True), use_regex=state.get("use_regex", True))
    enc = tok(sentences, is_split_into_words=True)
    versions = {"torch": torch.__version__, "transformers": transformers.__version__}
    print(json.dumps({"ids": enc["input_ids"], "word_ids": [enc.word_ids(i) for i in range(len(sentences))], "versions": versions}))


def ner(model_dir, texts_path):
    from transformers import pipeline
    texts = json.load(open(texts_path))
    out = {}
    for strategy in ("none", "simple", "first", "average", "max"):
        pipe = pipeline("token-classification", model=model_dir, aggregation_strategy=strategy, device="cpu")
        found = [pipe(t) for t in texts]
        out[strategy] = [[{k: (float(v) if k == "score" else int(v) if k in ("start", "end", "index") else v)
                           for k, v in e.items()} for e in ents] for ents in found]
    versions = {"torch": torch.__version__, "transformers": transformers.__version__}
    print(json.dumps({"entities": out, "versions": versions}))


def mlm(model_dir, texts_path):
    _answer(model_dir, texts_path, AutoModelForMaskedLM, lambda x: x[:, :1000].tolist())


def make(model_dir, num_labels, out):
    torch.manual_seed(0)
    n = int(num_labels)
    model = AutoModelForSequenceClassification.from_pretrained(
        model_dir, num_labels=n, id2label={i: f"label_{i}" for i in range(n)},
        label2id={f"label_{i}": i for i in range(n)})
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(out)
    model.save_pretrained(out, safe_serialization=True)


def pack_import(out, base, golden):
    from safetensors.torch import load_file, save_file
    saved = load_file(os.path.join(out, "model.safetensors"))
    base_tensors = load_file(os.path.join(base, "model.safetensors"))
    extra = {}
    for name, t in saved.items():
        b = base_tensors.get(name.removeprefix("bert."))
        if b is None or b.shape != t.shape or b.dtype != t.dtype or not torch.equal(b, t):
            extra[name] = t.contiguous()
    shutil.rmtree(golden, ignore_errors=True)
    os.makedirs(golden)
    save_file(extra, os.path.join(golden, "extra.safetensors"))
    json.dump({k: list(v.shape) for k, v in sorted(saved.items())}, open(os.path.join(golden, "names.json"), "w"), indent=1)
    files = sorted(f for f in os.listdir(out) if f != "model.safetensors")
    for f in files:
        same = os.path.exists(os.path.join(base, f)) and open(os.path.join(base, f), "rb").read() == open(os.path.join(out, f), "rb").read()
        # transformers rewrites tokenizer.json with the same vocabulary and rules; the golden copy
        # takes the base's (the test compares the token ids, so a difference would show).
        if not same and f != "tokenizer.json":
            if os.path.getsize(os.path.join(out, f)) > 100_000:
                sys.exit(f"{f} differs from the base's and is too large for a golden file")
            shutil.copy(os.path.join(out, f), golden)
    json.dump(files, open(os.path.join(golden, "files.json"), "w"), indent=1)


PEFT_HUB_ID = "sentence-transformers/all-MiniLM-L6-v2"


def peft_make(base, data, out):
    from peft import LoraConfig, TaskType, get_peft_model
    torch.manual_seed(0)
    rows = [json.loads(line) for line in open(data) if line.strip()]
    labels = sorted({r["label"] for r in rows})
    tok = AutoTokenizer.from_pretrained(base)
    model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=len(labels))
    config = LoraConfig(task_type=TaskType.SEQ_CLS, r=4, lora_alpha=8, lora_dropout=0.1,
                        target_modules=["query", "value", "intermediate.dense"])
    model = get_peft_model(model, config)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3)
    model.train()
    for epoch in range(3):
        for i in range(0, len(rows), 16):
            batch = rows[i:i + 16]
            enc = tok([r["text"] for r in batch], return_tensors="pt", padding=True, truncation=True, max_length=64)
            y = torch.tensor([labels.index(r["label"]) for r in batch])
            loss = model(**enc, labels=y).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
    # Named as a user's adapter names it: by the hub id, which the server matches to its models dir.
    model.peft_config["default"].base_model_name_or_path = PEFT_HUB_ID
    model.save_pretrained(out)


def peft_logits(base, adapter, texts_path):
    from peft import PeftModel
    from safetensors.torch import load_file
    texts = json.load(open(texts_path))
    saved = load_file(os.path.join(adapter, "adapter_model.safetensors"))
    head = saved.get("base_model.model.classifier.weight", saved.get("base_model.model.classifier.out_proj.weight"))
    n = head.shape[0]
    tok = AutoTokenizer.from_pretrained(base)
    model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=n)
    model = PeftModel.from_pretrained(model, adapter).eval()
    out_logits, out_ids = [], []
    with torch.inference_mode():
        for t in texts:
            enc = tok(t, return_tensors="pt", truncation=True, max_length=512)
            out_ids.append(enc["input_ids"][0].tolist())
            out_logits.append(model(**enc).logits[0].tolist())
    import peft
    versions = {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__}
    print(json.dumps({"logits": out_logits, "ids": out_ids, "versions": versions}))


def tokenize(model_dir, inputs_path):
    tok = AutoTokenizer.from_pretrained(model_dir)
    ids, types = [], []
    for x in json.load(open(inputs_path)):
        enc = tok(*x) if isinstance(x, list) else tok(x)
        ids.append(enc["input_ids"])
        # null where the tokenizer gives no token types (RoBERTa's, DistilBERT's).
        types.append(enc.get("token_type_ids"))
    versions = {"transformers": transformers.__version__}
    print(json.dumps({"ids": ids, "type_ids": types, "versions": versions}))


def rope(seq, head_dim, global_theta, local_theta):
    from transformers import ModernBertConfig
    from transformers.models.modernbert.modeling_modernbert import ModernBertRotaryEmbedding, apply_rotary_pos_emb
    seq, head_dim = int(seq), int(head_dim)
    config = ModernBertConfig(hidden_size=head_dim, num_attention_heads=1, max_position_embeddings=seq,
                              global_rope_theta=float(global_theta), local_rope_theta=float(local_theta))
    rotary = ModernBertRotaryEmbedding(config)
    i, d = torch.arange(seq, dtype=torch.float32)[:, None], torch.arange(head_dim, dtype=torch.float32)[None, :]
    x = (torch.sin(0.37 * i + 0.11 * d) + 0.01 * d)[None, None]  # [batch 1, head 1, seq, head_dim]
    positions = torch.arange(seq)[None]
    out = []
    for layer_type in ("full_attention", "sliding_attention"):
        cos, sin = rotary(x, positions, layer_type)
        q, _ = apply_rotary_pos_emb(x, x, cos, sin)
        out.append(q.flatten().tolist())
    print(json.dumps({"logits": out, "ids": [], "versions": {"torch": torch.__version__, "transformers": transformers.__version__}}))


if __name__ == "__main__":
    {"logits": logits, "crossencoder": crossencoder, "token-logits": token_logits, "ner": ner, "words": words, "make": make, "mlm": mlm, "pack-import": pack_import, "peft-make": peft_make,
     "peft-logits": peft_logits, "tokenize": tokenize, "rope": rope}[sys.argv[1]](*sys.argv[2:])
