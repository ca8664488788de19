#!/usr/bin/env python3
"""Differential fuzz of the klgpu binary: the GPU against `--backend cpu` (the f64 reference)
on random .npy and safetensors inputs — probabilities, log-probabilities and logits, close and
far pairs, f16/bf16/f32/f64, 1-D and 2-D, with and without --normalize, and small --block-bytes
so that rows are cut into pieces and streamed. Prints every row outside the precision bar (relative 1e-5,
or 1e-11 absolute below 1e-6; with the README's allowances for JS on rows cut into pieces,
for KL of log-probabilities, and for rows cut into pieces that are not distributions, whose
terms of both signs cancel), and every row where the CPU reference and NumPy's own f64
evaluation of the file's values disagree (an oracle for the readers: dtypes, shapes, order),
and exits 1 if there was one.

    cargo build --release && python3 scripts/cli_fuzz.py [SEED] [TRIALS] [--edges]

With CLI_FUZZ_KEEP=DIR set, the inputs of every trial with a row outside the bar are kept
there as SEED_TRIAL_p.npy and SEED_TRIAL_q.npy (SEED_TRIAL_pq.safetensors).

It found the long-logits-row bug fixed in e24971f (pieces fed as rounded log-probabilities) and
a float16 row whose normalized KL came out 2.8e-4 off (fixed in e907f0a).

Every run prints --json: the summary's infinite-row count, first infinite row and top-1
agreement must be the reference's exactly. Where both fail on bad input, they must print the
same `klgpu: error:` line (rows that overflow aside: f32's on the GPU, f64's on the CPU).

--edges fuzzes edge values instead (masks of -inf and of float32's minimum, whole pieces
masked, logits up to +-3.4e38, offsets up to 1e37, zeros, subnormals, probabilities near
float32's maximum) in pieces of 4 to 256 elements, against --backend cpu on whole rows. There
the bar is the GPU's whole-row answer where f32 cannot hold the result (an Overflow error then
must be the GPU's on the whole row too), and no NumPy oracle runs. It found the pieces' log-sum-
exps losing their small parts next to 1e37, pieces skipped that held p > 0 against q = 0, a KL
of logits 3.4e38 apart read 0 for +inf and +inf for 6.8e38, and cross-entropy and entropy of
logits masked with float32's minimum failing with Overflow, pieces that overflow alone failing
rows that are +inf, a piece weighing e^-720 reading KL +inf, and pieces whose own value
leaves f32 while their row's does not failing the row (now computed in f64) (sixteenth
session). In a third of its trials it plants one to three invalid values (NaN, +inf; -inf
and negatives in probabilities). That found an error that depended on the block size (an f64
beyond f32 named ahead of a NaN earlier in its block), and reading why, another (a row that
overflowed named ahead of a NaN in a later block) (eighteenth session).
"""
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile

import numpy as np

BIN = os.path.join(os.path.dirname(__file__), "..", "target", "release", "klgpu")


def pair(rng, inp, rows, cols):
    """A random (P, Q) of the given kind, as float64."""
    if inp == "logits":
        p = rng.normal(0, rng.choice([0.1, 1, 5, 20]), (rows, cols))
        noise = rng.choice([0, 1e-3, 1e-1, 1]) * rng.normal(size=(rows, cols))
        return p, p + noise + rng.choice([0, 5, -100])
    a = rng.gamma(rng.choice([0.1, 1, 10]), size=(rows, cols))
    a /= a.sum(1, keepdims=True)
    if rng.random() < 0.25:
        # Values near powers of two (P and Q either side of one) and rows that do not sum to 1:
        # where the normalized path's exact ratios once went out of range.
        a = 2.0 ** -rng.integers(1, 12, size=(rows, cols)) * (1 + 1e-3 * rng.uniform(-1, 1, size=(rows, cols)))
    b = a * np.exp(rng.choice([1e-4, 1e-2, 1]) * rng.uniform(-1, 1, size=(rows, cols)))
    b /= b.sum(1, keepdims=True)
    return (np.log(a), np.log(b)) if inp == "log-probs" else (a, b)


