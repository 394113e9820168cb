"""Train-step throughput and peak memory of the MNIST CapsNet with three class-capsule layers.

One full train step (forward, margin + reconstruction loss, backward, Adam step) of
``CapsNet(CapsNetConfig.mnist())`` (28x28x1, 3 routing iterations), with conv1, PrimaryCaps,
decoder and losses from ``capscore`` and the class-capsule layer swapped:

    capscore  capscore.layers.ClassCapsules as is (one bmm over I, logits [B, I, J]).
    einsum    a plain einsum layer: W [I, J, D, P], u_hat = einsum('ijdp,bip->bijd'),
              routing with einsums, logits [B, I, J].
    naive     the popular broadcast-style layer (as in gram-ai/capsule-networks): the input
              tiled to [B, I, J, P, 1] and matmul'ed with W [1, I, J, D, P] (W broadcast over the
              batch), routing logits at u_hat's shape [B, I, J, D].

All three share their weights (copied from the capscore layer) and are checked once to give the
same outputs and gradients in float64 before anything is timed. Every (impl, batch, mode) runs in
a fresh subprocess, so one measurement's allocations never leak into another's peak:

    CPU   peak RSS increase (VmHWM after the steps minus VmRSS after model, optimizer and data are
          built; the kernel's high-water mark is reset at that point via /proc/self/clear_refs).
          It includes the step's transients and the lazily allocated gradients and Adam state.
    CUDA  torch.cuda.max_memory_allocated() minus memory_allocated() after the same set-up;
          modes fp32, bf16 (autocast) and compile (torch.compile of forward + loss, fp32).

Usage (expected runtime: ~6 min on 2 CPU cores, ~1 min with --quick):

    .venv/bin/python bench/bench_model.py --output bench/results_model.md
    .venv/bin/python bench/bench_model.py --quick

Shape legend: B batch, I input capsules (1,152), J class capsules (10), P primary pose dim (8),
D class pose dim (16), K = J * D.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere, without installing the package
    sys.path.insert(0, str(ROOT))

from capscore import CapsNet, CapsNetConfig, ClassCapsules, RoutingOutput, squash  # noqa: E402

IMPLS = ("capscore", "einsum", "naive")
MODES = ("fp32", "bf16", "compile")
RESULT_TAG = "RESULT "


# --- the two comparison layers (same interface as ClassCapsules: u_BIP -> RoutingOutput) ---


class EinsumClassCapsules(nn.Module):
    """Plain einsum class capsules: W [I, J, D, P], logits [B, I, J]."""

    def __init__(self, ref: ClassCapsules):
        super().__init__()
        I, P, _ = ref.weight_IPK.shape
        J, D = ref.num_out, ref.out_dim
        self.iterations = ref.routing.config.iterations
        weight_IJDP = ref.weight_IPK.detach().view(I, P, J, D).permute(0, 2, 3, 1)
        self.weight_IJDP = nn.Parameter(weight_IJDP.contiguous())

    def forward(self, u_BIP: torch.Tensor) -> RoutingOutput:
        u_hat_BIJD = torch.einsum("ijdp,bip->bijd", self.weight_IJDP, u_BIP)
        B, I, J, _ = u_hat_BIJD.shape
        b_BIJ = u_hat_BIJD.new_zeros(B, I, J)
        for it in range(self.iterations):
            c_BIJ = torch.softmax(b_BIJ, dim=2)
            v_BJD = squash(torch.einsum("bij,bijd->bjd", c_BIJ, u_hat_BIJD))
            if it < self.iterations - 1:
                b_BIJ = b_BIJ + torch.einsum("bijd,bjd->bij", u_hat_BIJD, v_BJD)
        return RoutingOutput(v_BJD, v_BJD.float().norm(dim=-1), c_BIJ)


class NaiveClassCapsules(nn.Module):
    """Broadcast-style class capsules: tiled input, W broadcast over B, logits at u_hat's shape."""

    def __init__(self, ref: ClassCapsules):
        super().__init__()
        I, P, _ = ref.weight_IPK.shape
        J, D = ref.num_out, ref.out_dim
        self.num_out, self.iterations = J, ref.routing.config.iterations
        weight_IJDP = ref.weight_IPK.detach().view(I, P, J, D).permute(0, 2, 3, 1)
        self.weight_1IJDP = nn.Parameter(weight_IJDP.unsqueeze(0).contiguous())

    def forward(self, u_BIP: torch.Tensor) -> RoutingOutput:
        x_BIJP1 = torch.stack([u_BIP] * self.num_out, dim=2).unsqueeze(-1)
        u_hat_BIJD = torch.matmul(self.weight_1IJDP, x_BIJP1).squeeze(-1)
        b_BIJD = torch.zeros_like(u_hat_BIJD)
        for it in range(self.iterations):
            c_BIJD = torch.softmax(b_BIJD, dim=2)
            v_B1JD = squash((c_BIJD * u_hat_BIJD).sum(dim=1, keepdim=True))
            if it < self.iterations - 1:
                b_BIJD = b_BIJD + (u_hat_BIJD * v_B1JD).sum(dim=-1, keepdim=True)
        v_BJD = v_B1JD.squeeze(1)
        return RoutingOutput(v_BJD, v_BJD.float().norm(dim=-1), c_BIJD[..., 0])


