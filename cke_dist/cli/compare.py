"""`cke-dist compare`: our model against transformers' PyTorch model, number for number.

The same random batch goes through our Model and transformers' LlamaForCausalLM /
Qwen2ForCausalLM (float32, eager attention) holding the same weights: with
--model DIR transformers loads DIR with its own loader (so our loader is checked
too); without it a small random model is built from a seed. We print the largest
absolute and relative differences of the logits, the loss, every gradient, and
the parameters after N AdamW steps (torch.optim.AdamW on their side), and exit 1
when any exceeds |ours - torch| <= atol + rtol * max|torch|: the tolerance of each tensor is scaled
to its size, since float32 sums of a deep model's logits differ by a fraction of their scale, and an
element near zero would otherwise fail a correct model (a 30-layer model's logits: 1.4e-4 off on
values of 7); a wrong weight is off by the scale itself and still fails.

With --tp N under `mpiexec -n N`, our side is the tensor-parallel model (each rank holds its
shards, cke_dist.model.layout's cut): logits are gathered, gradients and parameters gathered into
the full tensors (KV-head replicas summed first), and compared the same way; rank 0 prints, every
rank exits with the same status.

Needs the test extra (torch, transformers): pip install -e '.[test]'.
"""
from __future__ import annotations

import argparse
import sys

import numpy as np

