#!/usr/bin/env bash
# One short, prepared run on a lent NVIDIA machine (the `device` tool): find out whether wgpu
# gets a Vulkan adapter for the GPU, run klgpu's tests and benchmark there, then the peers.
# Expects the binaries built here in .device/ (scripts/device_bundle.sh) and the Vulkan loader
# packages in .gl/ (device_bundle.sh downloads them). Writes logs and JSON under $RAW, packed into
# $OUT/results.tar.gz as each part ends (the device tool brings back at most eight files).
#
# PARTS picks what runs after the adapter probe, in its order (default: all of tests bench peers
# ab roof fuzz diag bf16 upload probe; ab runs .device/roof_ratios and every .device/roof_ratios_NAME that
# device_bundle.sh built from VARIANTS, each under every flag set of AB_FLAGS (sets separated by
# '|'; default "--quick 0|--quick 1", the quick path off and on; AB_QUICK="1" alone stands for
# "--quick 1"), alternating, over AB_CASES, AB_ROUNDS times (default 2)); SKIP_TESTS=1 drops
# the tests. Name the most needed first: a part that would likely end past BUDGET seconds
# (default 400: a session has 15 minutes of device time, start-up included) is skipped with a
# note, and every
# command runs under a timeout of at most what is left of BUDGET, so the run ends by BUDGET
# (plus a few seconds) and one call brings back whole parts rather than a cut-off run.
#
# Without a hardware Vulkan adapter nothing is timed (a GL or software adapter's numbers are
# not the GPU's): the probe says what wgpu found and the run ends, unless ALLOW_OTHER_ADAPTER=1.
# With one, WGPU_BACKEND=vulkan keeps every part on it. The summary at the end names the
# adapter, each part's outcome (exit codes, timeouts, skips) and the values' check.
set -u
cd "$(dirname "$0")/.."
PARTS="${PARTS:-tests bench peers ab roof fuzz diag bf16 upload probe}"
[ -n "${SKIP_TESTS:-}" ] && PARTS="${PARTS//tests/}"
BUDGET="${BUDGET:-400}"
# Rough seconds each part takes on an H200 (run 10, and the twenty-ninth session's estimates of
# what the parts have grown to; AB_COST for an ab of other than two builds, both quick settings
# and ten cases: each roof_ratios run at --scale 25 is ~15 s of data generation and its cases).
declare -A COST=([tests]=90 [upload]=60 [roof]=70 [bench]=150 [peers]=60 [diag]=50 [ab]=${AB_COST:-110} [bf16]=40 [probe]=40 [fuzz]=70)
OUT="${OUT:-/tmp/klgpu-out}"
RAW="${RAW:-/tmp/klgpu-raw}"
rm -rf "$RAW"
mkdir -p "$OUT" "$RAW"
pack() { tar czf "$OUT/results.tar.gz.part" -C "$RAW" . 2>/dev/null && mv -f "$OUT/results.tar.gz.part" "$OUT/results.tar.gz"; }
section() { pack; printf '\n==== %s (t=%ss)\n' "$1" "$SECONDS"; }
NOTES=()
note() { NOTES+=("$*"); }
PART=probe
HARDWARE=""
part() {
    [[ " $PARTS " == *" $1 "* ]] || return 1
    if [ -z "$HARDWARE" ] && [ -z "${ALLOW_OTHER_ADAPTER:-}" ]; then
        note "$1: skipped (no hardware Vulkan adapter)"
        return 1
    fi
    if (( SECONDS + ${COST[$1]} > BUDGET )); then
        printf '\n==== %s skipped: at t=%ss, ~%ss more would pass BUDGET=%ss\n' "$1" "$SECONDS" "${COST[$1]}" "$BUDGET"
        note "$1: skipped at t=${SECONDS}s (~${COST[$1]}s more would pass BUDGET=${BUDGET}s)"
        return 1
    fi
    PART=$1
}
# run CAP LOG CMD...: runs CMD under a timeout of CAP seconds or what is left of BUDGET,
# whichever is less, appends its output to LOG and prints it (QUIET=1: does not), and notes a
# failure or timeout for the summary. Returns CMD's status.
run() {
    local cap=$1 log=$2
    shift 2
    local t=$((BUDGET - SECONDS))
    (( t > cap )) && t=$cap
    if (( t < 5 )); then
        echo "-- not run, BUDGET spent: $*" | tee -a "$log"
        note "$PART: ${1#.device/} not run (BUDGET spent)"
        return 124
    fi
    local tmp rc
    tmp=$(mktemp)
    timeout -k 5 "$t" "$@" > "$tmp" 2>&1
    rc=$?
    grep -v XDG "$tmp" >> "$log"
    [ -n "${QUIET:-}" ] || grep -v XDG "$tmp"
    rm -f "$tmp"
    if (( rc == 124 || rc == 137 )); then
        note "$PART: ${1#.device/} ${*:2:3}… timed out after ${t}s"
    elif (( rc != 0 )); then
        note "$PART: ${1#.device/} ${*:2:3}… exit $rc"
    fi
    return $rc
}

