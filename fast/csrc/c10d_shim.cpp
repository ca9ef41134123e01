// PyTorch's own c10d (TCPStore + ProcessGroupNCCL) behind the C ABI in c10d_shim.h.
// Built only with the cargo feature `nccl` (see fast/build.rs). Every entry point catches every
// exception and returns its message; nothing unwinds into Rust.
#include "c10d_shim.h"

#include "ffi_error.h"

#include <ATen/ATen.h>
#include <c10/cuda/CUDAFunctions.h>
#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>

#include <chrono>
#include <cstdlib>
#include <mutex>
#include <cstring>
#include <exception>
#include <sstream>
#include <string>
#include <vector>

struct FastC10dGroup {
  c10::intrusive_ptr<c10d::Store> store;
  c10::intrusive_ptr<c10d::ProcessGroupNCCL> pg;
  int rank;
  int world;
  int local_rank;
  // Collectives started by c10d_shim_all_reduce_sum_async, not yet waited for.
  std::mutex pending_mu;
  std::vector<c10::intrusive_ptr<c10d::Work>> pending;
};

namespace {

std::vector<at::Tensor> checked_tensors(const FastC10dGroup* g, void* const* tensors, size_t n,
                                        const char* op) {
  std::vector<at::Tensor> out;
  out.reserve(n);
  for (size_t i = 0; i < n; ++i) {
    TORCH_CHECK(tensors[i] != nullptr, op, ": tensor ", i, " is null");
    const at::Tensor& t = *static_cast<at::Tensor*>(tensors[i]);
    TORCH_CHECK(t.defined(), op, ": tensor ", i, " is undefined");
    TORCH_CHECK(t.is_cuda() && t.get_device() == g->local_rank, op, ": tensor ", i, " is on ",
                t.device(), " but rank ", g->rank, " owns cuda:", g->local_rank);
    TORCH_CHECK(t.layout() == c10::kStrided && t.is_contiguous(), op, ": tensor ", i,
                " must be dense and contiguous");
    out.push_back(t);
  }
  return out;
}

}  // namespace

