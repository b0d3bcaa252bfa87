#version 460
// variants: FMT=F32|F16|BF16|Q4_0|Q4_1|Q5_0|Q5_1|Q8_0|Q4_K|Q5_K|Q6_K
// MatMul with f32 activations: dot_row = dot_f32(dequantize_row(w), x), element i in lane i % 8.
#include "common/base.glsl"
#include "common/exact.glsl"
#include "common/quant.glsl"
#include "common/mm.glsl"

void main() {
    uint lane = gl_LocalInvocationID.x & 7u, row_l = gl_LocalInvocationID.x >> 3;
    uint r = gl_WorkGroupID.x * ROWS + row_l;
    uint t0 = gl_WorkGroupID.y * TOKENS;
    uint nt = min(TOKENS, pc.n - t0);
    float acc[TOKENS], off[TOKENS];
    [[unroll]] for (uint t = 0u; t < TOKENS; t++) {
        acc[t] = 0.0;
        off[t] = 0.0;
    }
    if (r < pc.rows) {
        Words w = Words(pc.w);
        Floats x = Floats(pc.x);
        uint row = pc.w_byte + r * pc.row_bytes;
        uint xa = pc.x_off + t0 * pc.x_stride;
#if BLOCK_ELEMS == 1
        for (uint i = lane; i < pc.cols; i += 8u) {
            float wv = deq(w, row + i * BLOCK_BYTES, 0u);
            [[unroll]] for (uint t = 0u; t < TOKENS; t++) {
                if (t < nt) {
                    precise float acc_t = acc[t] + wv * x.v[xa + t * pc.x_stride + i];
                    acc[t] = acc_t;
                }
            }
        }
#else
        // Block by block: the lane's elements lane, lane + 8, … of each block, in order.
        const uint PER = BLOCK_ELEMS / 8;
        uint nb = pc.cols / BLOCK_ELEMS;
        for (uint b = 0u; b < nb; b++) {
            float v[PER];
            deq_lane(w, row + b * BLOCK_BYTES, lane, v);
            [[unroll]] for (uint j = 0u; j < PER; j++) {
                uint i = b * BLOCK_ELEMS + lane + 8u * j;
                [[unroll]] for (uint t = 0u; t < TOKENS; t++) {
                    if (t < nt) {
                        precise float acc_t = acc[t] + v[j] * x.v[xa + t * pc.x_stride + i];
                        acc[t] = acc_t;
                    }
                }
            }
        }
#endif
    }
    finish(r, lane, t0, nt, acc, off);
}
