#!/usr/bin/env bash
# Builds what scripts/device_run.sh runs on a lent GPU machine into .device/ (git-ignored):
# the benchmark driver, the interleaved roof-ratio tool, the host-upload sweep, the L2 re-read probe and the GPU test executables, stripped
# to fit the tool's 64 MiB.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .device
cargo build --release --example bench --example roof_ratios --example host_windows --example l2_reread
cp target/release/examples/{bench,roof_ratios,host_windows,l2_reread} .device/
cargo test --no-run --message-format=json 2>/dev/null | python3 -c '
import json, shutil, sys
for line in sys.stdin:
    m = json.loads(line)
    t = m.get("target", {})
    if m.get("reason") == "compiler-artifact" and m.get("executable") and t.get("kind") == ["test"] \
            and t.get("name") in ("core", "batch", "apps"):
        shutil.copy(m["executable"], ".device/" + t["name"])
'
strip .device/*
ls -la .device
