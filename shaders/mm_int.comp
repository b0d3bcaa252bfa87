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
// one per row). The workgroup copies each chunk of its rows' codes (32 words a row) and of x
// into shared memory with coalesced loads, PF chunks' loads in flight ahead of the arithmetic.
// A thread runs LPT of a row's 8 lanes, each in the reference's order, and reads each code word
// once for all of them.
//
// CONV=1 makes a code a float without a conversion instruction: the code shifted to the bottom
// of the mantissa of 1.0, f = 1 + u·2^-23 with u the stored unsigned code (two's-complement
// bytes get their sign bit flipped, +128); with c0 the offset from u to the signed value minus
// the zero point (u − c0 = q − zp), w = (f − (1 + c0·2^-23))·(sc·2^23): the difference is
// exact, the product rounded once, as float(q − zp)·sc is (scales below 2^104). CONV=0 converts
// q − zp as the element-wise path does.
layout(constant_id = 2) const uint FBITS = 0;
layout(constant_id = 3) const uint FGROUP = 0;
layout(constant_id = 4) const uint LPT = 1;       // lanes a thread: 1, 2 or 4
layout(constant_id = 5) const uint PF = 1;        // chunks loaded ahead: 1 to 4
layout(constant_id = 6) const uint CONV = 1;
layout(constant_id = 7) const uint VEC = 0;      // 1: fast_vec (one lane a thread, 16-byte shared reads)
const uint TPR = 8u / LPT;                        // threads a row
const uint FROWS = WG / TPR;                      // rows a workgroup
const uint CE = FBITS == 4u ? 256u : 128u;        // columns a chunk
const uint STEPS = CE / 8u;                       // a lane's elements a chunk
const uint GPC = FGROUP == 0u ? 1u : CE / FGROUP; // scale groups a chunk
const uint XPT = (CE + WG - 1u) / WG;             // x values each thread copies
const uint WSTRIDE = 34u;                         // words a row in shared memory: 32 + 2 (banks)
const float TWO23 = 8388608.0;
layout(buffer_reference, std430, buffer_reference_align = 16) buffer Quads { uvec4 v[]; };
shared uint wsh[2][VEC == 0u ? FROWS * WSTRIDE : 1u];
shared float xsh[2][VEC == 0u ? CE : 1u];

// Chunk c's groups: (scale, zero point as an int) for CONV=0; (sc·2^23, 1 + c0·2^-23) for
// CONV=1.
void fparams(Words s, Words z, uint r, uint c, out float fa[GPC], out float fb[GPC]) {
    [[unroll]] for (uint j = 0u; j < GPC; j++) {
        uint g = FGROUP == 0u ? 0u : c * GPC + j;
        float sc = int_scale(s, r * pc.groups + g, pc.iflags);
        int zp = int_zero(z, r, g, pc.groups, pc.iflags);
        if (CONV == 0u) {
            fa[j] = sc;
            fb[j] = intBitsToFloat(zp);
        } else {
            int c0 = int(FBITS == 4u ? 8u : 128u) + zp;
            precise float a = sc * TWO23;
            precise float b = 1.0 + float(c0) * (1.0 / TWO23);
            fa[j] = a;
            fb[j] = b;
        }
    }
}

