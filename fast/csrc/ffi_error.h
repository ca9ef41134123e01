// The C ABI's error convention, shared by every C++ file the Rust side calls: an entry point
// never throws into Rust; it returns nullptr on success or a malloc'd message, which the caller
// frees with std::free (mm_free_error from ops.cpp for every file's errors; mm_prof_free, c10d_shim_free_string for their strings).
#pragma once
#include <c10/util/Exception.h>

#include <cstdlib>
#include <cstring>
#include <exception>
#include <string>

namespace mm_ffi {

// A malloc'd, NUL-terminated copy of `s` (an error message, or a string handed to Rust); null
// only when out of memory.
inline char *c_string(const std::string &s) {
  char *out = static_cast<char *>(std::malloc(s.size() + 1));
  if (out != nullptr) std::memcpy(out, s.c_str(), s.size() + 1);
  return out;
}

// Runs f; any exception becomes its message (libtorch's without the C++ backtrace), after
// "`what`: " when `what` is given.
template <typename F>
char *guard(const char *what, F f) {
  const std::string prefix = what != nullptr ? std::string(what) + ": " : std::string();
  try {
    f();
    return nullptr;
  } catch (const c10::Error &e) {
    return c_string(prefix + e.what_without_backtrace());
  } catch (const std::exception &e) {
    return c_string(prefix + e.what());
  } catch (...) {
    return c_string(prefix + "unknown C++ exception");
  }
}

template <typename F>
char *guard(F f) {
  return guard(nullptr, f);
}

}  // namespace mm_ffi
