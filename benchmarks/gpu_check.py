"""One GPU check, one table: CUDA correctness, a DistilBERT-sized distillation step, and fused-head memory.

1. Correctness on the device: the fused output layer against the plain formulation (values and gradients of the
   soft-target KL, MLM cross-entropy and logit MSE) in float32 and under bf16 autocast.
2. Speed of the real training step (distil.training.objective.Objective, fused head) for a BERT-base-shaped
   teacher (12 x 768, random weights from a config) and a 6-layer DistilBERT student, bf16 autocast: tokens/s,
   MFU of the student's forward + backward and of the teacher's forward counted separately (6 N and 2 N FLOPs per
   token for N non-embedding parameters, plus the attention score terms, plus the output layer), peak memory.
3. Memory of the fused head against the plain formulation at a 128,256-token vocabulary (Llama-3), 8,192 rows.

    bash benchmarks/gpu_check.sh                 # on a machine with an NVIDIA GPU
    .venv/bin/python benchmarks/gpu_check.py --device cpu --small   # the same code, tiny, as a smoke test
"""

from __future__ import annotations

import argparse
import contextlib
import time

import torch

PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0}


def peak_tflops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


def fused_vs_plain(device, dtype_name: str, vocab: int, rows: int, hidden: int) -> dict:
    """Largest relative differences of the fused head against the plain losses (value, grad of hidden, of weight)."""
    from distil import losses
    from distil.training.fused_head import HeadTerms, fused_head_losses

    torch.manual_seed(0)
    proj = torch.nn.Linear(hidden, vocab).to(device)
    t_proj = torch.nn.Linear(hidden, vocab).to(device)
    with torch.no_grad():
        t_proj.weight.mul_(4.0)
    h = torch.randn(rows, hidden, device=device, requires_grad=True)
    t_h = torch.randn(rows, hidden, device=device)
    labels = torch.where(torch.rand(rows, device=device) < 0.15, torch.randint(0, vocab, (rows,), device=device),
                         torch.full((rows,), -100, device=device))
    kd = torch.ones(rows, dtype=torch.bool, device=device)
    T, w = 2.0, {"ce": 5.0 / rows, "mse": 0.1 / rows, "lm": 2.0 / max(1, int((labels != -100).sum()))}
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if dtype_name == "bf16" else contextlib.nullcontext()
    with autocast:
        total, _ = fused_head_losses(h, proj, t_h, t_proj, kd, labels,
                                     HeadTerms(T, coef_ce=w["ce"], coef_mse=w["mse"], coef_lm=w["lm"]))
    total.backward()
    fused = (total.detach().float(), h.grad.clone(), proj.weight.grad.clone())
    h.grad = None
    proj.zero_grad()
    with autocast:
        s, t = proj(h), t_proj(t_h)
        plain = (5.0 * losses.soft_target_kl(s, t, T) + 0.1 * losses.logit_mse(s, t)
                 + 2.0 * losses.masked_lm_loss(s, labels))
    plain.backward()
    rel = lambda a, b: float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12))  # noqa: E731
    return {"value": rel(fused[0], plain.detach()), "grad_hidden": rel(fused[1], h.grad),
            "grad_weight": rel(fused[2], proj.weight.grad)}


