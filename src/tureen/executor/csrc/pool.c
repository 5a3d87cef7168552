/* The runtime of pool.h: persistent worker threads, ops published by epoch, tasks handed out from
 * static ranges with stealing (as panels.h, but with the op's epoch in every range word), state
 * words with the epoch in them, and recomputation of tasks whose owner stopped.
 *
 * Epochs: every op of every call gets the next number. P.epoch is the live op's; the ring slot
 * epoch % RING describes it once its seq equals the epoch. A task's state word is
 * (epoch << 2) | state: a word from an older epoch means "not claimed yet". */
#define _GNU_SOURCE
#include "pool.h"

#include <limits.h>
#include <linux/futex.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdlib.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#define TP_MAX_THREADS 64
#define RING 4
/* A worker with nothing to do spins SPIN_NS, then offers its core to others (sched_yield) until
 * YIELD_NS, then sleeps: a decode step starts every few milliseconds, and a futex wake-up costs
 * tens of microseconds on a VM (measured: sleeping after 50 us made back-to-back batch-1 steps 18% slower). */
#define SPIN_NS 50000
#define YIELD_NS 2000000
/* A task may run this long, or 4 times the waiting thread's own task time, before others recompute
 * it; GRACE_IDLE_NS for a thread that has not timed a task of the op. */
#define GRACE_MIN_NS 10000
#define GRACE_IDLE_NS 30000
/* A range word: the op's epoch in TAG_BITS (a thread late by 2^28 ops could mistake an op for its
 * own), and next and end in IDX_BITS each: up to 262,143 tasks an op (more run on one thread). */
#define IDX_BITS 18
#define TAG_BITS (64 - 2 * IDX_BITS)
#define MAX_TASKS ((1 << IDX_BITS) - 1)

enum { DONE = 0, CLAIMED = 1, STOLEN = 2, WRITING = 3 };

typedef struct {
    _Alignas(64) uint64_t word; /* (tag << 2 IDX_BITS) | (end << IDX_BITS) | next */
    char pad[56];
} Range;

typedef struct {
    _Alignas(64) int64_t n; /* tasks this thread committed (a line each: no thread waits on another's) */
    char pad[56];
} Count;

typedef struct {
    _Alignas(64) uint64_t seq; /* the epoch described; 0 while the slot is rewritten */
    int64_t op, ntasks;
    int32_t nt;
    Range ranges[TP_MAX_THREADS];
    Count done[TP_MAX_THREADS];
} Region;

typedef struct {
    _Alignas(64) int32_t in_task; /* between taking a task and leaving it */
    float *priv;
    int64_t cap;
} Thread;

static struct {
    pthread_mutex_t lock; /* one call at a time */
    _Alignas(64) uint64_t epoch;
    _Alignas(64) uint64_t advance; /* the live op whose successor nobody has set up yet */
    _Alignas(64) uint32_t wake;
    int32_t sleepers;
    _Alignas(64) const TpOp *program;
    int64_t nops;
    uint64_t *words;
    int64_t words_cap;
    int workers;
    Region ring[RING];
    Thread th[TP_MAX_THREADS];
    int64_t steals, dropped, alone; /* statistics (tests): tasks recomputed, results dropped, calls run alone */
    int64_t stall_every, stall_ns; /* test-only: tureen_pool_debug_stall */
    int64_t stall_count[2];
} P = {.lock = PTHREAD_MUTEX_INITIALIZER};

static inline uint64_t load(const uint64_t *p) { return __atomic_load_n(p, __ATOMIC_ACQUIRE); }
static inline void store(uint64_t *p, uint64_t v) { __atomic_store_n(p, v, __ATOMIC_RELEASE); }
static inline int cas(uint64_t *p, uint64_t expect, uint64_t want) {
    return __atomic_compare_exchange_n(p, &expect, want, 0, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE);
}

static inline void relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield");
#endif
}

static int64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

/* ---- ranges: a thread's own tasks front to back, then the far end of the fullest range ---- */

#define TAG(e) ((uint64_t)(e) & ((1ull << TAG_BITS) - 1))
#define RANGE(tag, next, end) (((uint64_t)(tag) << 2 * IDX_BITS) | ((uint64_t)(end) << IDX_BITS) | (uint64_t)(next))
#define RANGE_TAG(w) ((w) >> 2 * IDX_BITS)
#define RANGE_END(w) ((int64_t)(((w) >> IDX_BITS) & MAX_TASKS))
#define RANGE_NEXT(w) ((int64_t)((w) & MAX_TASKS))

