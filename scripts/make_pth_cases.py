"""Write extra torch.save cases for the .pth importer's tests into OUTDIR (a temp dir; never commit).

Usage: .venv/bin/python scripts/make_pth_cases.py OUTDIR

For each case `<name>.pth` it writes `<name>.expected.safetensors` holding the same tensors as float64
(integers as int64), which the Rust test compares against bit for bit. Cases:
  bf16          OrderedDict of bfloat16 tensors with dotted names, protocol 2 (torch.save's default)
  f32_proto4    dict of float32 tensors, pickle_protocol=4 (FRAME, MEMOIZE, SHORT_BINUNICODE)
  shared        views into one storage: tied tensors (same storage key) and an offset slice,
                plus a 0-d tensor and an int64 tensor
  resume        a MiniMind-style resume dict {'model': state_dict, 'optimizer': ..., 'step': ...}
  noncontig     a transposed view (must be refused with a clear error)
  parameter     nn.Parameter values (torch._utils._rebuild_parameter)
"""

import collections
import os
import sys

import torch
from safetensors.torch import save_file


def expected(sd):
    out = {}
    for k, v in sd.items():
        v = v.detach()
        out[k] = (v.to(torch.float64) if v.is_floating_point() else v.to(torch.int64)).contiguous()
    return out


def main(outdir):
    os.makedirs(outdir, exist_ok=True)
    g = torch.Generator().manual_seed(0)

    bf16 = collections.OrderedDict()
    bf16["model.embed_tokens.weight"] = torch.randn(16, 8, generator=g).to(torch.bfloat16)
    bf16["model.layers.0.self_attn.q_proj.weight"] = torch.randn(8, 8, generator=g).to(torch.bfloat16)
    bf16["model.layers.10.mlp.experts.3.down_proj.weight"] = torch.randn(8, 4, generator=g).to(
        torch.bfloat16
    )
    bf16["model.norm.weight"] = torch.ones(8, dtype=torch.bfloat16)
    torch.save(bf16, f"{outdir}/bf16.pth")
    save_file(expected(bf16), f"{outdir}/bf16.expected.safetensors")

    f32 = {
        "a.weight": torch.randn(3, 5, generator=g),
        "b.c.d.weight": torch.randn(7, generator=g),
    }
    torch.save(f32, f"{outdir}/f32_proto4.pth", pickle_protocol=4)
    save_file(expected(f32), f"{outdir}/f32_proto4.expected.safetensors")

    base = torch.randn(40, generator=g)
    shared = collections.OrderedDict()
    shared["embed.weight"] = base[:32].view(4, 8)
    shared["lm_head.weight"] = shared["embed.weight"]
    shared["slice"] = base[33:38]
    shared["scalar"] = torch.tensor(2.5)
    shared["ids"] = torch.arange(6, dtype=torch.int64).view(2, 3)
    torch.save(shared, f"{outdir}/shared.pth")
    save_file(expected(shared), f"{outdir}/shared.expected.safetensors")

    model = torch.nn.Sequential(torch.nn.Linear(4, 3, bias=False), torch.nn.Linear(3, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(2, 4, generator=g)).sum().backward()
    opt.step()
    sd = {k: v.half() for k, v in model.state_dict().items()}
    resume = {
        "model": sd,
        "optimizer": opt.state_dict(),
        "epoch": 0,
        "step": 5,
        "world_size": 1,
        "wandb_id": None,
    }
    torch.save(resume, f"{outdir}/resume.pth")
    save_file(expected(sd), f"{outdir}/resume.expected.safetensors")

    torch.save({"w": torch.randn(3, 4, generator=g).t()}, f"{outdir}/noncontig.pth")

    params = collections.OrderedDict(
        (k, torch.nn.Parameter(v.float())) for k, v in sd.items()
    )
    torch.save(params, f"{outdir}/parameter.pth")
    save_file(expected(params), f"{outdir}/parameter.expected.safetensors")


if __name__ == "__main__":
    main(sys.argv[1])
