#!/usr/bin/env bash
# Extract the public reference implementations used by tests/golden/record_golden.py into the
# git-ignored folder .refs/ (never commit these files; they are third-party code).
#
# Source: bare git mirrors of the public GitHub repositories under $MIRROR (default /work/.mirror,
# one <owner>+<name>/repo per repository). Without a mirror, clone the repository yourself and
# point MIRROR at a folder holding <owner>+<name>/repo (a clone works as well as a bare mirror):
#   git clone https://github.com/<owner>/<name> "$MIRROR/<owner>+<name>/repo"
#   git -C "$MIRROR/<owner>+<name>/repo" checkout <commit below>
#
# Layout written: .refs/<owner>+<name>/<path in the repository>, plus .refs/SOURCES.txt recording
# repository, commit and path of every file.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
MIRROR=${MIRROR:-/work/.mirror}
OUT="$ROOT/.refs"

# repository            pinned commit                              files
REFS=(
  "ML-GSAI/LLaDA b7e6c3565f194352da44b38dd12b6970597309f3 generate.py"
  "NVlabs/Fast-dLLM 24cc59e75f20a6384bae8c905965bb090b96388e llada/generate.py llada/model/__init__.py llada/model/configuration_llada.py llada/model/modeling_llada.py dream/model/__init__.py dream/model/configuration_dream.py dream/model/modeling_dream.py dream/model/generation_utils.py dream/model/generation_utils_block.py"
  "maomaocun/dLLM-cache 17235bffc8c5b587a2dc6f7dc76fcd01eab76e3a dllm_cache/__init__.py dllm_cache/cache/__init__.py dllm_cache/cache/Cache.py dllm_cache/cache/Config.py dllm_cache/hooks/__init__.py dllm_cache/hooks/cache_hook_LLaDA.py dllm_cache/hooks/cache_hook_Dream.py dllm_cache/hooks/cache_hook_LLaDA_V.py dllm_cache/hooks/cache_hook_MMaDA.py utils/generate_function.py"
  "Kamichanw/d2Cache 72feb60bb288a5a4d14b4bab9afbbaa1fc1b509a src/"
)

mkdir -p "$OUT"
sources=$(mktemp)
trap 'rm -f "$sources"' EXIT
missing=0
for entry in "${REFS[@]}"; do
  read -r repo commit files <<<"$entry"
  dir="$MIRROR/${repo/\//+}/repo"
  if ! git -C "$dir" cat-file -e "$commit^{commit}" 2>/dev/null; then
    echo "MISSING: $repo@$commit (expected a git mirror at $dir)." >&2
    echo "  get it with: git clone https://github.com/$repo $dir && git -C $dir checkout $commit" >&2
    missing=1
    continue
  fi
  # an entry ending in / stands for every file under that folder
  files=$(for f in $files; do
    if [[ $f == */ ]]; then git -C "$dir" ls-tree -r --name-only "$commit" -- "$f"; else echo "$f"; fi
  done)
  for f in $files; do
    dest="$OUT/${repo/\//+}/$f"
    mkdir -p "$(dirname "$dest")"
    git -C "$dir" show "$commit:$f" > "$dest"
    echo "$repo $commit $f" >> "$sources"
  done
  echo "extracted $repo@${commit:0:8}: $(wc -w <<<"$files") files"
done
if [[ $missing == 0 ]]; then cp "$sources" "$OUT/SOURCES.txt"; fi
exit $missing
