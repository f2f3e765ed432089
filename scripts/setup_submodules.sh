#!/usr/bin/env bash
# Set up the upstream trees this project adapts, then install the project into the current Python.
#
#   scripts/setup_submodules.sh [--no-install] [--no-fetch] [--allow-missing]
#
# For every submodule in .gitmodules (third_party/latent-diffusion, third_party/enhancing-transformers):
#   1. a tree already in place is used as it is (and said so); otherwise `git submodule update --init` fetches the
#      pinned commit. The URL can be overridden per tree with <TREE>_URL, where <TREE> is the folder name in capitals
#      with '-' -> '_' (LATENT_DIFFUSION_URL, ENHANCING_TRANSFORMERS_URL), e.g. for a mirror or an air-gapped cluster;
#   2. patches/<tree folder name>/*.patch are applied in sorted order. A patch that is already applied is skipped,
#      so a second run changes nothing; one that applies neither way stops the script and is named (a tree patched
#      by an older version of patches/ is exported again, not patched over: the message says how);
#   3. `python -m pip install -e '.[test]'` installs the project (and the upstream tree, when it is a package, without
#      dependencies) into the interpreter `python` (or $PYTHON) resolves to: activate your conda env or venv first.
# Options: --no-install skips step 3; --no-fetch never touches the network (a missing tree is an error);
# --allow-missing reports a missing tree but still installs (CI: tests that need the tree then skip).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python}"
INSTALL=1
FETCH=1
ALLOW_MISSING=0
for arg in "$@"; do
  case "$arg" in
    --no-install) INSTALL=0 ;;
    --no-fetch) FETCH=0 ;;
    --allow-missing) ALLOW_MISSING=1 ;;
    -h|--help) sed -n '2,16p' "${BASH_SOURCE[0]}"; exit 0 ;;
    *) echo "setup_submodules.sh: unknown option '$arg' (known: --no-install, --no-fetch, --allow-missing)" >&2; exit 2 ;;
  esac
done

cd "$ROOT"
if [[ ! -f .gitmodules ]]; then
  echo "setup_submodules.sh: no .gitmodules in $ROOT; run this script from a checkout of the project" >&2
  exit 1
fi

in_git_repo() { git -C "$ROOT" rev-parse --is-inside-work-tree >/dev/null 2>&1; }

# Pinned commit of a submodule path: the gitlink in the index (works before the first commit too).
pinned_commit() {
  local path="$1"
  if in_git_repo; then
    git -C "$ROOT" ls-files -s -- "$path" | awk '$1 == "160000" {print $2; exit}'
  fi
}

# git apply in the tree itself: the ceiling keeps git from treating the project's repository as the patch root
# (which would silently skip files outside the current folder).
tree_git_apply() {
  local tree="$1"; shift
  (cd "$tree" && GIT_CEILING_DIRECTORIES="$(dirname "$tree")" git apply "$@")
}