def edge_row(rng, inp, cols):
    """One row of edge values of the given kind, as float64 (see --edges)."""
    if inp == "probs":
        a = rng.gamma(rng.choice([0.05, 1, 10]), size=cols)
        if rng.random() < 0.3:
            a = a * 2.0 ** -float(rng.integers(0, 140))
        if rng.random() < 0.5:
            a[rng.random(cols) < rng.choice([0.1, 0.5, 0.9])] = 0
        if rng.random() < 0.3:
            s = rng.integers(0, cols)
            a[s:rng.integers(s, cols + 1)] = 0
        if rng.random() < 0.2:
            a[rng.integers(0, cols)] = rng.choice([1e-45, 1e-40, 1e-38, 3e38, 1.0])
        return a / a.sum() if a.sum() > 0 and rng.random() < 0.7 else a
    scale = rng.choice([1, 30, 1e3, 1e10, 1e30, 3e38]) if rng.random() < 0.3 else rng.choice([0.1, 1, 5, 50])
    x = np.clip(rng.normal(0, 1, cols) * scale, -3.4e38, 3.4e38)
    if inp == "log-probs":
        with np.errstate(divide="ignore"):
            x = np.log(rng.dirichlet(np.full(cols, rng.choice([0.05, 1.0])))) if rng.random() < 0.7 else -np.abs(x)
    else:
        x = x + rng.choice([0, 80, -100, 1e6, 1e37, -1e37])
    mask = lambda: -np.inf if rng.random() < 0.6 else np.finfo(np.float32).min
    if rng.random() < 0.5:
        x[rng.random(cols) < rng.choice([0.1, 0.5, 0.9])] = mask()
    if rng.random() < 0.3:
        s = rng.integers(0, cols)
        x[s:rng.integers(s, cols + 1)] = mask()
    if rng.random() < 0.2:
        x[rng.integers(0, cols)] = rng.choice([-87.5, -100, -104, -150, 88, 3e38, -3e38])
    if np.all(np.isneginf(x)) and rng.random() < 0.8:
        x[rng.integers(0, cols)] = 0
    return x


def edge_pair(rng, inp, rows, cols):
    """Rows of edge values; Q is P nudged or a row of its own."""
    p, q = [], []
    for _ in range(rows):
        a = edge_row(rng, inp, cols)
        if rng.random() < 0.4:
            e = rng.choice([1e-6, 1e-3, 0.1])
            with np.errstate(invalid="ignore", over="ignore"):
                b = np.abs(a * (1 + e * rng.normal(size=cols))) if inp == "probs" else a + e * rng.normal(size=cols)
            b = np.where(np.isnan(b), a, b)
        else:
            b = edge_row(rng, inp, cols)
        p.append(a)
        q.append(b)
    return np.array(p), np.array(q)


def plant_invalid(rng, inp, p, q):
    """In a third of the trials, one to three invalid values (NaN, +inf; for probabilities also
    -inf and negatives) anywhere in P or Q, in place."""
    if rng.random() >= 1 / 3:
        return
    bad = [np.nan, np.inf] + ([-np.inf, -1e-3] if inp == "probs" else [])
    for _ in range(int(rng.integers(1, 4))):
        side = p if rng.random() < 0.5 else q
        side.flat[rng.integers(0, side.size)] = rng.choice(bad)


def error_line(run):
    """The `klgpu: error:` line of a run's stderr (Mesa may print its own lines there)."""
    return next((l for l in run.stderr.splitlines() if l.startswith("klgpu: error:")), None)


