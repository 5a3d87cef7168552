/* llama-bench's text-generation test (-p 0 -n N) on libllama's C API alone, for a llama.cpp build
 * whose llama-common library (which llama-bench links) is not built yet: the same loop, one token
 * per llama_decode, memory cleared before each repetition, one warm-up token first.
 *
 *   cc -O2 -o llamacpp-decode-bench scripts/llamacpp_decode_bench.c -I$SRC/include -I$SRC/ggml/include \
 *      -L$BUILD/bin -lllama -Wl,-rpath,$BUILD/bin
 *   llamacpp-decode-bench -m model.gguf -p 0 -n 128 -r 1 -t 1 -o json   ->  [{"avg_ts": ..., "n_gen": 128}]
 * Also: llamacpp-decode-bench --quantize in.gguf out.gguf Q8_0|Q4_0 (llama-quantize's default mix). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "llama.h"

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static void quiet(enum ggml_log_level level, const char *text, void *data) {
    (void)data;
    if (level >= GGML_LOG_LEVEL_ERROR) fputs(text, stderr);
}

static int quantize(const char *in, const char *out, const char *type) {
    llama_model_quantize_params p = llama_model_quantize_default_params();
    p.ftype = strcmp(type, "Q8_0") == 0 ? LLAMA_FTYPE_MOSTLY_Q8_0 : LLAMA_FTYPE_MOSTLY_Q4_0;
    return (int)llama_model_quantize(in, out, &p);
}

int main(int argc, char **argv) {
    const char *model_path = 0;
    int n_gen = 128, reps = 5, threads = 1;
    llama_log_set(quiet, 0);
    llama_backend_init();
    if (argc == 5 && strcmp(argv[1], "--quantize") == 0) return quantize(argv[2], argv[3], argv[4]);
    for (int i = 1; i + 1 < argc; i += 2) {
        if (!strcmp(argv[i], "-m")) model_path = argv[i + 1];
        else if (!strcmp(argv[i], "-n")) n_gen = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "-r")) reps = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "-t")) threads = atoi(argv[i + 1]);
        /* -p 0 and -o json are what this tool always does */
    }
    if (!model_path) {
        fprintf(stderr, "usage: %s -m model.gguf [-n 128] [-r 5] [-t 1] | --quantize in out Q8_0|Q4_0\n", argv[0]);
        return 2;
    }
    struct llama_model *model = llama_model_load_from_file(model_path, llama_model_default_params());
    if (!model) return 1;
    struct llama_context_params cp = llama_context_default_params();
    cp.n_ctx = n_gen + 16;
    cp.n_batch = cp.n_ubatch = 512;
    cp.n_threads = cp.n_threads_batch = threads;
    struct llama_context *ctx = llama_init_from_model(model, cp);
    if (!ctx) return 1;
    const int n_vocab = llama_vocab_n_tokens(llama_model_get_vocab(model));
    llama_token tok = 0;
    llama_decode(ctx, llama_batch_get_one(&tok, 1)); /* warm-up */
    llama_synchronize(ctx);
    double total = 0;
    for (int r = 0; r < reps; r++) {
        llama_memory_clear(llama_get_memory(ctx), false);
        const double t0 = now_s();
        for (int i = 0; i < n_gen; i++) {
            tok = rand() % n_vocab;
            if (llama_decode(ctx, llama_batch_get_one(&tok, 1))) return 1;
            llama_synchronize(ctx);
        }
        total += now_s() - t0;
    }
    printf("[{\"avg_ts\": %.3f, \"n_gen\": %d, \"repetitions\": %d, \"threads\": %d}]\n", n_gen * reps / total, n_gen,
           reps, threads);
    llama_free(ctx);
    llama_model_free(model);
    return 0;
}
