#!/usr/bin/env bash
# One short, prepared run on a lent NVIDIA machine (the `device` tool): find out whether wgpu
# gets a Vulkan adapter for the GPU, run klgpu's tests and benchmark there, then the peers.
# Expects the binaries built here in .device/ (scripts/device_bundle.sh) and the Vulkan loader
# packages in .gl/ (device_bundle.sh downloads them). Writes logs and JSON under $RAW, packed into
# $OUT/results.tar.gz as each part ends (the device tool brings back at most eight files).
# PARTS picks what runs after the adapter probe (default: all of ab roof tests bench fuzz peers
# diag bf16 upload probe; ab runs .device/roof_ratios and every .device/roof_ratios_NAME that
# device_bundle.sh built from VARIANTS, each under every flag set of AB_FLAGS (sets separated by
# '|'; default "--quick 0|--quick 1", the quick path off and on; AB_QUICK="1" alone stands for
# "--quick 1"), alternating, over AB_CASES); SKIP_TESTS=1 drops the tests. Parts run in that order, most needed first, and one
# that would likely end past BUDGET seconds (default 400: a session has 15 minutes of device
# time, start-up included) is skipped with a note, so one call brings back whole parts rather
# than a cut-off one.
set -u
PARTS="${PARTS:-ab roof tests bench fuzz peers diag bf16 upload probe}"
[ -n "${SKIP_TESTS:-}" ] && PARTS="${PARTS/tests/}"
BUDGET="${BUDGET:-400}"
# Rough seconds each part takes on an H200 (run 10; its timeouts allow more; AB_COST for an ab of
# other than two builds, both quick settings and ten cases).
declare -A COST=([tests]=90 [upload]=60 [roof]=50 [bench]=150 [peers]=120 [diag]=50 [ab]=${AB_COST:-110} [bf16]=40 [probe]=40 [fuzz]=70)
part() {
    [[ " $PARTS " == *" $1 "* ]] || return 1
    if (( SECONDS + ${COST[$1]} > BUDGET )); then
        printf '\n==== %s skipped: at t=%ss, ~%ss more would pass BUDGET=%ss\n' "$1" "$SECONDS" "${COST[$1]}" "$BUDGET"
        return 1
    fi
}
OUT="${OUT:-/tmp/klgpu-out}"
RAW=/tmp/klgpu-raw
rm -rf "$RAW"
mkdir -p "$OUT" "$RAW"
pack() { tar czf "$OUT/results.tar.gz" -C "$RAW" . 2>/dev/null; }
section() { pack; printf '\n==== %s (t=%ss)\n' "$1" "$SECONDS"; }

section machine
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv 2>&1
uname -r; ldd --version 2>&1 | head -1; nproc

