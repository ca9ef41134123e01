// The C ABI's error convention, shared by ops.cpp, fused_ops.cpp and profiler.cpp: an entry
// point never throws into Rust; it returns nullptr on success or a malloc'd message, which the
// caller frees (mm_free_error / mm_prof_free: std::free).
#pragma once
#include <c10/util/Exception.h>

#include <cstdlib>
#include <cstring>
#include <exception>
#include <string>

namespace mm_ffi {

// A malloc'd copy of `what`.
inline char *error(const std::string &what) {
  char *s = static_cast<char *>(std::malloc(what.size() + 1));
  if (s != nullptr) std::memcpy(s, what.c_str(), what.size() + 1);
  return s;
}

// Runs f; any exception becomes its message (libtorch's without the C++ backtrace).
template <typename F>
char *guard(F f) {
  try {
    f();
    return nullptr;
  } catch (const c10::Error &e) {
    return error(e.what_without_backtrace());
  } catch (const std::exception &e) {
    return error(e.what());
  } catch (...) {
    return error("unknown C++ exception");
  }
}

}  // namespace mm_ffi
