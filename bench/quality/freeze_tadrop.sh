#!/bin/sh
# A frozen copy of a committed tadrop (default HEAD) for long benchmark runs, so that edits in
# the working tree cannot change merges half-way. Prints the TADROP_CMD to use.
#   eval "$(sh bench/quality/freeze_tadrop.sh [COMMIT])"
set -eu
repo=$(cd "$(dirname "$0")/../.." && pwd)
commit=$(git -C "$repo" rev-parse --short "${1:-HEAD}")
# beside the benchmark cache (TADROP_QUALITY_CACHE, as common.py reads it), so that it lasts as long
dest="${TADROP_QUALITY_CACHE:-$repo/bench/.cache/quality}/tadrop_frozen/$commit"
if [ ! -f "$dest/.ok" ]; then
    rm -rf "$dest" && mkdir -p "$dest"
    git -C "$repo" archive "$commit" tadrop_cli | tar -x -C "$dest"
    # build the kernels from the frozen source (the working tree's library may be newer)
    ext=$(python3 -c 'import sysconfig; print(sysconfig.get_config_var("EXT_SUFFIX"))')
    cc -O3 -std=gnu11 -fopenmp -ffp-contract=off -fno-math-errno -fno-trapping-math -shared -fPIC -o "$dest/tadrop_cli/_kernels$ext" "$dest/tadrop_cli/_kernels.c" -lm 2>/dev/null \
        || cp "$repo/tadrop_cli/_kernels$ext" "$dest/tadrop_cli/"
    touch "$dest/.ok"
fi
echo "export TADROP_CMD='env PYTHONPATH=$dest python -m tadrop_cli' TADROP_COMMIT=$commit"
