#version 460
// Prefill attention, exactly as purehw_kernels::ops::attend (as attention.comp), for a block of
// QB consecutive rows and one query head per workgroup, so each key and value loaded serves QB
// queries. Rows of one sequence form a segment (a block holds one unless sequences meet in it);
// a segment's queries see keys of one range, each query its own part of it (causal, window).
// Pass 1 scores 32 keys a round, 8 lanes per key as the reference's lane chains; pass 2 adds
// exp(score - max) in key order (one invocation per query) and e·v (one chain per output
// dimension and query) where every query of the invocation sees the key without a check, with
// checks at the edges.
#include "common/base.glsl"
#include "common/exact.glsl"
#include "common/quantize.glsl"

#define CHUNK 512u
#define MAX_HD 256u

layout(local_size_x = 256) in;
// The head size: 32 ≤ HD ≤ 256 and a divisor of 256 (the host checks).
layout(constant_id = 0) const uint HD = 256;
// Rows per workgroup: ≤ 8, and QB·HD ≥ 256 (the host picks).
layout(constant_id = 1) const uint QB = 8;
// The caches' elements: 0 f32, 1 f16 (common/kv.glsl).
layout(constant_id = 2) const uint KV16 = 0;
#include "common/attn.glsl"
#include "common/kv.glsl"

const uint QPT = QB * HD / 256u;   // queries per invocation in the value chains

shared float sq[8u * MAX_HD];   // the segment's queries; at the end its outputs
shared float se[8u * CHUNK];    // per query: scores, then exp(score - max)
shared float sred[8u * 32u];
shared float smx[8u];
shared float ssum[8u];

uint first_of(uint p) {
    return (pc.window > 0u && p + 1u > pc.window) ? p + 1u - pc.window : 0u;
}

