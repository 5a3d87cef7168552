/* A parallel runtime that does not wait for a descheduled thread.
 *
 * On a machine where the engine shares its cores with the API server and the benchmark client,
 * one of the engine's threads is regularly descheduled in the middle of a step. With OpenMP (or any
 * fork/join runtime) every region then waits at its barrier for that thread: its share of the
 * region, and every region after it, stalls for the rest of the other process's time slice.
 *
 * Here a call runs a *program*: a list of ops executed one after another, each split into tasks.
 * Every thread, the caller included, runs the same loop: take a task of the live op, run it,
 * and when the op is complete, publish the next. No thread is needed for progress:
 *
 * - a task computes into its thread's private buffer and *commits* (copies to the real output)
 *   only after winning a compare-and-swap on the task's state word, so a task can be computed
 *   twice and is written once;
 * - a thread that runs out of tasks while one is still in progress for longer than a grace period
 *   (a few times its own task time) computes that task itself: a descheduled owner costs the grace
 *   and one task, not its time slice. Whoever finishes first commits; the other's result is dropped;
 * - whoever finds the op complete publishes the next one, so a descheduled caller does not hold the
 *   others up either.
 *
 * Tasks must therefore read only inputs that no commit of the same op changes (in-place ops compute
 * the new values in the buffer and write them in the commit), and every input must stay valid until
 * the call returns: a thread descheduled in a task may resume late and compute from stale inputs
 * (its result is then dropped), and the call waits for every thread to leave its task before it
 * returns. State words and ranges carry the op's epoch, so a late thread can never take or commit
 * a task of a later op.
 */
#ifndef TUREEN_POOL_H
#define TUREEN_POOL_H

#include <stdint.h>

typedef struct TpOp TpOp;
/* Compute task i of op into priv (op->priv_floats floats, this thread's own). */
typedef void (*TpTask)(const TpOp *op, int64_t i, float *priv);
/* Write task i's result from priv to the op's output. Runs once per task, after its TpTask. */
typedef void (*TpCommit)(const TpOp *op, int64_t i, const float *priv);

#define TP_ARGS 24

struct TpOp {
    int64_t ntasks;
    int64_t priv_floats;
    TpTask task;
    TpCommit commit;
    /* The kernel's own arguments: one of the *Args structs of tasks.h, copied in. */
    _Alignas(16) unsigned char args[TP_ARGS * 8];
};

/* Run program[0 .. nops) on num_threads threads (the caller and num_threads - 1 workers); on the
 * calling thread alone when num_threads is 1 or another thread is in a call. Returns 0, or -1 when
 * a buffer could not be allocated (nothing has run then). */
int tp_run(const TpOp *program, int64_t nops, int num_threads);

#endif