def bf16(x):
    """x rounded to bfloat16 (to nearest, ties to even; NaN stays NaN), as (bits, values as
    float32)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    b = x.view(np.uint32).astype(np.uint64)
    bits = ((b + 0x7FFF + ((b >> 16) & 1)) >> 16).astype(np.uint16)
    bits[np.isnan(x)] = 0x7FC0
    return bits, (bits.astype(np.uint32) << 16).view(np.float32)


def save_safetensors(path, tensors):
    """Writes {name: (safetensors dtype, array)} as one safetensors file."""
    header, blobs, at = {}, [], 0
    for name, (dtype, a) in tensors.items():
        raw = np.ascontiguousarray(a).tobytes()
        header[name] = {"dtype": dtype, "shape": list(a.shape), "data_offsets": [at, at + len(raw)]}
        blobs.append(raw)
        at += len(raw)
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h + b"".join(blobs))


def as_safetensors(rng, p, q, path):
    """In three trials of ten, P and Q as tensors "p" and "q" of one safetensors file, in F32,
    F64, F16 or BF16: returns the arguments that name them, the dtype, and P and Q as stored
    (BF16 as float32 values); otherwise None. Its own rng, so the .npy trials stay as seeded."""
    if rng.random() >= 0.3:
        return None
    kind = str(rng.choice(["F32", "F64", "F16", "BF16"]))
    with np.errstate(over="ignore", invalid="ignore"):
        if kind == "BF16":
            (pb, p), (qb, q) = bf16(p), bf16(q)
            tensors = {"p": (kind, pb), "q": (kind, qb)}
        else:
            t = {"F32": "<f4", "F64": "<f8", "F16": "<f2"}[kind]
            p, q = p.astype(t), q.astype(t)
            tensors = {"p": (kind, p), "q": (kind, q)}
    save_safetensors(path, tensors)
    return kind, p, q


def numpy_reference(cmd, inp, p, q, norm):
    """Each row's value from NumPy in f64, from the values as the command line reads them (f32):
    an oracle independent of klgpu's readers and of its CPU reference."""
    a = np.atleast_2d(p).astype(np.float32).astype(np.float64)
    b = np.atleast_2d(q).astype(np.float32).astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        if inp == "logits":
            a = np.exp(a - a.max(1, keepdims=True))
            b = np.exp(b - b.max(1, keepdims=True))
            norm = True
        elif inp == "log-probs":
            a, b = np.exp(a), np.exp(b)
        if norm:
            a = a / a.sum(1, keepdims=True)
            b = b / b.sum(1, keepdims=True)
        pos = a > 0
        if cmd == "entropy":
            return -np.where(pos, a * np.log(np.where(pos, a, 1)), 0).sum(1)
        if cmd == "ce":
            return -np.where(pos, a * np.log(b), 0).sum(1)
        if cmd == "kl":
            return np.where(pos, a * np.log(a / b), 0).sum(1)
        m = 0.5 * (a + b)
        half = lambda x: np.where(x > 0, x * np.log(np.where(x > 0, x, 1) / m), 0).sum(1)
        return 0.5 * (half(a) + half(b))


def agrees(c, n):
    """The CPU reference against NumPy's f64: loose, as NumPy's sums are not compensated and a
    log of a quotient near 1 loses ~1e-16 absolute per term; this is for reading errors."""
    if np.isinf(n) or np.isinf(c):
        return c == n
    return abs(c - n) <= 1e-6 * abs(n) + 1e-13


def cancelling_terms(cmd, inp, p, q):
    """Each row's Σ|term| in f64 where the row is not a distribution (else 0), for KL,
    cross-entropy and entropy of probabilities or log-probabilities: their terms then have both
    signs, and where they cancel the README allows ~2^-23 of that. Whole rows stay well inside
    it; a row cut into pieces gets each piece's value rounded to f32, and the pieces cancel."""
    rows = np.atleast_2d(p).shape[0]
    if cmd == "js" or inp == "logits":
        return np.zeros(rows)
    a = np.atleast_2d(p).astype(np.float32).astype(np.float64)
    b = np.atleast_2d(q).astype(np.float32).astype(np.float64)
    with np.errstate(all="ignore"):
        pa, pb = (np.exp(a), np.exp(b)) if inp == "log-probs" else (a, b)
        la, lb = (a, b) if inp == "log-probs" else (np.log(a), np.log(b))
        term = {"kl": pa * (la - lb), "ce": -pa * lb, "entropy": -pa * la}[cmd]
        mass = np.nan_to_num(np.abs(np.where(pa > 0, term, 0)), posinf=np.inf).sum(1)
        off = np.abs(pa.sum(1) - 1) > 1e-6
        if cmd != "entropy":
            off |= np.abs(pb.sum(1) - 1) > 1e-6
    return np.where(off, mass, 0.0)


