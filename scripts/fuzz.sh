#!/usr/bin/env bash
# Fuzzes every parser of untrusted bytes for a bounded time (docs/fuzzing.md): builds the
# targets of fuzz/ once with cargo-fuzz, then runs each for FUZZ_SECONDS (default 15), as
# many at once as there are cores (FUZZ_JOBS), from its seed corpus fuzz/corpus/TARGET.
# What a run discovers goes to a scratch corpus that is thrown away, so the repository
# keeps only the seeds. At the first crash it stops the other runs, prints the target's
# report and the path of the input that crashed it (under fuzz/artifacts/), and exits
# non-zero. Targets named as arguments run alone. Run from anywhere; paths are the repo's.
#
# Built without a sanitizer (-s none): vane's crates deny unsafe code, so an out-of-bounds
# access there is already a panic; AddressSanitizer would only add checks of the
# dependencies' unsafe code, at twice the build and half the runs. It also keeps the build
# on stable Rust: only the sanitizers need nightly flags (docs/fuzzing.md has a run with
# one).
set -euo pipefail
cd "$(dirname "$0")/.."

cargo_fuzz_version=0.13.2
seconds="${FUZZ_SECONDS:-15}"
jobs="${FUZZ_JOBS:-$(nproc)}"

# Largest input per target: a packet (or a few), a handful of tunnel messages, a control
# message. Larger inputs only slow every execution.
declare -A max_len=(
  [ipv4_packet]=2048
  [vnet_segments]=4096
  [vnet_coalescer]=4096
  [overlay_frame]=2048
  [icmp_frag_needed]=2048
  [switch]=8192
  [tunnel_responder]=4096
  [tunnel_session]=4096
  [node_pair]=8192
  [control_stream]=8192
  [api_requests]=8192
  [join_token]=512
  [stream_frames]=4096
  [validate]=1024
)

if [ "$(cargo fuzz --version 2>/dev/null)" != "cargo-fuzz $cargo_fuzz_version" ]; then
  cargo install --locked cargo-fuzz --version "$cargo_fuzz_version"
fi
# libfuzzer-sys compiles libFuzzer, which is C++.
if ! command -v c++ >/dev/null; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq g++ >/dev/null
fi

targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
  mapfile -t targets < <(cargo fuzz list --fuzz-dir fuzz)
fi
for t in "${targets[@]}"; do
  [ -n "${max_len[$t]:-}" ] || { echo "fuzz.sh: no max_len for target $t" >&2; exit 2; }
done

echo "fuzz: building ${#targets[@]} targets"
cargo fuzz build --fuzz-dir fuzz -s none
bin="fuzz/target/$(rustc -vV | sed -n 's/^host: //p')/release"

scratch="$(mktemp -d)"
declare -A running=()
stop_running() {
  for pid in "${!running[@]}"; do
    kill "$pid" 2>/dev/null || true
  done
  wait 2>/dev/null || true
}
trap 'stop_running; rm -rf "$scratch"' EXIT

run_target() {
  local t=$1
  local args=(
    -max_total_time="$seconds" -max_len="${max_len[$t]}" -timeout=10 -rss_limit_mb=2048
    -artifact_prefix="fuzz/artifacts/$t/" -print_final_stats=1
  )
  if [ -f "fuzz/dict/$t.dict" ]; then
    args+=(-dict="fuzz/dict/$t.dict")
  fi
  mkdir -p "$scratch/$t" "fuzz/artifacts/$t"
  exec "$bin/$t" "${args[@]}" "$scratch/$t" "fuzz/corpus/$t" >"$scratch/$t.log" 2>&1
}

# One line per finished target: how many inputs ran and the coverage reached.
report() {
  local t=$1 log="$scratch/$1.log"
  local runs cov
  runs="$(sed -n 's/^stat::number_of_executed_units: *//p' "$log")"
  cov="$(grep -o 'cov: [0-9]*' "$log" | tail -1)"
  printf 'fuzz: %-18s %8s inputs in %ss, %s\n' "$t" "${runs:-?}" "$seconds" "${cov:-cov: ?}"
}

crashed() {
  local t=$1 log="$scratch/$1.log"
  echo "fuzz: target $t FAILED; its report:" >&2
  grep -v -E '^#[0-9]+\s+(NEW|REDUCE|pulse)' "$log" | tail -60 >&2
  local input
  input="$(sed -n 's/.*Test unit written to //p' "$log" | tail -1)"
  if [ -n "$input" ]; then
    echo "fuzz: the input that crashed $t: $input" >&2
    echo "fuzz: reproduce with: cargo fuzz run --fuzz-dir fuzz -s none $t $input" >&2
  fi
  exit 1
}

# Waits for one run to end; a failed run ends the script.
wait_one() {
  local pid status=0
  wait -n -p pid "${!running[@]}" || status=$?
  local t=${running[$pid]}
  unset "running[$pid]"
  if [ "$status" -ne 0 ]; then
    crashed "$t"
  fi
  report "$t"
}

echo "fuzz: running each target for ${seconds}s, $jobs at once"
for t in "${targets[@]}"; do
  while [ ${#running[@]} -ge "$jobs" ]; do
    wait_one
  done
  run_target "$t" &
  running[$!]=$t
done
while [ ${#running[@]} -gt 0 ]; do
  wait_one
done
echo "fuzz: ${#targets[@]} targets ran without a crash"