static int64_t range_take(Range *r, uint64_t tag, int steal) {
    uint64_t w = __atomic_load_n(&r->word, __ATOMIC_ACQUIRE);
    for (;;) {
        const int64_t next = RANGE_NEXT(w), end = RANGE_END(w);
        if (RANGE_TAG(w) != tag || next >= end) return -1;
        const uint64_t want = steal ? RANGE(tag, next, end - 1) : RANGE(tag, next + 1, end);
        if (__atomic_compare_exchange_n(&r->word, &w, want, 0, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE))
            return steal ? end - 1 : next;
    }
}

static int64_t take(Region *g, int nt, int self, uint64_t tag) {
    const int64_t own = range_take(&g->ranges[self], tag, 0);
    if (own >= 0) return own;
    for (;;) {
        int victim = -1;
        int64_t most = 0;
        for (int t = 0; t < nt; t++) {
            const uint64_t w = __atomic_load_n(&g->ranges[t].word, __ATOMIC_RELAXED);
            const int64_t left = RANGE_END(w) - RANGE_NEXT(w);
            if (RANGE_TAG(w) == tag && left > most) most = left, victim = t;
        }
        if (victim < 0) return -1;
        const int64_t p = range_take(&g->ranges[victim], tag, 1);
        if (p >= 0) return p;
    }
}

/* ---- publishing ops --------------------------------------------------------------------------- */

static void wake_all(void) {
    __atomic_add_fetch(&P.wake, 1, __ATOMIC_SEQ_CST);
    if (__atomic_load_n(&P.sleepers, __ATOMIC_SEQ_CST) > 0)
        syscall(SYS_futex, &P.wake, FUTEX_WAKE_PRIVATE, INT_MAX, NULL, NULL, 0);
}

/* Describe op `op` as epoch e in its ring slot, then make it live. */
static void publish(uint64_t e, int64_t op, int nt) {
    Region *g = &P.ring[e % RING];
    store(&g->seq, 0);
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    const int64_t n = P.program[op].ntasks;
    g->op = op, g->ntasks = n, g->nt = nt;
    for (int t = 0; t < nt; t++) { /* ranges rounded up: an op of one task is the caller's, and stays in its cache */
        const int64_t lo = (n * t + nt - 1) / nt, hi = (n * (t + 1) + nt - 1) / nt;
        __atomic_store_n(&g->done[t].n, 0, __ATOMIC_RELAXED);
        __atomic_store_n(&g->ranges[t].word, RANGE(TAG(e), lo, hi), __ATOMIC_RELAXED);
    }
    store(&g->seq, e);
    __atomic_store_n(&P.advance, e, __ATOMIC_SEQ_CST);
    __atomic_store_n(&P.epoch, e, __ATOMIC_SEQ_CST);
    wake_all();
}

/* Op e is complete: whoever wins sets up the next (or ends the call: epoch past the last op). */
static void advance(uint64_t e, int64_t op, int nt) {
    if (!cas(&P.advance, e, e + 1)) return;
    if (op + 1 < P.nops) {
        publish(e + 1, op + 1, nt);
    } else {
        __atomic_store_n(&P.epoch, e + 1, __ATOMIC_SEQ_CST);
        wake_all();
    }
}

/* ---- running tasks ---------------------------------------------------------------------------- */

/* Commit task i of op e unless someone has: the owner from CLAIMED, or from STOLEN when its thief
 * has not finished yet; the thief from STOLEN. Whoever reaches WRITING first writes. */
static void finish(Region *g, const TpOp *op, uint64_t e, int64_t i, const float *priv, int owner, int self) {
    uint64_t *w = &P.words[i];
    const int won = cas(w, e << 2 | (owner ? CLAIMED : STOLEN), e << 2 | WRITING) ||
                    (owner && cas(w, e << 2 | STOLEN, e << 2 | WRITING));
    if (!won) {
        __atomic_add_fetch(&P.dropped, 1, __ATOMIC_RELAXED);
        return;
    }
    op->commit(op, i, priv);
    store(w, e << 2 | DONE);
    __atomic_store_n(&g->done[self].n, __atomic_load_n(&g->done[self].n, __ATOMIC_RELAXED) + 1, __ATOMIC_RELEASE);
}

/* Whether every task of the op in g has been committed. */
static int complete(Region *g, int nt, int64_t n) {
    int64_t sum = 0;
    for (int t = 0; t < nt; t++) sum += __atomic_load_n(&g->done[t].n, __ATOMIC_ACQUIRE);
    return sum == n;
}

/* Test-only: stall point 0 is after taking a task, 1 after computing it (each counted apart). */
static void maybe_stall(int self, int point) {
    if (!P.stall_every || self == 0) return;
    if (__atomic_add_fetch(&P.stall_count[point], 1, __ATOMIC_RELAXED) % P.stall_every == 0) {
        const struct timespec ts = {0, P.stall_ns};
        nanosleep(&ts, NULL);
    }
}

