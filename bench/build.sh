# Sourced by the benchmarks: runs as root (again through sudo if need be), takes `--debug`
# as the first argument (the debug build; release otherwise), installs what they need
# and builds vane. Sets `vane` (the binary) and `profile`; leaves the other arguments in
# "$@".
if [ "$(id -u)" -ne 0 ]; then
  exec sudo -E "$0" "$@"
fi
profile=release
if [ "${1:-}" = "--debug" ]; then
  profile=debug
  shift
fi
bash scripts/install-deps.sh
if [ "$profile" = release ]; then
  cargo build --release --quiet
else
  cargo build --quiet
fi
vane="${CARGO_TARGET_DIR:-target}/$profile/vane"
