#!/usr/bin/env bash
# Builds what scripts/device_run.sh runs on a lent GPU machine into .device/ (git-ignored):
# the benchmark driver, the interleaved roof-ratio tool (and those of VARIANTS, for the A/B), the
# host-upload sweep and the GPU test executables, stripped to fit the tool's 64 MiB (with the
# working tree). The L2 re-read probe, answered in run 7, is left out for room: PROBE=1 adds it.
# With PARTS set as device_run.sh takes it, the host-upload sweep comes only if PARTS names
# "upload" (with two variants the bundle is otherwise within 70 KB of the 64 MiB).
set -euo pipefail
cd "$(dirname "$0")/.."
# The base binaries build from the working tree and the variants from HEAD plus a patch: with
# uncommitted code the A/B would compare different code than it says.
dirty=$(git status --porcelain -- src shaders examples benches tests Cargo.toml Cargo.lock)
if [ -n "$dirty" ] && [ -z "${ALLOW_DIRTY:-}" ]; then
    echo "device_bundle.sh: uncommitted changes (commit first, or ALLOW_DIRTY=1):" >&2
    echo "$dirty" >&2
    exit 1
fi
mkdir -p .device
rm -f .device/*
# The Vulkan loader packages the device image may lack (device_run.sh unpacks them there; carry
# .gl with .device), downloaded for amd64 as the device tool's README says, unless .gl/ holds
# them already: like a session's branches, an ignored folder does not outlive the session.
if ! ls .gl/libvulkan1_*.deb >/dev/null 2>&1; then
    mkdir -p .gl /tmp/amd64/partial
    apt_amd64=(-oAPT::Architecture=amd64 -oAPT::Architectures=amd64 -oDir::State::Lists=/tmp/amd64)
    apt-get "${apt_amd64[@]}" update >/dev/null
    (cd .gl && apt-get "${apt_amd64[@]}" download libvulkan1 libegl1 libglvnd0 libopengl0 libgl1 \
        libglx0 libgles2)
fi
cargo build --release --example bench --example roof_ratios --example host_windows
cp target/release/examples/{bench,roof_ratios} .device/
rm -f .device/host_windows
if [ -z "${PARTS:-}" ] || [[ " $PARTS " == *" upload "* ]]; then
    cp target/release/examples/host_windows .device/
fi
rm -f .device/l2_reread
if [ -n "${PROBE:-}" ]; then
    cargo build --release --example l2_reread
    cp target/release/examples/l2_reread .device/
fi
# (set -e would end the script at a failed build before it says why: the `if` shows the log.)
rm -f /tmp/device_bundle_tests.log
if ! cargo test --release --no-run --message-format=json 2>/tmp/device_bundle_tests.log | python3 -c '
import json, shutil, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-message":  # errors come as JSON on stdout: show them
        sys.stderr.write(m["message"].get("rendered") or "")
    t = m.get("target", {})
    if m.get("reason") == "compiler-artifact" and m.get("executable") and t.get("kind") == ["test"] \
            and t.get("name") in ("core", "batch", "apps", "half"):
        shutil.copy(m["executable"], ".device/" + t["name"])
'; then
    echo "device_bundle.sh: the test executables did not build:" >&2
    tail -30 /tmp/device_bundle_tests.log >&2
    exit 1
fi
# roof_ratios of variants, for device_run.sh's A/B part: VARIANTS holds NAME=REF pairs, REF a
# patch file (say "ldexp=scripts/variants/ldexp.patch", applied to HEAD) or a commit or branch;
# each becomes .device/roof_ratios_NAME. Patches are how variants keep: only main lands, and a
# session's branches are gone in the next one. Each builds in a worktree of its own, with a
# target directory seeded from this one's release build (so wgpu is not rebuilt) and its
# sources touched (cargo's dep-info paths are relative: a seeded build would otherwise take
# klgpu as fresh).
rm -f .device/roof_ratios_*
for variant in ${VARIANTS:-}; do
    name="${variant%%=*}"
    ref="${variant#*=}"
    tree=$(mktemp -d)
    if [[ "$ref" == *.patch ]]; then
        git worktree add -q --detach "$tree/tree" HEAD
        git -C "$tree/tree" apply "$PWD/$ref" || {
            git worktree remove --force "$tree/tree"
            rm -rf "$tree"
            echo "device_bundle.sh: $ref no longer applies to HEAD (cargo test --test variants names the hunk)" >&2
            exit 1
        }
    else
        git worktree add -q --detach "$tree/tree" "$ref"
    fi
    var_target="$PWD/target/var-$name"
    [ -d "$var_target/release" ] || { mkdir -p "$var_target"; cp -a target/release "$var_target/"; }
    (cd "$tree/tree" && touch shaders/*.wgsl src/*.rs &&
        CARGO_TARGET_DIR="$var_target" cargo build --release --example roof_ratios)
    cp "$var_target/release/examples/roof_ratios" ".device/roof_ratios_$name"
    git worktree remove --force "$tree/tree"
    rm -rf "$tree"
done
for t in core batch apps half; do
    [ -x ".device/$t" ] || { echo "device_bundle.sh: no test executable $t" >&2; exit 1; }
done
strip .device/*
# What device_run.sh's summary names as the build it ran.
echo "$(git rev-parse --short HEAD)${dirty:+ (with uncommitted changes)}, built $(date -u +%FT%TZ)${VARIANTS:+, variants: $VARIANTS}" > .device/BUILT_FROM
ls -la .device
du -sh .device