/* Take and run tasks of op e until none is left; returns this thread's time per task (0: none). */
static int64_t run_tasks(Region *g, const TpOp *op, uint64_t e, int nt, int self) {
    Thread *me = &P.th[self];
    int64_t count = 0;
    const int64_t start = now_ns();
    for (;;) {
        __atomic_store_n(&me->in_task, 1, __ATOMIC_SEQ_CST);
        const int64_t i = take(g, nt, self, TAG(e));
        if (i < 0) break;
        maybe_stall(self, 0);
        /* A word of this op: stolen already; of a later op: this thread is late and op e is over. */
        const uint64_t w = load(&P.words[i]);
        if ((w >> 2) >= e || !cas(&P.words[i], w, e << 2 | CLAIMED)) continue;
        op->task(op, i, me->priv);
        maybe_stall(self, 1);
        finish(g, op, e, i, me->priv, 1, self);
        count++;
    }
    __atomic_store_n(&me->in_task, 0, __ATOMIC_SEQ_CST);
    return count ? (now_ns() - start) / count : 0;
}

/* Recompute one task of op e that is taken but not finished; returns whether there was one.
 * in_task goes up before op e is checked to be live, so the call cannot end (and its buffers go)
 * while this thread looks at its state words. */
static int steal_one(Region *g, const TpOp *op, uint64_t e, int64_t n, int self) {
    Thread *me = &P.th[self];
    int stole = 0;
    __atomic_store_n(&me->in_task, 1, __ATOMIC_SEQ_CST);
    if (__atomic_load_n(&P.epoch, __ATOMIC_SEQ_CST) == e) {
        for (int64_t i = 0; i < n && !stole; i++) {
            const uint64_t w = load(&P.words[i]);
            if ((w >> 2) > e) break;                           /* a later op's word: op e is over */
            if ((w >> 2) == e && (w & 3) != CLAIMED) continue; /* done, being written, or stolen */
            if (cas(&P.words[i], w, e << 2 | STOLEN)) {
                __atomic_add_fetch(&P.steals, 1, __ATOMIC_RELAXED);
                op->task(op, i, me->priv);
                finish(g, op, e, i, me->priv, 0, self);
                stole = 1;
            }
        }
    }
    __atomic_store_n(&me->in_task, 0, __ATOMIC_SEQ_CST);
    return stole;
}

/* Work on live ops until there is none (the call ended, or has not started). */
static void participate(int self) {
    for (;;) {
        const uint64_t e = __atomic_load_n(&P.epoch, __ATOMIC_ACQUIRE);
        Region *g = &P.ring[e % RING];
        if (load(&g->seq) != e) return;
        const int64_t opi = g->op, n = g->ntasks;
        const int nt = g->nt;
        if (load(&g->seq) != e) continue;
        if (self >= nt) return;
        const TpOp *op = &P.program[opi];
        const int64_t per_task = run_tasks(g, op, e, nt, self);
        const int64_t grace = per_task ? (4 * per_task > GRACE_MIN_NS ? 4 * per_task : GRACE_MIN_NS) : GRACE_IDLE_NS;
        int64_t idle = now_ns();
        while (__atomic_load_n(&P.epoch, __ATOMIC_ACQUIRE) == e) {
            if (complete(g, nt, n)) {
                advance(e, opi, nt);
                break;
            }
            relax();
            const int64_t t = now_ns();
            if (t - idle > grace) {
                steal_one(g, op, e, n, self);
                idle = now_ns();
            }
        }
    }
}

static void *worker_main(void *arg) {
    const int self = (int)(intptr_t)arg;
    for (;;) {
        participate(self);
        const uint64_t e = __atomic_load_n(&P.epoch, __ATOMIC_ACQUIRE);
        const int64_t start = now_ns();
        int64_t waited = 0;
        while (__atomic_load_n(&P.epoch, __ATOMIC_ACQUIRE) == e && (waited = now_ns() - start) < YIELD_NS) {
            if (waited < SPIN_NS)
                relax();
            else
                sched_yield();
        }
        const uint32_t seen = __atomic_load_n(&P.wake, __ATOMIC_SEQ_CST);
        __atomic_add_fetch(&P.sleepers, 1, __ATOMIC_SEQ_CST);
        if (__atomic_load_n(&P.epoch, __ATOMIC_SEQ_CST) == e)
            syscall(SYS_futex, &P.wake, FUTEX_WAIT_PRIVATE, seen, NULL, NULL, 0);
        __atomic_sub_fetch(&P.sleepers, 1, __ATOMIC_SEQ_CST);
    }
    return NULL;
}

/* ---- calls ------------------------------------------------------------------------------------ */

static void after_fork_child(void) {
    /* The workers did not survive the fork; the child starts its own on its first call. */
    pthread_mutex_init(&P.lock, NULL);
    P.workers = 0;
    P.sleepers = 0;
    for (int t = 0; t < TP_MAX_THREADS; t++) P.th[t].in_task = 0;
}

