#!/usr/bin/env bash
# Builds what scripts/device_run.sh runs on a lent GPU machine into .device/ (git-ignored):
# the benchmark driver, the interleaved roof-ratio tool (and that of BASE_REF, for the A/B), the
# host-upload sweep and the GPU test executables, stripped to fit the tool's 64 MiB (with the
# working tree). The L2 re-read probe, answered in run 7, is left out for room: PROBE=1 adds it.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .device
cargo build --release --example bench --example roof_ratios --example host_windows
cp target/release/examples/{bench,roof_ratios,host_windows} .device/
rm -f .device/l2_reread
if [ -n "${PROBE:-}" ]; then
    cargo build --release --example l2_reread
    cp target/release/examples/l2_reread .device/
fi
cargo test --no-run --message-format=json 2>/dev/null | python3 -c '
import json, shutil, sys
for line in sys.stdin:
    m = json.loads(line)
    t = m.get("target", {})
    if m.get("reason") == "compiler-artifact" and m.get("executable") and t.get("kind") == ["test"] \
            and t.get("name") in ("core", "batch", "apps", "half"):
        shutil.copy(m["executable"], ".device/" + t["name"])
'
# roof_ratios of an earlier commit, for device_run.sh's A/B part (BASE_REF; BASE_REF= skips
# it). Default: the last commit before logits took one pass.
BASE_REF="${BASE_REF-5b79e31}"
if [ -n "$BASE_REF" ]; then
    base=$(mktemp -d)
    git worktree add -q --detach "$base/tree" "$BASE_REF"
    base_target="$PWD/target/base"
    (cd "$base/tree" && CARGO_TARGET_DIR="$base_target" cargo build --release --example roof_ratios)
    cp "$base_target/release/examples/roof_ratios" .device/roof_ratios_base
    git worktree remove --force "$base/tree"
    rm -rf "$base"
fi
strip .device/*
ls -la .device
du -sh .device
