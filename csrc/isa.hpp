// Per-ISA compilation scaffolding. kernels_isa.cpp is compiled once per SIMD
// level with CK_ISA set to that level's name and matching -m flags; every
// kernel header is included inside namespace convkern::CK_ISA::{anonymous}.
// Internal linkage matters: identical inline functions compiled with different
// -m flags must never be merged by the linker, or AVX-512 code could run on a
// CPU without it. For the same reason the kernel headers use no std:: templates.
#pragma once
#include <cstdint>
#include <cstring>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif
#include <omp.h>

#include "common.hpp"

#ifndef CK_ISA
#error "CK_ISA must name the ISA level (scalar, avx2, avx512)"
#endif

#if defined(__AVX512F__)
#define CK_VEC_BYTES 64
#elif defined(__AVX2__)
#define CK_VEC_BYTES 32
#else
#define CK_VEC_BYTES 16
#endif
