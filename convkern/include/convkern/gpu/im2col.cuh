// The explicit im2col and col2im kernels of the GEMM convolution: the column
// matrix of a run of images, and the input gradient gathered back from the
// column gradient (each input sums its taps in a fixed order; deterministic).
#pragma once
#include "device.cuh"

namespace convkern::cuda {

// col[g][crs][img * P + p] for images [image0, image0 + images)
template <class T, class I>
__global__ void im2col_kernel(const T* x, T* col, i64 image_count, i64 image0, ConvGeom geom) {
    CK_CONV_LOCALS(I, geom);
    const I images = I(image_count);
    const I P = Ho * Wo, NP = images * P, RS = R * S;
    CK_GRID_STRIDE(I, i, static_cast<I>(C * RS) * NP) {
        const I n = i % NP, row = i / NP;  // row = g * CRS + crs = c * RS + rs
        const I c = row / RS, rs = row % RS, r = rs / S, s = rs % S;
        const I img = n / P, p = n % P, ho = p / Wo, wo = p % Wo;
        const I h = ho * sh - ph + r * dh, w = wo * sw - pw + s * dw;
        col[i] = (h >= 0 && h < H && w >= 0 && w < W) ? x[(((image0 + img) * C + c) * static_cast<i64>(H) + h) * W + w]
                                                       : T(0);
    }
}

// gx for images [image0, image0 + images): each input gathers its taps from dcol
template <class T, class I>
__global__ void col2im_kernel(const T* dcol, T* gx, i64 image_count, i64 image0, ConvGeom geom) {
    CK_CONV_LOCALS(I, geom);
    const I images = I(image_count);
    const I P = Ho * Wo, NP = images * P, RS = R * S;
    CK_GRID_STRIDE(I, i, images * C * H * W) {
        const I w = i % W, h = (i / W) % H, c = (i / (W * H)) % C, img = i / (W * H * C);
        T acc = T(0);
        for (I r = 0; r < R; ++r) {
            const I ho = tap_output(h, ph, r, dh, sh, Ho);
            if (ho < 0) continue;
            for (I s = 0; s < S; ++s) {
                const I wo = tap_output(w, pw, s, dw, sw, Wo);
                if (wo < 0) continue;
                acc += dcol[static_cast<i64>(c * RS + r * S + s) * NP + img * P + ho * Wo + wo];
            }
        }
        gx[image0 * C * H * W + i] = acc;
    }
}

}  // namespace convkern::cuda