section machine
timeout 20 nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv 2>&1
uname -r; ldd --version 2>&1 | head -1; nproc

section "vulkan loader and driver"
if ! ldconfig -p | grep -q 'libvulkan.so.1'; then
    echo "no libvulkan.so.1: unpacking the carried loader packages"
    ls .gl/*.deb >/dev/null 2>&1 || echo "no .gl/*.deb here: carry .gl (device_bundle.sh downloads it)"
    for f in .gl/*.deb; do [ -f "$f" ] && dpkg -x "$f" /; done
    ldconfig
fi
ldconfig -p | grep -E 'libvulkan|libEGL_nvidia|libGLX_nvidia' | head
for d in /usr/share/vulkan/icd.d /etc/vulkan/icd.d /usr/local/nvidia/share/vulkan/icd.d; do
    [ -d "$d" ] && { echo "$d:"; ls "$d"; }
done
if ! ls /usr/share/vulkan/icd.d/nvidia* /etc/vulkan/icd.d/nvidia* >/dev/null 2>&1 &&
    [ -f /usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json ]; then
    export VK_DRIVER_FILES=/usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json
    export __EGL_VENDOR_LIBRARY_FILENAMES=/usr/local/nvidia/share/glvnd/egl_vendor.d/10_nvidia.json
    echo "VK_DRIVER_FILES=$VK_DRIVER_FILES"
fi
export XDG_RUNTIME_DIR=/tmp

section "wgpu adapters"
run 60 "$RAW/adapters.txt" .device/bench --adapters
if grep -q "(Vulkan, \(DiscreteGpu\|IntegratedGpu\))" "$RAW/adapters.txt"; then
    HARDWARE=1
    export WGPU_BACKEND=vulkan
    ADAPTER=$(grep "(Vulkan, \(DiscreteGpu\|IntegratedGpu\))" "$RAW/adapters.txt" | head -1)
    echo "a hardware Vulkan adapter: every part runs on it (WGPU_BACKEND=vulkan)"
else
    ADAPTER="no hardware Vulkan adapter; wgpu sees: $(grep -c adapter "$RAW/adapters.txt") adapters (adapters.txt)"
    if [ -n "${ALLOW_OTHER_ADAPTER:-}" ]; then
        echo "wgpu found no hardware Vulkan adapter: ALLOW_OTHER_ADAPTER=1, so the parts run on what it found"
    else
        echo "wgpu found no hardware Vulkan adapter: nothing is timed (ALLOW_OTHER_ADAPTER=1 times what it found)"
    fi
fi

do_ab() {
    local flag_sets quick
    if [ -n "${AB_FLAGS:-}" ]; then
        flag_sets="$AB_FLAGS"
    else
        flag_sets=""
        for quick in ${AB_QUICK:-0 1}; do flag_sets="${flag_sets:+$flag_sets|}--quick $quick"; done
    fi
    IFS='|' read -r -a AB_SETS <<< "$flag_sets"
    section "A/B: this build and its variants (.device/roof_ratios_*) under ${flag_sets}, alternating"
    for _ in $(seq "${AB_ROUNDS:-2}"); do
        for b in .device/roof_ratios .device/roof_ratios_*; do
            [ -x "$b" ] || continue
            for flags in "${AB_SETS[@]}"; do
                echo "-- ${b#.device/} $flags" | tee -a "$RAW/ab.txt"
                PART="ab ($flags)"
                # shellcheck disable=SC2086
                run 40 "$RAW/ab.txt" "$b" --rounds 5 --scale 25 $flags \
                    ${AB_CASES:-H,KL,KLbare,CE,JS,KL10,KL1k,logits,Hlogits,CElogits}
            done
        done
    done
}

do_roof() {
    section "own-roof ratios, interleaved, sizes x25 (bandwidth-bound on a data-centre GPU)"
    run 150 "$RAW/roof_ratios.txt" .device/roof_ratios --rounds 10 --scale 25
    echo "-- rows of 1000 and of 10 with shorter and longer lane loops (default 16 iterations)"
    for m in 4 64; do
        echo "-- --min-iterations $m" | tee -a "$RAW/roof_ratios_iterations.txt"
        run 30 "$RAW/roof_ratios_iterations.txt" .device/roof_ratios --rounds 5 --scale 25 --min-iterations $m KL1k,KL10,KLnorm
    done
    echo "-- KL and normalized rows (KL's one pass: KLnorm; its terms pass: KLnormS; CE and entropy: CEnorm, Hnorm), without the quick path (on above; twenty-sixth session)"
    run 40 "$RAW/roof_ratios_quick0.txt" .device/roof_ratios --rounds 5 --scale 25 --quick 0 KL,KLnorm,KLnormS,CEnorm,Hnorm
}

do_tests() {
    section "tests on this adapter"
    local t
    for t in core batch apps half; do
        QUIET=1 run 100 "$RAW/test-$t.txt" ".device/$t" --test-threads 8
        echo "$t: exit $? — $(grep -E '^test result' "$RAW/test-$t.txt")"
        grep -E -A1 'panicked' "$RAW/test-$t.txt" | head -12
    done
}

do_bench() {
    section "benchmark"
    run 240 "$RAW/bench.txt" .device/bench --json "$RAW/bench.json" --no-cpu
}

do_fuzz() {
    section "edge-value fuzz beyond the tests' seeds (values at the edges of f32, invalid values)"
    KLGPU_FUZZ_SEEDS=2000..2040 QUIET=1 run 40 "$RAW/fuzz.txt" .device/core edge_values
    KLGPU_FUZZ_SEEDS=600..640 QUIET=1 run 30 "$RAW/fuzz.txt" .device/apps invalid_values
    grep -E '^test |panicked|seed' "$RAW/fuzz.txt" | head -16
}

# The peers read the bench's JSON: without it they would run the whole bench themselves, past
# their cost (a run once ended that way past the device tool's limit).
do_peers() {
    section "peers"
    PYTHONUNBUFFERED=1 run 200 "$RAW/peers.txt" python3 scripts/peers.py --klgpu-json "$RAW/bench.json" --json "$RAW/peers.json"
}

do_diag() {
    section "diagnostics: entropy (one input) at 1e8 after other cases, first, and at 2e8"
    run 40 "$RAW/diag.txt" .device/roof_ratios --rounds 5 --scale 25 H,KL,H,CE
    run 30 "$RAW/diag.txt" .device/roof_ratios --rounds 5 --scale 50 H
}

do_bf16() {
    section "bf16 inputs (2 bytes per element; kernel and roof alike; GB/s count those bytes)"
    run 40 "$RAW/roof_ratios_bf16.txt" .device/roof_ratios --rounds 5 --scale 25 --dtype bf16 KL,CE,H,JS,KL1k,logits,CElogits,Hlogits
}

do_upload() {
    section "host data: KL from host slices by window size, copying threads, staged or direct (mapped device memory) uploads"
    run 60 "$RAW/host_windows.txt" .device/host_windows --rounds 5 --mib 8,32,128 --threads 1,8 --direct 0,1
    echo "-- bf16 slices (windows hold as many elements as f32 ones, in half the bytes: do they want more?)"
    run 40 "$RAW/host_windows_bf16.txt" .device/host_windows --rounds 5 --mib 8,32,64,128 --dtype bf16
}

do_probe() {
    section "probe: would logits gain from re-reading rows from L2? (examples/l2_reread.rs)"
    run 60 "$RAW/l2_reread.txt" .device/l2_reread
}

# Parts run in PARTS' order, each once.
read -r -a PART_LIST <<< "$PARTS"
declare -A DONE=()
for p in ${PART_LIST[@]+"${PART_LIST[@]}"}; do
    [ -n "${DONE[$p]:-}" ] && continue
    DONE[$p]=1
    case $p in
        peers) [ -f "$RAW/bench.json" ] || { note "peers: skipped (no bench.json: run the bench part before it)"; continue; } ;;
        upload) [ -x .device/host_windows ] || { note "upload: skipped (not in the bundle)"; continue; } ;;
        probe) [ -x .device/l2_reread ] || { note "probe: skipped (not in the bundle: PROBE=1)"; continue; } ;;
        ab | roof | tests | bench | fuzz | diag | bf16) ;;
        *) note "$p: no such part"; continue ;;
    esac
    part "$p" && "do_$p"
done

section "summary (repeated here: the device tool returns only the output's tail)"
{
    echo "built from: $(cat .device/BUILT_FROM 2>/dev/null || echo 'unknown (no .device/BUILT_FROM)')"
    echo "adapter: $ADAPTER"
    for t in core batch apps half; do
        [ -f "$RAW/test-$t.txt" ] && echo "$t: $(grep -E '^test result' "$RAW/test-$t.txt" || echo 'no test result line (see the notes)')"
    done
    [ -f "$RAW/bench.txt" ] && grep -E "^roofline:|KL probs N=1e8 |KL logits 4096" "$RAW/bench.txt" | grep gpu-device
    [ -f "$RAW/bench.txt" ] && { grep -E "^checked against|WRONG" "$RAW/bench.txt" || echo "bench: no values' check line"; }
    [ -f "$RAW/peers.txt" ] && grep -E "^KL probs N=1e7 |^KL probs N=1e8 |values against" "$RAW/peers.txt"
    for n in ${NOTES[@]+"${NOTES[@]}"}; do echo "note: $n"; done
    echo "ended at t=${SECONDS}s of BUDGET=${BUDGET}s"
} | tee "$RAW/summary.txt"
pack
