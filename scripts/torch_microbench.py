"""Microbenchmarks in PyTorch on the GPU machine:
SDPA backends (cuDNN, flash, memory-efficient) for the 26M model's attention at batch 128 x 340
(8 query heads, 2 kv heads of 64), repeated k/v against GQA and against strided views of the merged
q/k/v projection; embedding backward against index_add_; and a weight-gradient GEMM with a bf16
output + cast + add against one with an fp32 output accumulated into the gradient.

Usage: python3 scripts/torch_microbench.py   (needs a CUDA GPU and torch)
"""
import torch, time, torch.nn.functional as F
from torch.nn.attention import sdpa_kernel, SDPBackend
torch.manual_seed(0)
dev = 'cuda'
B, T, H, KV, D = 128, 340, 8, 2, 64
def timeit(fn, n=20):
    for _ in range(3): fn()
    torch.cuda.synchronize(); t = time.perf_counter()
    for _ in range(n): fn()
    torch.cuda.synchronize(); return (time.perf_counter() - t) / n * 1e3
res = []
qkv = torch.randn(B, T, (H + 2 * KV) * D, device=dev, dtype=torch.bfloat16)
dO = torch.randn(B, H, T, D, device=dev, dtype=torch.bfloat16)
def mk(gqa, strided):
    if strided:
        x = qkv.clone().requires_grad_()
        q = x[..., :H*D].view(B, T, H, D).transpose(1, 2)
        k = x[..., H*D:(H+KV)*D].view(B, T, KV, D).transpose(1, 2)
        v = x[..., (H+KV)*D:].view(B, T, KV, D).transpose(1, 2)
        leaves = [x]
    else:
        q = torch.randn(B, T, H, D, device=dev, dtype=torch.bfloat16).transpose(1, 2).requires_grad_()
        nk = KV if gqa else H
        k = torch.randn(B, T, nk, D, device=dev, dtype=torch.bfloat16).transpose(1, 2).requires_grad_()
        v = torch.randn(B, T, nk, D, device=dev, dtype=torch.bfloat16).transpose(1, 2).requires_grad_()
        leaves = [q, k, v]
    return q, k, v, leaves
for name, be in [("cudnn", SDPBackend.CUDNN_ATTENTION), ("flash", SDPBackend.FLASH_ATTENTION), ("efficient", SDPBackend.EFFICIENT_ATTENTION)]:
    for gqa, strided in [(False, False), (True, False), (True, True)]:
        try:
            q, k, v, leaves = mk(gqa, strided)
            with sdpa_kernel([be]):
                def fwd():
                    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
                def fb():
                    o = fwd(); o.backward(dO)
                    for l in leaves: l.grad = None
                tf = timeit(fwd); tb = timeit(fb)
            res.append(f"sdpa {name:9s} gqa={gqa!s:5} strided={strided!s:5} fwd {tf:.3f} ms  fwd+bwd {tb:.3f} ms (x8 layers: {8*tb:.2f})")
        except Exception as e:
            res.append(f"sdpa {name:9s} gqa={gqa} strided={strided}: {type(e).__name__}: {str(e)[:150]}")
# embedding backward
N, V, d = B * T, 6400, 512
ids = torch.randint(0, V, (N,), device=dev)
W = torch.randn(V, d, device=dev, requires_grad=True)
g = torch.randn(N, d, device=dev)
def emb():
    y = F.embedding(ids, W); y.backward(g); W.grad = None
G = torch.zeros(V, d, device=dev)
def idx_add():
    G.index_add_(0, ids, g)
res.append(f"embedding backward (F.embedding fwd+bwd) {timeit(emb):.3f} ms; index_add_ {timeit(idx_add):.3f} ms")
# weight grads: bf16 mm + cast + add vs addmm out_dtype fp32 into the grad
for (m, k) in [(768, 512), (512, 512), (2816, 512), (512, 1408)]:
    dy = torch.randn(N, m, device=dev, dtype=torch.bfloat16)
    x = torch.randn(N, k, device=dev, dtype=torch.bfloat16)
    Gw = torch.zeros(m, k, device=dev)
    def base():
        Gw.add_((dy.t() @ x).float())
    def fused():
        torch.addmm(Gw, dy.t(), x, out_dtype=torch.float32, out=Gw)
    try:
        a = timeit(base); b = timeit(fused)
        Gw.zero_(); base(); r1 = Gw.clone(); Gw.zero_(); fused(); r2 = Gw.clone()
        err = ((r1 - r2).norm() / r1.norm()).item()
        res.append(f"dW [{m}x{k}] K={N}: bf16 mm + cast + add {a:.3f} ms, addmm out_dtype fp32 into grad {b:.3f} ms, rel diff {err:.2e}")
    except Exception as e:
        res.append(f"dW addmm out_dtype: {type(e).__name__}: {str(e)[:200]}")
print("\n".join(res))
