#!/usr/bin/env bash
# genai-perf (NVIDIA's LLM benchmark CLI, which drives perf_analyzer) for this machine, from the project's own
# files: its own virtual environment in .cache/genai-perf (its pins of pandas, numpy and transformers stay out of
# .venv), and the perf_analyzer that scripts/perf-tools.sh makes run here first on its PATH. HF_HUB_OFFLINE=1:
# it reads the tokenizer from the directory given with --tokenizer. Prints the wrapper: .cache/genai-perf/genai-perf.
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=.cache/genai-perf
WRAPPER="$DEST/genai-perf"
[ -x "$WRAPPER" ] && exec echo "$WRAPPER"
PERF="$PWD/$(scripts/perf-tools.sh | tail -1)"
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_CACHE_DIR="$PWD/.cache/pip"
rm -rf "$DEST/venv" "$DEST/bin"
"$(.venv/bin/python -c 'import sys; print(sys._base_executable)')" -m venv "$DEST/venv"
"$DEST/venv/bin/pip" install -q "genai-perf==$(cat scripts/genai-perf-version)"
mkdir -p "$DEST/bin"
ln -s "$PERF" "$DEST/bin/perf_analyzer"
cat > "$WRAPPER.tmp" <<WRAP
#!/usr/bin/env bash
PATH="$PWD/$DEST/bin:\$PATH" HF_HUB_OFFLINE=1 exec "$PWD/$DEST/venv/bin/genai-perf" "\$@"
WRAP
chmod +x "$WRAPPER.tmp"
"$WRAPPER.tmp" --version >/dev/null
mv "$WRAPPER.tmp" "$WRAPPER"
echo "$WRAPPER"
