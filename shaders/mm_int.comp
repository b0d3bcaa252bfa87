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

// The decode fast path (one token, whole 16-byte-aligned rows, chunks of whole groups), chosen
// by the host: FBITS 4 or 8 (0: the element-wise path below), FGROUP the columns per scale (0:
// one per row). The workgroup copies each chunk of its rows' codes (32 words a row, one uvec4 a
// thread) and of x into shared memory with coalesced loads, the next chunk's loads in flight
// while this one is computed; every lane still walks its own elements in the reference's order.
layout(constant_id = 2) const uint FBITS = 0;
layout(constant_id = 3) const uint FGROUP = 0;
// The wide variant of the fast path (below), and the chunks it keeps in flight.
layout(constant_id = 4) const uint WIDE = 0;
layout(constant_id = 5) const uint DEPTH = 4;
const uint CE = FBITS == 4u ? 256u : 128u;         // columns a chunk
const uint STEPS = CE / 8u;                       // a lane's elements a chunk
const uint GPC = FGROUP == 0u ? 1u : CE / FGROUP; // scale groups a chunk
const uint XPT = (CE + WG - 1u) / WG;             // x values each thread copies
const uint WSTRIDE = 34u;                         // words a row in shared memory: 32 + 2 (banks)
layout(buffer_reference, std430, buffer_reference_align = 16) buffer Quads { uvec4 v[]; };
shared uint wsh[2][WIDE == 0u ? ROWS * WSTRIDE : 1u];
shared float xsh[2][WIDE == 0u ? CE : 1u];

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

// Scales (and zero points) of chunk c's groups.
void chunk_params(Words s, Words z, uint r, uint c, out float sc[GPC], out int zp[GPC]) {
    [[unroll]] for (uint j = 0u; j < GPC; j++) {
        uint g = FGROUP == 0u ? 0u : c * GPC + j;
        sc[j] = int_scale(s, r * pc.groups + g, pc.iflags);
        zp[j] = int_zero(z, r, g, pc.groups, pc.iflags);
    }
}

void fast() {
    uint tid = gl_LocalInvocationID.x, lane = tid & 7u, row_l = tid >> 3;
    uint r = gl_WorkGroupID.x * ROWS + row_l;
    bool live = r < pc.rows;
    Quads w = Quads(pc.w);
    Words s = Words(pc.scales), z = Words(pc.zeros);
    Floats x = Floats(pc.x);
    uint chunks = pc.cols / CE;
    // This thread's quarter-row of codes: uvec4 `lane` of the row's 32-word chunk.
    uint q0 = (pc.w_byte + (live ? r : 0u) * pc.row_bytes) / 16u + lane;
    uvec4 wreg = live ? w.v[q0] : uvec4(0u);
    float xreg[XPT];
    [[unroll]] for (uint j = 0u; j < XPT; j++) {
        uint e = tid + j * WG;
        xreg[j] = e < CE ? x.v[pc.x_off + e] : 0.0;
    }
    float sc[GPC];
    int zp[GPC];
    chunk_params(s, z, live ? r : 0u, 0u, sc, zp);
    float acc = 0.0;
    bool four = FBITS == 4u, i8 = (pc.iflags & INT_I8) != 0u;
    for (uint c = 0u; c < chunks; c++) {
        uint b = c & 1u;
        uint wo = row_l * WSTRIDE + 4u * lane;
        wsh[b][wo] = wreg.x;
        wsh[b][wo + 1u] = wreg.y;
        wsh[b][wo + 2u] = wreg.z;
        wsh[b][wo + 3u] = wreg.w;
        [[unroll]] for (uint j = 0u; j < XPT; j++) {
            uint e = tid + j * WG;
            if (e < CE) xsh[b][e] = xreg[j];
        }
        barrier();
        // The next chunk's loads go out before this chunk's arithmetic.
        float nsc[GPC];
        int nzp[GPC];
        if (c + 1u < chunks) {
            if (live) wreg = w.v[q0 + 8u * (c + 1u)];
            [[unroll]] for (uint j = 0u; j < XPT; j++) {
                uint e = tid + j * WG;
                if (e < CE) xreg[j] = x.v[pc.x_off + (c + 1u) * CE + e];
            }
            if (FGROUP != 0u) chunk_params(s, z, live ? r : 0u, c + 1u, nsc, nzp);
        }
        uint rb = row_l * WSTRIDE;
        [[unroll]] for (uint e = 0u; e < STEPS; e++) {
            int q = four ? word_code(wsh[b][rb + e], lane, true, i8)
                         : word_code(wsh[b][rb + 2u * e + (lane >> 2)], lane & 3u, false, i8);
            uint g = FGROUP == 0u ? 0u : (8u * e) / FGROUP;
            precise float wv = float(q - zp[g]) * sc[g];
            precise float a = acc + wv * xsh[b][8u * e + lane];
            acc = a;
        }
        if (FGROUP != 0u && c + 1u < chunks) {
            [[unroll]] for (uint j = 0u; j < GPC; j++) {
                sc[j] = nsc[j];
                zp[j] = nzp[j];
            }
        }
    }
    float accs[TOKENS], off[TOKENS];
    [[unroll]] for (uint t = 0u; t < TOKENS; t++) {
        accs[t] = t == 0u ? acc : 0.0;
        off[t] = 0.0;
    }
    finish(r, lane, 0u, 1u, accs, off);
}

