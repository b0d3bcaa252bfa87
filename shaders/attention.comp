#version 460
// Attention, exactly as purehw_kernels::ops::attend: one workgroup per (row, query head).
// Pass 1 takes the max score (order-free); pass 2 recomputes each score identically, and in key
// order adds exp(s - max) to the sum (one thread) and e·v to each output dimension (one thread
// per dimension); then divides, correctly rounded.
#include "common/base.glsl"
#include "common/exact.glsl"

#define CHUNK 256u
#define MAX_HD 512u

layout(local_size_x = 256) in;
layout(push_constant) uniform Push {
    uvec2 out_;
    uvec2 q;
    uvec2 k;
    uvec2 v;
    uvec2 step;
    uint out_off;
    uint q_off;
    uint k_off;
    uint v_off;
    uint heads;
    uint kv_heads;
    uint head_dim;
    uint window;
    uint row_seq_off;
    uint seqs_off;
    float scale;
    float softcap;
} pc;

shared float sq[MAX_HD];
shared float se[CHUNK];
shared float smax[256];
shared float ssum;

float score(Floats k, uint kbase) {
    float acc[8];
    [[unroll]] for (uint l = 0u; l < 8u; l++) acc[l] = 0.0;
    for (uint i = 0u; i < pc.head_dim; i += 8u) {
        [[unroll]] for (uint l = 0u; l < 8u; l++) {
            if (i + l < pc.head_dim) {
                precise float a = acc[l] + sq[i + l] * k.v[kbase + i + l];
                acc[l] = a;
            }
        }
    }
    precise float s = reduce_lanes(acc[0], acc[1], acc[2], acc[3], acc[4], acc[5], acc[6], acc[7]) * pc.scale;
    return pc.softcap > 0.0 ? softcap_ref(s, pc.softcap) : s;
}

void main() {
    uint t = gl_WorkGroupID.x, h = gl_WorkGroupID.y, tid = gl_LocalInvocationID.x;
    uint hd = pc.head_dim;
    Words st = Words(pc.step);
    Floats o = Floats(pc.out_);
    uint obase = pc.out_off + (t * pc.heads + h) * hd;
    uint s = st.v[pc.row_seq_off + t];
    if (s == 0xFFFFFFFFu) return;
    uint srow = st.v[pc.seqs_off + 4u * s], cache_row = st.v[pc.seqs_off + 4u * s + 2u];
    uint p = st.v[pc.seqs_off + 4u * s + 3u] + (t - srow);
    uint first = (pc.window > 0u && p + 1u > pc.window) ? p + 1u - pc.window : 0u;
    uint nk = p + 1u - first;
    Floats q = Floats(pc.q), k = Floats(pc.k), v = Floats(pc.v);
    for (uint i = tid; i < hd; i += 256u) sq[i] = q.v[pc.q_off + (t * pc.heads + h) * hd + i];
    barrier();
    uint kvw = pc.kv_heads * hd, g = h / (pc.heads / pc.kv_heads);
    uint kb0 = (cache_row + first) * kvw + g * hd;

    // Pass 1: the largest score (NaN scores are skipped, as f32::max does).
    float m = uintBitsToFloat(0xFF800000u);
    for (uint j = tid; j < nk; j += 256u) {
        float sc = score(k, pc.k_off + kb0 + j * kvw);
        m = sc > m ? sc : m;
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
        if (tid < cn) se[tid] = exp_ref(score(k, pc.k_off + kb0 + (c0 + tid) * kvw) - mx);
        barrier();
        if (tid == 0u) {
            precise float sum = ssum;
            for (uint j = 0u; j < cn; j++) sum = sum + se[j];
            ssum = sum;
        }
        uint vb = pc.v_off + kb0 + c0 * kvw;
        if (tid < hd) {
            for (uint j = 0u; j < cn; j++) acc0 = acc0 + se[j] * v.v[vb + j * kvw + tid];
        }
        if (tid + 256u < hd) {
            for (uint j = 0u; j < cn; j++) acc1 = acc1 + se[j] * v.v[vb + j * kvw + tid + 256u];
        }
        barrier();
    }
    if (nk == 0u) {
        for (uint i = tid; i < hd; i += 256u) o.v[obase + i] = 0.0;
        return;
    }
    float sum = ssum;
    if (tid < hd) o.v[obase + tid] = div_rn(acc0, sum);
    if (tid + 256u < hd) o.v[obase + tid + 256u] = div_rn(acc1, sum);
}
