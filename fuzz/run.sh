#!/usr/bin/env bash
# Fuzzes vmsnap's parsers with AFL++ and SharpFuzz. Not a test: CI only builds fuzz/Vmsnap.Fuzz.
#
#   fuzz/run.sh TARGET [SECONDS]       fuzz TARGET (qcow2 | stream) for SECONDS (default 1200), then print
#                                      executions, corpus, coverage, crashes and hangs
#   fuzz/run.sh replay TARGET FILE...  run inputs once through the uninstrumented harness (exit 1 on a crash)
#   fuzz/run.sh seeds                  only make the seed inputs
#
# Installs what it needs: afl++ and qemu (Debian packages, as root), the SharpFuzz instrumenter
# (dotnet tool SharpFuzz.CommandLine 2.3.0, into fuzz/.work/tools). Builds the harness into
# fuzz/.work/bin-TARGET and instruments its copy of Vmsnap.Core.dll there; the normal build is not
# touched. Seeds are made by qemu-img and qemu-system-x86_64 (small images of several kinds, small
# migration streams of a -machine none guest) into fuzz/.work/seeds; the findings kept in
# fuzz/regressions/TARGET are seeds too. Findings: fuzz/.work/out/TARGET.
# Env: FUZZ_WORK (fuzz/.work), FUZZ_TIMEOUT_MS (afl-fuzz -t, default 5000), FUZZ_NICE (19).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
work=${FUZZ_WORK:-$root/fuzz/.work}
mkdir -p "$work"

