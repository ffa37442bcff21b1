#!/usr/bin/env bash
# Check the image recipe where no container runtime can start: build a Debian bookworm root
# file system with debootstrap (cached), run scripts/install-in-image.sh inside it with chroot
# exactly as the Containerfile's cpu target does, then, as the image's non-root user, with no
# network and a 64 MiB /dev/shm (Docker's default), run `uniseg --help`, `uniseg models`,
# `uniseg version` and the demo on examples/example_ct.nii.gz. Results go to RESULTS for
# tests/test_container.py to check.
#
#   scripts/rootfs-test.sh RESULTS        (as root; `make test-container` runs the test)
#
# Environment:
#   UNISEG_ROOTFS_CACHE   cache folder (default /var/cache/uniseg-rootfs): the pristine root file
#                         system, pip's cache and the CPU torch wheel; each run works on a copy
#                         that is deleted afterwards. Delete the folder to start from scratch.
#                         (Behind a proxy that strips HTTP caching headers, as on the project's
#                         machines, pip's cache stays empty: each run downloads the ~105 MB of
#                         wheels besides torch again, ~15 s there.)
#   PYTHON                Python that builds the unisegcli wheel (default python3)
#   UNISEG_TORCH_WHEEL    a torch-<pin>+cpu wheel to use (default: looked up in the cache, in
#                         pip's find-links folders, then downloaded from the PyTorch CPU index)
#   UNISEG_DEBIAN_MIRROR  default http://deb.debian.org/debian
#
# Differences from a real `docker build --target cpu`: the base is Debian's python3 (3.11.2)
# instead of the python:3.11-slim image's; the chroot shares the host's kernel, like a
# container, but has no cgroup limits and no seccomp profile.
set -euo pipefail

SUITE=bookworm
PACKAGES=python3,python3-venv,ca-certificates
CACHE=${UNISEG_ROOTFS_CACHE:-/var/cache/uniseg-rootfs}
REPO=$(cd "$(dirname "$0")/.." && pwd)
USER_SPEC=1000:1000
RUN_PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
DEMO_TASKS=liver,spleen,kidney,pancreas

log() { printf '[rootfs-test] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }
now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }

