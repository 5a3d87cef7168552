#!/usr/bin/env bash
# Single-stream speed, tureen against llama.cpp, side by side in one run (issue 20).
#
# 1. builds llama-bench, llama-server and llama-quantize OUTSIDE the repository, from the llama.cpp
#    source vendored in the llama-cpp-python sdist on PyPI (pip download --no-binary :all:);
# 2. converts the checkpoint (default: tureen's demo model) to GGUF with that source's own
#    convert_hf_to_gguf.py (f32), and llama-quantize's it to Q8_0 and Q4_0;
# 3. runs `tureen bench single`: batch-1 decode of 128 tokens, float32 vs f32, int8 vs Q8_0 and int4
#    (group 128: 4.5 bits a weight, like Q4_0) vs Q4_0, each also with tureen's LM head quantized
#    (+lm_head: llama-quantize quantizes the output matrix too), interleaved run by run, with tureen's
#    per-step breakdown; int8-a8 / int4-a8 are the same weights with int8 activations
#    (--quantization-activation int8: W8A8-dynamic with VNNI, as llama.cpp's Q8_0 / Q4_0 kernels
#    quantize activations); prints the table and writes bench-single.json / bench-single.png.
#
# Usage: scripts/llamacpp_compare.sh [MODEL_DIR]     (run inside tureen's virtual environment)
# Environment (all optional):
#   LLAMACPP_DIR  where llama.cpp is unpacked, built and the GGUF files go (default ~/.cache/tureen/llamacpp)
#   JOBS          parallel compile jobs (default 2; the build runs under nice -n 10)
#   THREADS       threads for both engines (default 1: steady ratios on a shared machine)
#   REPEATS       timed runs per variant, best counts (default 3)
#   TOKENS        decode tokens per run (default 128, as llama-bench -n 128)
#   OUT           output directory (default ./bench-single-llamacpp)
#   CAPI          1: build only libllama and time with scripts/llamacpp_decode_bench.c (llama-bench's
#                 -p 0 -n N loop on the C API) instead of llama-bench, and quantize through the C API
# Needs: cmake, a C/C++ compiler, and transformers in the environment (the converter imports it).
set -euo pipefail

MODEL=${1:-}
WORK=${LLAMACPP_DIR:-$HOME/.cache/tureen/llamacpp}
JOBS=${JOBS:-2}
THREADS=${THREADS:-1}
REPEATS=${REPEATS:-3}
TOKENS=${TOKENS:-128}
OUT=${OUT:-./bench-single-llamacpp}
PY=${PYTHON:-python3}
mkdir -p "$WORK"

# ---- 1. llama.cpp from the llama-cpp-python sdist --------------------------------------------
SRC=$(ls -d "$WORK"/llama_cpp_python-*/vendor/llama.cpp 2>/dev/null | head -1 || true)
if [ -z "$SRC" ]; then
    "$PY" -m pip download --no-binary :all: --no-deps llama-cpp-python -d "$WORK"
    tar -xzf "$(ls "$WORK"/llama_cpp_python-*.tar.gz | head -1)" -C "$WORK"
    SRC=$(ls -d "$WORK"/llama_cpp_python-*/vendor/llama.cpp | head -1)
fi
BIN="$WORK/build/bin"
cmake_configure() {
    [ -f "$WORK/build/CMakeCache.txt" ] || nice -n 10 cmake -S "$SRC" -B "$WORK/build" -DCMAKE_BUILD_TYPE=Release \
        -DLLAMA_CURL=OFF -DGGML_NATIVE=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=ON
}
if [ "${CAPI:-0}" = 1 ]; then
    # CAPI=1: build only libllama (minutes less than llama-bench, which links the large llama-common
    # library) and time the same loop with scripts/llamacpp_decode_bench.c on its C API.
    if [ ! -x "$WORK/llamacpp-decode-bench" ]; then
        cmake_configure
        nice -n 10 cmake --build "$WORK/build" -j"$JOBS" --target llama
        cc -O2 -o "$WORK/llamacpp-decode-bench" "$(dirname "$0")/llamacpp_decode_bench.c" -I"$SRC/include" \
            -I"$SRC/ggml/include" -L"$BIN" -lllama -Wl,-rpath,"$BIN"
    fi
    BENCH="$WORK/llamacpp-decode-bench"
    quantize() { "$BENCH" --quantize "$1" "$2" "$3"; }
else
    if [ ! -x "$BIN/llama-bench" ] || [ ! -x "$BIN/llama-quantize" ] || [ ! -x "$BIN/llama-server" ]; then
        cmake_configure
        nice -n 10 cmake --build "$WORK/build" -j"$JOBS" --target llama-bench llama-server llama-quantize
    fi
    BENCH="$BIN/llama-bench"
    quantize() { "$BIN/llama-quantize" "$1" "$2" "$3" "$THREADS"; }
fi

# ---- 2. the checkpoint as GGUF -----------------------------------------------------------------
if [ -z "$MODEL" ]; then
    MODEL=$("$PY" -c "from tureen.demo import demo_model_path; print(demo_model_path())")
fi
NAME=$(basename "$MODEL")
F32="$WORK/$NAME-f32.gguf"
if [ ! -s "$F32" ]; then
    # The converter refuses BPE tokenizers whose pre-tokenizer hash it does not know (the demo
    # model's is its own; decode speed does not depend on it, so unknown ones are written as gpt2),
    # and imports sentencepiece before it looks for a tokenizer.model.
    PYTHONPATH="$SRC/gguf-py:$SRC" "$PY" - "$MODEL" --outtype f32 --outfile "$F32" <<'EOF'
import sys
import conversion.base as base
import convert_hf_to_gguf
known = base.TextModel.get_vocab_base_pre
def vocab_base_pre(self, tokenizer):
    try:
        return known(self, tokenizer)
    except NotImplementedError:
        return "gpt-2"
base.TextModel.get_vocab_base_pre = vocab_base_pre
sentencepiece = base.TextModel._set_vocab_sentencepiece
def vocab_sentencepiece(self, *args, **kwargs):  # a BPE checkpoint needs no sentencepiece module
    if not (self.dir_model / "tokenizer.model").is_file():
        raise FileNotFoundError("no tokenizer.model")
    return sentencepiece(self, *args, **kwargs)
base.TextModel._set_vocab_sentencepiece = vocab_sentencepiece
sys.argv = ["convert_hf_to_gguf.py", *sys.argv[1:]]
convert_hf_to_gguf.main()
EOF
fi
for q in Q8_0 Q4_0; do
    [ -s "$WORK/$NAME-$q.gguf" ] || quantize "$F32" "$WORK/$NAME-$q.gguf" "$q"
done

# ---- 3. side by side -------------------------------------------------------------------------
MODEL_ARG=()
[ -n "${1:-}" ] && MODEL_ARG=("$MODEL")
Q8="$WORK/$NAME-Q8_0.gguf" Q4="$WORK/$NAME-Q4_0.gguf"
tureen bench single "${MODEL_ARG[@]}" --threads "$THREADS" --repeats "$REPEATS" --decode-tokens "$TOKENS" \
    --variants none,int8,int8+lm_head,int8-a8+lm_head,int4,int4+lm_head,int4-a8+lm_head \
    --llama-bench "$BENCH" --gguf "none=$F32" --gguf "int8=$Q8" --gguf "int8+lm_head=$Q8" \
    --gguf "int8-a8+lm_head=$Q8" --gguf "int4=$Q4" --gguf "int4+lm_head=$Q4" --gguf "int4-a8+lm_head=$Q4" \
    --output-dir "$OUT"
