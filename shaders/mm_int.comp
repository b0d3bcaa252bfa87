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
// A thread runs LPT of a row's 8 lanes, each in the reference's order.
//
// A code becomes a float without a conversion instruction: its m bits (m = FBITS) go to the top
// of the mantissa of 1.0, f = 1 + u·2^-m, with u the stored unsigned code (two's-complement
// bytes get their sign bit flipped, +128). With c0 the offset to the signed value minus the zero
// point (u − c0 = q − zp):
//   f32 scales: w = (f − (1 + c0·2^-m))·(sc·2^m) — the difference exact, the product rounded
//     once, as float(q − zp)·sc is;
//   16-bit scales (S16): w = fma(f, sc·2^m, −(2^m + c0)·sc), every value exact (at most
//     9 + 11 significant bits), so the one op gives float(q − zp)·sc, which is exact too.
layout(constant_id = 2) const uint FBITS = 0;
layout(constant_id = 3) const uint FGROUP = 0;
layout(constant_id = 4) const uint LPT = 1;       // lanes a thread: 1, 2 or 4
layout(constant_id = 5) const uint PF = 1;        // chunks loaded ahead: 1 to 4
layout(constant_id = 6) const uint S16 = 0;       // 1: f16/bf16 scales
const uint TPR = 8u / LPT;                        // threads a row
const uint FROWS = WG / TPR;                      // rows a workgroup
const uint CE = FBITS == 4u ? 256u : 128u;        // columns a chunk
const uint STEPS = CE / 8u;                       // a lane's elements a chunk
const uint GPC = FGROUP == 0u ? 1u : CE / FGROUP; // scale groups a chunk
const uint XPT = (CE + WG - 1u) / WG;             // x values each thread copies
const uint WSTRIDE = 34u;                         // words a row in shared memory: 32 + 2 (banks)
const float TWO_M = FBITS == 4u ? 16.0 : 256.0;
const uint MMASK = FBITS == 4u ? 0x00780000u : 0x007F8000u;  // the code's place in the mantissa
const uint MTOP = 22u;                            // its top bit
layout(buffer_reference, std430, buffer_reference_align = 16) buffer Quads { uvec4 v[]; };
shared uint wsh[2][FROWS * WSTRIDE];
shared vec4 xsh[2][CE / 4u];

uint rotl(uint v, uint s) {
    return (v << s) | (v >> ((32u - s) & 31u));
}

// The factor and addend of chunk c's groups (see above): a = sc·2^m, and −(2^m + c0)·sc (S16)
// or 1 + c0·2^-m.
void fparams(Words s, Words z, uint r, uint c, out float fa[GPC], out float fb[GPC]) {
    [[unroll]] for (uint j = 0u; j < GPC; j++) {
        uint g = FGROUP == 0u ? 0u : c * GPC + j;
        float sc = int_scale(s, r * pc.groups + g, pc.iflags);
        int c0 = int(FBITS == 4u ? 8u : 128u) + int_zero(z, r, g, pc.groups, pc.iflags);
        precise float a = sc * TWO_M;
        fa[j] = a;
        if (S16 != 0u) {
            precise float b = -(float(int(TWO_M) + c0) * sc);
            fb[j] = b;
        } else {
            precise float b = 1.0 + float(c0) * (1.0 / TWO_M);
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
    // Where each lane's code sits in its word, rotated to the top of the mantissa.
    uint rot[LPT];
    [[unroll]] for (uint i = 0u; i < LPT; i++) {
        uint l = l0 + i;
        uint at = FBITS == 4u ? 4u * l + 3u : 8u * (l & 3u) + 7u;   // the code's top bit
        rot[i] = (MTOP + 32u - at) & 31u;
    }
    uint fx = 0x3F800000u ^ (FBITS == 8u && (pc.iflags & INT_I8) != 0u ? 0x00400000u : 0u);
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
                    if (e < CE) xsh[b][e >> 2][e & 3u] = xreg[j][k];
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
                    vec4 x4 = xsh[b][(8u * e + l0) >> 2];
                    uint word = FBITS == 4u ? wsh[b][rb + e] : wsh[b][rb + 2u * e + (l0 >> 2)];
                    [[unroll]] for (uint i = 0u; i < LPT; i++) {
                        float xv = LPT == 4u ? x4[i] : LPT == 2u ? x4[(l0 & 2u) + i] : x4[l0 & 3u];
                        float f = uintBitsToFloat((rotl(word, rot[i]) & MMASK) ^ fx);
                        float wv;
                        if (S16 != 0u) {
                            precise float v = fma(f, fa[g], fb[g]);
                            wv = v;
                        } else {
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