void main() {
    uint blk = gl_WorkGroupID.x, h = gl_WorkGroupID.y, tid = gl_LocalInvocationID.x;
    uint lane = tid & 7u, grp = tid >> 3;
    uint t0 = blk * QB;
    uint nq = min(QB, pc.rows - t0);
    Words st = Words(pc.step);
    Floats q = Floats(pc.q), k = Floats(pc.k), v = Floats(pc.v), o = Floats(pc.out_);
    Words kw = Words(pc.k), vw = Words(pc.v);
    uint kvw = pc.kv_heads * HD, g = h / (pc.heads / pc.kv_heads);
    uint d = tid % HD, qs = tid / HD;
    uint seg = 0u;
    while (seg < nq) {
        uint s = st.v[pc.row_seq_off + t0 + seg];
        uint end = seg + 1u;
        while (end < nq && st.v[pc.row_seq_off + t0 + end] == s) end++;
        if (s == 0xFFFFFFFFu) {
            seg = end;
            continue;
        }
        uint srow = st.v[pc.seqs_off + 5u * s];
        uint plo = st.v[pc.seqs_off + 5u * s + 3u] + (t0 + seg - srow);   // query seg's position
        uint phi = plo + (end - 1u - seg);
        uint flo = first_of(plo);
        uint nk = phi + 1u - flo;   // the segment's keys, from position flo
        kv_rows(st, pc.seqs_off + 5u * s, flo);   // key j (position flo + j) at row kv_row(j)
        uint kb0 = pc.k_off + g * HD;
        uint vb0 = pc.v_off + g * HD;
        for (uint i = tid; i < QB * HD; i += 256u) {
            uint qi = i / HD;
            bool live = qi >= seg && qi < end;
            sq[i] = live ? q.v[pc.q_off + ((t0 + min(qi, nq - 1u)) * pc.heads + h) * HD + (i - qi * HD)] : 0.0;
        }
        barrier();

        // Pass 1: each query's largest score over the keys it sees (NaN skipped, as f32::max).
        float m[QB];
        [[unroll]] for (uint qi = 0u; qi < QB; qi++) m[qi] = uintBitsToFloat(0xFF800000u);
        for (uint j0 = 0u; j0 < nk; j0 += 32u) {
            uint j = j0 + grp;
            uint kb = kb0 + kv_row(min(j, nk - 1u)) * kvw;
            float kr[HD / 8u];
            [[unroll]] for (uint i = 0u; i < HD / 8u; i++) kr[i] = kv_ld(k, kw, pc.k_off, kb + 8u * i + lane);
            [[unroll]] for (uint qi = 0u; qi < QB; qi++) {
                if (qi >= seg && qi < end) {
                    precise float acc = 0.0;
                    [[unroll]] for (uint i = 0u; i < HD / 8u; i++) acc = acc + sq[qi * HD + 8u * i + lane] * kr[i];
                    float sc = score_of(acc);
                    uint p = plo + (qi - seg), kp = flo + j;
                    if (lane == 0u && j < nk && kp >= first_of(p) && kp <= p) {
                        m[qi] = sc > m[qi] ? sc : m[qi];
                        if (nk <= CHUNK) se[qi * CHUNK + j] = sc;
                    }
                }
            }
        }
        if (lane == 0u) {
            [[unroll]] for (uint qi = 0u; qi < QB; qi++) sred[qi * 32u + grp] = m[qi];
        }
        barrier();
        if (tid < QB) {
            float mx = sred[tid * 32u];
            for (uint i = 1u; i < 32u; i++) mx = sred[tid * 32u + i] > mx ? sred[tid * 32u + i] : mx;
            smx[tid] = mx;
        }
        barrier();

        // Pass 2, a chunk of keys at a time.
        precise float sum = 0.0;   // invocation qi < QB: query qi's sum
        float acc[QPT];
        [[unroll]] for (uint u = 0u; u < QPT; u++) acc[u] = 0.0;
        for (uint c0 = 0u; c0 < nk; c0 += CHUNK) {
            uint cn = min(CHUNK, nk - c0);
            if (nk <= CHUNK) {
                for (uint i = tid; i < QB * CHUNK; i += 256u) {
                    uint qi = i / CHUNK, j = i - qi * CHUNK;
                    uint p = plo + (qi - seg), kp = flo + j;
                    if (qi >= seg && qi < end && j < cn && kp >= first_of(p) && kp <= p) se[i] = exp_ref(se[i] - smx[qi]);
                }
            } else {
                for (uint j0 = 0u; j0 < cn; j0 += 32u) {
                    uint j = j0 + grp;
                    uint kb = kb0 + kv_row(c0 + min(j, cn - 1u)) * kvw;
                    float kr[HD / 8u];
                    [[unroll]] for (uint i = 0u; i < HD / 8u; i++) kr[i] = kv_ld(k, kw, pc.k_off, kb + 8u * i + lane);
                    [[unroll]] for (uint qi = 0u; qi < QB; qi++) {
                        if (qi >= seg && qi < end) {
                            precise float a = 0.0;
                            [[unroll]] for (uint i = 0u; i < HD / 8u; i++) a = a + sq[qi * HD + 8u * i + lane] * kr[i];
                            float sc = score_of(a);
                            uint p = plo + (qi - seg), kp = flo + c0 + j;
                            if (lane == 0u && j < cn && kp >= first_of(p) && kp <= p) se[qi * CHUNK + j] = exp_ref(sc - smx[qi]);
                        }
                    }
                }
            }
            barrier();
            // The keys of this chunk query qi sees: [lo, hi) relative to c0 (empty outside the segment).
            if (tid >= seg && tid < end) {
                uint p = plo + (tid - seg);
                uint lo = clamp(first_of(p) - flo, c0, c0 + cn) - c0, hi = clamp(p + 1u - flo, c0, c0 + cn) - c0;
                for (uint j = lo; j < hi; j++) sum = sum + se[tid * CHUNK + j];
            }
            uint lo[QPT], hi[QPT];
            uint all_lo = 0u, all_hi = CHUNK, any_lo = CHUNK, any_hi = 0u;
            [[unroll]] for (uint u = 0u; u < QPT; u++) {
                uint qi = qs * QPT + u;
                uint p = plo + (qi - seg);
                bool live = qi >= seg && qi < end;
                lo[u] = live ? clamp(first_of(p) - flo, c0, c0 + cn) - c0 : 0u;
                hi[u] = live ? clamp(p + 1u - flo, c0, c0 + cn) - c0 : 0u;
                if (hi[u] > lo[u]) {
                    all_lo = max(all_lo, lo[u]);
                    all_hi = min(all_hi, hi[u]);
                    any_lo = min(any_lo, lo[u]);
                    any_hi = max(any_hi, hi[u]);
                }
            }
            all_hi = max(all_hi, all_lo);
            uint vb = vb0 + d;
            // Keys some of the invocation's queries see: checked per query.
            for (uint j = any_lo; j < min(all_lo, any_hi); j++) {
                float vv = kv_ld(v, vw, pc.v_off, vb + kv_row(c0 + j) * kvw);
                [[unroll]] for (uint u = 0u; u < QPT; u++) {
                    uint qi = qs * QPT + u;
                    if (j >= lo[u] && j < hi[u]) {
                        precise float a = acc[u] + se[qi * CHUNK + j] * vv;
                        acc[u] = a;
                    }
                }
            }
            // Keys all of them see (those that see any in this chunk): 8 values in flight, then
            // the chains.
            uint j = all_lo;
            if (any_hi > any_lo) {
                for (; j + 8u <= all_hi; j += 8u) {
                    float vv[8];
                    [[unroll]] for (uint e = 0u; e < 8u; e++) vv[e] = kv_ld(v, vw, pc.v_off, vb + kv_row(c0 + j + e) * kvw);
                    [[unroll]] for (uint u = 0u; u < QPT; u++) {
                        uint qi = qs * QPT + u;
                        [[unroll]] for (uint e = 0u; e < 8u; e++) {
                            precise float a = acc[u] + se[qi * CHUNK + j + e] * vv[e];
                            acc[u] = hi[u] > lo[u] ? a : acc[u];
                        }
                    }
                }
                for (; j < all_hi; j++) {
                    float vv = kv_ld(v, vw, pc.v_off, vb + kv_row(c0 + j) * kvw);
                    [[unroll]] for (uint u = 0u; u < QPT; u++) {
                        uint qi = qs * QPT + u;
                        precise float a = acc[u] + se[qi * CHUNK + j] * vv;
                        acc[u] = hi[u] > lo[u] ? a : acc[u];
                    }
                }
            }
            for (j = max(all_hi, any_lo); j < any_hi; j++) {
                float vv = kv_ld(v, vw, pc.v_off, vb + kv_row(c0 + j) * kvw);
                [[unroll]] for (uint u = 0u; u < QPT; u++) {
                    uint qi = qs * QPT + u;
                    if (j >= lo[u] && j < hi[u]) {
                        precise float a = acc[u] + se[qi * CHUNK + j] * vv;
                        acc[u] = a;
                    }
                }
            }
            barrier();
        }
        if (tid < QB) ssum[tid] = sum;
        barrier();
        [[unroll]] for (uint u = 0u; u < QPT; u++) {
            uint qi = qs * QPT + u;
            if (qi >= seg && qi < end) {
                float r = div_rn(acc[u], ssum[qi]);
                o.v[pc.out_off + ((t0 + qi) * pc.heads + h) * HD + d] = r;
                sq[qi * HD + d] = r;
            }
        }
        if (pc.qmode != 0u) {
            // Quantize each query's head outputs (whole blocks of its row), as attention.comp.
            bool kq = pc.qmode == 2u;
            uint be = kq ? 256u : 32u, bw = kq ? 73u : 10u;
            for (uint qi = seg; qi < end; qi++) {
                barrier();
                qv[tid] = tid < HD ? sq[qi * HD + tid] : 0.0;
                barrier();
                quantize_seg(Words(pc.qout), pc.qout_off + ((t0 + qi) * pc.heads * HD + h * HD) / be * bw, HD, kq);
            }
        }
        barrier();
        seg = end;
    }
}
