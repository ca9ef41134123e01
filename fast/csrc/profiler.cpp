// libtorch's Kineto profiler (what torch.profiler drives from Python), for `fast bench --profile`:
// start, run a few steps, stop; the trace is saved for chrome://tracing / Perfetto and the GPU
// time is summed per (aten op, kernel) so the bench can print where a step's time goes.
// Needs only libtorch's headers. Entry points never throw into Rust: they return nullptr on
// success or a malloc'd message freed with mm_prof_free.
#include <torch/csrc/autograd/profiler_kineto.h>

#include "ffi_error.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <map>
#include <set>
#include <sstream>
#include <string>
#include <unordered_map>

namespace {
namespace prof = torch::autograd::profiler;
using torch::profiler::impl::ActivityType;
using torch::profiler::impl::ProfilerConfig;
using torch::profiler::impl::ProfilerState;

std::set<ActivityType> activities(bool cuda) {
  std::set<ActivityType> a{ActivityType::CPU};
  if (cuda) a.insert(ActivityType::CUDA);
  return a;
}

ProfilerConfig config() { return ProfilerConfig(ProfilerState::KINETO); }
bool g_cuda = false;
}  // namespace

extern "C" {
void mm_prof_free(char *s) { std::free(s); }

char *mm_prof_start(int cuda) {
  try {
    g_cuda = cuda != 0;
    prof::prepareProfiler(config(), activities(g_cuda));
    prof::enableProfiler(config(), activities(g_cuda));
    return nullptr;
  } catch (const std::exception &e) {
    return mm_ffi::c_string(e.what());
  }
}

// Stops the profiler, saves the trace to `trace_path` (if not null) and writes into *summary a
// TSV, one line per (op, kernel): total device ns, count, op name, kernel name. The op is the
// innermost aten op that launched the kernel (correlation id), "-" when none.
char *mm_prof_stop(const char *trace_path, char **summary) {
  try {
    auto result = prof::disableProfiler();
    if (!result) return mm_ffi::c_string("the profiler was not running");
    std::unordered_map<uint64_t, std::string> op_of;
    for (const auto &e : result->events()) {
      if (e.deviceType() == c10::DeviceType::CPU) op_of[e.correlationId()] = e.name();
    }
    std::map<std::pair<std::string, std::string>, std::pair<uint64_t, uint64_t>> sums;
    for (const auto &e : result->events()) {
      if (e.deviceType() != c10::DeviceType::CUDA) continue;
      auto it = op_of.find(e.linkedCorrelationId());
      std::string op = it == op_of.end() ? "-" : it->second;
      auto &s = sums[{op, e.name()}];
      s.first += e.durationNs();
      s.second += 1;
    }
    std::vector<std::pair<std::pair<std::string, std::string>, std::pair<uint64_t, uint64_t>>> rows(
        sums.begin(), sums.end());
    std::sort(rows.begin(), rows.end(),
              [](const auto &a, const auto &b) { return a.second.first > b.second.first; });
    std::ostringstream out;
    for (const auto &r : rows) {
      std::string kernel = r.first.second;
      std::replace(kernel.begin(), kernel.end(), '\t', ' ');
      std::replace(kernel.begin(), kernel.end(), '\n', ' ');
      out << r.second.first << '\t' << r.second.second << '\t' << r.first.first << '\t' << kernel
          << '\n';
    }
    *summary = mm_ffi::c_string(out.str());
    if (trace_path) result->save(trace_path);
    return nullptr;
  } catch (const std::exception &e) {
    return mm_ffi::c_string(e.what());
  }
}
}