void fast() {
    uint tid = gl_LocalInvocationID.x, sub = tid % TPR, row_l = tid / TPR;
    uint l0 = sub * LPT;
    uint r = gl_WorkGroupID.x * FROWS + row_l;
    bool live = r < pc.rows;
    uint rs = live ? r : 0u;
    Quads w = Quads(pc.w);
    Words s = Words(pc.scales), z = Words(pc.zeros);
    Floats x = Floats(pc.x);
    uint chunks = pc.cols / CE;
    bool i8 = (pc.iflags & INT_I8) != 0u;
    // This thread's LPT quads of the 8 in a row's chunk.
    uint q0 = (pc.w_byte + rs * pc.row_bytes) / 16u + l0;
    uvec4 wreg[PF][LPT];
    float xreg[PF][XPT];
    [[unroll]] for (uint j = 0u; j < PF; j++) {
        [[unroll]] for (uint i = 0u; i < LPT; i++) wreg[j][i] = live && j < chunks ? w.v[q0 + 8u * j + i] : uvec4(0u);
        [[unroll]] for (uint k = 0u; k < XPT; k++) {
            uint e = tid + k * WG;
            xreg[j][k] = e < CE && j < chunks ? x.v[pc.x_off + j * CE + e] : 0.0;
        }
    }
    float fa[GPC], fb[GPC];
    fparams(s, z, rs, 0u, fa, fb);
    // Each lane's code: shifted down by sh, then (CONV=1) masked into the mantissa of 1.0.
    uint sh[LPT];
    [[unroll]] for (uint i = 0u; i < LPT; i++) sh[i] = FBITS == 4u ? 4u * (l0 + i) : 8u * ((l0 + i) & 3u);
    uint fx = 0x3F800000u ^ (FBITS == 8u && i8 ? 0x80u : 0u);
    float acc[LPT];
    [[unroll]] for (uint i = 0u; i < LPT; i++) acc[i] = 0.0;
    uint rb = row_l * WSTRIDE;
    for (uint c0 = 0u; c0 < chunks; c0 += PF) {
        [[unroll]] for (uint j = 0u; j < PF; j++) {
            uint c = c0 + j;
            if (c < chunks) {
                uint b = c & 1u;
                [[unroll]] for (uint i = 0u; i < LPT; i++) {
                    uint wo = rb + 4u * (l0 + i);
                    wsh[b][wo] = wreg[j][i].x;
                    wsh[b][wo + 1u] = wreg[j][i].y;
                    wsh[b][wo + 2u] = wreg[j][i].z;
                    wsh[b][wo + 3u] = wreg[j][i].w;
                }
                [[unroll]] for (uint k = 0u; k < XPT; k++) {
                    uint e = tid + k * WG;
                    if (e < CE) xsh[b][e] = xreg[j][k];
                }
                barrier();
                // Chunk c + PF's loads go out before this chunk's arithmetic.
                uint cn = c + PF;
                if (cn < chunks) {
                    [[unroll]] for (uint i = 0u; i < LPT; i++) {
                        if (live) wreg[j][i] = w.v[q0 + 8u * cn + i];
                    }
                    [[unroll]] for (uint k = 0u; k < XPT; k++) {
                        uint e = tid + k * WG;
                        if (e < CE) xreg[j][k] = x.v[pc.x_off + cn * CE + e];
                    }
                }
                float na[GPC], nb[GPC];
                if (FGROUP != 0u && c + 1u < chunks) fparams(s, z, rs, c + 1u, na, nb);
                [[unroll]] for (uint e = 0u; e < STEPS; e++) {
                    uint g = FGROUP == 0u ? 0u : (8u * e) / FGROUP;
                    uint word = FBITS == 4u ? wsh[b][rb + e] : wsh[b][rb + 2u * e + (l0 >> 2)];
                    [[unroll]] for (uint i = 0u; i < LPT; i++) {
                        float xv = xsh[b][8u * e + l0 + i];
                        float wv;
                        if (CONV == 0u) {
                            int q;
                            if (FBITS == 4u) {
                                q = int((word >> sh[i]) & 15u) - 8;
                            } else {
                                q = i8 ? int(word << (24u - sh[i])) >> 24 : int((word >> sh[i]) & 255u) - 128;
                            }
                            precise float v = float(q - floatBitsToInt(fb[g])) * fa[g];
                            wv = v;
                        } else {
                            float f = uintBitsToFloat(((word >> sh[i]) & (FBITS == 4u ? 15u : 255u)) ^ fx);
                            precise float d = f - fb[g];
                            precise float v = d * fa[g];
                            wv = v;
                        }
                        precise float a = acc[i] + wv * xv;
                        acc[i] = a;
                    }
                }
                if (FGROUP != 0u && c + 1u < chunks) {
                    [[unroll]] for (uint k = 0u; k < GPC; k++) {
                        fa[k] = na[k];
                        fb[k] = nb[k];
                    }
                }
            }
        }
    }
    // The row's first thread gathers the 8 lanes (shuffles: moves, no arithmetic).
    uint me = gl_SubgroupInvocationID;
    float lanes[8];
    [[unroll]] for (uint t = 0u; t < TPR; t++) {
        [[unroll]] for (uint i = 0u; i < LPT; i++) lanes[t * LPT + i] = subgroupShuffle(acc[i], me + t);
    }
    if (sub == 0u && live) {
        precise float res = reduce_lanes(lanes[0], lanes[1], lanes[2], lanes[3], lanes[4], lanes[5], lanes[6], lanes[7]);
        Floats o = Floats(pc.out_);
        o.v[pc.out_off + r] = res;
    }
}

// VEC=1 (one lane a thread): both shared arrays are laid out so that a thread reads four
// steps' codes and four steps' x values with one 16-byte load each. A row's chunk is 36 words
// (9 quads; rows 4 banks apart): 4-bit codes in order (word e is step e), 8-bit codes split by
// half-word (lanes 0–3 read words 0..15 = the chunk's even words, lanes 4–7 words 16..31 = its
// odd ones). x is stored lane-major, x[8e + l] at l·XSTR + e (lanes 4 banks apart).
const uint XSTR = STEPS + 4u;
shared uvec4 wq[2][VEC != 0u ? ROWS * 9u : 1u];
shared vec4 xq[2][VEC != 0u ? 2u * XSTR : 1u];