def within(g, c, allowance):
    if np.isinf(c) or np.isinf(g):
        return g == c
    err = abs(g - c)
    if err <= allowance:
        return True
    return err <= 1e-11 if abs(c) < 1e-6 else err <= 1e-5 * abs(c)


def keep(seed, trial, inputs):
    """Copies a failing trial's input files to $CLI_FUZZ_KEEP, if set, as SEED_TRIAL_NAME."""
    dest = os.environ.get("CLI_FUZZ_KEEP")
    if dest:
        os.makedirs(dest, exist_ok=True)
        for path in inputs:
            shutil.copyfile(path, os.path.join(dest, f"{seed}_{trial}_{os.path.basename(path)}"))


def main():
    args = [a for a in sys.argv[1:] if a != "--edges"]
    edges = len(args) < len(sys.argv) - 1
    seed = int(args[0]) if args else 1
    trials = int(args[1]) if len(args) > 1 else 60
    rng = np.random.default_rng(seed)
    container_rng = np.random.default_rng([seed, 1])
    bad = named = 0
    with tempfile.TemporaryDirectory() as tmp:
        pf, qf, gf, cf = (os.path.join(tmp, n) for n in ("p.npy", "q.npy", "g.npy", "c.npy"))
        sf = os.path.join(tmp, "pq.safetensors")
        for trial in range(trials):
            inp = ["probs", "log-probs", "logits"][trial % 3]
            if edges:
                rows = int(rng.integers(1, 4))
                cols = int(rng.choice([1, 2, 5, 17, 64, 100, 333, 1000]))
                dtype = rng.choice([np.float32, np.float32, np.float16, np.float64])
                with np.errstate(over="ignore"):
                    p, q = (x.astype(dtype) for x in edge_pair(rng, inp, rows, cols))
                plant_invalid(rng, inp, p, q)
                blocks = [16, 64, 256, 1024]
            else:
                rows = int(rng.integers(1, 5))
                # 70,000 columns: blocks of 64 Ki elements or more, which read Q on a second
                # thread.
                cols = int(rng.choice([1, 3, 10, 33, 257, 1000, 5000, 70_000]))
                dtype = rng.choice([np.float32, np.float64, np.float16])
                p, q = (x.astype(dtype) for x in pair(rng, inp, rows, cols))
                blocks = [1 << 18, 1 << 20] if cols >= 70_000 else [64, 256, 4096, 1 << 20]
            if rows == 1 and rng.random() < 0.3:
                p, q = p[0], q[0]
            np.save(pf, p)
            np.save(qf, q)
            stored = as_safetensors(container_rng, p, q, sf)
            dtype_name = dtype.__name__
            if stored:
                dtype_name, p, q = stored
            block = str(int(rng.choice(blocks)))
            for cmd in ["kl", "ce", "js", "entropy"]:
                files = [pf] if cmd == "entropy" else [pf, qf]
                if stored:
                    files = [sf, "--tensor", "p"] + ([] if cmd == "entropy" else [sf, "--tensor-q", "q"])
                # With log-probabilities, --normalize reads them as logits.
                norm = ["--normalize"] if rng.random() < 0.3 else []
                base = ["--base", "2"] if edges and rng.random() < 0.2 else []
                args = [BIN, cmd, *files, "--input", inp, "-q", "--json", *norm, *base]
                g = subprocess.run(args + ["--backend", "gpu", "--block-bytes", block, "--out", gf],
                                   capture_output=True, text=True)
                c = subprocess.run(args + ["--backend", "cpu", "--out", cf],
                                   capture_output=True, text=True)
                what = f"seed {seed} trial {trial}: {cmd} {inp} {dtype_name} {rows}x{cols} block {block} {' '.join(norm + base)}"
                if g.returncode != c.returncode:
                    if edges and "the result exceeds the" in g.stderr:
                        # Beyond f32 arithmetic: then the GPU must say so on whole rows too.
                        whole = subprocess.run(args + ["--backend", "gpu", "--out", gf],
                                               capture_output=True, text=True)
                        if "the result exceeds the" in whole.stderr:
                            continue
                    bad += 1
                    keep(seed, trial, [sf] if stored else [pf, qf])
                    print(f"{what}: exit {g.returncode} vs {c.returncode}: {g.stderr.strip()} | {c.stderr.strip()}")
                    continue
                named += g.returncode == 2
                both_overflow = all("the result exceeds the" in run.stderr for run in (g, c))
                if g.returncode == 2 and error_line(g) != error_line(c) and not both_overflow:
                    # Bad input: the same element named, whether rows came whole or in pieces
                    # (rows that overflow: f32's first on the GPU, f64's on the CPU).
                    bad += 1
                    keep(seed, trial, [sf] if stored else [pf, qf])
                    print(f"{what}: GPU said {error_line(g)!r}, reference {error_line(c)!r}")
                if g.returncode != 0:
                    continue
                # The summary's counts and top-1 agreement (logits): exact, pieces or not.
                gs, cs = (json.loads(run.stdout)["summary"] or {} for run in (g, c))
                for key in ("infinite_rows", "first_infinite_row", "top1_agreement"):
                    if gs.get(key) != cs.get(key):
                        bad += 1
                        keep(seed, trial, [sf] if stored else [pf, qf])
                        print(f"{what}: summary {key} GPU {gs.get(key)}, reference {cs.get(key)}")
                # KL of log-probabilities: p = e^a rounded in f32 enters Σ(p − q) (README).
                with np.errstate(over="ignore", invalid="ignore"):
                    ea = np.exp(np.atleast_2d(p).astype(np.float64))
                    eb = np.exp(np.atleast_2d(q).astype(np.float64))
                    spread = np.abs(ea - eb).sum(1) * 2.0**-23
                if not edges:
                    want = numpy_reference(cmd, inp, p, q, bool(norm))
                    for i, y in enumerate(np.atleast_1d(np.load(cf))):
                        if not agrees(y, want[i]):
                            bad += 1
                            print(f"{what}, row {i}: reference {y:.9e}, NumPy f64 {want[i]:.9e}")
                in_pieces = int(block) // 4 < np.atleast_2d(p).shape[1]
                cancelling = cancelling_terms(cmd, inp, p, q) * 2.0**-23
                for i, (x, y) in enumerate(zip(np.atleast_1d(np.load(gf)), np.atleast_1d(np.load(cf)))):
                    allowance = spread[i] if (cmd == "kl" and inp == "log-probs" and not norm) else 0.0
                    # JS of a row cut into pieces gets them as x/Σ or x − lse rounded to f32.
                    if cmd == "js" and in_pieces:
                        allowance = max(allowance, 2e-7)
                    # Pieces of a row that is not a distribution: their f32 values cancel.
                    if in_pieces and not norm:
                        allowance = max(allowance, cancelling[i])
                    if not within(x, y, allowance):
                        bad += 1
                        keep(seed, trial, [sf] if stored else [pf, qf])
                        print(f"{what}, row {i}: GPU {x:.9e}, reference {y:.9e}")
    print(f"{bad} rows or errors outside the bar; {named} GPU runs refused bad input")
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
