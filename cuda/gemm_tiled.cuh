// A shared-memory tiled GEMM whose operands come from loader objects, so the
// same kernel multiplies plain matrices, an im2col column buffer, or a column
// tile gathered from the input on the fly (implicit GEMM).
//
// Block tile BM x BN (64 or 128 each) over BK = 8 deep slices of the
// reduction; 256 threads as 16 x 16, each holding (BM/16) x (BN/16)
// accumulators in runs of four adjacent rows/columns 64 apart, so a thread
// reads its operands from shared memory as 16-byte vectors (a 128 x 128 tile:
// 64 FMAs per 4 vector loads) and a warp's reads are broadcasts or distinct
// banks. Shared memory is double-buffered: the next slice is loaded from
// global memory into registers while the current one is multiplied, one
// barrier per slice. Each output is reduced by one thread, k in increasing
// order, so the result depends neither on the launch nor on the tile shape:
// deterministic, and the same bits whichever tile the host picks. A block
// walks the batch * splits "z" indices from blockIdx.z in steps of gridDim.z
// (the grid's z is capped at CK_GEMM_MAX_GRID_Z): `batch` picks a
// group/image set inside the loaders and `split` a fixed slice of the
// reduction (split-K, summed in order later).
#pragma once
#include <cstdint>

#include "common.cuh"
#include "ops.cuh"

