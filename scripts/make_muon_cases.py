#!/usr/bin/env python3
"""Golden cases for the reference's Muon (reference/src/muon.rs) from torch.optim.Muon.

    .venv/bin/python scripts/make_muon_cases.py            # writes golden/muon/muon_cases.json

PyTorch 2.11, float64, CPU. Every case runs a few torch.optim.Muon steps on small random matrices
(wide, tall and square, so both orientations of Newton-Schulz run) with given gradients and stores
the initial weights, each step's gradients and the weights after each step.

torch.optim.Muon casts the Newton-Schulz input to bfloat16 (`grad.bfloat16()` in
`_zeropower_via_newtonschulz`). The reference computes in float64, so the cases marked
"newton_schulz": "float64" run the same torch.optim.Muon.step with that one function replaced by a
copy whose only change is to keep the input's dtype; everything else (momentum lerp, Nesterov,
norm clamp, addmm iterations, lr adjustment, decoupled weight decay) is torch's own code. One case,
"stock_bfloat16", runs torch unmodified, to show how far bfloat16 Newton-Schulz lands from float64.
"""
import json
import pathlib
import sys

import torch
import torch.optim._muon as muon_mod

OUT = pathlib.Path(__file__).resolve().parent.parent / "golden" / "muon" / "muon_cases.json"
STOCK_NS = muon_mod._zeropower_via_newtonschulz


def ns_in_input_dtype(grad, ns_coefficients, ns_steps, eps):
    """torch 2.11's _zeropower_via_newtonschulz with `grad.bfloat16()` replaced by `grad.clone()`."""
    if ns_steps >= 100:
        raise ValueError("Number of steps must be less than 100 for computational efficiency")
    if len(grad.shape) != 2:
        raise ValueError("Input tensor gradient must be a 2D matrix")
    if len(ns_coefficients) != 3:
        raise ValueError("Coefficients must be a tuple of exactly 3 values")
    a, b, c = ns_coefficients
    ortho_grad = grad.clone()
    if grad.size(0) > grad.size(1):
        ortho_grad = ortho_grad.T
    ortho_grad.div_(ortho_grad.norm().clamp(min=eps))
    for _ in range(ns_steps):
        gram_matrix = ortho_grad @ ortho_grad.T
        gram_update = torch.addmm(gram_matrix, gram_matrix, gram_matrix, beta=b, alpha=c)
        ortho_grad = torch.addmm(ortho_grad, gram_update, ortho_grad, beta=a)
    if grad.size(0) > grad.size(1):
        ortho_grad = ortho_grad.T
    return ortho_grad


SHAPES = {"wide": (4, 6), "tall": (7, 3), "square": (5, 5)}
CASES = [
    # torch's defaults except lr (1e-3 moves the weights too little to check the update well)
    dict(name="defaults", ns="float64", steps=3, options=dict(lr=0.02)),
    dict(
        name="no_nesterov_match_rms_adamw",
        ns="float64",
        steps=3,
        options=dict(lr=0.01, weight_decay=0.01, momentum=0.9, nesterov=False,
                     ns_steps=3, adjust_lr_fn="match_rms_adamw"),
    ),
    dict(
        name="custom_coefficients_no_decay",
        ns="float64",
        steps=2,
        options=dict(lr=0.05, weight_decay=0.0, momentum=0.5, ns_coefficients=(3.0, -3.2, 1.2),
                     eps=1e-5, ns_steps=7, adjust_lr_fn="original"),
    ),
    dict(name="stock_bfloat16", ns="bfloat16", steps=3, options=dict(lr=0.02)),
]
DEFAULTS = dict(lr=1e-3, weight_decay=0.1, momentum=0.95, nesterov=True,
                ns_coefficients=(muon_mod.DEFAULT_A, muon_mod.DEFAULT_B, muon_mod.DEFAULT_C),
                eps=muon_mod.EPS, ns_steps=muon_mod.DEFAULT_NS_STEPS, adjust_lr_fn=None)


def flat(t):
    return t.detach().reshape(-1).tolist()


def run_case(case, gen):
    muon_mod._zeropower_via_newtonschulz = ns_in_input_dtype if case["ns"] == "float64" else STOCK_NS
    options = {**DEFAULTS, **case["options"]}
    params = {k: torch.randn(*s, generator=gen, dtype=torch.float64) for k, s in SHAPES.items()}
    tensors = {k: torch.nn.Parameter(v.clone()) for k, v in params.items()}
    opt = torch.optim.Muon(list(tensors.values()), **options)
    steps = []
    for _ in range(case["steps"]):
        grads = {k: torch.randn(*s, generator=gen, dtype=torch.float64) for k, s in SHAPES.items()}
        for k, t in tensors.items():
            t.grad = grads[k].clone()
        opt.step()
        steps.append({"grads": {k: flat(g) for k, g in grads.items()},
                      "after": {k: flat(t) for k, t in tensors.items()}})
    muon_mod._zeropower_via_newtonschulz = STOCK_NS
    return {
        "name": case["name"],
        "newton_schulz": case["ns"],
        "options": {**options, "ns_coefficients": list(options["ns_coefficients"])},
        "params": {k: {"shape": list(SHAPES[k]), "initial": flat(v)} for k, v in params.items()},
        "steps": steps,
    }


def main():
    gen = torch.Generator().manual_seed(2011)
    cases = [run_case(c, gen) for c in CASES]
    OUT.parent.mkdir(parents=True, exist_ok=True)
    doc = {"torch_version": torch.__version__, "dtype": "float64", "cases": cases}
    OUT.write_text(json.dumps(doc, separators=(",", ":")) + "\n")
    print(f"wrote {OUT} ({len(cases)} cases)", file=sys.stderr)


if __name__ == "__main__":
    main()
