// A shared-memory tiled GEMM whose operands come from loader objects, so the
// same kernel multiplies plain matrices, an im2col column buffer, or a column
// tile gathered from the input on the fly (implicit GEMM).
//
// Block tile BM x BN over a BK-deep slice of the reduction; 256 threads as
// 16 x 16, each holding TM x TN accumulators at rows ty + 16i, columns
// tx + 16j (strided, so shared-memory reads of a warp hit distinct banks or
// broadcast). Each output is reduced by one thread in a fixed order, so the
// result does not depend on the launch: deterministic. A block walks the
// batch * splits "z" indices from blockIdx.z in steps of gridDim.z (the grid's
// z is capped at CK_GEMM_MAX_GRID_Z): `batch` picks a group/image set inside
// the loaders and `split` a fixed slice of the reduction (split-K, summed in
// order later).
#pragma once
#include "common.cuh"

namespace convkern::cuda {

// CUDA's limit on grid.z; the CPU emulator's tests lower it so that the
// loop over z is exercised by small problems
#ifndef CK_GEMM_MAX_GRID_Z
#define CK_GEMM_MAX_GRID_Z 65535
#endif

constexpr int kGemmThreads = 256;
constexpr int kBM = 64, kBN = 64, kBK = 16, kTM = 4, kTN = 4;

// ALoad: T operator()(batch, m, k) for m < M, k < Kr.
// BLoad: Col column(batch, n) (n may be >= N: the column then reads zeros)
//        and T at(const Col&, batch, k) for k < Kr.
// Store: void operator()(batch, split, m, n, value) for m < M, n < N.
template <class T, class ALoad, class BLoad, class Store>
__global__ void __launch_bounds__(kGemmThreads)
    gemm_tiled_kernel(i64 M, i64 N, i64 Kr, i64 k_chunk, int splits, i64 zcount, ALoad a, BLoad b, Store store) {
    __shared__ T As[kBK][kBM + 1];
    __shared__ T Bs[kBK][kBN];
    const int tid = threadIdx.x, tx = tid % 16, ty = tid / 16;
    for (i64 z = blockIdx.z; z < zcount; z += gridDim.z) {  // uniform per block: barriers stay safe
        const i64 batch = z / splits;
        const int split = static_cast<int>(z % splits);
        const i64 m0 = static_cast<i64>(blockIdx.y) * kBM, n0 = static_cast<i64>(blockIdx.x) * kBN;
        const i64 k_begin = split * k_chunk, k_end = min(Kr, k_begin + k_chunk);
        // fixed load slots: A (kk, mm) with kk = tid % BK; B (kk, nn) with nn = tid % BN
        const int a_kk = tid % kBK, a_mm = tid / kBK;  // a_mm + 16 j, j < BM * BK / 256
        const int b_nn = tid % kBN, b_kk = tid / kBN;  // b_kk + 4 j,  j < BK * BN / 256
        const auto col = b.column(batch, n0 + b_nn);
        T acc[kTM][kTN];
#pragma unroll
        for (int i = 0; i < kTM; ++i)
#pragma unroll
            for (int j = 0; j < kTN; ++j) acc[i][j] = T(0);
        for (i64 k0 = k_begin; k0 < k_end; k0 += kBK) {
#pragma unroll
            for (int j = 0; j < kBM * kBK / kGemmThreads; ++j) {
                const int mm = a_mm + 16 * j;
                const i64 m = m0 + mm, k = k0 + a_kk;
                As[a_kk][mm] = (m < M && k < k_end) ? a(batch, m, k) : T(0);
            }
#pragma unroll
            for (int j = 0; j < kBK * kBN / kGemmThreads; ++j) {
                const int kk = b_kk + 4 * j;
                const i64 k = k0 + kk;
                Bs[kk][b_nn] = k < k_end ? b.at(col, batch, k) : T(0);
            }
            __syncthreads();
#pragma unroll
            for (int kk = 0; kk < kBK; ++kk) {
                T av[kTM], bv[kTN];
#pragma unroll
                for (int i = 0; i < kTM; ++i) av[i] = As[kk][ty + 16 * i];
#pragma unroll
                for (int j = 0; j < kTN; ++j) bv[j] = Bs[kk][tx + 16 * j];
#pragma unroll
                for (int i = 0; i < kTM; ++i)
#pragma unroll
                    for (int j = 0; j < kTN; ++j) acc[i][j] += av[i] * bv[j];
            }
            __syncthreads();
        }
#pragma unroll
        for (int i = 0; i < kTM; ++i)
#pragma unroll
            for (int j = 0; j < kTN; ++j) {
                const i64 m = m0 + ty + 16 * i, n = n0 + tx + 16 * j;
                if (m < M && n < N) store(batch, split, m, n, acc[i][j]);
            }
    }
}

// Launches gemm_tiled_kernel over batch * splits; throws if the grid is too large.
template <class T, class ALoad, class BLoad, class Store>
void launch_gemm_tiled(i64 M, i64 N, i64 Kr, i64 batch, int splits, const ALoad& a, const BLoad& b, const Store& st,
                       cudaStream_t stream, const char* name) {
    if (M <= 0 || N <= 0 || batch <= 0) return;
    const i64 gx = (N + kBN - 1) / kBN, gy = (M + kBM - 1) / kBM, zcount = batch * splits;
    const i64 gz = zcount < CK_GEMM_MAX_GRID_Z ? zcount : CK_GEMM_MAX_GRID_Z;
    if (gx > 2147483647LL || gy > 65535)
        throw std::runtime_error(std::string(name) + ": problem too large for one launch (M=" + std::to_string(M) +
                                 ", N=" + std::to_string(N) + ")");
    // k_chunk: whole BK steps, so the split boundaries never change a sum's order
    const i64 k_chunk = ((Kr + splits - 1) / splits + kBK - 1) / kBK * kBK;
    gemm_tiled_kernel<T><<<dim3(static_cast<unsigned>(gx), static_cast<unsigned>(gy), static_cast<unsigned>(gz)),
                           kGemmThreads, 0, stream>>>(M, N, Kr, k_chunk > 0 ? k_chunk : kBK, splits, zcount, a, b, st);
    check_launch(name);
}

}  // namespace convkern::cuda
