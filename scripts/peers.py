#!/usr/bin/env python3
"""klgpu against its peers, in one run on one machine, printed as one table.

Runs NumPy (f32 expression), SciPy (rel_entr(...).sum()), and where CUDA is present PyTorch
(F.kl_div(..., reduction="sum") on probabilities, and a logits -> log_softmax -> kl_div
pipeline, also on bf16 logits upcast to f32 as PyTorch code usually does) on the same workloads
as klgpu's benchmark driver (examples/bench.rs), whose JSON it reads or runs. First it finds out which adapter wgpu uses and says so: if the machine has an
NVIDIA GPU but wgpu only sees a software adapter, the klgpu column is lavapipe's.

    python3 scripts/peers.py --bench target/release/examples/bench [--quick] [--json OUT.json]
    python3 scripts/peers.py --klgpu-json bench.json   # reuse a finished bench run

Finishes in well under 5 minutes (sizes shrink with --quick).
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import time

try:
    import numpy as np
except ImportError:  # said after the adapter, which needs no NumPy
    np = None


def median_time(fn, budget=1.0, min_reps=3, max_reps=30):
    fn()  # warm-up
    times, start = [], time.perf_counter()
    while len(times) < min_reps or (time.perf_counter() - start < budget and len(times) < max_reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def cuda_time(torch, fn, reps=20):
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    return sorted(times)[len(times) // 2]


def sci(n):
    """1e7, as Rust's {:.0e} writes it (the bench's workload names)."""
    m, e = f"{n:.0e}".split("e")
    return f"{m}e{int(e)}"


def probs(rng, rows, cols):
    x = rng.random((rows, cols), dtype=np.float32) + np.float32(1e-6)
    return (x / x.sum(axis=1, keepdims=True, dtype=np.float64)).astype(np.float32)


def logits(rng, rows, cols):
    return ((rng.random((rows, cols), dtype=np.float32) - 0.5) * 16).astype(np.float32)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bench", help="path of klgpu's bench binary (examples/bench)")
    ap.add_argument("--klgpu-json", help="a finished bench --json file instead of running it")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", help="write the table as JSON here")
    ap.add_argument("--bench-timeout", type=float, default=240,
                    help="seconds the bench may take when it is run here (default 240)")
    args = ap.parse_args()

    # 1. klgpu, which also tells us the adapter. A bench that fails leaves the peers' columns.
    kl = None
    try:
        if args.klgpu_json:
            kl = json.load(open(args.klgpu_json))
        else:
            if not args.bench:
                sys.exit("peers.py: give --bench or --klgpu-json")
            out = "/tmp/klgpu-bench.json"
            cmd = [args.bench, "--json", out, "--no-cpu"] + (["--quick"] if args.quick else [])
            print("running", " ".join(cmd), flush=True)
            subprocess.run(cmd, check=True, timeout=args.bench_timeout)
            kl = json.load(open(out))
    except (OSError, ValueError, subprocess.SubprocessError) as e:
        print(f"klgpu's bench gave no results ({e}): its columns stay empty", flush=True)
    has_nvidia = shutil.which("nvidia-smi") is not None
    if kl:
        adapter = kl["adapter"]
        print(f"\nwgpu adapter: {adapter['name']} ({adapter['backend']}, {adapter['device_type']})")
        if has_nvidia and adapter["device_type"] == "Cpu":
            print("NOTE: this machine has an NVIDIA GPU but wgpu found no Vulkan adapter for it;"
                  " klgpu's numbers below are lavapipe's (CPU).")
        elif adapter["device_type"] != "Cpu":
            print("wgpu has a hardware adapter: klgpu ran on the GPU.")
        check = kl.get("check")
        if check is None:
            print("klgpu's values were not checked against the f64 reference in this bench run")
        else:
            worst = check["worst_relative_error"]  # JSON has no infinity: null for an infinite one
            worst = "inf" if worst is None else f"{worst:.1e}"
            print(f"klgpu's values against the f64 reference: {check['rows_off']} rows off by more "
                  f"than 1e-4 over {check['workloads']} workloads (worst {worst}: {check['worst_at']})"
                  + ("" if check["rows_off"] == 0 else ": WRONG, timings below are of wrong numbers"))
    else:
        adapter = None
    klgpu = {(r["workload"], r["path"]): r for r in kl["results"]} if kl else {}
    if np is None:
        print("NumPy is not installed here: no peers to time")
        return

    # 2. The peers.
    try:
        import torch
        import torch.nn.functional as F
        cuda = torch.cuda.is_available()
    except ImportError:
        torch, cuda = None, False
    try:
        from scipy.special import rel_entr
    except ImportError:
        rel_entr = None
    if cuda:
        print(f"PyTorch {torch.__version__} on {torch.cuda.get_device_name(0)}")
    else:
        print("PyTorch with CUDA: not available on this machine")

    rng = np.random.default_rng(0)
    big = 10_000_000 if args.quick else 100_000_000
    rows = []

    def row(name, klgpu_name, nbytes, numpy_s=None, scipy_s=None, torch_s=None, torch_label="", torch_given_log_s=None):
        k = klgpu.get((klgpu_name, "gpu-device"))
        kh = klgpu.get((klgpu_name, "gpu-host"))
        kc = klgpu.get((klgpu_name, "cpu-reference"))
        rows.append({
            "workload": name, "bytes": nbytes,
            "numpy_f32_s": numpy_s, "scipy_s": scipy_s, "torch_cuda_s": torch_s, "torch_op": torch_label,
            "torch_given_log_q_s": torch_given_log_s,
            "klgpu_device_s": k["seconds"] if k else None,
            "klgpu_host_s": kh["seconds"] if kh else None,
            "klgpu_cpu_reference_s": kc["seconds"] if kc else None,
        })

    # The adapter's streaming bandwidth as PyTorch sees it: a read-only sum and a copy.
    bandwidth = {}
    if cuda:
        x = torch.rand(1 << 29, device="cuda")  # 2 GiB
        y = torch.empty_like(x)
        s_sum = cuda_time(torch, lambda: x.sum())
        s_copy = cuda_time(torch, lambda: y.copy_(x))
        bandwidth = {"torch_sum_read_gbps": x.numel() * 4 / s_sum / 1e9,
                     "torch_copy_read_write_gbps": 2 * x.numel() * 4 / s_copy / 1e9}
        print(f"streaming bandwidth (PyTorch): sum reads {bandwidth['torch_sum_read_gbps']:.0f} GB/s, "
              f"copy moves {bandwidth['torch_copy_read_write_gbps']:.0f} GB/s (read + write)")
        del x, y
        torch.cuda.empty_cache()

    for n in [10_000_000, big] if big != 10_000_000 else [10_000_000]:
        p, q = probs(rng, 1, n)[0], probs(rng, 1, n)[0]
        numpy_s = median_time(lambda: np.sum(p * np.log(p / q)))
        scipy_s = median_time(lambda: rel_entr(p, q).sum()) if rel_entr else None
        torch_s = torch_given_log_s = None
        if cuda:
            pt, qt = torch.from_numpy(p).cuda(), torch.from_numpy(q).cuda()
            lq = qt.log()
            torch_s = cuda_time(torch, lambda: F.kl_div(qt.log(), pt, reduction="sum"))
            torch_given_log_s = cuda_time(torch, lambda: F.kl_div(lq, pt, reduction="sum"))
            del pt, qt, lq
        row(f"KL probs N={sci(n)}", f"KL probs N={sci(n)}", 8 * n, numpy_s, scipy_s, torch_s,
            "kl_div(q.log(), p, sum)", torch_given_log_s)
        del p, q

    shapes = [(100_000, 10, "probs"), (256, 32_000, "logits"), (16, 262_144, "logits")] if args.quick else \
        [(1_000_000, 10, "probs"), (4096, 32_000, "logits"), (16, 262_144, "logits")]
    for r_, c_, kind in shapes:
        name = f"KL {'probs' if kind == 'probs' else 'logits'} {r_}x{c_}"
        if kind == "probs":
            p, q = probs(rng, r_, c_), probs(rng, r_, c_)
            numpy_s = median_time(lambda: np.sum(p * np.log(p / q), axis=1))
            scipy_s = median_time(lambda: rel_entr(p, q).sum(axis=1)) if rel_entr else None
            torch_s = None
            if cuda:
                pt, qt = torch.from_numpy(p).cuda(), torch.from_numpy(q).cuda()
                torch_s = cuda_time(torch, lambda: F.kl_div(qt.log(), pt, reduction="none").sum(-1))
            label = "kl_div(q.log(), p).sum(-1)"
        else:
            zp, zq = logits(rng, r_, c_), logits(rng, r_, c_)

            def np_logits():
                lp = zp - zp.max(axis=1, keepdims=True)
                lp -= np.log(np.exp(lp).sum(axis=1, keepdims=True))
                lq = zq - zq.max(axis=1, keepdims=True)
                lq -= np.log(np.exp(lq).sum(axis=1, keepdims=True))
                return (np.exp(lp) * (lp - lq)).sum(axis=1)
            numpy_s = median_time(np_logits, budget=0.5, min_reps=1, max_reps=3)
            scipy_s = None
            torch_s = None
            if cuda:
                pt, qt = torch.from_numpy(zp).cuda(), torch.from_numpy(zq).cuda()
                torch_s = cuda_time(torch, lambda: F.kl_div(F.log_softmax(qt, -1), F.log_softmax(pt, -1),
                                                             log_target=True, reduction="none").sum(-1))
            label = "kl_div(log_softmax(zq), log_softmax(zp), log_target).sum(-1)"
        row(name, name, 8 * r_ * c_, numpy_s, scipy_s, torch_s, label)
        if cuda:
            del pt, qt
            torch.cuda.empty_cache()

    # The logits batch stored as bf16 (as models save them): klgpu reads the bf16 values and
    # widens them in the kernel; PyTorch's usual pipeline upcasts to f32 first.
    r_, c_ = (256, 32_000) if args.quick else (4096, 32_000)
    name = f"KL logits {r_}x{c_} bf16"
    torch_s = None
    if cuda:
        zp, zq = logits(rng, r_, c_), logits(rng, r_, c_)
        pt = torch.from_numpy(zp).cuda().to(torch.bfloat16)
        qt = torch.from_numpy(zq).cuda().to(torch.bfloat16)
        torch_s = cuda_time(torch, lambda: F.kl_div(F.log_softmax(qt.float(), -1), F.log_softmax(pt.float(), -1),
                                                     log_target=True, reduction="none").sum(-1))
        del pt, qt
        torch.cuda.empty_cache()
    row(name, name, 4 * r_ * c_, None, None, torch_s,
        "kl_div(log_softmax(zq.float()), log_softmax(zp.float()), log_target).sum(-1), bf16 in")

    # 3. One table.
    def fmt(s):
        return "      —     " if s is None else f"{s * 1e3:9.3f} ms"
    print(f"\n{'workload':<26} {'NumPy f32':>12} {'SciPy':>12} {'PyTorch CUDA':>12} {'PT, log q given':>15} "
          f"{'klgpu GPU':>12} {'klgpu+upload':>12} {'vs PyTorch':>10} {'klgpu GB/s':>10} {'klgpu CPU f64':>13}")
    for r in rows:
        speed = gbps = ""
        if r["torch_cuda_s"] and r["klgpu_device_s"]:
            speed = f"{r['torch_cuda_s'] / r['klgpu_device_s']:.2f}x"
        if r["klgpu_device_s"]:
            gbps = f"{r['bytes'] / r['klgpu_device_s'] / 1e9:.0f}"
        print(f"{r['workload']:<26} {fmt(r['numpy_f32_s'])} {fmt(r['scipy_s'])} {fmt(r['torch_cuda_s'])} "
              f"{fmt(r['torch_given_log_q_s']):>15} {fmt(r['klgpu_device_s'])} {fmt(r['klgpu_host_s'])} {speed:>10} {gbps:>10} "
              f"{fmt(r['klgpu_cpu_reference_s']):>13}")
    # The [bench] target for the f64 reference: within 1.5x of NumPy's f32 expression at 1e7.
    ref = next((r for r in rows if r["workload"] == "KL probs N=1e7"), None)
    if ref and ref["klgpu_cpu_reference_s"] and ref["numpy_f32_s"]:
        ratio = ref["klgpu_cpu_reference_s"] / ref["numpy_f32_s"]
        print(f"\nCPU reference (f64) at N=1e7: {ref['klgpu_cpu_reference_s'] * 1e3:.1f} ms, "
              f"{ratio:.2f}x NumPy's f32 np.sum(p*np.log(p/q)) (target <= 1.5x)")
    if kl:
        print(f"\nklgpu roofline (plain streaming sum, same adapter): {kl['roofline_gbps']:.1f} GB/s; timer: {kl['timer']}")
    if args.json:
        json.dump({"adapter": adapter, "rows": rows, "bandwidth": bandwidth, "klgpu": kl}, open(args.json, "w"), indent=2)


if __name__ == "__main__":
    main()