DEFAULT_CONFIG = dict(vocab_size=256, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", metavar="DIR", help="HF model directory (default: a small random Llama)")
    p.add_argument("--steps", type=int, default=10, help="AdamW steps before comparing parameters (default 10)")
    p.add_argument("--batch", type=int, default=2, help="batch size (default 2)")
    p.add_argument("--seq", type=int, default=32, help="sequence length (default 32)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random batch and random model")
    p.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate (default 1e-3)")
    p.add_argument("--eps", type=float, default=1e-5,
                   help="AdamW eps (default 1e-5: with 1e-8 a gradient element that is float32 noise "
                        "around zero becomes a full-size step in both, and differs between them)")
    p.add_argument("--weight-decay", type=float, default=0.1, help="AdamW weight decay (default 0.1)")
    p.add_argument("--rtol", type=float, default=1e-4, help="relative tolerance (default 1e-4)")
    p.add_argument("--atol", type=float, default=1e-5, help="absolute tolerance (default 1e-5)")
    p.add_argument("--threads", type=int, default=None, help="BLAS/numba threads for our side")
    p.add_argument("--tp", type=int, default=1,
                   help="tensor-parallel size of our side; run under mpiexec -n TP (default 1)")


def _diff(ours, ref, rtol, atol):
    """(max abs diff, max rel diff, worst |d| / (atol + rtol max|ref|))."""
    ours = np.asarray(ours, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    d = np.abs(ours - ref)
    if d.size == 0:
        return 0.0, 0.0, 0.0
    rel = d / np.maximum(np.abs(ref), 1e-30)
    tol = atol + rtol * np.abs(ref).max()
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(d == 0, 0.0, d / tol)   # d > 0 with tol 0 is inf: beyond any tolerance
    return float(d.max()), float(rel.max()), float(ratio.max())


def run(args) -> int:
    try:
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM
    except ImportError as e:
        print(f"cke-dist compare needs torch and transformers ({e}); install the test extra: "
              f"pip install -e '.[test]'", file=sys.stderr)
        return 2
    from cke_dist.model import LlamaConfig, Model, load_model
    from cke_dist.model.layout import offsets, param_specs
    from cke_dist.train.optim import AdamW
    from cke_dist.parallel import ParallelGrads

    if args.threads:
        from cke_kernels.threads import set_num_threads
        set_num_threads(args.threads)
        torch.set_num_threads(args.threads)
    for name in ("steps", "batch", "seq"):
        if getattr(args, name) < (0 if name == "steps" else 1):
            print(f"--{name} must be positive, got {getattr(args, name)}", file=sys.stderr)
            return 2

    def full_named(local):
        """This rank's flat array -> {HF name: full tensor} (gathered over tp)."""
        full = model.gather_flat(local)
        return {sp.name: full[a:b].reshape(sp.full)
                for sp, (a, b) in zip(param_specs(model.config), offsets(param_specs(model.config)).values())}

    tp_group = None
    if args.tp != 1:
        from cke_dist.comm import init
        world = init()
        if args.tp < 1 or world.size != args.tp:
            print(f"cke-dist compare: --tp {args.tp} needs exactly {args.tp} ranks (mpiexec -n {args.tp}); this "
                  f"job has {world.size}", file=sys.stderr)
            return 2
        tp_group = world
    say = print if tp_group is None or tp_group.rank == 0 else (lambda *a, **k: None)

    if args.model:
        try:
            model = load_model(args.model, tp_group=tp_group)
        except (OSError, ValueError) as e:
            print(f"cke-dist compare: cannot load --model {args.model}: {e}", file=sys.stderr)
            return 2
        ref = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32, attn_implementation="eager")
        source = args.model
    else:
        try:
            model = Model.from_config(LlamaConfig.from_dict(DEFAULT_CONFIG), seed=args.seed, tp_group=tp_group)
        except ValueError as e:
            print(f"cke-dist compare: {e}", file=sys.stderr)
            return 2
        hf_cfg = AutoConfig.for_model(**model.config.to_dict())
        hf_cfg._attn_implementation = "eager"
        ref = AutoModelForCausalLM.from_config(hf_cfg, dtype=torch.float32)
        sd = ref.state_dict()
        with torch.no_grad():
            for name, v in full_named(model.params).items():
                sd[name].copy_(torch.from_numpy(np.ascontiguousarray(v)))
        source = f"random model (seed {args.seed}) {DEFAULT_CONFIG}"
    cfg = model.config
    ref_params = dict(ref.named_parameters())
    missing = sorted(set(model.named_params) - set(ref_params))
    if missing:
        print(f"transformers' {type(ref).__name__} has no parameter(s) {missing[:3]}: names differ", file=sys.stderr)
        return 1
    T = min(args.seq, cfg.max_position_embeddings)
    rng = np.random.default_rng(args.seed)

    def make_batch():
        tok = rng.integers(0, cfg.vocab_size, (args.batch, T + 1))
        return tok[:, :-1].copy(), tok[:, 1:].copy()

    def ref_loss(x, y):
        logits = ref(torch.from_numpy(x)).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, cfg.vocab_size), torch.from_numpy(y).reshape(-1))
        return logits, loss

    tp_grads = ParallelGrads(model)
    rows = []
    x, y = make_batch()
    logits, loss = ref_loss(x, y)
    loss.backward()
    rows.append(("logits", *_diff(model.forward(x), logits.detach().numpy(), args.rtol, args.atol), ""))
    model.zero_grad()
    our_loss = model.forward_backward(x, y)
    tp_grads.sum_shared()
    rows.append(("loss", *_diff(our_loss, loss.item(), args.rtol, args.atol), ""))
    grads = full_named(model.grads)
    worst = max(((n, *_diff(g, ref_params[n].grad.numpy(), args.rtol, args.atol))
                 for n, g in grads.items()), key=lambda r: r[3])
    rows.append(("grads", *_diff(np.concatenate([g.reshape(-1) for g in grads.values()]), np.concatenate(
        [ref_params[n].grad.numpy().reshape(-1) for n in grads]), args.rtol, args.atol)[:2],
                 worst[3], f"worst: {worst[0]}"))

    opt = AdamW(model, lr=args.lr, betas=(0.9, 0.95), eps=args.eps, weight_decay=args.weight_decay)
    ref_opt = torch.optim.AdamW([ref_params[n] for n in model.named_params], lr=args.lr, betas=(0.9, 0.95),
                                eps=args.eps, weight_decay=args.weight_decay)
    for step in range(args.steps):
        if step:
            x, y = make_batch()
            ref_opt.zero_grad()
            ref_loss(x, y)[1].backward()
            model.zero_grad()
            model.forward_backward(x, y)
            tp_grads.sum_shared()
        ref_opt.step()
        opt.step()
    if args.steps:
        params = full_named(model.params)
        worst = max(((n, *_diff(v, ref_params[n].detach().numpy(), args.rtol, args.atol))
                     for n, v in params.items()), key=lambda r: r[3])
        rows.append((f"params after {args.steps} AdamW", *_diff(np.concatenate(
            [v.reshape(-1) for v in params.values()]), np.concatenate(
            [ref_params[n].detach().numpy().reshape(-1) for n in params]), args.rtol, args.atol)[:2],
                     worst[3], f"worst: {worst[0]}"))

    say(f"cke-dist compare: {source}" + (f" (ours: tensor parallel over {args.tp} ranks)" if tp_group else ""))
    say(f"  {cfg.model_type}, {sum(s.size for s in param_specs(cfg)):,} params, batch {args.batch} x {T}, "
          f"tolerance |ours - torch| <= {args.atol:g} + {args.rtol:g} * max|torch| of each tensor")
    say(f"  {'quantity':<24} {'max abs diff':>13} {'max rel diff':>13} {'/ tolerance':>12}")
    failed = []
    for name, dabs, drel, ratio, note in rows:
        flag = "ok" if ratio <= 1.0 else "FAIL"
        if ratio > 1.0:
            failed.append(name)
        say(f"  {name:<24} {dabs:13.3e} {drel:13.3e} {ratio:12.3f}  {flag} {note}")
    if failed:
        say(f"FAILED: {', '.join(failed)} beyond tolerance", file=sys.stderr)
        return 1
    say("all within tolerance")
    return 0
