/* How the linear kernels share a weight's panels among threads: static ranges with stealing.
 *
 * Each thread owns one contiguous range of panels, as with schedule(static), and walks it front to
 * back, so its weights stream from memory in order and its next-panel prefetches land in its own
 * cache. A thread that finishes its range takes panels from the far end of the range with the most
 * left. On an idle machine nobody steals and this is schedule(static). When another process holds a
 * core (the API server, a benchmark client) and a thread is descheduled mid-step, the others finish
 * its panels, instead of the whole step waiting for it to be scheduled again; at batch 1 a step is
 * a few milliseconds, and one time slice taken from one thread used to add to every step.
 * schedule(dynamic) tolerates that too, but interleaves the threads' panels, which breaks the
 * sequential streams: batch-1 decode measured 25-35% slower with it.
 *
 * A range is one 64-bit word, (end << 32) | next, changed only by compare-and-swap: the owner moves
 * next up, a thief moves end down, and a panel is handed out exactly once.
 */
#ifndef TUREEN_PANELS_H
#define TUREEN_PANELS_H

#include <stdint.h>

#ifdef _OPENMP
#include <omp.h>
#endif

typedef struct {
    _Alignas(64) int64_t word; /* one range per cache line: owners do not share lines */
    char pad[56];
} PanelRange;

#define PANEL_RANGE(next, end) ((int64_t)(((uint64_t)(end) << 32) | (uint32_t)(next)))

/* n panels split into nt ranges (nt as requested: a range whose thread never starts is stolen). */
static inline void panel_ranges_init(PanelRange *r, int nt, int64_t n) {
    for (int t = 0; t < nt; t++) r[t].word = PANEL_RANGE(n * t / nt, n * (t + 1) / nt);
}

/* One panel from range t: its next (own) or its last (stolen); -1 when the range is empty. */
static inline int64_t panel_take(PanelRange *r, int t, int steal) {
    int64_t w = __atomic_load_n(&r[t].word, __ATOMIC_RELAXED);
    for (;;) {
        const int64_t next = (uint32_t)w, end = (int64_t)((uint64_t)w >> 32);
        if (next >= end) return -1;
        const int64_t want = steal ? PANEL_RANGE(next, end - 1) : PANEL_RANGE(next + 1, end);
        if (__atomic_compare_exchange_n(&r[t].word, &w, want, 0, __ATOMIC_RELAXED, __ATOMIC_RELAXED))
            return steal ? end - 1 : next;
    }
}

/* The calling thread's next panel, or -1 when every range is empty. */
static inline int64_t panel_next(PanelRange *r, int nt, int self) {
    if (self < nt) {
        const int64_t p = panel_take(r, self, 0);
        if (p >= 0) return p;
    }
    for (;;) {
        int victim = -1;
        int64_t most = 0;
        for (int t = 0; t < nt; t++) {
            const int64_t w = __atomic_load_n(&r[t].word, __ATOMIC_RELAXED);
            const int64_t left = (int64_t)((uint64_t)w >> 32) - (uint32_t)w;
            if (left > most) most = left, victim = t;
        }
        if (victim < 0) return -1;
        const int64_t p = panel_take(r, victim, 1);
        if (p >= 0) return p;
    }
}

static inline int panel_thread(void) {
#ifdef _OPENMP
    return omp_get_thread_num();
#else
    return 0;
#endif
}

#endif