def distilbert_step(device, small: bool, steps: int) -> dict:
    from transformers import BertConfig, BertForMaskedLM, DistilBertConfig, DistilBertForMaskedLM

    from distil.data.masking import MLMMasker, mask_probabilities
    from distil.training.fused_head import output_projection
    from distil.training.batches import build_step
    from distil.training.objective import Objective, TermSpec
    from distil.training.sources.live import LiveTeacher

    width, layers, heads, ffn, vocab = (64, 2, 4, 128, 1000) if small else (768, 12, 12, 3072, 30_522)
    batch, length = (4, 32) if small else (64, 128)
    torch.manual_seed(0)
    teacher = BertForMaskedLM(BertConfig(vocab_size=vocab, hidden_size=width, num_hidden_layers=layers,
                                         num_attention_heads=heads, intermediate_size=ffn)).to(device).eval()
    student = DistilBertForMaskedLM(DistilBertConfig(vocab_size=vocab, dim=width, n_layers=max(1, layers // 2),
                                                     n_heads=heads, hidden_dim=ffn)).to(device).train()
    teacher.requires_grad_(False)
    if device.type == "cuda":
        teacher.to(torch.bfloat16)
    spec = TermSpec(weights={"ce": 5.0, "mlm": 2.0, "cos": 1.0}, temperature=2.0, objective="mlm",
                    restrict_ce_to_mask=False, layer_pairs=[(max(1, layers // 2), layers)])
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16))
    objective = Objective(spec, LiveTeacher(teacher, output_projection(teacher), autocast), student,
                          output_projection(student), autocast)
    masker = MLMMasker(mask_probabilities(torch.ones(vocab), [0, 1, 2, 3, 4]), 4, [0, 1, 2, 3, 4], vocab)
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-4, fused=device.type == "cuda")
    generator = torch.Generator(device=device)
    sequences = [torch.randint(5, vocab, (length,)).numpy() for _ in range(batch)]

    def one_step(seed):
        generator.manual_seed(seed)
        (b,) = build_step(sequences, 0, "mlm", masker, generator, 0, 1, device)
        with autocast():
            loss, _ = objective(student, b)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for seed in range(2):
        one_step(seed)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    for seed in range(steps):
        one_step(seed)
    if device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - started
    tokens = batch * length * steps

    def flops_per_token(model, n_layers, backward: bool):
        # 2 FLOPs per parameter per token, plus the output layer (tied to the embeddings, so not among the
        # non-embedding parameters, but a vocab x width matmul all the same), plus QK^T and AV (4 L d per layer).
        non_embedding = sum(p.numel() for n, p in model.named_parameters() if "embeddings" not in n)
        forward = 2 * non_embedding + 2 * vocab * width + 4 * n_layers * length * width
        return forward * (3 if backward else 1)

    student_flops = flops_per_token(student, max(1, layers // 2), True) * tokens
    teacher_flops = flops_per_token(teacher, layers, False) * tokens
    peak = peak_tflops(device)
    return {
        "tokens_per_s": tokens / elapsed,
        "student_tflops": student_flops / elapsed / 1e12, "teacher_tflops": teacher_flops / elapsed / 1e12,
        "mfu": (student_flops + teacher_flops) / elapsed / 1e12 / peak if peak else None,
        "peak_memory_gb": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
        "batch": f"{batch} x {length}",
    }


def head_memory(device, small: bool) -> dict:
    """Peak memory of the fused head and of the plain formulation, with the loss and backward of each."""
    if device.type != "cuda":
        return {}
    from distil import losses
    from distil.training.fused_head import HeadTerms, fused_head_losses

    vocab, rows, hidden = (1000, 256, 64) if small else (128_256, 8_192, 2_048)
    results = {}
    for name in ("plain", "fused"):
        torch.cuda.empty_cache()
        proj = torch.nn.Linear(hidden, vocab, bias=False, device=device, dtype=torch.bfloat16)
        t_proj = torch.nn.Linear(hidden, vocab, bias=False, device=device, dtype=torch.bfloat16)
        h = torch.randn(rows, hidden, device=device, dtype=torch.bfloat16, requires_grad=True)
        t_h = torch.randn(rows, hidden, device=device, dtype=torch.bfloat16)
        labels = torch.randint(0, vocab, (rows,), device=device)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        if name == "fused":
            total, _ = fused_head_losses(h, proj, t_h, t_proj, torch.ones(rows, dtype=torch.bool, device=device),
                                         labels, HeadTerms(2.0, coef_ce=1 / rows, coef_lm=1 / rows))
        else:
            s = proj(h)
            with torch.no_grad():
                t = t_proj(t_h)
            total = losses.soft_target_kl(s, t, 2.0) + losses.masked_lm_loss(s, labels)
        total.backward()
        torch.cuda.synchronize()
        results[name] = (torch.cuda.max_memory_allocated() - base) / 2**30
        del proj, t_proj, h, t_h, total
    results["ratio"] = results["fused"] / results["plain"]
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--small", action="store_true", help="tiny shapes (a smoke test on any device)")
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("No CUDA device here. Run on a GPU machine, or --device cpu --small for a smoke test.")
    shape = (500, 64, 32) if args.small else (32_000, 2_048, 768)
    rows = []
    for dtype_name in ("fp32", "bf16"):
        diff = fused_vs_plain(device, dtype_name, *shape)
        ok = max(diff.values()) < (1e-4 if dtype_name == "fp32" else 3e-2)
        rows.append((f"fused head = plain, {dtype_name} (value / d hidden / d weight, relative)",
                     f"{diff['value']:.1e} / {diff['grad_hidden']:.1e} / {diff['grad_weight']:.1e}",
                     "ok" if ok else "MISMATCH"))
    step = distilbert_step(device, args.small, args.steps)
    rows.append((f"DistilBERT-sized step, bf16, batch {step['batch']}: tokens/s", f"{step['tokens_per_s']:,.0f}", ""))
    rows.append(("  student forward+backward TFLOP/s", f"{step['student_tflops']:.1f}", ""))
    rows.append(("  teacher forward TFLOP/s", f"{step['teacher_tflops']:.1f}", ""))
    if step["mfu"] is not None:
        rows.append(("  MFU (student + teacher, of the bf16 peak)", f"{100 * step['mfu']:.1f}%",
                     "goal >= 45%" if step["mfu"] < 0.45 else "ok"))
    if step["peak_memory_gb"] is not None:
        rows.append(("  peak memory (GB)", f"{step['peak_memory_gb']:.2f}", ""))
    memory = head_memory(device, args.small)
    if memory:
        rows.append(("fused head memory, vocab 128,256 x 8,192 rows (GB): fused / plain",
                     f"{memory['fused']:.2f} / {memory['plain']:.2f} ({memory['ratio']:.2f}x)",
                     "ok" if memory["ratio"] <= 0.2 else "goal <= 0.2x"))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"| check on {name} | value | |")
    print("|---|---:|---|")
    for label, value, verdict in rows:
        print(f"| {label} | {value} | {verdict} |")


if __name__ == "__main__":
    main()
