"""Read a GGUF file written by `fast export --format gguf` with llama.cpp's own `gguf` package and
check it against the MiniMind weights it came from, independently of our writer.

usage: gguf_readback.py FILE.gguf SOURCE.safetensors

SOURCE holds the MiniMind-named float32 weights. The name mapping and the q/k permutation for
the `llama` architecture are written out here again, after llama.cpp's convert_hf_to_gguf.py, so
the check does not share code with what it checks. Prints one JSON object: the metadata, the
tensors (name, GGUF dims, type) and, per tensor, whether its values equal the source's as the
converter would store them (exactly: f32 as is, f16 by numpy's rounding, bf16 and q8_0 by
gguf-py's own quantize).
"""

import json
import sys

import numpy as np
from gguf import GGUFReader, GGMLQuantizationType as T
from gguf import quants
from safetensors.numpy import load_file


def field_value(f):
    # Strings and arrays live in parts; gguf-py's ReaderField.contents() decodes both.
    return f.contents()


def permute(w, n_head):
    # convert_hf_to_gguf.py LlamaModel.permute: HF rotate-half rows -> ggml's interleaved RoPE.
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
            .swapaxes(1, 2)
            .reshape(w.shape))


def expected_tensors(src, arch, n_head, n_kv, n_layer, n_expert):
    out = {"token_embd.weight": src["model.embed_tokens.weight"],
           "output_norm.weight": src["model.norm.weight"]}
    for i in range(n_layer):
        l, b = f"model.layers.{i}", f"blk.{i}"
        q = src[f"{l}.self_attn.q_proj.weight"]
        k = src[f"{l}.self_attn.k_proj.weight"]
        if arch == "llama":
            q, k = permute(q, n_head), permute(k, n_kv)
        out[f"{b}.attn_q.weight"] = q
        out[f"{b}.attn_k.weight"] = k
        out[f"{b}.attn_v.weight"] = src[f"{l}.self_attn.v_proj.weight"]
        out[f"{b}.attn_output.weight"] = src[f"{l}.self_attn.o_proj.weight"]
        out[f"{b}.attn_norm.weight"] = src[f"{l}.input_layernorm.weight"]
        out[f"{b}.ffn_norm.weight"] = src[f"{l}.post_attention_layernorm.weight"]
        if f"{l}.self_attn.q_norm.weight" in src:
            out[f"{b}.attn_q_norm.weight"] = src[f"{l}.self_attn.q_norm.weight"]
            out[f"{b}.attn_k_norm.weight"] = src[f"{l}.self_attn.k_norm.weight"]
        if n_expert:
            out[f"{b}.ffn_gate_inp.weight"] = src[f"{l}.mlp.gate.weight"]
            for ours, theirs in [("gate_proj", "ffn_gate_exps"), ("up_proj", "ffn_up_exps"),
                                 ("down_proj", "ffn_down_exps")]:
                out[f"{b}.{theirs}.weight"] = np.stack(
                    [src[f"{l}.mlp.experts.{e}.{ours}.weight"] for e in range(n_expert)])
        else:
            for ours, theirs in [("gate_proj", "ffn_gate"), ("up_proj", "ffn_up"),
                                 ("down_proj", "ffn_down")]:
                out[f"{b}.{theirs}.weight"] = src[f"{l}.mlp.{ours}.weight"]
    return out


def main():
    path, source = sys.argv[1], sys.argv[2]
    r = GGUFReader(path)
    meta = {}
    for name, f in r.fields.items():
        if name.startswith("GGUF."):
            continue
        v = field_value(f)
        # The vocabulary is long: keep its length and ends, enough to check it.
        if isinstance(v, list) and len(v) > 8:
            v = {"len": len(v), "head": v[:4], "tail": v[-4:]}
        meta[name] = v
    arch = meta["general.architecture"]
    src = load_file(source)
    want = expected_tensors(
        src, arch,
        meta[f"{arch}.attention.head_count"], meta[f"{arch}.attention.head_count_kv"],
        meta[f"{arch}.block_count"], meta.get(f"{arch}.expert_count", 0))
    tensors, mismatches = [], []
    for t in r.tensors:
        ty = T(t.tensor_type)
        tensors.append({"name": t.name, "dims": [int(d) for d in t.shape], "type": ty.name})
        if t.name not in want:
            mismatches.append(f"{t.name}: not a tensor of the source")
            continue
        w = want[t.name].astype(np.float32)
        # GGUF dims are innermost first: reversed, they are the source's shape.
        if [int(d) for d in reversed(t.shape)] != list(w.shape):
            mismatches.append(f"{t.name}: dims {list(t.shape)} for source shape {list(w.shape)}")
            continue
        raw = np.asarray(t.data)
        if ty in (T.F32, T.F16):
            got = raw.astype(np.float32).reshape(w.shape)
            exp = w.astype(np.float16).astype(np.float32) if ty == T.F16 else w
            ok = np.array_equal(got, exp)
        else:
            # bf16 and q8_0: gguf-py's quantize of the source gives the file's bytes exactly.
            ok = np.array_equal(raw.view(np.uint8).reshape(-1),
                                quants.quantize(w, ty).view(np.uint8).reshape(-1))
        if not ok:
            d = np.abs(quants.dequantize(raw, ty).reshape(w.shape) - w).max()
            mismatches.append(f"{t.name} ({ty.name}): values differ, max |diff| {d:.3e}")
    missing = sorted(set(want) - {t.name for t in r.tensors})
    print(json.dumps({"metadata": meta, "tensors": tensors, "mismatches": mismatches,
                      "missing": missing}, ensure_ascii=False))


if __name__ == "__main__":
    main()