fetch_tree() {
  local name="$1" path="$2" url="$3" pin="$4"
  if [[ "$FETCH" == 0 ]]; then
    return 1
  fi
  if ! in_git_repo || [[ -z "$pin" ]]; then
    echo "  $path: not a git checkout with a gitlink for it; cannot fetch the pinned commit" >&2
    return 1
  fi
  echo "  fetching $path from $url (commit $pin)"
  # </dev/null: git must not read the list of submodules this loop is reading
  git -C "$ROOT" submodule init -- "$path" >/dev/null </dev/null
  git -C "$ROOT" config "submodule.$name.url" "$url" </dev/null
  local allow=()
  # a mirror given as a local path (air-gapped clusters): git refuses file:// for submodules unless allowed
  if [[ "$url" == /* || "$url" == file://* || -d "$url" ]]; then allow=(-c protocol.file.allow=always); fi
  git -C "$ROOT" "${allow[@]}" submodule update --init -- "$path" </dev/null
}

# How many of the (sorted) patches are already in the tree: the largest k such that patches k-1..0 reverse-apply,
# in that order, to a scratch copy of the files they touch. Checking the series as a whole (not each patch alone)
# matters when a later patch edits lines another patch uses as context.
applied_prefix() {
  local tree="$1"; shift
  local patches=("$@") k i f ok scratch
  for ((k = ${#patches[@]}; k > 0; k--)); do
    scratch="$(mktemp -d)"
    ok=1
    while read -r f; do
      [[ -z "$f" ]] && continue
      if [[ -f "$tree/$f" ]]; then
        mkdir -p "$scratch/$(dirname "$f")" && cp "$tree/$f" "$scratch/$f"
      fi
    done < <(sed -n 's#^+++ b/##p' "${patches[@]:0:k}" | sort -u)
    for ((i = k - 1; i >= 0; i--)); do
      if ! tree_git_apply "$scratch" --reverse "${patches[i]}" >/dev/null 2>&1; then
        ok=0
        break
      fi
    done
    rm -rf "$scratch"
    if [[ "$ok" == 1 ]]; then
      echo "$k"
      return
    fi
  done
  echo 0
}

apply_patches() {
  local tree="$1" dir="$2" pinned="${3:-}"
  local p rel i
  local patches=()
  while IFS= read -r p; do patches+=("$p"); done < <(find "$dir" -maxdepth 1 -name '*.patch' 2>/dev/null | LC_ALL=C sort)
  if [[ ${#patches[@]} -eq 0 ]]; then
    echo "  no patches in ${dir#"$ROOT"/}"
    return 0
  fi
  local done_k
  done_k="$(applied_prefix "$tree" "${patches[@]}")"
  for ((i = 0; i < ${#patches[@]}; i++)); do
    p="${patches[i]}"
    rel="${p#"$ROOT"/}"
    if ((i < done_k)); then
      echo "  already applied: $rel"
    elif tree_git_apply "$tree" --check "$p" 2>/dev/null; then
      tree_git_apply "$tree" "$p"
      echo "  applied: $rel"
    else
      echo "setup_submodules.sh: patch $rel does not apply to ${tree#"$ROOT"/} (conflict: the tree is not the" \
           "pinned commit, was edited, has patches applied out of order, or was patched by an older version of" \
           "patches/ than this checkout's). git apply says:" >&2
      tree_git_apply "$tree" --check "$p" >&2 || true
      echo "setup_submodules.sh: a tree patched by an older version of patches/ is exported again, not patched" \
           "over: delete ${tree#"$ROOT"/} (nothing of the project is in it) and run this script again (it fetches" \
           "commit ${pinned:-<pinned>} and applies every patch), or offline put a fresh export of that commit there" \
           "and run it with --no-fetch." >&2
      exit 1
    fi
  done
  echo "  patches: $((${#patches[@]} - done_k)) applied, $done_k already applied"
}

status=0
while read -r key path; do
  name="${key#submodule.}"; name="${name%.path}"
  url="$(git config -f .gitmodules --get "submodule.$name.url" || true)"
  tree_name="$(basename "$path")"
  env_var="$(echo "$tree_name" | tr '[:lower:]-.' '[:upper:]__')_URL"
  url="${!env_var:-$url}"
  tree="$ROOT/$path"
  pin="$(pinned_commit "$path")"
  echo "== $path (pinned ${pin:-unknown}; URL override: \$$env_var)"
  if [[ -d "$tree" ]] && [[ -n "$(ls -A "$tree" 2>/dev/null)" ]]; then
    echo "  tree already present: using it as it is"
  elif ! fetch_tree "$name" "$path" "$url" "$pin"; then
    echo "setup_submodules.sh: $path is missing and could not be fetched from $url (commit ${pin:-unknown})." \
         "Check the network, set $env_var to a reachable mirror, or put the upstream tree at commit" \
         "${pin:-<pinned>} into $path and run this script again with --no-fetch (never touches the network)." \
         "Behind a firewall without the trees: --allow-missing installs the project anyway (tests needing a tree skip)." >&2
    status=1
    continue
  fi
  apply_patches "$tree" "$ROOT/patches/$tree_name" "$pin"
done < <(git config -f .gitmodules --get-regexp '^submodule\..*\.path$')

if [[ "$status" != 0 ]]; then
  if [[ "$ALLOW_MISSING" == 1 ]]; then
    echo "  --allow-missing: going on without the missing tree(s); tests that need them will skip"
  else
    exit "$status"
  fi
fi

if [[ "$INSTALL" == 1 ]]; then
  echo "== installing the project into $("$PYTHON" -c 'import sys; print(sys.executable)')"
  "$PYTHON" -m pip install -e "$ROOT[test]"
  # latent-diffusion is a package (setup.py): install it too so `import ldm` works outside its main.py.
  if [[ -f "$ROOT/third_party/latent-diffusion/setup.py" ]]; then
    "$PYTHON" -m pip install --no-deps -e "$ROOT/third_party/latent-diffusion"
  fi
else
  echo "== --no-install: skipped python -m pip install -e '.[test]'"
fi
echo "setup_submodules.sh: done"