namespace convkern::cuda {

// CUDA's limit on grid.z; the CPU emulator's tests lower it so that the
// loop over z is exercised by small problems
#ifndef CK_GEMM_MAX_GRID_Z
#define CK_GEMM_MAX_GRID_Z 65535
#endif

constexpr int kGemmThreads = 256;
constexpr int kGemmBK = 8;
// split-K slices are whole multiples of this, for every tile shape, so a
// split's boundaries (and with them the sums) never depend on the tile
constexpr int kSplitStep = 16;
static_assert(kSplitStep % kGemmBK == 0, "split slices must be whole BK steps");

// The tile shapes a launch can take; float picks one per problem
// (gemm_tile_for) unless set_gemm_tile (ops.cuh) forces one by its value;
// double always takes 64 x 64 (its 8x8 accumulators would not fit the
// registers).
enum class GemmTile : int { t64x64 = 1, t64x128 = 2, t128x64 = 3, t128x128 = 4 };

// Tile for an M x N problem over zcount z indices on a GPU with `sms`
// multiprocessors, by a cost model that counts waves: blocks run
// sms * (blocks per SM) at a time, a partly filled last wave takes as long as
// a full one, and a wave lasts as long as one SM's share of outputs takes at
// that tile's FFMA share of its main-loop instructions (sm_90 SASS, read by
// tools/sass_mix.py: 0.80 at 128x128, 0.71 at 128x64 and 64x128, 0.60 at
// 64x64). A 128 side over 64 rows or columns or fewer is never taken (half
// of it would idle). Ties keep the larger tile. An estimate from the machine
// code until tools/gemm_tiles.py has timed the tiles on a GPU.
inline GemmTile gemm_tile_for(i64 M, i64 N, i64 zcount, int sms) {
    struct Option {
        GemmTile tile;
        int bm, bn, per_sm;
        double ffma_share;
    };
    static constexpr Option options[] = {{GemmTile::t128x128, 128, 128, 1, 0.80},
                                         {GemmTile::t128x64, 128, 64, 2, 0.71},
                                         {GemmTile::t64x128, 64, 128, 2, 0.71},
                                         {GemmTile::t64x64, 64, 64, 2, 0.60}};
    if (sms < 1) sms = 1;  // unknown: the rule still prefers big tiles on big problems
    GemmTile best = GemmTile::t64x64;
    double best_cost = 0;
    for (const Option& o : options) {
        if ((o.bm == 128 && M <= 64) || (o.bn == 128 && N <= 64)) continue;
        const i64 blocks = ((M + o.bm - 1) / o.bm) * ((N + o.bn - 1) / o.bn) * zcount;
        const i64 slots = static_cast<i64>(sms) * o.per_sm;
        const double waves = static_cast<double>((blocks + slots - 1) / slots);
        const double cost = waves * o.per_sm * o.bm * o.bn / o.ffma_share;
        if (best_cost == 0 || cost < best_cost * (1 - 1e-9)) best = o.tile, best_cost = cost;
    }
    return best;
}

// v[0..3] = p[0..3]; p is 16-byte aligned (a run of four at a multiple of 4
// in a row whose length is a multiple of 4): one vector load on the GPU
template <class T>
__device__ __forceinline__ void load_run4(const T* p, T* v) {
#ifdef CK_CUDA_EMU
    if (reinterpret_cast<std::uintptr_t>(p) % 16) ck_emu::fault("misaligned 16-byte shared-memory load in the tiled GEMM");
    for (int i = 0; i < 4; ++i) v[i] = p[i];
#else
    if constexpr (sizeof(T) == 4) {
        const float4 q = *reinterpret_cast<const float4*>(p);
        v[0] = q.x, v[1] = q.y, v[2] = q.z, v[3] = q.w;
    } else {
        const double2 q0 = reinterpret_cast<const double2*>(p)[0], q1 = reinterpret_cast<const double2*>(p)[1];
        v[0] = q0.x, v[1] = q0.y, v[2] = q1.x, v[3] = q1.y;
    }
#endif
}

// ALoad: Cursor cursor(batch, k); void advance(Cursor&) (k += kGemmBK);
//        T load(batch, m, const Cursor&) for m < M and the cursor's k < Kr.
// BLoad: Col column(batch, n) (n may be >= N: the column then reads zeros),
//        Cursor cursor(const Col&, batch, k), void advance(Cursor&) and
//        T load(const Col&, batch, const Cursor&) for the cursor's k < Kr.
// A cursor may be moved past Kr: it is then never loaded from.
// Store: void operator()(batch, split, m, n, value) for m < M, n < N.
// Blocks per SM the compiler must leave room for: two 256-thread blocks cap a
// thread at 128 registers. Float tiles up to 128x64 fit in that (107-128
// registers unbounded); 128x128 (153-209) and every double tile (146-184)
// would spill, so they run one block per SM.
template <class T, int BM, int BN>
constexpr int kGemmMinBlocks = sizeof(T) == 4 && BM * BN <= 128 * 64 ? 2 : 1;

template <class T, int BM, int BN, class ALoad, class BLoad, class Store>
__global__ void __launch_bounds__(kGemmThreads, kGemmMinBlocks<T, BM, BN>)
    gemm_tiled_kernel(i64 M, i64 N, i64 Kr, i64 k_chunk, int splits, i64 zcount, ALoad a, BLoad b, Store store) {
    constexpr int BK = kGemmBK, TM = BM / 16, TN = BN / 16;
    constexpr int A_LOADS = BM * BK / kGemmThreads, A_STEP = kGemmThreads / BK;
    constexpr int B_LOADS = BK * BN / kGemmThreads, B_STEP = kGemmThreads / BN;
    // rows padded by 4: the transposed stores of A hit 32 distinct banks and
    // every run of four stays 16-byte aligned
    __shared__ __align__(16) T As[2][BK][BM + 4];
    __shared__ __align__(16) T Bs[2][BK][BN];
    const int tid = threadIdx.x, tx = tid % 16, ty = tid / 16;
    // fixed load slots: A (a_kk, a_mm + A_STEP j), B (b_kk + B_STEP j, b_nn)
    const int a_kk = tid % BK, a_mm = tid / BK;
    const int b_nn = tid % BN, b_kk = tid / BN;
    for (i64 z = blockIdx.z; z < zcount; z += gridDim.z) {  // uniform per block: barriers stay safe
        const i64 batch = z / splits;
        const int split = static_cast<int>(z % splits);
        const i64 m0 = static_cast<i64>(blockIdx.y) * BM, n0 = static_cast<i64>(blockIdx.x) * BN;
        const i64 k_begin = split * k_chunk, k_end = min(Kr, k_begin + k_chunk);
        const auto col = b.column(batch, n0 + b_nn);
        // cursors at this thread's k in the first slice, each moved on by BK
        // per fetch (loaders that would divide k per element walk it instead)
        auto a_cur = a.cursor(batch, k_begin + a_kk);
        typename BLoad::Cursor b_cur[B_LOADS];
#pragma unroll
        for (int j = 0; j < B_LOADS; ++j) b_cur[j] = b.cursor(col, batch, k_begin + b_kk + B_STEP * j);
        // rows of A this thread loads that lie inside M (fixed for this z)
        const i64 a_rows_left = M - (m0 + a_mm);
        T ra[A_LOADS], rb[B_LOADS];
        auto fetch = [&](i64 k0) {  // global -> registers: the slice at k0, the cursors' slice
            // k left in this split from k0, clamped so 32-bit compares decide every slot
            const int k_left = static_cast<int>(min(k_end - k0, static_cast<i64>(BK)));
            const bool a_live = a_kk < k_left;
#pragma unroll
            for (int j = 0; j < A_LOADS; ++j)
                ra[j] = (a_live && A_STEP * j < a_rows_left) ? a.load(batch, m0 + a_mm + A_STEP * j, a_cur) : T(0);
            a.advance(a_cur);
#pragma unroll
            for (int j = 0; j < B_LOADS; ++j) {
                rb[j] = b_kk + B_STEP * j < k_left ? b.load(col, batch, b_cur[j]) : T(0);
                b.advance(b_cur[j]);
            }
        };
        auto stash = [&](int buf) {  // registers -> shared buffer buf
#pragma unroll
            for (int j = 0; j < A_LOADS; ++j) As[buf][a_kk][a_mm + A_STEP * j] = ra[j];
#pragma unroll
            for (int j = 0; j < B_LOADS; ++j) Bs[buf][b_kk + B_STEP * j][b_nn] = rb[j];
        };
        T acc[TM][TN];
#pragma unroll
        for (int i = 0; i < TM; ++i)
#pragma unroll
            for (int j = 0; j < TN; ++j) acc[i][j] = T(0);
        // the last barrier of the previous z came after its last read of
        // either buffer, so buffer 0 is free here
        if (k_begin < k_end) {
            fetch(k_begin);
            stash(0);
        }
        __syncthreads();
        int buf = 0;
        for (i64 k0 = k_begin; k0 < k_end; k0 += BK) {
            const bool more = k0 + BK < k_end;
            if (more) fetch(k0 + BK);  // in flight while this slice is multiplied
#pragma unroll
            for (int kk = 0; kk < BK; ++kk) {
                T av[TM], bv[TN];
#pragma unroll
                for (int i = 0; i < TM; i += 4) load_run4(&As[buf][kk][(i / 4) * 64 + ty * 4], av + i);
#pragma unroll
                for (int j = 0; j < TN; j += 4) load_run4(&Bs[buf][kk][(j / 4) * 64 + tx * 4], bv + j);
#pragma unroll
                for (int i = 0; i < TM; ++i)
#pragma unroll
                    for (int j = 0; j < TN; ++j) acc[i][j] += av[i] * bv[j];
            }
            // the other buffer was last read before the previous barrier
            if (more) stash(buf ^ 1);
            __syncthreads();
            buf ^= 1;
        }
#pragma unroll
        for (int i = 0; i < TM; ++i)
#pragma unroll
            for (int j = 0; j < TN; ++j) {
                const i64 m = m0 + (i / 4) * 64 + ty * 4 + i % 4, n = n0 + (j / 4) * 64 + tx * 4 + j % 4;
                if (m < M && n < N) store(batch, split, m, n, acc[i][j]);
            }
    }
}

template <class T, int BM, int BN, class ALoad, class BLoad, class Store>
void launch_gemm_tile(i64 M, i64 N, i64 Kr, i64 k_chunk, int splits, i64 zcount, const ALoad& a, const BLoad& b,
                      const Store& st, cudaStream_t stream, const char* name) {
    const i64 gx = (N + BN - 1) / BN, gy = (M + BM - 1) / BM;
    const i64 gz = zcount < CK_GEMM_MAX_GRID_Z ? zcount : CK_GEMM_MAX_GRID_Z;
    if (gx > 2147483647LL || gy > 65535)
        throw std::runtime_error(std::string(name) + ": problem too large for one launch (M=" + std::to_string(M) +
                                 ", N=" + std::to_string(N) + ")");
    gemm_tiled_kernel<T, BM, BN><<<dim3(static_cast<unsigned>(gx), static_cast<unsigned>(gy),
                                        static_cast<unsigned>(gz)),
                                   kGemmThreads, 0, stream>>>(M, N, Kr, k_chunk, splits, zcount, a, b, st);
    check_launch(name);
}

// Launches gemm_tiled_kernel over batch * splits with the tile gemm_tile_for
// picks; throws if the grid is too large.
template <class T, class ALoad, class BLoad, class Store>
void launch_gemm_tiled(i64 M, i64 N, i64 Kr, i64 batch, int splits, const ALoad& a, const BLoad& b, const Store& st,
                       cudaStream_t stream, const char* name) {
    if (M <= 0 || N <= 0 || batch <= 0) return;
    const i64 zcount = batch * splits;
    // k_chunk: whole kSplitStep steps, so the split boundaries never change a sum's order
    i64 k_chunk = ((Kr + splits - 1) / splits + kSplitStep - 1) / kSplitStep * kSplitStep;
    if (k_chunk <= 0) k_chunk = kSplitStep;
    if constexpr (sizeof(T) == 4) {
        const int forced = forced_gemm_tile();
        const GemmTile tile =
            forced ? static_cast<GemmTile>(forced) : gemm_tile_for(M, N, zcount, current_multiprocessors());
        switch (tile) {
            case GemmTile::t128x128:
                return launch_gemm_tile<T, 128, 128>(M, N, Kr, k_chunk, splits, zcount, a, b, st, stream, name);
            case GemmTile::t128x64:
                return launch_gemm_tile<T, 128, 64>(M, N, Kr, k_chunk, splits, zcount, a, b, st, stream, name);
            case GemmTile::t64x128:
                return launch_gemm_tile<T, 64, 128>(M, N, Kr, k_chunk, splits, zcount, a, b, st, stream, name);
            case GemmTile::t64x64:
                break;
        }
    }
    launch_gemm_tile<T, 64, 64>(M, N, Kr, k_chunk, splits, zcount, a, b, st, stream, name);
}

}  // namespace convkern::cuda
