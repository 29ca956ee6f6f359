#!/usr/bin/env bash
# perf_analyzer for this machine, from the project's own files: tritonclient[all] 2.51 ships the perf_analyzer
# binary that matches the bundled Triton 2.51 (the PyPI perf-analyzer wheels need glibc 2.38, newer than Debian
# 12's), but it loads two libraries neither Debian 12 nor the venv has: libb64.so.0d (Debian's libb64-0d) and
# libcudart.so.12 (PyPI's nvidia-cuda-runtime-cu12; loaded, unused without a GPU). Both go to .cache/perf-tools
# (no root, nothing installed system-wide), with a wrapper: .cache/perf-tools/perf_analyzer.
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=.cache/perf-tools
WRAPPER="$DEST/perf_analyzer"
[ -x "$WRAPPER" ] && exec echo "$WRAPPER"
mkdir -p "$DEST/tmp"
(cd "$DEST/tmp" && apt-get download -q libb64-0d >/dev/null 2>&1) || { echo "perf-tools: cannot download the Debian package libb64-0d" >&2; exit 1; }
dpkg -x "$DEST"/tmp/libb64-0d_*.deb "$DEST/libb64"
PIP_CACHE_DIR=.cache/pip .venv/bin/pip download -q --no-deps -d "$DEST/tmp" "nvidia-cuda-runtime-cu12==12.9.79"
.venv/bin/python -m zipfile -e "$DEST"/tmp/nvidia_cuda_runtime_cu12-*.whl "$DEST/cudart"
LIBS="$PWD/$DEST/libb64/usr/lib/x86_64-linux-gnu:$PWD/$DEST/cudart/nvidia/cuda_runtime/lib"
cat > "$WRAPPER.tmp" <<WRAP
#!/usr/bin/env bash
LD_LIBRARY_PATH="$LIBS\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}" exec "$PWD/.venv/bin/perf_analyzer" "\$@"
WRAP
chmod +x "$WRAPPER.tmp"
"$WRAPPER.tmp" --version >/dev/null
mv "$WRAPPER.tmp" "$WRAPPER"
rm -rf "$DEST/tmp"
echo "$WRAPPER"
