"""``python -m bench <experiment> [args]``: run one experiment; without one, list them."""
import importlib
import inspect
import sys

EXPERIMENTS = {     # module in bench/ -> what it measures
    "ch01_batch_sweep": "ch 01: measured peaks, one decode step per batch size (step time, MBU)",
    "run_ladder": "ch 04/09: several engines (rungs) on the same requests, one JSON",
    "paged_attention": "ch 07: one layer of packed, paged attention: gather, flex, kernel",
    "curve": "ch 08: a real throughput-latency sweep over arrival rates and max_batch",
    "simulator_validation": "ch 08: fit the step-cost model to some runs, predict the others",
    "decode_step": "ch 09: whole decode steps per batch size (graph replay, unfused, eager)",
    "profile_decode": "ch 09: torch.profiler of decode steps and one mixed step, by kernel",
    "tune_decode_kernel": "ch 09: the Triton decode kernel's knobs swept per batch size",
    "decode_lengths": "ch 09: the decode kernel on equal and lognormal context lengths",
    "thin_matmuls": "ch 09: the decode step's matmuls alone: cuBLAS, cuBLASLt, Inductor",
    "thin_gemv": "ch 09: small-batch projections, cuBLAS against a plain Triton kernel",
    "l2_prefetch": "ch 09: small-batch projections with the next weights read into L2 beside them",
    "mlp_chunks": "ch 09: a mixed step's MLP in chunks of tokens (SwiGLU's intermediate in L2)",
    "mixed_parts": "ch 09: a mixed step's non-matmul parts, variants of each timed",
    "timeline": "ch 09: the GPU's timeline over windows of a real run: busy, gaps, kernels",
    "flex_in_run": "ch 09: FlexAttention's calls timed inside a real run and alone",
    "gpu_correctness": "ch 09: the fast engine's float32 tokens on a GPU against HF generate",
    "smollm2_gpu": "ch 09: SmolLM2 on the fast path against HF generate, with/without graphs",
    "sustained_peak": "ch 09: the matmul peak in a burst and held for seconds (clock, power)",
    "host_overlap": "ch 09: the fastest rung's host time per step (launch, wait, retire)",
    "host_time": "ch 09: the engine's host cost alone on the CPU, with the tests' fake model",
    "floor_by_step": "ch 09: a stored run's steps against their floor, by kind of step",
}


def usage() -> str:
    width = max(map(len, EXPERIMENTS))
    return "\n".join(["usage: python -m bench <experiment> [args]   (<experiment> -h for its args)",
                      "", *(f"  {k:{width}}  {v}" for k, v in EXPERIMENTS.items())])


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help", "list"):
        print(usage())
        return 0
    name, args = argv[0], argv[1:]
    if name not in EXPERIMENTS:
        print(f"unknown experiment {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(f"bench.{name}")
    sys.argv = [f"python -m bench {name}", *args]      # argparse's prog, and what a run records
    # host_time's main() reads sys.argv itself; the others take argv
    module.main(args) if inspect.signature(module.main).parameters else module.main()
    return 0


if __name__ == "__main__":
    sys.exit(main())
