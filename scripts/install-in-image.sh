#!/usr/bin/env bash
# Everything a uniseg image does at build time, in one place. Run as root inside the image
# being built: by the Containerfile (both targets), by apptainer.def (%post) and by
# scripts/rootfs-test.sh inside a Debian chroot (what CI checks, see README "Run in a container").
#
#   install-in-image.sh SRC      SRC: a copy of the repository (the build context); only
#                                constraints.txt is read from it, plus the sources when no
#                                wheel is given
#
# Settings (environment; the Containerfile passes its build arguments through):
#   UNISEG_TORCH            cpu | cuda (default cpu). cpu installs torch==<pin>+cpu (the CPU
#                           build, ~180 MB, no CUDA libraries); cuda installs torch==<pin> from
#                           PyPI, whose Linux x86_64 wheel is the CUDA 13.0 build and pulls the
#                           nvidia-*/cuda-toolkit wheels (several GB). <pin> comes from
#                           constraints.txt.
#   UNISEG_TORCH_INDEX_URL  extra index for torch (default: https://download.pytorch.org/whl/cpu
#                           for cpu, none for cuda); empty for none.
#   UNISEG_WHEELS           folder of local wheels (pip --find-links): the uniseg wheel
#                           (unisegcli-*.whl) and anything else to install offline (a CPU torch
#                           wheel). Without a unisegcli wheel there, one is built from SRC.
#   UNISEG_EXTRAS           extras of unisegcli to install (default "dicom"; "" for none,
#                           "dicom,nnunet" for nnU-Net v2 / TotalSegmentator models).
#   UNISEG_BAKE_MODELS      models to download into /weights now (comma or space separated),
#                           e.g. "uniseg" or "totalsegmentator": the image then runs offline.
#   UNISEG_IMPORT_DIR       a folder inside SRC with weights to import instead of downloading:
#                           <dir>/<model>/ holds the files of registry model <model>
#                           (`uniseg weights import <model> <dir>/<model>`); <dir>/nnunet/<name>
#                           (a results folder or .zip) becomes model <name> (needs the
#                           nnunet extra: UNISEG_EXTRAS=dicom,nnunet).
#   PIP_CACHE_DIR, PIP_NO_CACHE_DIR   honoured as usual (the Containerfile uses a cache mount).
#
# Result: a venv in /opt/uniseg (uniseg on PATH via /usr/local/bin/uniseg), the non-root user
# `uniseg` (uid/gid 1000, home /home/uniseg), UNISEG_HOME folder /weights owned by that user,
# holding the baked weights if any.
set -euo pipefail

SRC=${1:?usage: install-in-image.sh SRC (a copy of the uniseg repository)}
SRC=$(cd "$SRC" && pwd)
TORCH_VARIANT=${UNISEG_TORCH:-cpu}
EXTRAS=${UNISEG_EXTRAS-dicom}
WHEELS=${UNISEG_WHEELS:-}
BAKE_MODELS=${UNISEG_BAKE_MODELS:-}
IMPORT_DIR=${UNISEG_IMPORT_DIR:-}
VENV=/opt/uniseg
WEIGHTS=/weights
USER_NAME=uniseg
USER_ID=1000

log() { printf '[install-in-image] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

case "$TORCH_VARIANT" in
    cpu) TORCH_INDEX_URL=${UNISEG_TORCH_INDEX_URL-https://download.pytorch.org/whl/cpu} ;;
    cuda) TORCH_INDEX_URL=${UNISEG_TORCH_INDEX_URL-} ;;
    *) die "UNISEG_TORCH='$TORCH_VARIANT'; expected cpu or cuda" ;;
esac
[ "$(id -u)" = 0 ] || die "run as root (it creates a user and writes /opt, /weights)"
[ -f "$SRC/constraints.txt" ] || die "$SRC/constraints.txt is missing; SRC must be the repository"
TORCH_PIN=$(sed -n 's/^torch==\([0-9][0-9.]*\).*/\1/p' "$SRC/constraints.txt")
[ -n "$TORCH_PIN" ] || die "no 'torch==X' line in $SRC/constraints.txt"

