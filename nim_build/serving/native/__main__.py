"""`python -m nim_build.serving.native`: build the native postprocessing backend into $NIM_BUILD_NATIVE_DIR now
(images do this at build time, so that `nim_build repo` finds it without a compiler) and print its path."""

from nim_build.serving.native import build_detokenizer

print(build_detokenizer())
