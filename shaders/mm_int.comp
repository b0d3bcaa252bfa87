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
const uint CE = FBITS == 4u ? 256u : 128u;         // columns a chunk
const uint STEPS = CE / 8u;                       // a lane's elements a chunk
const uint GPC = FGROUP == 0u ? 1u : CE / FGROUP; // scale groups a chunk
const uint XPT = (CE + WG - 1u) / WG;             // x values each thread copies
const uint WSTRIDE = 34u;                         // words a row in shared memory: 32 + 2 (banks)
layout(buffer_reference, std430, buffer_reference_align = 16) buffer Quads { uvec4 v[]; };
shared uint wsh[2][ROWS * WSTRIDE];
shared float xsh[2][CE];

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

// The split decode path (SPLIT=1, with FBITS/FGROUP as the fast path): a workgroup of 256
// threads takes SR rows. Each chunk's products (w·x, each rounded as the reference rounds it)
// are made by every thread, one code word a thread, into shared memory; then thread (row, lane)
// of the first SR·8 adds its lane's products in element order — the reference's chain — while
// the next chunk is being made. So eight chains a row no longer bound how many conversions are
// in flight. The code words and scales of DEPTH chunks are loaded at once, the next DEPTH's
// going out while these are computed, so more of the stream is in flight than one chunk's.
layout(constant_id = 4) const uint SPLIT = 0;
layout(constant_id = 5) const uint DEPTH = 4;
const uint SR = 8u;                               // rows a workgroup (256 threads: 32 words a row)
const uint SPC = FBITS == 4u ? 8u : 4u;           // columns a code word
const uint PSTR = CE + 8u;                        // a row's products in shared memory (banks)
shared float prod[SPLIT != 0u ? 2u * SR * PSTR : 1u];

// Chunk c's code word, scale and zero point for this producer (nothing past the last chunk).
void split_load(uint c, uint chunks, uint q0, uint rp, uint wi, out uint word, out float sc, out int zp) {
    word = 0u;
    sc = 0.0;
    zp = 0;
    if (c < chunks) {
        word = Words(pc.w).v[q0 + 32u * c];
        uint g = FGROUP == 0u ? 0u : (c * CE + SPC * wi) / FGROUP;
        sc = int_scale(Words(pc.scales), rp * pc.groups + g, pc.iflags);
        zp = int_zero(Words(pc.zeros), rp, g, pc.groups, pc.iflags);
    }
}

void split() {
    uint tid = gl_LocalInvocationID.x;
    uint r0 = gl_WorkGroupID.x * SR;
    // Producer: word `wi` of row `pr`'s chunk.
    uint pr = tid >> 5, wi = tid & 31u;
    uint rp = min(r0 + pr, pc.rows - 1u);
    Floats x = Floats(pc.x);
    uint q0 = (pc.w_byte + rp * pc.row_bytes) / 4u + wi;
    uint chunks = pc.cols / CE;
    bool i8 = (pc.iflags & INT_I8) != 0u;
    // Adder: (row, lane) of the first SR·8 threads.
    uint ar = tid >> 3, lane = tid & 7u;
    bool adder = ar < SR;
    uint wq[DEPTH];
    float sq[DEPTH];
    int zq[DEPTH];
    [[unroll]] for (uint k = 0u; k < DEPTH; k++) split_load(k, chunks, q0, rp, wi, wq[k], sq[k], zq[k]);
    float xv[SPC];
    [[unroll]] for (uint j = 0u; j < SPC; j++) xv[j] = x.v[pc.x_off + SPC * wi + j];
    precise float acc = 0.0;
    for (uint c0 = 0u; c0 < chunks; c0 += DEPTH) {
        uint nwq[DEPTH];
        float nsq[DEPTH];
        int nzq[DEPTH];
        [[unroll]] for (uint k = 0u; k < DEPTH; k++) split_load(c0 + DEPTH + k, chunks, q0, rp, wi, nwq[k], nsq[k], nzq[k]);
        [[unroll]] for (uint k = 0u; k < DEPTH; k++) {
            uint c = c0 + k;
            if (c < chunks) {
                uint b = c & 1u;
                // The next chunk's x (shared by every row: from the cache).
                float nx[SPC];
                uint xn = min(c + 1u, chunks - 1u) * CE + SPC * wi;
                [[unroll]] for (uint j = 0u; j < SPC; j++) nx[j] = x.v[pc.x_off + xn + j];
                uint po = (b * SR + pr) * PSTR + SPC * wi;
                [[unroll]] for (uint j = 0u; j < SPC; j++) {
                    int q = word_code(wq[k], j, FBITS == 4u, i8);
                    precise float wv = float(q - zq[k]) * sq[k];
                    precise float p = wv * xv[j];
                    prod[po + j] = p;
                }
                barrier();
                if (adder) {
                    uint ao = (b * SR + ar) * PSTR + lane;
                    [[unroll]] for (uint e = 0u; e < CE / 8u; e++) {
                        precise float a = acc + prod[ao + 8u * e];
                        acc = a;
                    }
                }
                [[unroll]] for (uint j = 0u; j < SPC; j++) xv[j] = nx[j];
            }
        }
        [[unroll]] for (uint k = 0u; k < DEPTH; k++) {
            wq[k] = nwq[k];
            sq[k] = nsq[k];
            zq[k] = nzq[k];
        }
    }
    float accs[TOKENS], off[TOKENS];
    [[unroll]] for (uint t = 0u; t < TOKENS; t++) {
        accs[t] = t == 0u ? acc : 0.0;
        off[t] = 0.0;
    }
    finish(adder ? r0 + ar : 0xFFFFFFFFu, lane, 0u, 1u, accs, off);
}

void main() {
    if (SPLIT != 0u) {
        split();
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
