# Real QMP clients used by test/integration/qmp-clients.test.ts.
# Sourced by .ci/run under `set -e`; idempotent, and a no-op (well under a
# second) when everything is already in place.
#
#  * QEMU's Python QMP library (qemu.qmp) and qmp-shell: pure Python under
#    python/ in Debian's `qemu` *source* package (no binary package ships
#    them). We enable deb-src for bookworm, download the source with apt and
#    extract only python/qemu/qmp and scripts/qmp/qmp-shell into
#    $FERRY_QEMU_PYTHON (default /opt/ferry-deps/qemu-python), outside the repo.
#  * go-qemu: Debian's golang-github-digitalocean-go-qemu-dev (GOPATH-style
#    source in /usr/share/gocode) plus golang-go; built offline with
#    GO111MODULE=off GOPATH=/usr/share/gocode.
#  * node-qemu: an npm devDependency, nothing to do here.
# The tests read FERRY_QEMU_PYTHON (exported below) and skip with a message
# when a client is missing.

export FERRY_QEMU_PYTHON="${FERRY_QEMU_PYTHON:-/opt/ferry-deps/qemu-python}"

(
  set -e
  apt_updated=0
  apt_update_main() {
    if [ "$apt_updated" = 0 ]; then
      apt-get update -qq >/dev/null
      apt_updated=1
    fi
  }

  # --- python3 (the node machine image has it; install it if not)
  if ! command -v python3 >/dev/null 2>&1; then
    apt_update_main
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3 >/dev/null
  fi

  # --- strace: qmp-protocol.test.ts checks the monitor's write() boundaries
  if ! command -v strace >/dev/null 2>&1; then
    apt_update_main
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends strace >/dev/null
  fi

  # --- go + go-qemu
  if ! command -v go >/dev/null 2>&1 || [ ! -f /usr/share/gocode/src/github.com/digitalocean/go-qemu/qmp/socket.go ]; then
    apt_update_main
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
      golang-go golang-github-digitalocean-go-qemu-dev >/dev/null
  fi

  # --- qemu.qmp + qmp-shell from the qemu source package
  dest="$FERRY_QEMU_PYTHON"
  if [ ! -f "$dest/.ferry-complete" ]; then
    srcs=/etc/apt/sources.list.d/ferry-debsrc.sources
    if [ ! -f "$srcs" ]; then
      cat >"$srcs" <<'SRC'
Types: deb-src
URIs: http://deb.debian.org/debian
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb-src
URIs: http://deb.debian.org/debian-security
Suites: bookworm-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
    fi
    # refresh only the deb-src indexes (keeps the binary lists as they are)
    apt-get update -qq -o Dir::Etc::sourcelist="$srcs" -o Dir::Etc::sourceparts=- \
      -o APT::Get::List-Cleanup=0 >/dev/null
    work="$(mktemp -d /tmp/ferry-qemu-src.XXXXXX)"
    trap 'rm -rf "$work"' EXIT
    chmod 755 "$work"
    (cd "$work" && apt-get source -qq --download-only qemu >/dev/null 2>&1)
    # no `| head` here: under pipefail the writer's SIGPIPE (exit 141) would
    # fail the whole script once head has closed the pipe
    origs=("$work"/qemu_*.orig.tar.*)
    orig="${origs[0]}"
    top="$(tar -tf "$orig" | sed -n '1s|/.*||p')"
    tar -xf "$orig" -C "$work" "$top/python/qemu/qmp" "$top/scripts/qmp/qmp-shell" "$top/COPYING"
    rm -rf "$dest.tmp"
    mkdir -p "$dest.tmp/qemu" "$dest.tmp/bin"
    cp -r "$work/$top/python/qemu/qmp" "$dest.tmp/qemu/qmp"
    cp "$work/$top/scripts/qmp/qmp-shell" "$dest.tmp/bin/qmp-shell"
    cp "$work/$top/COPYING" "$dest.tmp/COPYING"
    basename "$orig" >"$dest.tmp/SOURCE"
    touch "$dest.tmp/.ferry-complete"
    rm -rf "$dest"
    mv "$dest.tmp" "$dest"
  fi
)
