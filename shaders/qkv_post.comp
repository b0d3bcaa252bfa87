#version 460
// Qkv's epilogue in one dispatch, one workgroup per (row, head) over the q heads, then the k
// heads, then the v heads: per-head RMSNorm of q and k (when given), RoPE of q and k (from the
// step's table), and the row's k and v stored in the caches. Each head is RmsNorm, Rope and
// StoreKv exactly as their own kernels compute them.
#include "common/base.glsl"
#include "common/exact.glsl"

#define MAX_HD 512u
#define F_QNORM 1u
#define F_KNORM 2u
#define F_ROPE 4u
#define F_NEOX 8u
#define F_KCACHE 16u
#define F_VCACHE 32u

layout(local_size_x = 256) in;
// The caches' elements: 0 f32, 1 f16 (common/kv.glsl).
layout(constant_id = 0) const uint KV16 = 0;
layout(push_constant) uniform Push {
    uvec2 q;
    uvec2 k;
    uvec2 v;
    uvec2 qn;         // f32 q-norm weight
    uvec2 kn;
    uvec2 kc;         // k cache
    uvec2 vc;         // v cache
    uvec2 step;
    uint q_off;
    uint k_off;
    uint v_off;
    uint kc_off;
    uint vc_off;
    uint row_seq_off;
    uint seqs_off;
    uint heads;
    uint kv_heads;
    uint head_dim;
    uint flags;
    uint table_off;
    float eps;
    uint ring;        // rows a slot of ring caches (position p at ring_row + p % ring); 0: linear
} pc;

#include "common/kv.glsl"

shared float h[MAX_HD];
shared float lanes[8];
shared float inv_s;

void main() {
    uint t = gl_WorkGroupID.y, hh = gl_WorkGroupID.x, tid = gl_LocalInvocationID.x;
    uint hd = pc.head_dim, half_ = hd / 2u;
    Words st = Words(pc.step);
    uint k_off = pc.k_off, v_off = pc.v_off, kc_off = pc.kc_off, vc_off = pc.vc_off;
    uint row_seq_off = pc.row_seq_off, seqs_off = pc.seqs_off;
    uint kind = hh < pc.heads ? 0u : (hh < pc.heads + pc.kv_heads ? 1u : 2u);
    uint head = kind == 0u ? hh : (kind == 1u ? hh - pc.heads : hh - pc.heads - pc.kv_heads);
    uint width = kind == 0u ? pc.heads * hd : pc.kv_heads * hd;
    Floats x = Floats(kind == 0u ? pc.q : (kind == 1u ? pc.k : pc.v));
    uint xo = (kind == 0u ? pc.q_off : (kind == 1u ? k_off : v_off)) + t * width + head * hd;
    for (uint i = tid; i < hd; i += 256u) h[i] = x.v[xo + i];
    // What the later stages read, loaded now (one wait on memory, not one per stage): the norm
    // weight, this invocation's RoPE pair, the row's cache place.
    bool norm = kind < 2u && (pc.flags & (kind == 0u ? F_QNORM : F_KNORM)) != 0u;
    bool rope = kind < 2u && (pc.flags & F_ROPE) != 0u;
    Floats wn = Floats(kind == 0u ? pc.qn : pc.kn);
    float wn0 = norm ? wn.v[min(tid, hd - 1u)] : 0.0, wn1 = norm ? wn.v[min(tid + 256u, hd - 1u)] : 0.0;
    uint ti = pc.table_off + (t * half_ + min(tid, half_ - 1u)) * 2u;
    float rc = rope ? uintBitsToFloat(st.v[ti]) : 0.0, rs = rope ? uintBitsToFloat(st.v[ti + 1u]) : 0.0;
    uint s = st.v[row_seq_off + t], sc = s == 0xFFFFFFFFu ? 0u : s;
    uint srow = st.v[seqs_off + 5u * sc], cache_row = st.v[seqs_off + 5u * sc + 2u], pos0 = st.v[seqs_off + 5u * sc + 3u];
    uint ring_row = st.v[seqs_off + 5u * sc + 4u];
    barrier();
    if (kind < 2u) {
        if (norm) {
            if (tid < 8u) {
                precise float acc = 0.0;
                for (uint i = tid; i < hd; i += 8u) acc = acc + h[i] * h[i];
                lanes[tid] = acc;
            }
            barrier();
            if (tid == 0u) {
                precise float ss = reduce_lanes(lanes[0], lanes[1], lanes[2], lanes[3], lanes[4], lanes[5], lanes[6], lanes[7]);
                precise float ms = div_rn(ss, float(hd));
                inv_s = div_rn(1.0, sqrt_rn(ms + pc.eps));
            }
            barrier();
            float inv = inv_s;
            for (uint i = tid; i < hd; i += 256u) {
                precise float r = h[i] * inv * (i == tid ? wn0 : wn1);
                h[i] = r;
            }
            barrier();
        }
        if (rope) {
            bool neox = (pc.flags & F_NEOX) != 0u;
            // half_ ≤ 256 (head_dim ≤ MAX_HD): one pair per invocation.
            uint i = tid;
            if (i < half_) {
                uint ia = neox ? i : 2u * i, ib = neox ? i + half_ : 2u * i + 1u;
                float a = h[ia], b = h[ib];
                precise float ra = a * rc - b * rs;
                precise float rb = b * rc + a * rs;
                h[ia] = ra;
                h[ib] = rb;
            }
            barrier();
        }
        for (uint i = tid; i < hd; i += 256u) x.v[xo + i] = h[i];
    }
    // Store k and v rows in the cache at the row's position.
    bool store = (kind == 1u && (pc.flags & F_KCACHE) != 0u) || (kind == 2u && (pc.flags & F_VCACHE) != 0u);
    if (!store) return;
    if (s == 0xFFFFFFFFu) return;
    uint p = pos0 + (t - srow);
    uint dst = pc.ring == 0u ? cache_row + p : ring_row + p % pc.ring;
    uvec2 c = kind == 1u ? pc.kc : pc.vc;
    uint co = kind == 1u ? kc_off : vc_off, e0 = dst * width + head * hd;
    KV_STORE_ROW(c, co, e0, h, hd, tid)
}