extern "C" {

char* c10d_shim_init(const char* host, uint16_t port, int is_server, int rank, int world,
                     int local_rank, int64_t timeout_ms, const char* store_prefix,
                     FastC10dGroup** out) {
  if (out == nullptr) return mm_ffi::c_string("c10d_shim_init: out is null");
  *out = nullptr;
  return mm_ffi::guard("c10d init", [&] {
    TORCH_CHECK(host != nullptr && store_prefix != nullptr, "host and store_prefix are required");
    TORCH_CHECK(world >= 1 && rank >= 0 && rank < world, "rank ", rank, " outside world ", world);
    const auto n_dev = c10::cuda::device_count();
    TORCH_CHECK(local_rank >= 0 && local_rank < n_dev, "LOCAL_RANK ", local_rank,
                " but this process sees ", static_cast<int>(n_dev), " CUDA device(s)");
    // Each rank selects its own device before NCCL sets up communicators.
    c10::cuda::set_device(static_cast<c10::DeviceIndex>(local_rank));
    const auto timeout = std::chrono::milliseconds(timeout_ms);

    // As torch.distributed's env:// rendezvous: world size as the worker count, rank 0 hosts the
    // store unless torchrun's agent already does (then every rank is a client).
    c10d::TCPStoreOptions so;
    so.port = port;
    so.isServer = is_server != 0;
    so.numWorkers = static_cast<size_t>(world);
    so.waitWorkers = true;
    so.timeout = timeout;
    so.multiTenant = is_server != 0;
    auto tcp = c10::make_intrusive<c10d::TCPStore>(std::string(host), so);
    c10::intrusive_ptr<c10d::Store> store =
        c10::make_intrusive<c10d::PrefixStore>(std::string(store_prefix), tcp);

    auto opts = c10d::ProcessGroupNCCL::Options::create();
    opts->timeout = timeout;
    auto pg = c10::make_intrusive<c10d::ProcessGroupNCCL>(store, rank, world, opts);
    pg->setGroupUid("0");  // the default group's name in torch.distributed
    auto* group = new FastC10dGroup();
    group->store = store;
    group->pg = pg;
    group->rank = rank;
    group->world = world;
    group->local_rank = local_rank;
    *out = group;
  });
}

namespace {
// Enqueues a sum over ranks of each tensor on NCCL's stream (ordered after the current stream's
// work so far; ProcessGroupNCCL takes one tensor per call) and returns the collectives' Work.
std::vector<c10::intrusive_ptr<c10d::Work>> start_sums(FastC10dGroup* g,
                                                       const std::vector<at::Tensor>& ts) {
  c10d::AllreduceOptions opts;
  opts.reduceOp = c10d::ReduceOp::SUM;
  std::vector<c10::intrusive_ptr<c10d::Work>> works;
  for (const auto& t : ts) {
    std::vector<at::Tensor> one{t};
    works.push_back(g->pg->allreduce(one, opts));
  }
  return works;
}
}  // namespace

char* c10d_shim_all_reduce_sum(FastC10dGroup* g, void* const* tensors, size_t n) {
  if (g == nullptr) return mm_ffi::c_string("all_reduce_sum: group is null");
  return mm_ffi::guard("all_reduce_sum", [&] {
    // Enqueue all, then make the current stream wait.
    for (auto& w : start_sums(g, checked_tensors(g, tensors, n, "all_reduce_sum"))) w->wait();
  });
}

char* c10d_shim_all_reduce_sum_async(FastC10dGroup* g, void* const* tensors, size_t n) {
  if (g == nullptr) return mm_ffi::c_string("all_reduce_sum_async: group is null");
  return mm_ffi::guard("all_reduce_sum_async", [&] {
    auto works = start_sums(g, checked_tensors(g, tensors, n, "all_reduce_sum_async"));
    std::lock_guard<std::mutex> lock(g->pending_mu);
    g->pending.insert(g->pending.end(), works.begin(), works.end());
  });
}

char* c10d_shim_wait_pending(FastC10dGroup* g) {
  if (g == nullptr) return mm_ffi::c_string("wait_pending: group is null");
  return mm_ffi::guard("wait_pending", [&] {
    std::vector<c10::intrusive_ptr<c10d::Work>> works;
    {
      std::lock_guard<std::mutex> lock(g->pending_mu);
      works.swap(g->pending);
    }
    for (auto& w : works) w->wait();
  });
}

char* c10d_shim_broadcast(FastC10dGroup* g, void* const* tensors, size_t n, int root) {
  if (g == nullptr) return mm_ffi::c_string("broadcast: group is null");
  return mm_ffi::guard("broadcast", [&] {
    TORCH_CHECK(root >= 0 && root < g->world, "root ", root, " outside world ", g->world);
    auto ts = checked_tensors(g, tensors, n, "broadcast");
    c10d::BroadcastOptions opts;
    opts.rootRank = root;
    opts.rootTensor = 0;
    std::vector<c10::intrusive_ptr<c10d::Work>> works;
    for (auto& t : ts) {
      std::vector<at::Tensor> one{t};
      works.push_back(g->pg->broadcast(one, opts));
    }
    for (auto& w : works) w->wait();
  });
}

char* c10d_shim_barrier(FastC10dGroup* g) {
  if (g == nullptr) return mm_ffi::c_string("barrier: group is null");
  return mm_ffi::guard("barrier", [&] {
    auto t = at::ones({1}, at::TensorOptions().dtype(at::kFloat).device(at::kCUDA, g->local_rank));
    std::vector<at::Tensor> one{t};
    g->pg->allreduce(one)->wait();
    const float got = t.item<float>();  // host sync: every rank has arrived
    TORCH_CHECK(got == static_cast<float>(g->world), "barrier allreduce gave ", got,
                ", expected ", g->world);
  });
}

// ---- failure notices through the store (the monitor in nccl.rs) ----------------------------
// A handle of its own on the group's store, so the monitor thread outlives an aborted group.
struct FastC10dStore {
  c10::intrusive_ptr<c10d::Store> store;
};

FastC10dStore* c10d_shim_store_handle(FastC10dGroup* g) {
  if (g == nullptr) return nullptr;
  return new FastC10dStore{g->store};
}

void c10d_shim_store_free(FastC10dStore* s) {
  try { delete s; } catch (...) {}
}

// store[key] = value.
char* c10d_shim_store_set(FastC10dStore* s, const char* key, const char* value) {
  if (s == nullptr) return mm_ffi::c_string("store_set: store is null");
  return mm_ffi::guard("store set", [&] {
    std::string v(value);
    s->store->set(key, std::vector<uint8_t>(v.begin(), v.end()));
  });
}

// *value = store[key] (malloc'ed) if the key is set, else nullptr; never blocks.
char* c10d_shim_store_try_get(FastC10dStore* s, const char* key, char** value) {
  if (s == nullptr) return mm_ffi::c_string("store_try_get: store is null");
  *value = nullptr;
  return mm_ffi::guard("store check", [&] {
    if (s->store->check({std::string(key)})) {
      auto bytes = s->store->get(key);
      *value = mm_ffi::c_string(std::string(bytes.begin(), bytes.end()));
    }
  });
}

// *out = (store[key] += delta), as an integer counter.
char* c10d_shim_store_add(FastC10dStore* s, const char* key, int64_t delta, int64_t* out) {
  if (s == nullptr) return mm_ffi::c_string("store_add: store is null");
  return mm_ffi::guard("store add", [&] { *out = s->store->add(key, delta); });
}

char* c10d_shim_shutdown(FastC10dGroup* g) {
  if (g == nullptr) return nullptr;
  char* err = mm_ffi::guard("shutdown", [&] { g->pg->shutdown(); });
  if (err != nullptr) {
    try { g->pg->abort(); } catch (...) {}
  }
  try { delete g; } catch (...) {}
  return err;
}

void c10d_shim_abort(FastC10dGroup* g) {
  if (g == nullptr) return;
  try { g->pg->abort(); } catch (...) {}
  try { delete g; } catch (...) {}
}

void c10d_shim_free_string(char* s) { std::free(s); }

}  // extern "C"
