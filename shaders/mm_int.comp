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

layout(buffer_reference, std430, buffer_reference_align = 16) readonly buffer Quads { uvec4 v[]; };

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

// The wide path's state: the row's pieces, its steps and the current group's scale and zero point.
struct Wide {
    Quads wq;
    uint src;          // subgroup invocation of the row's lane 0
    uint lane;
    uint r;
    uint qbase;        // the row's first piece
    uint nq;           // pieces in the row
    uint steps;        // 8-element steps in the row
    uint gsteps;       // steps per group
    uint piece_steps;  // steps per 16-byte piece: 4 (four-bit codes) or 2
    uint g;
    uint gnext;        // first step of the next group
    float sc;
    int zp;
    uint xa;
    uint nt;
};

uvec4 piece(Wide c, uint i) {
    return i < c.nq ? c.wq.v[c.qbase + i] : uvec4(0u);
}

// The steps of the chunk of 8 pieces from piece `q0`; `cur` is this lane's piece of it.
void chunk(inout Wide c, uvec4 cur, uint q0, inout float acc[TOKENS], Words s, Words z, Floats x) {
    uint k0 = q0 * c.piece_steps, k1 = min(c.steps, k0 + 8u * c.piece_steps);
    bool four = (pc.iflags & INT_4BIT) != 0u, i8 = (pc.iflags & INT_I8) != 0u;
    for (uint p = 0u; k0 + p * c.piece_steps < k1; p++) {
        [[unroll]] for (uint j = 0u; j < 4u; j++) {
            uint k = k0 + p * c.piece_steps + j;
            if (j < c.piece_steps && k < k1) {
                if (k == c.gnext) {
                    c.g++;
                    c.gnext += c.gsteps;
                    c.sc = int_scale(s, c.r * pc.groups + c.g, pc.iflags);
                    c.zp = int_zero(z, c.r, c.g, pc.groups, pc.iflags);
                }
                int q;
                if (four) {
                    uint word = subgroupShuffle(cur[j], c.src + p);
                    q = int((word >> (4u * c.lane)) & 15u) - 8;
                } else {
                    // two steps a piece: words 2j and 2j + 1 of piece p
                    uvec2 pair = subgroupShuffle(j == 0u ? cur.xy : cur.zw, c.src + p);
                    uint word = (c.lane >> 2) == 0u ? pair.x : pair.y;
                    q = i8 ? sbyte(word, c.lane & 3u) : int((word >> (8u * (c.lane & 3u))) & 255u) - 128;
                }
                precise float wv = float(q - c.zp) * c.sc;
                accumulate(acc, wv, x, c.xa + 8u * k + c.lane, c.nt);
            }
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
        bool wide = whole && ((pc.w.x | row | pc.row_bytes) & 15u) == 0u;
        if (wide) {
            // Rows of whole 16-byte pieces: a row's 8 lanes load 128 neighbouring bytes at once,
            // each lane one piece, four such chunks in flight (each register reloaded as soon as
            // its chunk is summed), and step k's word comes to every lane by a shuffle (a move)
            // from the lane that loaded it. The same values and the same chains as below.
            Wide c = Wide(Quads(pc.w), gl_SubgroupInvocationID - lane, lane, r, row >> 4, pc.row_bytes >> 4,
                          pc.cols / 8u, pc.group / 8u, (pc.iflags & INT_4BIT) != 0u ? 4u : 2u, 0u, pc.group / 8u,
                          int_scale(s, r * pc.groups, pc.iflags), int_zero(z, r, 0u, pc.groups, pc.iflags), xa, nt);
            uvec4 c0 = piece(c, lane), c1 = piece(c, 8u + lane), c2 = piece(c, 16u + lane), c3 = piece(c, 24u + lane);
            for (uint q0 = 0u; q0 < c.nq; q0 += 32u) {
                chunk(c, c0, q0, acc, s, z, x);
                c0 = piece(c, q0 + 32u + lane);
                chunk(c, c1, q0 + 8u, acc, s, z, x);
                c1 = piece(c, q0 + 40u + lane);
                chunk(c, c2, q0 + 16u, acc, s, z, x);
                c2 = piece(c, q0 + 48u + lane);
                chunk(c, c3, q0 + 24u, acc, s, z, x);
                c3 = piece(c, q0 + 56u + lane);
            }
        } else if (whole) {
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
