#version 460
// MatMul with f32 activations over compressed-tensors integer weights: dot_int_row, element i
// in lane i % 8 (each element dequantized as dequantize_int_row does, then the lane's chain).
#include "common/base.glsl"
#include "common/exact.glsl"
#include "common/int.glsl"
#define MM_PUSH_EXTRA \
    uvec2 scales;     \
    uvec2 zeros;      \
    uint group;       \
    uint groups;      \
    uint iflags;
#include "common/mm.glsl"

// One element's step of every token's chain: acc[t] = acc[t] + wv·x[t] (x[t] at `xi` + t rows),
// the product and the sum each rounded once.
void accumulate(inout float acc[TOKENS], float wv, Floats x, uint xi, uint nt) {
    [[unroll]] for (uint t = 0u; t < TOKENS; t++) {
        if (t < nt) {
            precise float acc_t = acc[t] + wv * x.v[xi + t * pc.x_stride];
            acc[t] = acc_t;
        }
    }
}

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
        Words w = Words(pc.w), s = Words(pc.scales), z = Words(pc.zeros);
        Floats x = Floats(pc.x);
        uint row = pc.w_byte + r * pc.row_bytes;
        uint xa = pc.x_off + t0 * pc.x_stride;
        bool whole = (row & 3u) == 0u && (pc.row_bytes & 3u) == 0u && pc.group % 8u == 0u && pc.cols % 8u == 0u;
        if (whole) {
            // Whole words and groups of whole 8-element steps: each group's scale and zero point
            // read once, then step k gives this lane element 8k + lane from one word (the same
            // word for the row's 8 lanes with 4-bit codes, two with 8-bit).
            bool four = (pc.iflags & INT_4BIT) != 0u, i8 = (pc.iflags & INT_I8) != 0u;
            uint base = row >> 2, steps = pc.group / 8u, k = 0u;
            for (uint g = 0u; g < pc.groups; g++) {
                float sc = int_scale(s, r * pc.groups + g, pc.iflags);
                int zp = int_zero(z, r, g, pc.groups, pc.iflags);
                for (uint e = 0u; e < steps; e++, k++) {
                    int q;
                    if (four) {
                        q = int((w.v[base + k] >> (4u * lane)) & 15u) - 8;
                    } else {
                        uint word = w.v[base + 2u * k + (lane >> 2)];
                        q = i8 ? sbyte(word, lane & 3u) : int((word >> (8u * (lane & 3u))) & 255u) - 128;
                    }
                    precise float wv = float(q - zp) * sc;
                    uint i = 8u * k + lane;
                    accumulate(acc, wv, x, xa + i, nt);
                }
            }
        } else {
            for (uint i = lane; i < pc.cols; i += 8u) {
                float wv = int_deq(w, row, s, z, r, i, pc.group, pc.groups, pc.iflags);
                accumulate(acc, wv, x, xa + i, nt);
            }
        }
    }
    finish(r, lane, t0, nt, acc, off);
}