// The wide decode path (WIDE=1, with FBITS/FGROUP as the fast path): the fast path's threads
// and chains, with fewer instructions an element. A row's code words sit in shared memory as
// uvec4s and x by lane, so one shared load gives a thread four words (four of its 4-bit codes,
// two 8-bit) and another four of its x values; each group's scale is loaded once a row (by one
// of its 8 threads) and shared with its magic constant. A code's float is made from its bits
// rather than by a conversion: (2^23 + u) − (2^23 + offset + zero point) is q − zp exactly
// (both operands and the difference are integers below 2^24). DEPTH chunks are in flight.
const uint QROW = 9u;                 // uvec4s a row in shared memory: 8 + 1 (banks)
const uint XQ = STEPS / 4u;           // vec4s of a lane's x a chunk
const uint XS = XQ + 1u;              // ... in shared memory (+1: banks)
const uint SPT = (GPC + 7u) / 8u;     // groups whose scale a thread loads a chunk
const uint SROW = GPC + 1u;           // (scale, magic) pairs a row in shared memory (+1: banks)
shared uvec4 wq4[WIDE != 0u ? 2u * ROWS * QROW : 1u];
shared vec4 xq4[WIDE != 0u ? 2u * 8u * XS : 1u];
shared vec2 sm2[WIDE != 0u ? 2u * ROWS * SROW : 1u];

// Chunk c's code quad, x quad (thread tid < 8·XQ: lane tid % 8, quad tid / 8) and the scales
// of groups lane, lane + 8, … with their magic constants; zeros past the last chunk.
void wide_load(uint c, uint chunks, uint q0, uint rr, uint tid, out uvec4 wd, out vec4 xd, out vec2 sd[SPT]) {
    wd = uvec4(0u);
    xd = vec4(0.0);
    [[unroll]] for (uint j = 0u; j < SPT; j++) sd[j] = vec2(0.0);
    if (c >= chunks) return;
    wd = Quads(pc.w).v[q0 + 8u * c];
    uint xl = tid & 7u, xq = tid >> 3;
    if (xq < XQ) {
        Floats x = Floats(pc.x);
        uint xb = pc.x_off + c * CE + 32u * xq + xl;
        xd = vec4(x.v[xb], x.v[xb + 8u], x.v[xb + 16u], x.v[xb + 24u]);
    }
    int off = FBITS == 4u ? 8 : 128;
    [[unroll]] for (uint j = 0u; j < SPT; j++) {
        uint gl = (tid & 7u) + 8u * j;
        if (gl < GPC) {
            uint g = FGROUP == 0u ? 0u : c * GPC + gl;
            float sc = int_scale(Words(pc.scales), rr * pc.groups + g, pc.iflags);
            int zp = int_zero(Words(pc.zeros), rr, g, pc.groups, pc.iflags);
            sd[j] = vec2(sc, float(8388608 + off + zp));
        }
    }
}

