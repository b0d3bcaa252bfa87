#version 460
// Attention, exactly as purehw_kernels::ops::attend: one workgroup per (row, query head).
// Pass 1 takes the max score (order-free) and keeps the scores when they fit one chunk; pass 2
// recomputes each score identically where they did not, and in key order adds exp(s - max) to
// the sum (one thread) and e·v to each output dimension (one thread per dimension); then
// divides, correctly rounded.
#include "common/base.glsl"
#include "common/exact.glsl"
#include "common/quantize.glsl"
#extension GL_KHR_shader_subgroup_basic : require
#extension GL_KHR_shader_subgroup_shuffle : require

#define CHUNK 256u
#define MAX_HD 512u

layout(local_size_x = 256) in;
// The head size, fixed per pipeline so the loops over it unroll.
layout(constant_id = 0) const uint HD = 256;
// The caches' elements: 0 f32, 1 f16 (common/kv.glsl).
layout(constant_id = 1) const uint KV16 = 0;
#include "common/attn.glsl"
#include "common/kv.glsl"

shared float sq[MAX_HD];
shared float se[CHUNK];
shared float smax[256];
shared float ssum;

// Lane `lane` (0..8) of key `kbase`'s score chain: q·k over elements lane, lane + 8, … (the
// reference's dot_f32 lanes), one lane per invocation of 8 neighbouring invocations.
float score_lane(Floats k, Words kw, uint kbase, uint lane) {
    precise float acc = 0.0;
    [[unroll]] for (uint i = 0u; i < HD; i += 8u) {
        if (i + lane < HD) acc = acc + sq[i + lane] * kv_ld(k, kw, pc.k_off, kbase + i + lane);
    }
    return acc;
}