# -- 1. the operating system: python3 with venv (the CUDA base has no Python at all) -----------
if ! command -v python3 >/dev/null || ! python3 -c 'import ensurepip, venv' 2>/dev/null; then
    log "installing python3, python3-venv, ca-certificates with apt-get"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update
    apt-get install -y --no-install-recommends python3 python3-venv ca-certificates
    rm -rf /var/lib/apt/lists/*
fi

# -- 2. the non-root user (Ubuntu images ship `ubuntu` with uid 1000: it makes way) ------------
existing=$(getent passwd "$USER_ID" | cut -d: -f1 || true)
if [ -n "$existing" ] && [ "$existing" != "$USER_NAME" ]; then
    log "removing user '$existing' (uid $USER_ID) so that '$USER_NAME' gets uid $USER_ID"
    userdel --remove "$existing" 2>/dev/null || userdel "$existing"
fi
if ! getent passwd "$USER_NAME" >/dev/null; then
    getent group "$USER_ID" >/dev/null && groupdel "$(getent group "$USER_ID" | cut -d: -f1)"
    groupadd --gid "$USER_ID" "$USER_NAME"
    useradd --uid "$USER_ID" --gid "$USER_ID" --create-home --shell /bin/bash "$USER_NAME"
fi

# -- 3. Python packages into a venv ------------------------------------------------------------
log "creating $VENV with $(python3 --version)"
python3 -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)
install -m 0644 "$SRC/constraints.txt" "$VENV/constraints.txt"

find_links=()
wheel=""
if [ -n "$WHEELS" ]; then
    find_links=(--find-links "$WHEELS")
    wheel=$(find "$WHEELS" -maxdepth 1 -name 'unisegcli-*.whl' | sort | tail -n 1)
fi
if [ -z "$wheel" ]; then
    build_dir=$(mktemp -d)
    log "no unisegcli wheel given: building one from $SRC"
    "${PIP[@]}" wheel --quiet --no-deps --wheel-dir "$build_dir" "$SRC"
    wheel=$(find "$build_dir" -maxdepth 1 -name 'unisegcli-*.whl')
fi

if [ "$TORCH_VARIANT" = cpu ]; then
    # The local label makes pip refuse PyPI's CUDA wheel of the same version instead of
    # silently pulling several GB of nvidia-* wheels when the CPU wheel cannot be found.
    torch_spec="torch==$TORCH_PIN+cpu"
else
    torch_spec="torch==$TORCH_PIN"
fi
index_args=()
[ -n "$TORCH_INDEX_URL" ] && index_args=(--extra-index-url "$TORCH_INDEX_URL")
target="$wheel"
[ -n "$EXTRAS" ] && target="${wheel}[$EXTRAS]"
log "installing $torch_spec and $(basename "$wheel")${EXTRAS:+ [$EXTRAS]}"
"${PIP[@]}" install --quiet --constraint "$SRC/constraints.txt" \
    "${find_links[@]}" "${index_args[@]}" "$torch_spec" "$target"
ln -sf "$VENV/bin/uniseg" /usr/local/bin/uniseg

"$VENV/bin/python" - "$TORCH_VARIANT" <<'EOF'
import sys

import torch

want, cuda = sys.argv[1], torch.version.cuda
if want == "cpu" and cuda:
    sys.exit(f"expected the CPU build of torch, got {torch.__version__} (CUDA {cuda})")
if want == "cuda" and not cuda:
    sys.exit(f"expected a CUDA build of torch, got {torch.__version__} (CPU only)")
print(f"[install-in-image] torch {torch.__version__}, CUDA {cuda or 'none'}", file=sys.stderr)
EOF

# -- 4. the weights folder, with baked weights if asked for ------------------------------------
mkdir -p "$WEIGHTS"
export UNISEG_HOME=$WEIGHTS
baked=()
for model in ${BAKE_MODELS//,/ }; do
    log "baking model '$model' into $WEIGHTS (uniseg weights download)"
    uniseg weights download --quiet "$model"
    baked+=("$model")
done
if [ -n "$IMPORT_DIR" ]; then
    import_root="$SRC/$IMPORT_DIR"
    [ -d "$import_root" ] || die "UNISEG_IMPORT_DIR=$IMPORT_DIR: no folder $import_root"
    for entry in "$import_root"/*; do
        [ -e "$entry" ] || continue
        name=$(basename "$entry")
        if [ "$name" = nnunet ]; then
            for results in "$entry"/*; do
                [ -e "$results" ] || continue
                log "importing nnU-Net model '$(basename "$results" .zip)' from $results"
                uniseg weights import nnunet "$results" --name "$(basename "$results" .zip)"
            done
        else
            log "importing model '$name' from $entry (uniseg weights import)"
            uniseg weights import --quiet "$name" "$entry"
            baked+=("$name")
        fi
    done
fi
for model in "${baked[@]}"; do             # every file present, hashes as the registry says
    UNISEG_OFFLINE=1 uniseg weights verify --quiet "$model"
done
# The user may download further models at run time; baked files stay readable by anyone.
chown -R "$USER_ID:$USER_ID" "$WEIGHTS"
chmod -R a+rX "$WEIGHTS"

# -- 5. smoke check: the entry point starts ----------------------------------------------------
uniseg --help >/dev/null
log "done: $("$VENV/bin/python" -c 'import importlib.metadata as m; print("unisegcli", m.version("unisegcli"))')"
