"""The PyTorch reference with LoRA: `finetune_ref.py`'s recipe, unchanged, with the model wrapped by
Hugging Face peft (`get_peft_model`, task SEQ_CLS: the classifier head is trained in full), so that
a LoRA job here is measured against peft on the same data, seed and schedule.

  python bench/lora_ref.py [--lora-r 8] [--lora-alpha 2r] [--lora-dropout 0.1]
                           [--lora-targets query,key,value] FINETUNE_REF_ARGS...

Every other argument goes to `../shared/bench/reference/finetune_ref.py` (or the script named by
FINETUNE_REF). Its report gains `lora` (the settings and the trainable parameter count).
"""
import argparse
import json
import os
import runpy
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
REF = os.environ.get("FINETUNE_REF", os.path.join(HERE, "..", "..", "shared", "bench", "reference", "finetune_ref.py"))

ap = argparse.ArgumentParser(add_help=False)
ap.add_argument("--lora-r", type=int, default=8)
ap.add_argument("--lora-alpha", type=float, default=None, help="default: twice --lora-r, as the service")
ap.add_argument("--lora-dropout", type=float, default=0.1)
ap.add_argument("--lora-targets", default="query,key,value")
lora, rest = ap.parse_known_args()
if lora.lora_alpha is None:
    lora.lora_alpha = 2.0 * lora.lora_r

import transformers  # noqa: E402
from peft import LoraConfig, TaskType, get_peft_model  # noqa: E402

settings = {"r": lora.lora_r, "alpha": lora.lora_alpha, "dropout": lora.lora_dropout,
            "target_modules": lora.lora_targets.split(",")}
plain = transformers.AutoModelForSequenceClassification.from_pretrained


def with_lora(*args, **kwargs):
    model = plain(*args, **kwargs)
    config = LoraConfig(task_type=TaskType.SEQ_CLS, r=lora.lora_r, lora_alpha=lora.lora_alpha,
                        lora_dropout=lora.lora_dropout, target_modules=settings["target_modules"])
    model = get_peft_model(model, config)
    settings["trainable_params"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return model


transformers.AutoModelForSequenceClassification.from_pretrained = with_lora
sys.argv = [REF] + rest
try:
    runpy.run_path(REF, run_name="__main__")
finally:
    out = rest[rest.index("--out") + 1] if "--out" in rest else None
    if out and os.path.exists(out):
        report = json.load(open(out))
        report["lora"] = settings
        json.dump(report, open(out, "w"), indent=1)
