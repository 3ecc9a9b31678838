#!/usr/bin/env bash
# The one command that fetches what the GPU image lacks: the wheels of bench/gpu_wheels.txt, at the versions pinned
# in requirements-lock.txt, into bench/wheels/ (ignored by git; the device call carries it: bench/README.md).
#   Usage: bash bench/fetch_wheels.sh        (here, where the package index is reachable; about 9 MB)
# Replaces the wheels already in bench/wheels/: two versions of one package would both be unpacked.
# Env: PYTHON (default python3); WHEELS_LOCK (default requirements-lock.txt); GPU_WHEELS_DIR (default bench/wheels).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
LOCK=${WHEELS_LOCK:-requirements-lock.txt}
DEST=${GPU_WHEELS_DIR:-bench/wheels}
mapfile -t DISTS < <(awk '!/^#/ && NF {print $1}' bench/gpu_wheels.txt)

if [[ ! -f $LOCK ]]; then
  echo "fetch_wheels: error: $LOCK not found (the pins the carried wheels take)" >&2
  exit 2
fi
specs=()
for d in "${DISTS[@]}"; do
  pattern="^${d//[-_.]/[-_.]}=="  # a name matches its -, _ and . spellings
  spec=$(grep -iE "$pattern" "$LOCK" | head -1 | sed 's/[ ;\\#].*//' || true)
  if [[ -z $spec ]]; then
    echo "fetch_wheels: error: $d is not pinned (name==version) in $LOCK" >&2
    exit 2
  fi
  specs+=("$spec")
done
echo "fetch_wheels: ${specs[*]} (versions from $LOCK) -> $DEST/"

mkdir -p "$DEST"
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
# The GPU machine runs CPython 3.12 on x86-64 (bench/gpu_image_packages.txt); all but wcwidth are py3-none-any.
"$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 --platform any -d "$TMP" "${specs[@]}"
rm -f "$DEST"/*.whl
mv "$TMP"/*.whl "$DEST"/
ls -l "$DEST"/*.whl