LAYERS = {"einsum": EinsumClassCapsules, "naive": NaiveClassCapsules}


def build(impl: str, seed: int = 0) -> CapsNet:
    """The paper's MNIST CapsNet with the class-capsule layer of `impl` (same weights per seed)."""
    torch.manual_seed(seed)
    model = CapsNet(CapsNetConfig.mnist())
    if impl != "capscore":
        model.classes = LAYERS[impl](model.classes)
    return model


def capscore_layout(impl: str, grad: torch.Tensor) -> torch.Tensor:
    """A class-capsule weight (or its gradient) in capscore's [I, P, J*D] layout."""
    if impl == "capscore":
        return grad
    g_IJDP = grad.squeeze(0)
    I, J, D, P = g_IJDP.shape
    return g_IJDP.permute(0, 3, 1, 2).reshape(I, P, J * D)


def verify(batch: int = 3) -> str:
    """All three layers give the same outputs and gradients in float64 (raises if not)."""
    torch.manual_seed(1)
    images = torch.rand(batch, 1, 28, 28, dtype=torch.float64)
    targets = torch.randint(0, 10, (batch,))
    results = {}
    for impl in IMPLS:
        model = build(impl).double()
        out = model(images, targets)
        model.loss(out, images, targets).total.backward()
        w = next(p for n, p in model.named_parameters() if n.startswith("classes.weight"))
        results[impl] = {
            "lengths": out.lengths,
            "poses": out.poses,
            "coupling": out.coupling,
            "reconstructions": out.reconstructions,
            "grad_W": capscore_layout(impl, w.grad),
            "grad_conv1": model.conv1.weight.grad,
        }
    worst = 0.0
    for impl in IMPLS[1:]:
        for key, ref in results["capscore"].items():
            # The margin loss is computed in float32 by capscore, so gradients agree to ~1e-6.
            rtol, atol = (1e-5, 1e-12) if key.startswith("grad") else (1e-10, 1e-14)
            got = results[impl][key]
            torch.testing.assert_close(got, ref, rtol=rtol, atol=atol, msg=f"{impl} {key}")
            worst = max(worst, ((got - ref).abs().max() / ref.abs().max()).item())
    return f"outputs and gradients agree in float64 (max relative difference {worst:.1e})"


# --- one measurement, in its own process ---


