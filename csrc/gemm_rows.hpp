// Tall GEMMs, C (M x N) = A (M x K) B (K x N) with M much larger than N, the
// shape of a conv on channels_last data (M output pixels, N output channels,
// K the patch length). B is packed once, whole; M is split into row blocks
// spread over the threads, each packing its own block of A with the caller's
// packer (for a conv: gathering NHWC patches straight into the panels, so no
// column matrix is ever written) and finishing its rows of C, epilogue
// included, while they are in cache. There is no barrier between blocks. When
// M has too few blocks for the threads, N is split too (each task then
// packs its A block itself). Every C element is reduced over K in KC order
// by one thread: deterministic for any thread count.

// Rows per block of gemm_rows: its A block (kRowsMC x rows_kc, at most 288 KiB
// of float32) stays in L2. Fixed, as the per-block row tables are on the stack.
constexpr idx kRowsMC = 144, kRowsKCMax = 512;

// KC of gemm_rows: the packed GEMM's (derived from L1 by the same rule, so
// that the B micro-panel streamed by every micro-kernel call stays in L1
// beside the A rows, or measured by the blocking tuner, which times both
// GEMM forms: a core whose L2 feeds B fast enough runs both faster with a
// longer KC), at most kRowsKCMax.
inline idx rows_kc_for(idx packed_kc) {
    return imin(kRowsKCMax, packed_kc);
}

template <class T>
idx rows_kc() {
    static const idx kc = rows_kc_for(gemm_dims<T>().kc);
    return kc;
}

template <class T>
idx packed_b_elems(idx K, idx N) {
    constexpr int NR = GemmBlocking<T>::NR;
    return ((N + NR - 1) / NR) * NR * K;
}

// For each rows_kc() block of K, every NR-column panel of N, zero-padded to Npad.
template <class T>
void pack_b_full(idx K, idx N, const T* B, idx rsb, idx csb, T* out) {
    typedef GemmBlocking<T> GB;
    constexpr int NR = GB::NR;
    const idx KC = rows_kc<T>();
    const idx panels = (N + NR - 1) / NR, Npad = panels * NR, blocks = (K + KC - 1) / KC;
#pragma omp parallel for collapse(2) num_threads(threads_for(panels * blocks)) schedule(static)
    for (idx b = 0; b < blocks; ++b)
        for (idx jp = 0; jp < panels; ++jp) {
            const idx pc = b * KC, kc = imin(KC, K - pc);
            pack_b_panel(kc, imin(NR, N - jp * NR), B + pc * rsb + jp * NR * csb, rsb, csb,
                         out + pc * Npad + jp * NR * kc);
        }
}

// An A operand for gemm_rows says, per MR-row panel, either where its rows
// start (indirect(i0, live, rows) returns true: row i's column k is at
// rows[i] + offsets(pc)[k - pc]; the micro-kernel reads it in place), or
// packs it: panel(i0, live, pc, kc, Ap) fills one MR x kc panel.

// The plain A: read through (row stride, column stride), always packed.
template <class T>
struct StridedRows {
    const T* A;
    idx rsa, csa;
    bool indirect(idx, idx, const T**) const { return false; }
    const idx* offsets(idx) const { return nullptr; }
    void panel(idx i0, idx live, idx pc, idx kc, T* Ap) const {
        pack_a_panel(kc, live, A + i0 * rsa + pc * csa, rsa, csa, Ap);
    }
};

// epilogue(i0, i1, j0, j1) runs on finished rows [i0, i1), columns [j0, j1).
template <class T, class ASource, class Epilogue>
void gemm_rows(idx M, idx N, idx K, const ASource& a_src, const T* Bp, T* C, idx ldc, const Epilogue& epilogue) {
    typedef GemmBlocking<T> GB;
    constexpr int MR = GB::MR, NR = GB::NR;
    if (M <= 0 || N <= 0) return;
    const int nt = num_threads();
    const idx KC = rows_kc<T>();
    const idx npanels = (N + NR - 1) / NR, Npad = npanels * NR;
    // near-equal row blocks, a multiple of the thread count of them where M
    // allows (11 blocks on 2 threads would leave one thread idle a twelfth of
    // the time), none over MC rows
    const idx per_thread = imax(1, (M + kRowsMC * nt - 1) / (kRowsMC * nt));
    const idx rows = imax(MR, ((M + per_thread * nt - 1) / (per_thread * nt) + MR - 1) / MR * MR);
    const idx mblocks = (M + rows - 1) / rows;
    const idx nchunks = mblocks >= 2 * nt ? 1 : imin(npanels, (2 * nt + mblocks - 1) / mblocks);
    const idx tasks = mblocks * nchunks;
    const idx abuf = (kRowsMC * KC + 15) / 16 * 16;
    const int nthreads = threads_for(tasks);
    T* ws = static_cast<T*>(workspace(static_cast<std::size_t>(nthreads * abuf) * sizeof(T), 3));
    // Where A is read in place, pairs of full panels (jp0 + 2i, jp0 + 2i + 1)
    // go to the wide tile (half the A loads per FMA; gemm_micro_indirect_wide).
    const auto paired = [&](idx j, idx jp0, idx jp1) {
        return kIndirectWide<T> && (j - jp0) % 2 == 0 && j + 1 < jp1 && N - j * NR >= 2 * NR;
    };
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (idx t = 0; t < tasks; ++t) {
        T* Ap = ws + omp_get_thread_num() * abuf;
        const idx ib = t / nchunks, jc = t % nchunks;
        const idx i0 = ib * rows, mc = imin(rows, M - i0), mpanels = (mc + MR - 1) / MR;
        const idx jp0 = jc * npanels / nchunks, jp1 = (jc + 1) * npanels / nchunks;
        const T* rows_of[kRowsMC / MR][MR];
        bool direct[kRowsMC / MR];
        for (idx ip = 0; ip < mpanels; ++ip)
            direct[ip] = a_src.indirect(i0 + ip * MR, imin(MR, mc - ip * MR), rows_of[ip]);
        for (idx pc = 0; pc < K; pc += KC) {
            const idx kc = imin(KC, K - pc);
            for (idx ip = 0; ip < mpanels; ++ip)
                if (!direct[ip]) a_src.panel(i0 + ip * MR, imin(MR, mc - ip * MR), pc, kc, Ap + ip * MR * kc);
            const idx* off = a_src.offsets(pc);
            const T* Bblk = Bp + pc * Npad;
            for (idx jp = jp0; jp < jp1; ++jp)
                for (idx ip = 0; ip < mpanels; ++ip) {
                    T* Ct = C + (i0 + ip * MR) * ldc + jp * NR;
                    const idx nr = imin(NR, N - jp * NR);
                    if (!direct[ip])
                        gemm_micro(kc, Ap + ip * MR * kc, Bblk + jp * NR * kc, Ct, ldc, imin(MR, mc - ip * MR), nr,
                                   pc > 0);
                    else if (!(jp > jp0 && paired(jp - 1, jp0, jp1)))  // (else done with the panel before it)
                        gemm_micro_indirect_panel(kc, rows_of[ip], off, Bblk, jp, nr, paired(jp, jp0, jp1), Ct, ldc,
                                                  pc > 0);
                }
        }
        epilogue(i0, i0 + mc, jp0 * NR, imin(N, jp1 * NR));
    }
}