void main() {
    uint t = gl_WorkGroupID.x, h = gl_WorkGroupID.y, tid = gl_LocalInvocationID.x;
    uint hd = HD;
    Words st = Words(pc.step);
    Floats o = Floats(pc.out_);
    uint obase = pc.out_off + (t * pc.heads + h) * hd;
    // The query's loads are issued before the row's place is known (they do not depend on it).
    Floats q = Floats(pc.q);
    uint qb = pc.q_off + (t * pc.heads + h) * hd;
    float q0 = q.v[qb + min(tid, hd - 1u)], q1 = q.v[qb + min(tid + 256u, hd - 1u)];
    uint s = st.v[pc.row_seq_off + t];
    if (s == 0xFFFFFFFFu) return;
    uint srow = st.v[pc.seqs_off + 5u * s];
    uint p = st.v[pc.seqs_off + 5u * s + 3u] + (t - srow);
    uint first = (pc.window > 0u && p + 1u > pc.window) ? p + 1u - pc.window : 0u;
    kv_rows(st, pc.seqs_off + 5u * s, first);
    uint nk = p + 1u - first;
    Floats k = Floats(pc.k), v = Floats(pc.v);
    Words kw = Words(pc.k), vw = Words(pc.v);
    if (tid < hd) sq[tid] = q0;
    if (tid + 256u < hd) sq[tid + 256u] = q1;
    barrier();
    uint kvw = pc.kv_heads * hd, g = h / (pc.heads / pc.kv_heads);
    uint kb0 = g * hd;   // key j of the range: row kv_row(j), this head's part

    // Pass 1: the largest score (NaN scores are skipped, as f32::max does). Groups of 8
    // invocations take one key each, 32 keys a round.
    uint lane = tid & 7u, grp = tid >> 3;
    float m = uintBitsToFloat(0xFF800000u);
    for (uint j0 = 0u; j0 < nk; j0 += 32u) {
        uint j = j0 + grp;
        // Past the end a group scores the last key again (unconditional loads) and keeps nothing.
        float acc = score_lane(k, kw, pc.k_off + kv_row(min(j, nk - 1u)) * kvw + kb0, lane);
        float sc = score_of(acc);
        if (lane == 0u && j < nk) {
            m = sc > m ? sc : m;
            if (nk <= CHUNK) se[j] = sc;   // one chunk: pass 2 takes the scores from here
        }
    }
    smax[tid] = m;
    barrier();
    for (uint w = 128u; w > 0u; w >>= 1) {
        if (tid < w) smax[tid] = smax[tid + w] > smax[tid] ? smax[tid + w] : smax[tid];
        barrier();
    }
    float mx = smax[0];

    // Pass 2, a chunk of keys at a time.
    precise float acc0 = 0.0, acc1 = 0.0;   // output dims tid and tid + 256
    if (tid == 0u) ssum = 0.0;
    for (uint c0 = 0u; c0 < nk; c0 += CHUNK) {
        uint cn = min(CHUNK, nk - c0);
        if (nk <= CHUNK) {
            // The scores pass 1 kept (the same bits a recomputation gives), one key per invocation.
            for (uint j = tid; j < cn; j += 256u) se[j] = exp_ref(se[j] - mx);
        } else {
            for (uint j0 = 0u; j0 < cn; j0 += 32u) {
                uint j = j0 + grp;
                float acc = score_lane(k, kw, pc.k_off + kv_row(c0 + min(j, cn - 1u)) * kvw + kb0, lane);
                float sc = score_of(acc);
                if (lane == 0u && j < cn) se[j] = exp_ref(sc - mx);
            }
        }
        barrier();
        // The chains, eight keys at a time: loads first, then the additions in key order.
        if (tid == 0u) {
            precise float sum = ssum;
            uint j = 0u;
            for (; j + 8u <= cn; j += 8u) {
                float e[8];
                [[unroll]] for (uint u = 0u; u < 8u; u++) e[u] = se[j + u];
                [[unroll]] for (uint u = 0u; u < 8u; u++) sum = sum + e[u];
            }
            for (; j < cn; j++) sum = sum + se[j];
            ssum = sum;
        }
        uint vb = pc.v_off + kb0;
        [[unroll]] for (uint half_ = 0u; half_ < 2u; half_++) {
            uint d = tid + 256u * half_;
            if (d >= HD) continue;
            precise float acc = half_ == 0u ? acc0 : acc1;
            uint j = 0u;
            // 32 keys' values in flight at once: the chain waits on memory once per 32 keys.
            for (; j + 32u <= cn; j += 32u) {
                float vv[32];
                [[unroll]] for (uint u = 0u; u < 32u; u++) vv[u] = kv_ld(v, vw, pc.v_off, vb + kv_row(c0 + j + u) * kvw + d);
                [[unroll]] for (uint u = 0u; u < 32u; u++) acc = acc + se[j + u] * vv[u];
            }
            for (; j + 8u <= cn; j += 8u) {
                float vv[8];
                [[unroll]] for (uint u = 0u; u < 8u; u++) vv[u] = kv_ld(v, vw, pc.v_off, vb + kv_row(c0 + j + u) * kvw + d);
                [[unroll]] for (uint u = 0u; u < 8u; u++) acc = acc + se[j + u] * vv[u];
            }
            for (; j < cn; j++) acc = acc + se[j] * kv_ld(v, vw, pc.v_off, vb + kv_row(c0 + j) * kvw + d);
            if (half_ == 0u) acc0 = acc; else acc1 = acc;
        }
        barrier();
    }
    float sum = ssum;
    float o0 = tid < hd ? div_rn(acc0, sum) : 0.0;
    if (tid < hd) o.v[obase + tid] = o0;
    if (tid + 256u < hd) o.v[obase + tid + 256u] = div_rn(acc1, sum);
    if (pc.qmode != 0u) {
        // Quantize this head's outputs: whole blocks of the row (head_dim a multiple of the block).
        bool k = pc.qmode == 2u;
        uint be = k ? 256u : 32u, bw = k ? 73u : 10u;
        qv[tid] = o0;
        barrier();
        quantize_seg(Words(pc.qout), pc.qout_off + (t * pc.heads * hd + h * hd) / be * bw, hd, k);
    }
}
