#version 460
// variants: FMT=Q4_0|Q4_1|Q5_0|Q5_1|Q8_0|Q4_K|Q5_K|Q6_K DOT=0|1
// MatMulQ8: integer dots of weight rows with int8 activation blocks (dot_codes_q8a / q8k).
// DOT=1 uses the device's packed 4x8-bit dot product (exact either way).
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
        Words a = Words(pc.x);
        uint row = pc.w_byte + r * pc.row_bytes;
        uint nb = pc.cols / BLOCK_ELEMS;
        uint xa = pc.x_off + t0 * pc.x_stride;
#if BLOCK_ELEMS == 32
        // Four blocks at a time: their weight codes first (independent loads in flight together),
        // then each token's chain over them in block order.
        for (uint b0 = 0u; b0 < nb; b0 += 4u) {
            uint codes[4];
            float dw[4], mw[4];
            [[unroll]] for (uint u = 0u; u < 4u; u++) {
                if (b0 + u < nb) block32(w, row + (b0 + u) * BLOCK_BYTES, lane, codes[u], dw[u], mw[u]);
            }
            [[unroll]] for (uint t = 0u; t < TOKENS; t++) {
                if (t < nt) {
                    [[unroll]] for (uint u = 0u; u < 4u; u++) {
                        if (b0 + u < nb) {
                            uint blk = xa + t * pc.x_stride + (b0 + u) * 10u;   // BlockQ8A: d, sum, 32 codes
                            float da = uintBitsToFloat(a.v[blk]);
                            int l = dot4(codes[u], a.v[blk + 2u + lane]);
                            precise float d = dw[u] * da;
                            precise float acc_t = acc[t] + d * float(l);
                            acc[t] = acc_t;
#if FMT == FMT_Q4_1 || FMT == FMT_Q5_1
                            if (lane == 0u) {
                                precise float o = off[t] + mw[u] * (da * float(int(a.v[blk + 1u])));
                                off[t] = o;
                            }
#endif
                        }
                    }
                }
            }
        }
#else
        for (uint b = 0u; b < nb; b++) {
            uint sb = row + b * BLOCK_BYTES;
            uint cw[8];
            int cs[8];
            [[unroll]] for (uint c = 0u; c < 8u; c++) chunk256(w, sb, c, lane, cw[c], cs[c]);
            vec2 dd = superblock_scales(w, sb);
            [[unroll]] for (uint t = 0u; t < TOKENS; t++) {
                if (t < nt) {
                    uint blk = xa + t * pc.x_stride + b * 73u;   // BlockQ8K: d, 256 codes, 16 bsums
                    int l = 0;
                    [[unroll]] for (uint c = 0u; c < 8u; c++) l += cs[c] * dot4(cw[c], a.v[blk + 1u + 8u * c + lane]);
                    float da = uintBitsToFloat(a.v[blk]);
                    precise float d = dd.x * da;
                    precise float acc_t = acc[t] + d * float(l);
                    acc[t] = acc_t;
#if FMT != FMT_Q6_K
                    if (lane == 0u) {
                        int m = superblock_mins(w, sb, a, blk + 65u);
                        precise float o = off[t] - (dd.y * da) * float(m);
                        off[t] = o;
                    }
#endif
                }
            }
        }
#endif
    }
    finish(r, lane, t0, nt, acc, off);
}