def rss_kib(field: str) -> int:
    """VmRSS / VmHWM of this process in KiB (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_rss_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where that is not allowed."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def busy_cores_s() -> tuple[float, float]:
    """(CPU seconds all processes have been busy, this process's CPU seconds) so far."""
    ticks = os.sysconf("SC_CLK_TCK")
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    busy = sum(fields) - fields[3] - fields[4]  # all but idle and iowait
    own = resource.getrusage(resource.RUSAGE_SELF)
    return busy / ticks, own.ru_utime + own.ru_stime


def median_ms(
    fn, warmup: int, steps: int, sync, quiet_load: float = float("inf"), tries: int = 3
) -> tuple[float, float, float]:
    """(median wall ms, this process's CPU ms per step, other processes' busy cores).

    On a shared machine the timed block is repeated (up to `tries` times) while other processes
    kept more than `quiet_load` cores busy; the fastest block is returned.
    """
    for _ in range(warmup):
        fn()
    sync()
    blocks = []
    for _ in range(tries):
        blocks.append(timed_block(fn, steps, sync))
        if blocks[-1][2] < quiet_load:
            break
    return min(blocks)


def timed_block(fn, steps: int, sync) -> tuple[float, float, float]:
    times = []
    busy0, own0 = busy_cores_s()
    for _ in range(steps):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    busy1, own1 = busy_cores_s()
    other = max(0.0, (busy1 - busy0) - (own1 - own0)) / sum(times)
    return 1000 * statistics.median(times), 1000 * (own1 - own0) / steps, other


def saved_for_backward_mib(forward_loss, model: nn.Module) -> float:
    """Bytes autograd saves for backward in one forward (unique storages, parameters excluded).

    Deterministic, unlike RSS: the activation memory an implementation holds at its peak.
    """
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = forward_loss()
    del loss
    return sum(saved.values()) / 2**20


def measure(
    impl: str, batch: int, mode: str, device: str, warmup: int, steps: int, quiet_load: float
) -> dict:
    """Median train-step time, peak memory over the set-up baseline, and class-layer time."""
    cuda = device == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    model = build(impl).to(device).train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    images = torch.rand(batch, 1, 28, 28, device=device)
    targets = torch.randint(0, 10, (batch,), device=device)
    amp = (
        torch.autocast(device, dtype=torch.bfloat16) if mode == "bf16" else contextlib.nullcontext()
    )

    def forward_loss():
        with amp:
            out = model(images, targets)
            return model.loss(out, images, targets).total

    fwd_loss = torch.compile(forward_loss) if mode == "compile" else forward_loss

    def step():
        opt.zero_grad(set_to_none=True)
        fwd_loss().backward()
        opt.step()

    gc.collect()
    if cuda:
        sync()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        exact_peak = reset_rss_peak()
        base = rss_kib("VmRSS") * 1024
    step_ms, cpu_ms, other_cores = median_ms(step, warmup, steps, sync, quiet_load)
    peak = (torch.cuda.max_memory_allocated() if cuda else rss_kib("VmHWM") * 1024) - base
    # The class-capsule layer alone (forward + backward), to show what the swap itself costs.
    u_BIP = squash(torch.randn(batch, model.config.num_primary, 8, device=device))
    u_BIP.requires_grad_(True)

    def layer_step():
        with amp:
            v_BJD, _ = model.classes(u_BIP)
        v_BJD.float().sum().backward()

    layer_ms = median_ms(layer_step, warmup, steps, sync, quiet_load)[0]
    saved = None if mode == "compile" else saved_for_backward_mib(forward_loss, model)
    result = {
        "impl": impl,
        "batch": batch,
        "mode": mode,
        "step_ms": step_ms,
        "images_per_s": batch / step_ms * 1000,
        "peak_mib": peak / 2**20,
        "cpu_ms": cpu_ms,
        "other_cores": other_cores,
        "layer_ms": layer_ms,
        "saved_mib": saved,
    }
    if not cuda and not exact_peak:
        result["note"] = "VmHWM not resettable: peak includes set-up"
    return result


def wait_for_quiet(max_load: float, max_wait: float) -> float:
    """Wait (up to max_wait s) until other processes keep < max_load cores busy; returns the load."""
    deadline = time.time() + max_wait
    while True:
        busy0, own0 = busy_cores_s()
        time.sleep(1.0)
        busy1, own1 = busy_cores_s()
        load = max(0.0, (busy1 - busy0) - (own1 - own0))
        if load < max_load or time.time() > deadline:
            return load
        time.sleep(2.0)


def run_worker(args: argparse.Namespace, impl: str, batch: int, mode: str) -> dict:
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--worker",
        f"{impl},{batch},{mode}",
        "--device",
        args.device,
        "--warmup",
        str(args.warmup),
        "--steps",
        str(args.steps),
        "--quiet-load",
        str(args.quiet_load),
    ]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_TAG):
            return json.loads(line[len(RESULT_TAG) :])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
    return {"impl": impl, "batch": batch, "mode": mode, "error": " | ".join(tail)}


# --- report ---


def best_of(runs: list[dict]) -> dict:
    """The repeat with the fastest median step (least disturbed), with the largest peak seen."""
    ok = [r for r in runs if "error" not in r]
    if not ok:
        return runs[0]
    return {**min(ok, key=lambda r: r["step_ms"]), "peak_mib": max(r["peak_mib"] for r in ok)}


