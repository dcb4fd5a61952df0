#!/usr/bin/env bash
# System packages the data pipeline needs, from Debian: the Noto colour emoji font and Unicode's emoji-test.txt
# (the emoji dataset is built from them offline). Idempotent: installs only what is missing; runs as root or
# through sudo.
set -euo pipefail

PACKAGES=(fonts-noto-color-emoji unicode-data)
FILES=(/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf /usr/share/unicode/emoji/emoji-test.txt)

missing=()
for package in "${PACKAGES[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$package")
  fi
done

if ((${#missing[@]})); then
  if [[ $(id -u) -eq 0 ]]; then
    as_root=()
  elif command -v sudo >/dev/null; then
    as_root=(sudo)
  else
    echo "setup_system.sh: need root or sudo to install: ${missing[*]}" >&2
    exit 1
  fi
  echo "Installing ${missing[*]}"
  "${as_root[@]}" apt-get update -qq
  "${as_root[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

for file in "${FILES[@]}"; do
  if [[ ! -f $file ]]; then
    echo "setup_system.sh: $file is missing although its package is installed" >&2
    exit 1
  fi
done
echo "System packages ready: ${PACKAGES[*]}"