# -- inside a private mount namespace: mounts vanish with it, whatever happens ------------------
if [ "${1:-}" = --inside ]; then
    ROOT=$2 RESULTS=$3
    # shellcheck disable=SC2317  # called by the trap
    cleanup_mounts() {
        for m in "$ROOT/var/cache/uniseg-pip" "$ROOT/dev/shm" "$ROOT/dev" "$ROOT/proc"; do
            mountpoint -q "$m" && umount "$m"
        done
        return 0
    }
    trap cleanup_mounts EXIT
    mount -t proc proc "$ROOT/proc"
    mount --bind /dev "$ROOT/dev"             # not recursive: no host /dev/shm, /dev/pts
    mount -t tmpfs -o size=64m,mode=1777 shm "$ROOT/dev/shm"
    mkdir -p "$CACHE/pip" "$ROOT/var/cache/uniseg-pip"
    mount --bind "$CACHE/pip" "$ROOT/var/cache/uniseg-pip"
    cp /etc/resolv.conf "$ROOT/etc/resolv.conf"
    # The CA bundle the host's pip trusts (a site's TLS-inspecting proxy adds its own CA there;
    # Debian's ca-certificates in the fresh root file system would not know it).
    cp "${PIP_CERT:-/etc/ssl/certs/ca-certificates.crt}" "$ROOT/tmp/host-ca.crt"

    t=$(now)
    log "install: scripts/install-in-image.sh in the chroot (as root, with network)"
    chroot "$ROOT" /usr/bin/env -i PATH="$RUN_PATH" HOME=/root LANG=C.UTF-8 \
        UNISEG_TORCH=cpu UNISEG_TORCH_INDEX_URL= UNISEG_WHEELS=/tmp/uniseg-wheels \
        PIP_CACHE_DIR=/var/cache/uniseg-pip PIP_CERT=/tmp/host-ca.crt \
        bash /tmp/uniseg-src/scripts/install-in-image.sh /tmp/uniseg-src
    echo "install $(elapsed "$t")" >> "$RESULTS/timings.txt"

    # What `docker run IMAGE ...` gets: the image's user and environment (Containerfile ENV),
    # working folder /data, and here no network at all (a new, empty network namespace).
    as_user() {
        unshare --net chroot --userspec="$USER_SPEC" "$ROOT" /usr/bin/env -i PATH="$RUN_PATH" \
            HOME=/home/uniseg LANG=C.UTF-8 UNISEG_HOME=/weights \
            sh -c 'cd /data && exec "$@"' sh "$@"
    }
    t=$(now)
    as_user id -u > "$RESULTS/uid.txt"
    as_user df --output=size -B1 /dev/shm > "$RESULTS/shm.txt"
    as_user cat /proc/net/dev > "$RESULTS/net.txt"
    as_user uniseg --help > "$RESULTS/help.txt"
    as_user uniseg models > "$RESULTS/models.txt"
    as_user uniseg version > "$RESULTS/version.txt"
    echo "commands $(elapsed "$t")" >> "$RESULTS/timings.txt"
    t=$(now)
    log "demo: uniseg example_ct.nii.gz -o out --model uniseg-demo --tasks $DEMO_TASKS (uid 1000, offline)"
    as_user uniseg example_ct.nii.gz -o out --model uniseg-demo --tasks "$DEMO_TASKS" --json \
        > "$RESULTS/demo-events.jsonl" 2> "$RESULTS/demo-stderr.txt" \
        || { cat "$RESULTS/demo-stderr.txt" >&2; die "the demo failed"; }
    echo "demo $(elapsed "$t")" >> "$RESULTS/timings.txt"
    stat -c '%u %n' "$ROOT/data/out"/* > "$RESULTS/owners.txt"
    cp -r "$ROOT/data/out" "$RESULTS/out"
    exit 0
fi

# -- outside: cache, copy, wheels, then the inside part under unshare ---------------------------
RESULTS=${1:?usage: rootfs-test.sh RESULTS (folder for the outputs to check)}
[ "$(id -u)" = 0 ] || die "needs root (debootstrap, chroot, mounts)"
mkdir -p "$RESULTS" "$CACHE"
RESULTS=$(cd "$RESULTS" && pwd)
: > "$RESULTS/timings.txt"
exec 9> "$CACHE/.lock"
flock 9                                       # one run at a time per cache
# Holding the lock, any run.* folder is left over from a killed run (a killed run's mounts went
# with its mount namespace; its processes held the lock until they ended).
find "$CACHE" -maxdepth 1 -name 'run.*' -type d -exec rm -rf --one-file-system {} +

if ! command -v debootstrap >/dev/null; then
    log "installing debootstrap with apt-get"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >/dev/null
fi

BASE=$CACHE/$SUITE
MIRROR=${UNISEG_DEBIAN_MIRROR:-http://deb.debian.org/debian}
RECIPE="debootstrap --variant=minbase --include=$PACKAGES $SUITE $MIRROR"
t=$(now)
if [ "$(cat "$BASE.recipe" 2>/dev/null)" != "$RECIPE" ]; then
    log "building the root file system (first run, about a minute): $RECIPE"
    rm -rf --one-file-system "$BASE" "$BASE.tmp" "$BASE.recipe"
    debootstrap --variant=minbase --include="$PACKAGES" "$SUITE" "$BASE.tmp" "$MIRROR" \
        > "$CACHE/debootstrap.log" 2>&1 || { tail -n 20 "$CACHE/debootstrap.log" >&2; die "debootstrap failed"; }
    rm -rf "$BASE.tmp/var/cache/apt/archives/"*.deb
    mv "$BASE.tmp" "$BASE"
    echo "$RECIPE" > "$BASE.recipe"
    echo "rootfs_build $(elapsed "$t")" >> "$RESULTS/timings.txt"
else
    log "root file system cached in $BASE"
    echo "rootfs_cached 0" >> "$RESULTS/timings.txt"
fi

PIN=$(sed -n 's/^torch==\([0-9][0-9.]*\).*/\1/p' "$REPO/constraints.txt")
PYTAG=$(chroot "$BASE" python3 -c 'import sys; print("cp%d%d" % sys.version_info[:2])')
TORCH_GLOB="torch-$PIN+cpu-$PYTAG-$PYTAG-*linux*_$(uname -m).whl"
find_torch_wheel() {
    local dirs=("$CACHE/wheels") d f
    [ -n "${UNISEG_TORCH_WHEEL:-}" ] && { echo "$UNISEG_TORCH_WHEEL"; return; }
    # pip's configured find-links folders (how this machine's .venv got its CPU torch)
    for d in ${PIP_FIND_LINKS:-} $("${PYTHON:-python3}" -m pip config list 2>/dev/null \
            | sed -n "s/^[^=]*find-links='\(.*\)'$/\1/p"); do
        dirs+=("${d#file://}")
    done
    for d in "${dirs[@]}"; do
        for f in "$d"/$TORCH_GLOB; do [ -f "$f" ] && { echo "$f"; return; }; done
    done
    return 0
}
mkdir -p "$CACHE/wheels"
TORCH_WHEEL=$(find_torch_wheel)
if [ -z "$TORCH_WHEEL" ]; then
    log "downloading torch==$PIN+cpu from the PyTorch CPU index"
    "${PYTHON:-python3}" -m pip download --quiet --no-deps --only-binary=:all: \
        --python-version "${PYTAG#cp}" --implementation cp --dest "$CACHE/wheels" \
        --index-url https://download.pytorch.org/whl/cpu "torch==$PIN+cpu"
    TORCH_WHEEL=$(find_torch_wheel)
    [ -n "$TORCH_WHEEL" ] || die "no $TORCH_GLOB found or downloadable; set UNISEG_TORCH_WHEEL"
