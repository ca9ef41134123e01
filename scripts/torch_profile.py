#!/usr/bin/env python3
"""MiniMind's 26M decoder step in plain PyTorch (autocast bf16, fused AdamW), eager and
torch.compile'd, timed and profiled: an anchor to compare `fast bench --profile` against, per
kernel class. Synthetic tokens, padded batch B x T. Usage: torch_profile.py B [compile]"""
import math, sys, time
import torch, torch.nn as nn, torch.nn.functional as F

B = int(sys.argv[1]) if len(sys.argv) > 1 else 128
COMPILE = len(sys.argv) > 2 and sys.argv[2] == "compile"
T, D, L, H, KV, V, FF = 340, 512, 8, 8, 2, 6400, 1408
HD = D // H
dev = "cuda"

class RMSNorm(nn.Module):
    def __init__(s, d): super().__init__(); s.weight = nn.Parameter(torch.ones(d))
    def forward(s, x): return s.weight * (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-5)).type_as(x)

def rot(x): return torch.cat((-x[..., HD // 2:], x[..., :HD // 2]), -1)

class Layer(nn.Module):
    def __init__(s):
        super().__init__()
        s.q, s.k, s.v, s.o = nn.Linear(D, H * HD, bias=False), nn.Linear(D, KV * HD, bias=False), nn.Linear(D, KV * HD, bias=False), nn.Linear(H * HD, D, bias=False)
        s.g, s.u, s.d = nn.Linear(D, FF, bias=False), nn.Linear(D, FF, bias=False), nn.Linear(FF, D, bias=False)
        s.n1, s.n2 = RMSNorm(D), RMSNorm(D)
    def forward(s, x, cos, sin):
        h = s.n1(x); b, t, _ = h.shape
        q, k, v = s.q(h).view(b, t, H, HD), s.k(h).view(b, t, KV, HD), s.v(h).view(b, t, KV, HD)
        q, k = q * cos + rot(q) * sin, k * cos + rot(k) * sin
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        k = k[:, :, None].expand(b, KV, H // KV, t, HD).reshape(b, H, t, HD)
        v = v[:, :, None].expand(b, KV, H // KV, t, HD).reshape(b, H, t, HD)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, D)
        x = x + s.o(o)
        h = s.n2(x)
        return x + s.d(F.silu(s.g(h)) * s.u(h))

class Model(nn.Module):
    def __init__(s):
        super().__init__()
        s.emb = nn.Embedding(V, D); s.layers = nn.ModuleList(Layer() for _ in range(L)); s.norm = RMSNorm(D)
        f = 1.0 / (1e6 ** (torch.arange(0, HD, 2).float() / HD)); fr = torch.outer(torch.arange(T).float(), f)
        s.register_buffer("cos", torch.cat([fr.cos(), fr.cos()], -1)[:, None]); s.register_buffer("sin", torch.cat([fr.sin(), fr.sin()], -1)[:, None])
    def forward(s, ids, labels):
        x = s.emb(ids)
        for l in s.layers: x = l(x, s.cos, s.sin)
        logits = F.linear(s.norm(x), s.emb.weight)
        return F.cross_entropy(logits[:, :-1].reshape(-1, V).float(), labels[:, 1:].reshape(-1))

torch.manual_seed(0)
m = Model().to(dev)
opt = torch.optim.AdamW(m.parameters(), lr=5e-4, fused=True)
ids = torch.randint(3, V, (B, T), device=dev)
fwd = torch.compile(m) if COMPILE else m
def step():
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = fwd(ids, ids)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
    opt.step(); opt.zero_grad(set_to_none=True)
for _ in range(5): step()
torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats()
n = 20; t0 = time.time()
for _ in range(n): step()
torch.cuda.synchronize(); dt = (time.time() - t0) / n
print(f"torch {'compile' if COMPILE else 'eager'} b{B}: {dt*1e3:.2f} ms/step, {B*T/dt/1e3:.0f}k tok/s, peak {torch.cuda.max_memory_allocated()/2**30:.2f} GiB")
from torch.profiler import profile, ProfilerActivity
with profile(activities=[ProfilerActivity.CUDA]) as p:
    for _ in range(3): step()
    torch.cuda.synchronize()
print(p.key_averages().table(sort_by="self_device_time_total", row_limit=30, max_name_column_width=90))