void wide() {
    uint tid = gl_LocalInvocationID.x, lane = tid & 7u, row_l = tid >> 3;
    uint r = gl_WorkGroupID.x * ROWS + row_l;
    uint rr = r < pc.rows ? r : 0u;
    uint chunks = pc.cols / CE;
    uint q0 = (pc.w_byte + rr * pc.row_bytes) / 16u + lane;
    // The float's bits: 2^23's exponent, and int-quantized bytes (two's complement) offset by
    // 128 by flipping their sign bit; one xor does both (the code has no bits of either).
    uint fm = 0x4B000000u | ((pc.iflags & INT_I8) != 0u ? 0x80u : 0u);
    uint sh = FBITS == 4u ? 4u * lane : 8u * (lane & 3u);
    bool hi = lane >= 4u;
    uvec4 wd[DEPTH];
    vec4 xd[DEPTH];
    vec2 sd[DEPTH][SPT];
    [[unroll]] for (uint k = 0u; k < DEPTH; k++) wide_load(k, chunks, q0, rr, tid, wd[k], xd[k], sd[k]);
    precise float acc = 0.0;
    for (uint c0 = 0u; c0 < chunks; c0 += DEPTH) {
        [[unroll]] for (uint k = 0u; k < DEPTH; k++) {
            uint c = c0 + k;
            if (c < chunks) {
                uint b = c & 1u;
                uint rb = (b * ROWS + row_l) * QROW, xb = (b * 8u + lane) * XS, sb = (b * ROWS + row_l) * SROW;
                wq4[rb + lane] = wd[k];
                if (tid < 8u * XQ) xq4[(b * 8u + (tid & 7u)) * XS + (tid >> 3)] = xd[k];
                [[unroll]] for (uint j = 0u; j < SPT; j++) {
                    if (lane + 8u * j < GPC) sm2[sb + lane + 8u * j] = sd[k][j];
                }
                barrier();
                // The loads DEPTH chunks ahead go out before this chunk's arithmetic.
                wide_load(c + DEPTH, chunks, q0, rr, tid, wd[k], xd[k], sd[k]);
                [[unroll]] for (uint qd = 0u; qd < 8u; qd++) {
                    uvec4 w4 = wq4[rb + qd];
                    vec4 x4 = xq4[xb + (FBITS == 4u ? qd : qd / 2u)];
                    [[unroll]] for (uint i = 0u; i < (FBITS == 4u ? 4u : 2u); i++) {
                        // 4-bit: word 4qd + i holds this lane's element 4qd + i; 8-bit: words
                        // 2e and 2e + 1 hold element e's byte (lanes 0–3, 4–7).
                        uint e = FBITS == 4u ? 4u * qd + i : 2u * qd + i;
                        uint word = FBITS == 4u ? w4[i] : (i == 0u ? (hi ? w4.y : w4.x) : (hi ? w4.w : w4.z));
                        uint bits = ((word >> sh) & (FBITS == 4u ? 15u : 255u)) ^ fm;
                        vec2 sm = sm2[sb + (FGROUP == 0u ? 0u : (8u * e) / FGROUP)];
                        precise float f = uintBitsToFloat(bits) - sm.y;
                        precise float wv = f * sm.x;
                        precise float a = acc + wv * x4[FBITS == 4u ? i : 2u * (qd & 1u) + i];
                        acc = a;
                    }
                }
            }
        }
    }
    float accs[TOKENS], off[TOKENS];
    [[unroll]] for (uint t = 0u; t < TOKENS; t++) {
        accs[t] = t == 0u ? acc : 0.0;
        off[t] = 0.0;
    }
    finish(r, lane, 0u, 1u, accs, off);
}

void main() {
    if (WIDE != 0u) {
        wide();
        return;
    }
    if (FBITS != 0u) {
        fast();
        return;
    }
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
                    int q = four ? word_code(w.v[base + k], lane, true, i8)
                                 : word_code(w.v[base + 2u * k + (lane >> 2)], lane & 3u, false, i8);
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
