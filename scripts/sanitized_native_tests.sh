#!/usr/bin/env bash
# Property tests of the packing core against an AddressSanitizer + UndefinedBehaviorSanitizer native build.
#
# The sanitised build happens OUT OF TREE, in a temporary copy of the package, so the normal in-place build that
# other processes use is never touched. The tests then run in that copy with OPENSLOTH_TEST_BACKENDS=native,
# libasan preloaded (python itself is not instrumented), leak detection off (CPython keeps objects alive on
# purpose), and the run's output kept in a log in which any sanitizer report fails the run.
#
# Usage: bash scripts/sanitized_native_tests.sh [extra pytest args]
# Environment:
#   PYTHON                       interpreter to use (default: python, i.e. the active venv)
#   SANITIZE_MAX_EXAMPLES        hypothesis examples per property (default 60; the sanitised build is slower)
#   SANITIZE_KEEP=1              keep the temporary directory for inspection
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python}"
MAX_EXAMPLES="${SANITIZE_MAX_EXAMPLES:-60}"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/opensloth-sanitize.XXXXXX")"
cleanup() {
  if [[ "${SANITIZE_KEEP:-0}" == "1" ]]; then echo "sanitize: kept $WORK"; else rm -rf "$WORK"; fi
}
trap cleanup EXIT

say() { echo "sanitize: $*"; }

case "$(uname -s)" in
  Linux) ;;
  *) say "only Linux is supported (LD_PRELOAD of libasan)"; exit 2 ;;
esac

# 1. A copy of what the build and the tests need (no build outputs, caches or compiled modules).
SRC="$WORK/src"
mkdir -p "$SRC"
for path in opensloth csrc tests setup.py pyproject.toml README.md; do
  [[ -e "$ROOT/$path" ]] && cp -R "$ROOT/$path" "$SRC/"
done
mkdir -p "$SRC/benchmarks"  # tests/conftest.py reads the development data through benchmarks/_shared_data.py
for path in benchmarks/__init__.py benchmarks/_shared_data.py; do
  [[ -e "$ROOT/$path" ]] && cp "$ROOT/$path" "$SRC/$path"
done
find "$SRC" \( -name '__pycache__' -o -name '*.so' -o -name '*.pyd' -o -name '*.egg-info' \) -prune \
  -exec rm -rf {} +

# 2. The sanitised build, in place in the copy. pybind11 comes from the active environment when it has it, else it
#    is installed into the temporary directory (the venv is left as it is).
BUILD_PATH=""
if ! "$PYTHON" -c "import pybind11" >/dev/null 2>&1; then
  say "pybind11 is not importable; installing it into $WORK/buildtools"
  "$PYTHON" -m pip install -q --no-deps --target "$WORK/buildtools" "pybind11>=2.12"
  BUILD_PATH="$WORK/buildtools"
fi
say "building the ASan+UBSan native module in $SRC"
(
  cd "$SRC"
  PYTHONPATH="$BUILD_PATH${BUILD_PATH:+:}${PYTHONPATH:-}" OPENSLOTH_SANITIZE=1 OPENSLOTH_REQUIRE_NATIVE=1 \
    "$PYTHON" setup.py -q build_ext --inplace --build-temp "$WORK/build-temp" >"$WORK/build.log" 2>&1
) || { cat "$WORK/build.log"; say "the sanitised build failed"; exit 1; }

SO="$(ls "$SRC"/opensloth/_native*.so 2>/dev/null | head -n 1 || true)"
[[ -n "$SO" ]] || { cat "$WORK/build.log"; say "no opensloth/_native*.so was built"; exit 1; }

# 3. The sanitizer runtimes, from the compiler that built the module.
CXX_BIN="${CXX:-$(command -v g++ || command -v c++)}"
LIBASAN="$("$CXX_BIN" -print-file-name=libasan.so)"
[[ -f "$LIBASAN" ]] || { say "libasan.so not found (compiler: $CXX_BIN)"; exit 1; }
# libstdc++ after libasan: otherwise ASan aborts on the first C++ exception (CHECK failed ... real___cxa_throw),
# and the tests that expect the module to raise cannot run.
LIBSTDCXX="$("$CXX_BIN" -print-file-name=libstdc++.so)"
[[ -f "$LIBSTDCXX" ]] || { say "libstdc++.so not found (compiler: $CXX_BIN)"; exit 1; }
SYMBOLS="$(nm -D "$SO" 2>/dev/null || true)"
if [[ "$SYMBOLS" != *__asan_init* || "$SYMBOLS" != *__ubsan_handle* ]]; then
  say "$SO is not instrumented with ASan and UBSan"
  exit 1
fi

# 4. The property tests against the native backend only, in the copy, in one process that first checks that the
#    module it imports is the sanitised one. Its output is kept in a log; any sanitizer report in it fails the run
#    (UBSan and ASan also stop the process at the first report, so the status fails too).
LOG="$WORK/tests.log"
say "running tests/test_packing_properties.py (native only, max_examples=$MAX_EXAMPLES) with $LIBASAN preloaded"
set +e
(
  cd "$SRC"
  export OPENSLOTH_TEST_BACKENDS=native OPENSLOTH_BACKEND=native SANITIZED_SO="$SO" MAX_EXAMPLES
  export ASAN_OPTIONS="detect_leaks=0:halt_on_error=1:detect_odr_violation=0"
  export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1"
  export PYTHONDONTWRITEBYTECODE=1
  LD_PRELOAD="$LIBASAN:$LIBSTDCXX${LD_PRELOAD:+:$LD_PRELOAD}" "$PYTHON" - "$@" <<'PY'
import os
import sys

sys.path.insert(0, os.getcwd())
import opensloth._native as native  # noqa: E402

expected = os.path.realpath(os.environ["SANITIZED_SO"])
if os.path.realpath(native.__file__) != expected:
    sys.exit(f"sanitize: imported {native.__file__}, not the sanitised build {expected}")
print(f"sanitize: opensloth._native is {native.__file__}", flush=True)

from hypothesis import settings  # noqa: E402

# tests/conftest.py loads the profile named by HYPOTHESIS_PROFILE; this one caps the examples for the slower build.
settings.register_profile("sanitize-script", max_examples=int(os.environ["MAX_EXAMPLES"]), deadline=None)
settings.load_profile("sanitize-script")
os.environ["HYPOTHESIS_PROFILE"] = "sanitize-script"

import pytest  # noqa: E402

# --capture=sys leaves file descriptor 2 alone, so a report printed as the process halts is not swallowed.
args = ["-q", "-p", "no:cacheprovider", "--capture=sys", "-W", "ignore::pytest.PytestAssertRewriteWarning"]
sys.exit(pytest.main([*args, "tests/test_packing_properties.py", "tests/test_native.py",
                      "-k", "test_packing_properties or gather", *sys.argv[1:]]))
PY
) 2>&1 | tee "$LOG"
status=${PIPESTATUS[0]}
set -e

if grep -qE "runtime error:|ERROR: AddressSanitizer|SUMMARY: (AddressSanitizer|UndefinedBehaviorSanitizer)" "$LOG"; then
  say "FAILED: sanitizer report(s) above"
  exit 1
fi
if [[ $status -ne 0 ]]; then
  say "FAILED: the tests exited with status $status"
  exit "$status"
fi
say "clean: no sanitizer report, all tests passed"
