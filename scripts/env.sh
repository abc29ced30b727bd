# Sourced by the scripts: where natter keeps what outlives a clone. The cargo
# build and downloaded tools live under ~/.cache/natter, so a fresh clone reuses them.
CACHE="${NATTER_CACHE:-$HOME/.cache/natter}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$CACHE/target}"
export PATH="$PATH:$CACHE/bin"