static int start_workers(int want) {
    static int registered;
    if (!registered) {
        pthread_atfork(NULL, NULL, after_fork_child);
        registered = 1;
    }
    while (P.workers < want) {
        sigset_t all, old;
        sigfillset(&all);
        pthread_sigmask(SIG_SETMASK, &all, &old); /* signals go to the interpreter's threads */
        pthread_t tid;
        pthread_attr_t attr;
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        const int rc = pthread_create(&tid, &attr, worker_main, (void *)(intptr_t)(P.workers + 1));
        pthread_attr_destroy(&attr);
        pthread_sigmask(SIG_SETMASK, &old, NULL);
        if (rc) return -1;
        P.workers++;
    }
    return 0;
}

/* Buffers for this call, grown while no thread is in a task (the previous call waited for that). */
static int reserve(const TpOp *program, int64_t nops, int nt) {
    int64_t tasks = 0, priv = 1;
    for (int64_t k = 0; k < nops; k++) {
        if (program[k].ntasks > tasks) tasks = program[k].ntasks;
        if (program[k].priv_floats > priv) priv = program[k].priv_floats;
    }
    if (tasks > MAX_TASKS) return -1;
    if (tasks > P.words_cap) {
        uint64_t *w = calloc((size_t)tasks, sizeof *w); /* epoch 0: never a live op's */
        if (!w) return -1;
        free(P.words);
        P.words = w, P.words_cap = tasks;
    }
    for (int t = 0; t < nt; t++) {
        if (P.th[t].cap >= priv) continue;
        float *b = aligned_alloc(64, (size_t)((priv * 4 + 63) / 64 * 64));
        if (!b) return -1;
        free(P.th[t].priv);
        P.th[t].priv = b, P.th[t].cap = priv;
    }
    return 0;
}

/* The program on the calling thread alone (another thread holds the pool). */
static int run_serial(const TpOp *program, int64_t nops) {
    int64_t priv = 1;
    for (int64_t k = 0; k < nops; k++) priv = program[k].priv_floats > priv ? program[k].priv_floats : priv;
    float *buf = malloc(sizeof(float) * (size_t)priv);
    if (!buf) return -1;
    for (int64_t k = 0; k < nops; k++)
        for (int64_t i = 0; i < program[k].ntasks; i++) {
            program[k].task(program + k, i, buf);
            program[k].commit(program + k, i, buf);
        }
    free(buf);
    return 0;
}

int tp_run(const TpOp *program, int64_t nops, int num_threads) {
    if (nops <= 0) return 0;
    if (num_threads <= 1) return run_serial(program, nops);
    if (pthread_mutex_trylock(&P.lock)) {
        __atomic_add_fetch(&P.alone, 1, __ATOMIC_RELAXED);
        return run_serial(program, nops);
    }
    int nt = num_threads > TP_MAX_THREADS ? TP_MAX_THREADS : num_threads;
    if (start_workers(nt - 1)) nt = P.workers + 1;
    if (reserve(program, nops, nt)) {
        pthread_mutex_unlock(&P.lock);
        return run_serial(program, nops);
    }
    P.program = program, P.nops = nops;
    const uint64_t first = __atomic_load_n(&P.epoch, __ATOMIC_RELAXED) + 1, end = first + (uint64_t)nops;
    publish(first, 0, nt);
    while (__atomic_load_n(&P.epoch, __ATOMIC_ACQUIRE) != end) {
        participate(0);
        relax();
    }
    for (int t = 1; t <= P.workers; t++) /* nobody may still read this call's inputs */
        while (__atomic_load_n(&P.th[t].in_task, __ATOMIC_SEQ_CST)) relax();
    pthread_mutex_unlock(&P.lock);
    return 0;
}

/* For tests: tasks recomputed, results dropped and calls that found the pool busy, since load. */
void tureen_pool_stats(int64_t *out) {
    out[0] = __atomic_load_n(&P.steals, __ATOMIC_RELAXED);
    out[1] = __atomic_load_n(&P.dropped, __ATOMIC_RELAXED);
    out[2] = __atomic_load_n(&P.alone, __ATOMIC_RELAXED);
}

/* Test-only fault: a worker sleeps ns at every every-th of its stall points (0: off), which are
 * after taking a task and after computing it, before committing. */
void tureen_pool_debug_stall(int64_t every, int64_t ns) {
    P.stall_ns = ns;
    __atomic_store_n(&P.stall_every, every, __ATOMIC_SEQ_CST);
}

/* Test-only: hold the pool (on 1) as another thread's call would, or let it go (on 0). */
void tureen_pool_debug_hold(int on) {
    if (on)
        pthread_mutex_lock(&P.lock);
    else
        pthread_mutex_unlock(&P.lock);
}
