// The C++ unit tests' check: EXPECT(condition, printf-style message) prints the message with its
// file and line when the condition is false and counts the failure; main returns 1 if any failed.
// (EXPECT, not CHECK: torch's headers define a CHECK of their own.)
#pragma once

#include <cstdio>

inline int& expect_failures() {
  static int failures = 0;
  return failures;
}

#define EXPECT(cond, ...)                                 \
  do {                                                    \
    if (!(cond)) {                                        \
      std::printf("FAIL (%s:%d): ", __FILE__, __LINE__);  \
      std::printf(__VA_ARGS__);                           \
      std::printf("\n");                                  \
      ++expect_failures();                                \
    }                                                     \
  } while (0)
