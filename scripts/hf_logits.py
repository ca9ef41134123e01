"""Load an exported Hugging Face folder with transformers and write its logits.

Usage: .venv/bin/python scripts/hf_logits.py MODEL_DIR IDS OUT.safetensors
  IDS: comma-separated token ids, rows separated by ';' (equal lengths).
Runs in float32 on the CPU, eval mode, attn_implementation="eager"; writes `logits` [B, T, V]
(float32) and prints the architecture transformers built and its rope settings.
"""

import sys

import torch
import transformers
from safetensors.torch import save_file
from transformers import AutoConfig, AutoModelForCausalLM


def main(model_dir, ids, out):
    rows = [[int(t) for t in r.split(",")] for r in ids.split(";")]
    cfg = AutoConfig.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    with torch.no_grad():
        logits = model(torch.tensor(rows, dtype=torch.long)).logits
    save_file({"logits": logits.float().contiguous()}, out)
    rope = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_theta", None)
    print(f"transformers {transformers.__version__}: {type(model).__name__}, rope {rope}, "
          f"tied {model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()}")


if __name__ == "__main__":
    main(*sys.argv[1:])
