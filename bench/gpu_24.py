"""2:4 on a CUDA GPU: dense versus torch semi-structured sparse, for large square matmuls and the pruned SmolLM2.

Timings are medians of repeated CUDA-event measurements after warm-up, dense and sparse interleaved. Needs an NVIDIA
GPU of compute capability 8.0+; on a machine without one it says so and exits 0.

    .venv/bin/python bench/gpu_24.py                     # matmuls 4096/8192 in fp16/bf16 + SmolLM2 2:4
    .venv/bin/python bench/gpu_24.py --model tiny-llama   # quick
"""

from __future__ import annotations

import argparse
import statistics
import sys

import torch

from runtimes.torch_sparse import available


def cuda_median_ms(fn, repeats: int = 20, warmup: int = 5) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def two_four(weight: torch.Tensor) -> torch.Tensor:
    """Keep the 2 largest |w| of every 4 consecutive inputs."""
    groups = weight.reshape(weight.shape[0], -1, 4)
    idx = groups.abs().topk(2, dim=-1, largest=False).indices
    return groups.scatter(-1, idx, 0).reshape_as(weight)


def matmul_rows(sizes: list[int], tokens: int, repeats: int) -> list[str]:
    from torch.sparse import to_sparse_semi_structured

    rows = []
    for dtype in (torch.float16, torch.bfloat16):
        for n in sizes:
            w = two_four(torch.randn(n, n, device="cuda", dtype=dtype))
            x = torch.randn(tokens, n, device="cuda", dtype=dtype)
            ws = to_sparse_semi_structured(w)
            dense = cuda_median_ms(lambda: torch.nn.functional.linear(x, w), repeats)
            sparse = cuda_median_ms(lambda: torch.nn.functional.linear(x, ws), repeats)
            err = float((torch.nn.functional.linear(x, ws) - torch.nn.functional.linear(x, w)).abs().max())
            rows.append(f"| linear {tokens}x{n} @ {n}x{n} | {str(dtype).split('.')[-1]} | {dense:.3f} | {sparse:.3f} | "
                        f"{dense / sparse:.2f}x | {err:.2e} |")
    return rows


def model_rows(model: str, shapes: list[tuple[int, int]], repeats: int) -> list[str]:
    from nexus_export.graph.program import Program
    from nexus_export.models.zoo import open_model
    from passes.magnitude import MagnitudePass
    from runtimes.torch_sparse import dense_module, to_semi_structured

    loaded = open_model(model)
    program = Program.from_loaded(loaded)
    MagnitudePass({"pattern": "2:4"}).run(program)  # the mask does not change the speed; any 2:4 will do
    dense = dense_module(program)
    sparse, names = to_semi_structured(program)
    rows = []
    for batch, seq in shapes:
        ids = torch.randint(0, 1000, (batch, seq), device="cuda")
        mask = torch.ones_like(ids)
        with torch.no_grad():
            d = cuda_median_ms(lambda: dense(ids, mask), repeats)
            s = cuda_median_ms(lambda: sparse(ids, mask), repeats)
            err = float((dense(ids, mask).float() - sparse(ids, mask).float()).abs().max())
        rows.append(f"| {model} 2:4 ({len(names)} sparse linears), {batch}x{seq} | float16 | {d:.2f} | {s:.2f} | "
                    f"{d / s:.2f}x | {err:.2e} |")
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="4096,8192")
    ap.add_argument("--tokens", type=int, default=4096, help="rows of the activation matrix for the matmuls")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--shapes", default="1x128,8x512")
    ap.add_argument("--repeats", type=int, default=20)
    args = ap.parse_args()
    ok, why = available()
    if not ok:
        print(f"no 2:4 benchmark here: {why}")
        return 0
    print(f"{why}\n")
    print("| workload | dtype | dense ms | 2:4 ms | speed-up | max abs diff |")
    print("|---|---|---|---|---|---|")
    for row in matmul_rows([int(s) for s in args.sizes.split(",")], args.tokens, args.repeats):
        print(row, flush=True)
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    for row in model_rows(args.model, shapes, args.repeats):
        print(row, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