void fast_vec() {
    uint tid = gl_LocalInvocationID.x, lane = tid & 7u, row_l = tid >> 3;
    uint r = gl_WorkGroupID.x * ROWS + row_l;
    bool live = r < pc.rows;
    uint rs = live ? r : 0u;
    Quads w = Quads(pc.w);
    Words s = Words(pc.scales), z = Words(pc.zeros);
    Floats x = Floats(pc.x);
    uint chunks = pc.cols / CE;
    bool i8 = (pc.iflags & INT_I8) != 0u;
    uint q0 = (pc.w_byte + rs * pc.row_bytes) / 16u + lane;
    uvec4 wreg[PF];
    float xreg[PF][XPT];
    [[unroll]] for (uint j = 0u; j < PF; j++) {
        wreg[j] = live && j < chunks ? w.v[q0 + 8u * j] : uvec4(0u);
        [[unroll]] for (uint k = 0u; k < XPT; k++) {
            uint e = tid + k * WG;
            xreg[j][k] = e < CE && j < chunks ? x.v[pc.x_off + j * CE + e] : 0.0;
        }
    }
    float fa[GPC], fb[GPC];
    fparams(s, z, rs, 0u, fa, fb);
    uint sh = FBITS == 4u ? 4u * lane : 8u * (lane & 3u);
    uint fx = 0x3F800000u ^ (FBITS == 8u && i8 ? 0x80u : 0u);
    uint wbase = row_l * 9u + (FBITS == 8u ? 4u * (lane >> 2) : 0u);   // this lane's quads
    float acc = 0.0;
    for (uint c0 = 0u; c0 < chunks; c0 += PF) {
        [[unroll]] for (uint j = 0u; j < PF; j++) {
            uint c = c0 + j;
            if (c < chunks) {
                uint b = c & 1u;
                if (FBITS == 4u) {
                    wq[b][row_l * 9u + lane] = wreg[j];
                } else {
                    // Quad `lane` is words 4·lane..4·lane+3: the even ones are steps 2·lane and
                    // 2·lane + 1 of the low half, the odd ones of the high half.
                    uint base = row_l * 36u + 2u * lane;
                    wq[b][(base) >> 2][(base) & 3u] = wreg[j].x;
                    wq[b][(base + 1u) >> 2][(base + 1u) & 3u] = wreg[j].z;
                    wq[b][(base + 16u) >> 2][(base + 16u) & 3u] = wreg[j].y;
                    wq[b][(base + 17u) >> 2][(base + 17u) & 3u] = wreg[j].w;
                }
                [[unroll]] for (uint k = 0u; k < XPT; k++) {
                    uint e = tid + k * WG;
                    if (e < CE) {
                        uint at = (e & 7u) * XSTR + (e >> 3);
                        xq[b][at >> 2][at & 3u] = xreg[j][k];
                    }
                }
                barrier();
                uint cn = c + PF;
                if (cn < chunks) {
                    if (live) wreg[j] = w.v[q0 + 8u * cn];
                    [[unroll]] for (uint k = 0u; k < XPT; k++) {
                        uint e = tid + k * WG;
                        if (e < CE) xreg[j][k] = x.v[pc.x_off + cn * CE + e];
                    }
                }
                float na[GPC], nb[GPC];
                if (FGROUP != 0u && c + 1u < chunks) fparams(s, z, rs, c + 1u, na, nb);
                [[unroll]] for (uint e4 = 0u; e4 < STEPS / 4u; e4++) {
                    uvec4 wv4 = wq[b][wbase + e4];
                    vec4 xv4 = xq[b][(lane * XSTR) / 4u + e4];
                    [[unroll]] for (uint k = 0u; k < 4u; k++) {
                        uint e = 4u * e4 + k;
                        uint g = FGROUP == 0u ? 0u : (8u * e) / FGROUP;
                        float wv;
                        if (CONV == 0u) {
                            int q;
                            if (FBITS == 4u) {
                                q = int((wv4[k] >> sh) & 15u) - 8;
                            } else {
                                q = i8 ? int(wv4[k] << (24u - sh)) >> 24 : int((wv4[k] >> sh) & 255u) - 128;
                            }
                            precise float v = float(q - floatBitsToInt(fb[g])) * fa[g];
                            wv = v;
                        } else {
                            float f = uintBitsToFloat(((wv4[k] >> sh) & (FBITS == 4u ? 15u : 255u)) ^ fx);
                            precise float d = f - fb[g];
                            precise float v = d * fa[g];
                            wv = v;
                        }
                        precise float a = acc + wv * xv4[k];
                        acc = a;
                    }
                }
                if (FGROUP != 0u && c + 1u < chunks) {
                    [[unroll]] for (uint k = 0u; k < GPC; k++) {
                        fa[k] = na[k];
                        fb[k] = nb[k];
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
    if (FBITS != 0u && VEC != 0u) {
        fast_vec();
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
