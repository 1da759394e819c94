// The SGD step (PyTorch's rule) in one pass over parameter, gradient and
// momentum buffer, where NumPy makes one pass (and a temporary) per term:
//   d = g + weight_decay * p
//   buf = first ? d : momentum * buf + (1 - dampening) * d   (momentum > 0)
//   p -= lr * (nesterov ? d + momentum * buf : buf)          (d itself without momentum)
// buf may be null without momentum.

constexpr idx kSgdChunk = 1 << 14;

template <class T>
void sgd_update(T* __restrict p, const T* __restrict g, T* __restrict buf, idx n, const SgdStep& h) {
    const T lr = T(h.lr), mom = T(h.momentum), keep = T(1.0 - h.dampening), wd = T(h.weight_decay);
    const bool use_buf = h.momentum != 0.0, first = h.first, nesterov = h.nesterov;
    const idx chunks = (n + kSgdChunk - 1) / kSgdChunk;
#pragma omp parallel for num_threads(threads_for(chunks)) schedule(static)
    for (idx c = 0; c < chunks; ++c) {
        const idx i0 = c * kSgdChunk, i1 = imin(n, i0 + kSgdChunk);
        if (!use_buf) {
            for (idx i = i0; i < i1; ++i) p[i] -= lr * (g[i] + wd * p[i]);
        } else if (first) {
            for (idx i = i0; i < i1; ++i) {
                const T d = g[i] + wd * p[i];
                buf[i] = d;
                p[i] -= lr * (nesterov ? d + mom * d : d);
            }
        } else {
            for (idx i = i0; i < i1; ++i) {
                const T d = g[i] + wd * p[i];
                const T b = mom * buf[i] + keep * d;
                buf[i] = b;
                p[i] -= lr * (nesterov ? d + mom * b : b);
            }
        }
    }
}