fi
[ "$(dirname "$TORCH_WHEEL")" = "$CACHE/wheels" ] || cp "$TORCH_WHEEL" "$CACHE/wheels/"
TORCH_WHEEL=$CACHE/wheels/$(basename "$TORCH_WHEEL")

WORK=$(mktemp -d "$CACHE/run.XXXXXX")
cleanup() {
    # Never delete through a mount that is still there (a bound /dev would be emptied).
    if grep -qF " $WORK/" /proc/self/mountinfo; then
        log "mounts left under $WORK; not deleting it"
        return 1
    fi
    rm -rf --one-file-system "$WORK"
}
trap cleanup EXIT
ROOT=$WORK/root
t=$(now)
cp -a "$BASE" "$ROOT"
echo "rootfs_copy $(elapsed "$t")" >> "$RESULTS/timings.txt"

t=$(now)
mkdir -p "$ROOT/tmp/uniseg-wheels" "$ROOT/tmp/uniseg-src/scripts" "$ROOT/data" "$WORK/src"
# The wheel is built from a copy, so setuptools leaves no build/ or *.egg-info in the checkout.
cp -r "$REPO/pyproject.toml" "$REPO/README.md" "$REPO/unisegcli" "$WORK/src/"
find "$WORK/src" -name __pycache__ -prune -exec rm -rf {} +
"${PYTHON:-python3}" -m pip wheel --quiet --no-deps --wheel-dir "$ROOT/tmp/uniseg-wheels" "$WORK/src" \
    > "$WORK/wheel.log" 2>&1 || { cat "$WORK/wheel.log" >&2; die "building the unisegcli wheel failed"; }
ln "$TORCH_WHEEL" "$ROOT/tmp/uniseg-wheels/" 2>/dev/null || cp "$TORCH_WHEEL" "$ROOT/tmp/uniseg-wheels/"
cp "$REPO/constraints.txt" "$ROOT/tmp/uniseg-src/"
cp "$REPO/scripts/install-in-image.sh" "$ROOT/tmp/uniseg-src/scripts/"
cp "$REPO/examples/example_ct.nii.gz" "$ROOT/data/"
chown -R "$USER_SPEC" "$ROOT/data"
echo "wheel $(elapsed "$t")" >> "$RESULTS/timings.txt"

unshare --mount --propagation private \
    bash "$REPO/scripts/rootfs-test.sh" --inside "$ROOT" "$RESULTS"
log "timings (seconds): $(tr '\n' ' ' < "$RESULTS/timings.txt")"