section "vulkan loader and driver"
if ! ldconfig -p | grep -q 'libvulkan.so.1'; then
    echo "no libvulkan.so.1: unpacking the carried loader packages"
    for f in .gl/*.deb; do dpkg -x "$f" /; done
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

section "wgpu adapters (quick bench decides)"
timeout 120 .device/bench --quick --no-cpu --max-n 1000000 > "$RAW/probe.txt" 2>&1
head -3 "$RAW/probe.txt"
if ! grep -q "DiscreteGpu\|IntegratedGpu" "$RAW/probe.txt"; then
    echo "wgpu found no hardware Vulkan adapter; trying the GL backend (EGL)"
    WGPU_BACKEND=gl timeout 60 .device/bench --quick --no-cpu --max-n 100000 2>&1 | head -3
fi

if part ab; then
if [ -n "${AB_FLAGS:-}" ]; then
    flag_sets="$AB_FLAGS"
else
    flag_sets=""
    for quick in ${AB_QUICK:-0 1}; do flag_sets="${flag_sets:+$flag_sets|}--quick $quick"; done
fi
IFS='|' read -r -a AB_SETS <<< "$flag_sets"
section "A/B: this build and its variants (.device/roof_ratios_*) under ${flag_sets}, alternating"
for i in 1 2; do
    for b in .device/roof_ratios .device/roof_ratios_*; do
        [ -x "$b" ] || continue
        for flags in "${AB_SETS[@]}"; do
            echo "-- ${b#.device/} $flags"
            # shellcheck disable=SC2086
            timeout 40 "$b" --rounds 5 --scale 25 $flags \
                ${AB_CASES:-H,KL,KLbare,CE,JS,KL10,KL1k,logits,Hlogits,CElogits} 2>&1 | grep -v XDG
        done
    done
done 2>&1 | tee "$RAW/ab.txt"
fi

if part roof; then
section "own-roof ratios, interleaved, sizes x25 (bandwidth-bound on a data-centre GPU)"
timeout 150 .device/roof_ratios --rounds 10 --scale 25 2>&1 | tee "$RAW/roof_ratios.txt" | grep -v XDG
echo "-- rows of 1000 and of 10 with shorter and longer lane loops (default 16 iterations)"
for m in 4 64; do
    echo "-- --min-iterations $m"
    timeout 30 .device/roof_ratios --rounds 5 --scale 25 --min-iterations $m KL1k,KL10,KLnorm 2>&1 | grep -v XDG
done 2>&1 | tee "$RAW/roof_ratios_iterations.txt"
echo "-- KL and normalized rows (KL's one pass: KLnorm; its terms pass: KLnormS; CE and entropy: CEnorm, Hnorm), without the quick path (on above; twenty-sixth session)"
timeout 40 .device/roof_ratios --rounds 5 --scale 25 --quick 0 KL,KLnorm,KLnormS,CEnorm,Hnorm 2>&1 | tee "$RAW/roof_ratios_quick0.txt" | grep -v XDG
fi

section "tests on this adapter"
tests="core batch apps half"
part tests || { tests=""; echo "skipped (PARTS=$PARTS)"; }
for t in $tests; do
    timeout 100 ".device/$t" --test-threads 8 > "$RAW/test-$t.txt" 2>&1
    echo "$t: exit $? — $(grep -E '^test result' "$RAW/test-$t.txt")"
    grep -E -A1 'panicked' "$RAW/test-$t.txt" | head -12
done

if part bench; then
section "benchmark"
timeout 240 .device/bench --json "$RAW/bench.json" --no-cpu 2>&1 | tee "$RAW/bench.txt" | grep -v XDG
fi

if part fuzz; then
section "edge-value fuzz beyond the tests' seeds (values at the edges of f32, invalid values)"
KLGPU_FUZZ_SEEDS=2000..2040 timeout 40 .device/core edge_values 2>&1 | grep -E '^test |panicked|seed' | head -8
KLGPU_FUZZ_SEEDS=600..640 timeout 30 .device/apps invalid_values 2>&1 | grep -E '^test |panicked|seed' | head -8
fi

if part peers; then
section "peers"
klgpu=(--klgpu-json "$RAW/bench.json")
[ -f "$RAW/bench.json" ] || klgpu=(--bench .device/bench)
PYTHONUNBUFFERED=1 timeout 200 python3 scripts/peers.py "${klgpu[@]}" --json "$RAW/peers.json" 2>&1 | tee "$RAW/peers.txt"
fi

if part diag; then
section "diagnostics: entropy (one input) at 1e8 after other cases, first, and at 2e8"
timeout 40 .device/roof_ratios --rounds 5 --scale 25 H,KL,H,CE 2>&1 | grep -v XDG
timeout 30 .device/roof_ratios --rounds 5 --scale 50 H 2>&1 | grep -v XDG
fi



if part bf16; then
section "bf16 inputs (2 bytes per element; kernel and roof alike; GB/s count those bytes)"
timeout 40 .device/roof_ratios --rounds 5 --scale 25 --dtype bf16 KL,CE,H,JS,KL1k,logits,CElogits,Hlogits 2>&1 | tee "$RAW/roof_ratios_bf16.txt" | grep -v XDG
fi

if part upload && [ -x .device/host_windows ]; then
section "host data: KL from host slices by window size, copying threads, staged or direct (mapped device memory) uploads"
timeout 60 .device/host_windows --rounds 5 --mib 8,32,128 --threads 1,8 --direct 0,1 2>&1 | tee "$RAW/host_windows.txt" | grep -v XDG
echo "-- bf16 slices (windows hold as many elements as f32 ones, in half the bytes: do they want more?)"
timeout 40 .device/host_windows --rounds 5 --mib 8,32,64,128 --dtype bf16 2>&1 | tee "$RAW/host_windows_bf16.txt" | grep -v XDG
fi

if part probe && [ -x .device/l2_reread ]; then
section "probe: would logits gain from re-reading rows from L2? (examples/l2_reread.rs)"
timeout 60 .device/l2_reread 2>&1 | tee "$RAW/l2_reread.txt" | grep -v XDG
fi

section "summary (repeated here: the device tool returns only the output's tail)"
for t in core batch apps half; do
    [ -f "$RAW/test-$t.txt" ] && echo "$t: $(grep -E '^test result' "$RAW/test-$t.txt")"
done
[ -f "$RAW/bench.txt" ] && grep -E "^roofline:|KL probs N=1e8 |KL logits 4096" "$RAW/bench.txt" | grep gpu-device
[ -f "$RAW/bench.txt" ] && grep -E "^checked against|WRONG" "$RAW/bench.txt"
section done
pack
