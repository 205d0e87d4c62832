#!/usr/bin/env bash
# Build MNN's CPU runtime from source for the CPU a model will run on, at the version the
# project pins (the MNN==3.6.1 wheel = git tag 3.6.1 of github.com/alibaba/MNN, commit
# d407447ed56c4121a11ccbd266dc184ca1ead0c2).
#
# Usage: scripts/build-mnn.sh SOURCE BUILD_DIR [TOOLCHAIN_FILE]
#   SOURCE          an MNN source folder, or a .tar.gz of one (e.g. made with
#                   `git -C MNN archive --prefix=MNN-3.6.1/ 3.6.1 | gzip > MNN-3.6.1.tar.gz`).
#                   Nothing is downloaded: the script never touches the network.
#   BUILD_DIR       where the build goes; the tools end up in BUILD_DIR/bin.
#   TOOLCHAIN_FILE  optional CMake toolchain file for a cross build (e.g. aarch64 Linux or
#                   MNN's Android NDK toolchain); then the x86 AVX-512 options are left off and
#                   MNN picks the ARM kernels (ARMv8.2 fp16/int8 dot product: MNN_ARM82).
#
# Environment: JOBS (default 2), MNN_X86_AVX512 (default ON for a native x86-64 build; set OFF
# for x86 CPUs without AVX-512), MNN_EXTRA_CMAKE_ARGS (appended to the cmake call).
#
# Why: the PyPI wheel has no AVX-512/VNNI code, so its int8 is slower than fp32 on x86 CPUs that
# have VNNI (benchmarks/results/mnn-int8-findings.md). MNN_AVX512 + MNN_AVX512_VNNI build the
# int8 kernels in source/backend/cpu/x86_x64/avx512/.
#
# Output: BUILD_DIR/bin/benchmark.out (times every .mnn in a folder: the tool the benchmark step
# runs when MNNPIPE_MNN_BENCHMARK names it) and libMNN.so beside it (rpath'ed).
set -euo pipefail

if [ $# -lt 2 ]; then
  sed -n '6,13p' "$0" >&2
  exit 2
fi
source_arg=$1
build_dir=$(mkdir -p "$2" && cd "$2" && pwd)
toolchain=${3:-}
jobs=${JOBS:-2}

if [ -f "$source_arg" ]; then
  # A tarball: unpack once into the build folder (its top folder name does not matter).
  src="$build_dir/src"
  if [ ! -f "$src/CMakeLists.txt" ]; then
    rm -rf "$src" && mkdir -p "$src"
    tar -xzf "$source_arg" -C "$src" --strip-components=1
  fi
elif [ -f "$source_arg/CMakeLists.txt" ]; then
  src=$(cd "$source_arg" && pwd)
else
  echo "build-mnn: SOURCE must be an MNN source folder or a .tar.gz of one: $source_arg" >&2
  exit 2
fi
grep -q 'project(MNN' "$src/CMakeLists.txt" || { echo "build-mnn: not MNN's source: $src" >&2; exit 2; }

cmake_args=(
  -S "$src" -B "$build_dir/cmake"
  -DCMAKE_BUILD_TYPE=Release
  -DMNN_BUILD_BENCHMARK=ON   # benchmark.out
  -DMNN_BUILD_TOOLS=OFF      # no tools/cpp executables: only the targets timing needs
  -DMNN_BUILD_CONVERTER=OFF  # conversion and quantization stay with the wheel
  -DMNN_BUILD_SHARED_LIBS=ON
  -DMNN_SEP_BUILD=OFF        # one libMNN.so
  -DMNN_USE_THREAD_POOL=ON
  -DCMAKE_RUNTIME_OUTPUT_DIRECTORY="$build_dir/bin"
  -DCMAKE_LIBRARY_OUTPUT_DIRECTORY="$build_dir/bin"
  -DCMAKE_BUILD_RPATH='$ORIGIN'
)
if [ -n "$toolchain" ]; then
  [ -f "$toolchain" ] || { echo "build-mnn: toolchain file not found: $toolchain" >&2; exit 2; }
  cmake_args+=(-DCMAKE_TOOLCHAIN_FILE="$(cd "$(dirname "$toolchain")" && pwd)/$(basename "$toolchain")" -DMNN_ARM82=ON)
elif [ "$(uname -m)" = x86_64 ]; then
  avx512=${MNN_X86_AVX512:-ON}
  cmake_args+=(-DMNN_AVX512="$avx512" -DMNN_AVX512_VNNI="$avx512")
fi
if command -v ninja >/dev/null 2>&1; then
  cmake_args+=(-G Ninja)
fi
# shellcheck disable=SC2206  # word splitting of the extra args is intended
cmake_args+=(${MNN_EXTRA_CMAKE_ARGS:-})

cmake "${cmake_args[@]}"
cmake --build "$build_dir/cmake" --target benchmark.out -j "$jobs"
echo "build-mnn: $build_dir/bin/benchmark.out"