def machine(device: str) -> list[str]:
    lines = []
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        model_name = next(
            (
                ln.split(":", 1)[1].strip()
                for ln in lscpu.splitlines()
                if ln.startswith("Model name")
            ),
            platform.processor(),
        )
    except OSError:
        model_name = platform.processor() or "unknown CPU"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    lines.append(f"- CPU: {model_name}, nproc {cores}, torch threads {torch.get_num_threads()}")
    if device == "cuda":
        lines.append(f"- GPU: {torch.cuda.get_device_name()} (CUDA {torch.version.cuda})")
    lines.append(
        f"- torch {torch.__version__}, Python {platform.python_version()}, "
        f"{platform.system()} {platform.release()}"
    )
    return lines


def fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def table(results: list[dict]) -> list[str]:
    rows = [
        "| mode | batch | impl | step ms (median) | images/s | x naive | x einsum "
        "| peak mem MiB | saved for bwd MiB | class layer fwd+bwd ms | CPU ms/step "
        "| other load (cores) |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    by_key = {(r["mode"], r["batch"], r["impl"]): r for r in results}
    for r in results:
        if "error" in r:
            rows.append(
                f"| {r['mode']} | {r['batch']} | {r['impl']} | failed: {r['error']} "
                "| | | | | | | | |"
            )
            continue
        ratios = []
        for other in ("naive", "einsum"):
            o = by_key.get((r["mode"], r["batch"], other), {})
            ratios.append(
                f"{r['images_per_s'] / o['images_per_s']:.2f}" if "images_per_s" in o else "-"
            )
        rows.append(
            f"| {r['mode']} | {r['batch']} | {r['impl']} | {r['step_ms']:.1f} "
            f"| {r['images_per_s']:.1f} | {ratios[0]} | {ratios[1]} "
            f"| {r['peak_mib']:.0f} | {fmt(r.get('saved_mib'), '.1f')} "
            f"| {r['layer_ms']:.1f} | {r['cpu_ms']:.0f} "
            f"| {r['other_cores']:.2f} |"
        )
    return rows


def target_check(results: list[dict]) -> list[str]:
    """The issue's target: capscore >= einsum speed, >= 1.5x naive, less peak memory than both."""
    by_key = {(r["mode"], r["batch"], r["impl"]): r for r in results if "error" not in r}
    lines = []
    for (mode, batch, impl), r in by_key.items():
        e, n = by_key.get((mode, batch, "einsum")), by_key.get((mode, batch, "naive"))
        if impl != "capscore" or e is None or n is None:
            continue
        checks = {
            "speed >= einsum": r["images_per_s"] >= e["images_per_s"],
            "speed >= 1.5x naive": r["images_per_s"] >= 1.5 * n["images_per_s"],
            "memory < einsum and naive": r["peak_mib"] < min(e["peak_mib"], n["peak_mib"]),
        }
        verdict = ", ".join(f"{k}: {'yes' if ok else 'NO'}" for k, ok in checks.items())
        lines.append(f"- {mode}, batch {batch}: {verdict}")
    return lines


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Each (impl, batch, mode) runs in a fresh subprocess.",
    )
    p.add_argument(
        "--device",
        choices=("auto", "cpu", "cuda"),
        default="auto",
        help="auto: cuda if available, else cpu",
    )
    p.add_argument("--impls", default=",".join(IMPLS), help="comma-separated, from %(default)s")
    p.add_argument(
        "--batch-sizes",
        default=None,
        help="comma-separated (default: 16,32,64 on CPU, 64,128,256 on CUDA)",
    )
    p.add_argument(
        "--modes",
        default=None,
        help="comma-separated from fp32,bf16,compile (default: fp32 on CPU, all on CUDA)",
    )
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (default 2)")
    p.add_argument("--steps", type=int, default=7, help="timed steps; median reported (default 7)")
    p.add_argument(
        "--repeats",
        type=int,
        default=2,
        help="fresh processes per row, interleaved; the fastest is reported (default 2)",
    )
    p.add_argument(
        "--quiet-wait",
        type=float,
        default=60,
        help="before each run, wait up to this many s for other processes to go quiet "
        "(shared machines; 0: don't wait; default 60)",
    )
    p.add_argument(
        "--quiet-load",
        type=float,
        default=0.3,
        help="'quiet' means other processes busy < this many cores (default 0.3)",
    )
    p.add_argument(
        "--threads", type=int, default=0, help="torch.set_num_threads (0: torch default)"
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="very short run: batch 16 (CPU) / 64 (CUDA), 1 warm-up, 3 timed steps",
    )
    p.add_argument("--no-verify", action="store_true", help="skip the float64 equivalence check")
    p.add_argument("--timeout", type=float, default=600, help="seconds per subprocess")
    p.add_argument("--output", type=Path, help="also write the markdown report to this file")
    p.add_argument("--worker", help=argparse.SUPPRESS)  # "impl,batch,mode": one measurement
    args = p.parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    cuda = args.device == "cuda"
    if args.quick:
        args.warmup, args.steps, args.repeats = 1, 3, 1
        args.batch_sizes = args.batch_sizes or ("64" if cuda else "16")
    args.batch_sizes = [
        int(b) for b in (args.batch_sizes or ("64,128,256" if cuda else "16,32,64")).split(",")
    ]
    args.modes = (args.modes or (",".join(MODES) if cuda else "fp32")).split(",")
    args.impls = args.impls.split(",")
    for name, values, allowed in (("--impls", args.impls, IMPLS), ("--modes", args.modes, MODES)):
        if bad := [v for v in values if v not in allowed]:
            p.error(f"{name}: unknown {bad}, choose from {allowed}")
    if args.device == "cpu" and "compile" in args.modes:
        print(
            "note: torch.compile on CPU needs a C++ compiler and is slow to warm up",
            file=sys.stderr,
        )
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.worker:
        impl, batch, mode = args.worker.split(",")
        result = measure(
            impl, int(batch), mode, args.device, args.warmup, args.steps, args.quiet_load
        )
        print(RESULT_TAG + json.dumps(result), flush=True)
        return
    started = time.time()
    check = "not run (--no-verify)" if args.no_verify else verify()
    print(f"equivalence: {check}", flush=True)
    runs: dict[tuple, list[dict]] = {}
    for _ in range(args.repeats):  # interleaved, so a burst of other load hits every impl alike
        for mode in args.modes:
            for batch in args.batch_sizes:
                for impl in args.impls:
                    if args.quiet_wait > 0:
                        wait_for_quiet(args.quiet_load, args.quiet_wait)
                    r = run_worker(args, impl, batch, mode)
                    print(json.dumps(r), flush=True)
                    runs.setdefault((mode, batch, impl), []).append(r)
    results = [best_of(rs) for rs in runs.values()]
    command = " ".join(["python", *sys.argv])
    report = [
        "## CapsNet train step: capscore vs einsum vs naive class capsules",
        "",
        f"Command: `{command}`  ",
        f"Date: {datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}; "
        f"total wall time {time.time() - started:.0f} s",
        "",
        *machine(args.device),
        "",
        f"Model: CapsNet(CapsNetConfig.mnist()), 28x28x1, 3 routing iterations, Adam. "
        f"{args.warmup} warm-up steps, median of {args.steps} timed steps, in {args.repeats} fresh "
        f"processes per row run interleaved; the row shows the fastest one. Equivalence: {check}.",
        "",
        "CPU ms/step: this process's user + system CPU time per timed step (all threads). Other "
        "load: CPU cores kept busy by other processes during the timed steps (from /proc/stat); "
        "well above 0 means the wall times are inflated by contention. Saved for bwd: bytes autograd "
        "keeps from one forward for the backward (unique storages, parameters excluded): a "
        "deterministic measure of activation memory, unlike RSS.",
        "",
        "Peak memory: "
        + (
            "torch.cuda.max_memory_allocated() minus memory_allocated() after set-up."
            if args.device == "cuda"
            else "VmHWM minus VmRSS after set-up (model, optimizer, data), in a fresh "
            "process; includes gradients + Adam state (3 x 8.2M fp32 = 94 MiB, "
            "the same for every impl)."
        ),
        "",
        *table(results),
        "",
        "Target (capscore at least as fast as einsum, >= 1.5x naive, less peak memory than both):",
        *target_check(results),
        "",
    ]
    text = "\n".join(report)
    print("\n" + text)
    if args.output:
        args.output.write_text(text)


if __name__ == "__main__":
    main()