need_packages() {
  local need=()
  command -v afl-fuzz >/dev/null || need+=(afl++)
  command -v qemu-img >/dev/null || need+=(qemu-utils)
  command -v qemu-system-x86_64 >/dev/null || need+=(qemu-system-x86)
  [ ${#need[@]} -eq 0 ] && return
  if [ "$(id -u)" -ne 0 ]; then echo "fuzz/run.sh: need root to install ${need[*]}" >&2; exit 1; fi
  apt-get update -q
  DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${need[@]}"
}

sharpfuzz_tool() {
  local tool="$work/tools/sharpfuzz"
  if [ ! -x "$tool" ]; then
    dotnet tool install SharpFuzz.CommandLine --version 2.3.0 --tool-path "$work/tools" >&2
  fi
  echo "$tool"
}

# A guest without devices whose RAM is FILE; HMP commands on stdin.
qemu_none() { # ramfile size extra-args... < commands
  local ram=$1 size=$2; shift 2
  timeout 60 qemu-system-x86_64 -machine none -nodefaults -display none \
    -object "memory-backend-file,id=ram0,size=$size,mem-path=$ram,share=on" -machine memory-backend=ram0 \
    -monitor stdio "$@" >/dev/null 2>&1
}

page_at() { # file page-index source
  dd if="$3" of="$1" bs=4096 seek="$2" count=1 conv=notrunc status=none
}

make_seeds() {
  local s="$work/seeds" tmp
  [ -f "$s/.done" ] && return
  rm -rf "$s"; mkdir -p "$s/qcow2" "$s/stream"
  tmp=$(mktemp -d); trap 'rm -rf "$tmp"' RETURN
  head -c 4096 /dev/urandom > "$tmp/random.page"
  { yes 'the quick brown fox ' || true; } | head -c 4096 > "$tmp/text.page"
  head -c 4096 /dev/zero | tr '\0' '\1' > "$tmp/ones.page"

  # Images: several cluster sizes, versions, refcount widths, features; data, snapshots, COW, compression.
  local q="$s/qcow2"
  qemu-img create -q -f qcow2 -o cluster_size=512 "$q/plain-512.qcow2" 64K
  qemu-img create -q -f qcow2 -o cluster_size=512 "$q/data-512.qcow2" 128K
  qemu-io -c "write -P 0xa5 0 1k" -c "write -P 0x5a 64k 512" "$q/data-512.qcow2" >/dev/null
  cp "$q/data-512.qcow2" "$q/snap-512.qcow2"
  qemu-img snapshot -c first "$q/snap-512.qcow2"
  qemu-io -c "write -P 0x33 512 512" -c "write -z 64k 512" "$q/snap-512.qcow2" >/dev/null
  qemu-img snapshot -c second "$q/snap-512.qcow2"
  qemu-img create -q -f qcow2 -o compat=0.10,cluster_size=512 "$q/v2-512.qcow2" 64K
  qemu-io -c "write -P 0x11 1k 2k" "$q/v2-512.qcow2" >/dev/null
  qemu-img snapshot -c old "$q/v2-512.qcow2"
  qemu-img create -q -f qcow2 -o cluster_size=1024,refcount_bits=1 "$q/refcount1.qcow2" 64K
  qemu-io -c "write -P 0x22 0 2k" "$q/refcount1.qcow2" >/dev/null
  qemu-img create -q -f qcow2 -o cluster_size=1024,refcount_bits=64,lazy_refcounts=on "$q/refcount64-lazy.qcow2" 64K
  qemu-io -c "write -P 0x44 4k 1k" "$q/refcount64-lazy.qcow2" >/dev/null
  qemu-img create -q -f qcow2 -o cluster_size=16384,extended_l2=on "$q/extended-l2.qcow2" 64K
  qemu-io -c "write -P 0x55 2k 1k" -c "write -z 8k 4k" "$q/extended-l2.qcow2" >/dev/null
  head -c 8192 /dev/zero > "$tmp/raw"; page_at "$tmp/raw" 0 "$tmp/text.page"
  qemu-img convert -q -c -O qcow2 -o cluster_size=4096,compression_type=zlib "$tmp/raw" "$q/compressed-zlib.qcow2"
  qemu-img convert -q -c -O qcow2 -o cluster_size=4096,compression_type=zstd "$tmp/raw" "$q/compressed-zstd.qcow2"
  qemu-img create -q -f qcow2 -o cluster_size=512 "$q/base-512.qcow2" 64K
  qemu-img create -q -f qcow2 -o cluster_size=512 -b base-512.qcow2 -F qcow2 "$q/backing-512.qcow2"
  qemu-io -c "write -P 0x66 0 512" "$q/backing-512.qcow2" >/dev/null
  qemu-img create -q -f qcow2 -o cluster_size=512 "$q/bitmap-512.qcow2" 64K
  qemu-img bitmap --add "$q/bitmap-512.qcow2" dirty0
  # A snapshot with VM state, written by QEMU's own savevm.
  truncate -s 64K "$tmp/vm.ram"; page_at "$tmp/vm.ram" 2 "$tmp/text.page"
  qemu-img create -q -f qcow2 -o cluster_size=512 "$q/savevm-512.qcow2" 64K
  printf 'savevm vm1\nquit\n' | qemu_none "$tmp/vm.ram" 64K -drive "if=none,id=d0,file=$q/savevm-512.qcow2,format=qcow2"

  # Streams: migrate of small -machine none guests (zero, random, text and filled pages).
  local m="$s/stream" i=0 ram
  for layout in "" "3:random" "0:text 5:ones" "1:random 2:random 15:text"; do
    ram="$tmp/ram$i"; truncate -s 64K "$ram"
    for p in $layout; do page_at "$ram" "${p%%:*}" "$tmp/${p#*:}.page"; done
    printf 'migrate "exec:cat > %s"\nquit\n' "$m/none-64k-$i.mig" | qemu_none "$ram" 64K
    i=$((i + 1))
  done
  ram="$tmp/ram-small"; truncate -s 16K "$ram"; page_at "$ram" 1 "$tmp/ones.page"
  printf 'migrate "exec:cat > %s"\nquit\n' "$m/none-16k.mig" | qemu_none "$ram" 16K
  for f in "$q"/*.qcow2 "$m"/*.mig; do [ -s "$f" ] || { echo "fuzz/run.sh: seed $f was not made" >&2; exit 1; }; done
  touch "$s/.done"
}

# Tokens the mutator splices in (afl-fuzz -x): magics, names and markers the parsers compare against.
make_dictionary() { # target -> file
  local d="$work/$1.dict"
  case $1 in
    qcow2) cat > "$d" <<'DICT'
magic="QFI\xfb"
version2="\x00\x00\x00\x02"
version3="\x00\x00\x00\x03"
ext_backing_format="\xe2\x79\x2a\xca"
ext_feature_table="\x68\x03\xf8\x57"
ext_bitmaps="\x23\x85\x28\x75"
ext_crypto="\x05\x37\xbe\x77"
ext_data_file="\x44\x41\x54\x41"
copied="\x80\x00\x00\x00"
compressed="\x40\x00\x00\x00"
qcow2="qcow2"
QEVM="QEVM"
DICT
    ;;
    stream) cat > "$d" <<'DICT'
magic="QEVM\x00\x00\x00\x03"
ram="\x03ram"
ram0="\x04ram0"
none="\x00\x00\x00\x04none"
page_bits="\x1econfiguration/target-page-bits"
capabilities="\x1aconfiguration/capabilities"
uuid="\x12configuration/uuid"
mapped_ram="\x0amapped-ram"
timer="\x05timer"
globalstate="\x0bglobalstate"
footer="\x7e"
eos="\x00\x00\x00\x00\x00\x00\x00\x10"
vmdesc="\x00\x06"
page_size="\"page_size\": 4096"
devices="\"devices\": ["
fields="\"fields\": ["
subsections="\"subsections\": ["
vmsd_name="\"vmsd_name\""
instance_id="\"instance_id\""
DICT
    ;;
  esac
  echo "$d"
}

build() { # target -> bin dir with an instrumented Vmsnap.Core.dll
  local bin="$work/bin-$1" tool
  tool=$(sharpfuzz_tool)
  rm -rf "$bin"
  dotnet publish fuzz/Vmsnap.Fuzz -c Release -o "$bin" -nologo -v q -clp:ErrorsOnly >&2
  "$tool" "$bin/Vmsnap.Core.dll" >&2
  echo "$bin"
}

stats() { # out-dir
  local f="$1/default/fuzzer_stats"
  [ -f "$f" ] || { echo "no fuzzer_stats in $1" >&2; return 1; }
  awk -F' *: *' '$1 ~ /^(run_time|execs_done|execs_per_sec|corpus_count|corpus_found|bitmap_cvg|saved_crashes|saved_hangs|last_find)$/ {printf "%s=%s ", $1, $2} END {print ""}' "$f"
}

case "${1:-}" in
  seeds)
    need_packages; make_seeds; ls -la "$work/seeds"/* ;;
  replay)
    target=${2:?target}; shift 2
    dotnet build fuzz/Vmsnap.Fuzz -c Release -nologo -v q -clp:ErrorsOnly >&2
    exec dotnet fuzz/Vmsnap.Fuzz/bin/Release/net10.0/Vmsnap.Fuzz.dll "$target" "$@" ;;
  qcow2|stream)
    target=$1; seconds=${2:-1200}
    need_packages; make_seeds
    bin=$(build "$target")
    dict=$(make_dictionary "$target")
    out="$work/out/$target"; rm -rf "$out"; mkdir -p "$out"
    # The seeds, and the findings kept in fuzz/regressions/TARGET: the fuzzer starts from what broke before.
    in="$work/in/$target"; rm -rf "$in"; mkdir -p "$in"
    cp "$work/seeds/$target"/* "$in"/
    if [ -d "fuzz/regressions/$target" ]; then for f in "fuzz/regressions/$target"/*; do cp "$f" "$in/regression-${f##*/}"; done; fi
    scratch=/dev/shm; [ -w "$scratch" ] || scratch=$work
    echo "fuzzing $target for $seconds s: seeds $in, findings $out" >&2
    # A runaway allocation is a finding too: the GC's hard limit turns it into an OutOfMemoryException.
    AFL_SKIP_BIN_CHECK=1 AFL_NO_AFFINITY=1 AFL_SKIP_CPUFREQ=1 AFL_NO_UI=1 AFL_I_DONT_CARE_ABOUT_MISSING_CRASHES=1 \
    DOTNET_GCHeapHardLimit=0x40000000 VMSNAP_FUZZ_SCRATCH="$scratch" \
      nice -n "${FUZZ_NICE:-19}" afl-fuzz -i "$in" -o "$out" -t "${FUZZ_TIMEOUT_MS:-5000}" -m none \
        -x "$dict" -V "$seconds" -- dotnet "$bin/Vmsnap.Fuzz.dll" "$target" > "$out/afl.log" 2>&1 || {
          echo "afl-fuzz failed; the end of $out/afl.log:" >&2; tail -20 "$out/afl.log" >&2; exit 1; }
    echo "$target: $(stats "$out")"
    ls "$out/default/crashes" "$out/default/hangs" 2>/dev/null | grep -v README || true ;;
  *)
    sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2 ;;
esac
