/* C ABI over PyTorch's own c10d (TCPStore + ProcessGroupNCCL) for the Rust crate `fast`.
 *
 * Tensors cross the boundary as `at::Tensor*` (tch's `*mut C_tensor`). Every function catches
 * every C++ exception: on failure it returns a non-NULL error string, allocated with malloc,
 * which the caller releases with c10d_shim_free_string. Nothing unwinds into Rust. */
#ifndef FAST_C10D_SHIM_H
#define FAST_C10D_SHIM_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct FastC10dGroup FastC10dGroup;

/* Selects CUDA device `local_rank`, connects to (or, when is_server, hosts) the TCPStore at
 * host:port, prefixes its keys with store_prefix, and creates a ProcessGroupNCCL of `world` ranks
 * whose collectives time out after timeout_ms (the watchdog then aborts the communicators and
 * ends the process). On success *out holds the group and NULL is returned. */
char* c10d_shim_init(const char* host, uint16_t port, int is_server, int rank, int world,
                     int local_rank, int64_t timeout_ms, const char* store_prefix,
                     FastC10dGroup** out);

/* In-place sum over ranks of each tensor (dense, contiguous, on this rank's CUDA device).
 * Enqueued on NCCL's stream; the current CUDA stream waits for it before later work. */
char* c10d_shim_all_reduce_sum(FastC10dGroup* group, void* const* tensors, size_t n);

/* As c10d_shim_all_reduce_sum, ordered after the current stream's work so far, but nothing waits
 * for it until c10d_shim_wait_pending, which makes the then-current stream wait for every such
 * collective. */
char* c10d_shim_all_reduce_sum_async(FastC10dGroup* group, void* const* tensors, size_t n);
char* c10d_shim_wait_pending(FastC10dGroup* group);

/* In place: every rank's tensors receive root's values. */
char* c10d_shim_broadcast(FastC10dGroup* group, void* const* tensors, size_t n, int root);

/* Returns once every rank has reached it (an allreduce of one element, synchronised on the host). */
char* c10d_shim_barrier(FastC10dGroup* group);

/* Graceful end: waits for outstanding work, destroys the communicators, frees the group. */
char* c10d_shim_shutdown(FastC10dGroup* group);

/* Error path: aborts the NCCL communicators without waiting (peers blocked in a collective
 * with us fail instead of hanging), frees the group. Never fails. */
void c10d_shim_abort(FastC10dGroup* group);

void c10d_shim_free_string(char* s);

/* Failure notices (the monitor in nccl.rs): a handle of its own on the group's store, which
 * outlives the group; set, non-blocking get (NULL *value when unset) and counter add. */
typedef struct FastC10dStore FastC10dStore;
FastC10dStore* c10d_shim_store_handle(FastC10dGroup* group);
void c10d_shim_store_free(FastC10dStore* store);
char* c10d_shim_store_set(FastC10dStore* store, const char* key, const char* value);
char* c10d_shim_store_try_get(FastC10dStore* store, const char* key, char** value);
char* c10d_shim_store_add(FastC10dStore* store, const char* key, int64_t delta, int64_t* out);

#ifdef __cplusplus
}
#endif

#endif
