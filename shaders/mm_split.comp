#version 460
// variants: FMT=Q4_0|Q4_1|Q5_0|Q5_1|Q8_0|Q4_K|Q5_K|Q6_K DOT=0|1
// MatMulQ8 for up to 16 tokens (decode, batched decode): the same sums as mm_q8, split for latency. Phase 1: every
// (row, block, lane) of the workgroup's rows is one item, spread over all threads and loaded in
// one wave (neighbouring threads read neighbouring bytes of a row); each item's integer lane sum
// becomes the reference's product d·lane (and the block's offset term) in shared memory.
// Phase 2: thread (row, token, lane) adds its lane's products in block order — the reference's
// chain of float additions — then lane 0 gathers the 8 lanes as mm_q8 does.
#include "common/base.glsl"
#include "common/exact.glsl"
#include "common/quant.glsl"
#extension GL_KHR_shader_subgroup_basic : require
#extension GL_KHR_shader_subgroup_shuffle : require

layout(local_size_x = 256) in;
layout(constant_id = 0) const uint TOKENS = 1;   // 1, 2, 4, 8 or 16
layout(constant_id = 1) const uint R = 16;       // rows per workgroup (R·TOKENS ≤ 32)
layout(constant_id = 2) const uint NBC = 20;     // blocks per chunk (R·TOKENS·NBC ≤ 512)

layout(push_constant) uniform Push {
    uvec2 w;
    uvec2 x;
    uvec2 out_;
    uint w_byte;
    uint x_off;
    uint out_off;
    uint rows;
    uint cols;
    uint n;
    uint row_bytes;
    uint x_stride;
} pc;

shared float prod[4096];   // [row][token][block][lane]
shared float offp[512];    // [row][token][block]

void main() {
    uint tid = gl_LocalInvocationID.x;
    uint r0 = gl_WorkGroupID.x * R;
    uint t0 = gl_WorkGroupID.y * TOKENS;
    uint nt = min(TOKENS, pc.n - t0);
    uint nb = pc.cols / BLOCK_ELEMS;
    Words w = Words(pc.w), a = Words(pc.x);
    uint xa = pc.x_off + t0 * pc.x_stride;
    // Phase 2's thread: (row, token, lane).
    uint c_lane = tid & 7u, c_t = (tid >> 3) % TOKENS, c_r = (tid >> 3) / TOKENS;
    bool chain = c_r < R;
    precise float acc = 0.0, off = 0.0;
    for (uint b0 = 0u; b0 < nb; b0 += NBC) {
        uint nc = min(NBC, nb - b0);
        // Phase 1: products of this chunk.
        [[unroll]] for (uint j = 0u; j < (R * NBC * 8u + 255u) / 256u; j++) {
            uint i = tid + 256u * j;
            uint k = i & 7u, b = (i >> 3) % NBC, r = (i >> 3) / NBC;
            if (r >= R || b >= nc || r0 + r >= pc.rows) continue;
            uint row = pc.w_byte + (r0 + r) * pc.row_bytes;
#if BLOCK_ELEMS == 32
            uint codes;
            float dw, mw;
            block32(w, row + (b0 + b) * BLOCK_BYTES, k, codes, dw, mw);
            [[unroll]] for (uint t = 0u; t < TOKENS; t++) {
                if (t >= nt) continue;
                uint blk = xa + t * pc.x_stride + (b0 + b) * 10u;
                float da = uintBitsToFloat(a.v[blk]);
                precise float d = dw * da;
                precise float pr = d * float(dot4(codes, a.v[blk + 2u + k]));
                prod[((r * TOKENS + t) * NBC + b) * 8u + k] = pr;
#if FMT == FMT_Q4_1 || FMT == FMT_Q5_1
                if (k == 0u) {
                    precise float o = mw * (da * float(int(a.v[blk + 1u])));
                    offp[(r * TOKENS + t) * NBC + b] = o;
                }
#endif
            }
#else
            uint sb = row + (b0 + b) * BLOCK_BYTES;
            uint cw[8];
            int cs[8];
            [[unroll]] for (uint c = 0u; c < 8u; c++) chunk256(w, sb, c, k, cw[c], cs[c]);
            vec2 dd = superblock_scales(w, sb);
            [[unroll]] for (uint t = 0u; t < TOKENS; t++) {
                if (t >= nt) continue;
                uint blk = xa + t * pc.x_stride + (b0 + b) * 73u;
                int l = 0;
                [[unroll]] for (uint c = 0u; c < 8u; c++) l += cs[c] * dot4(cw[c], a.v[blk + 1u + 8u * c + k]);
                float da = uintBitsToFloat(a.v[blk]);
                precise float d = dd.x * da;
                precise float pr = d * float(l);
                prod[((r * TOKENS + t) * NBC + b) * 8u + k] = pr;
#if FMT != FMT_Q6_K
                if (k == 0u) {
                    precise float o = (dd.y * da) * float(superblock_mins(w, sb, a, blk + 65u));
                    offp[(r * TOKENS + t) * NBC + b] = o;
                }
#endif
            }
#endif
        }
        barrier();
        // Phase 2: each lane's chain over the chunk, in block order.
        if (chain) {
            uint base = (c_r * TOKENS + c_t) * NBC;
            for (uint b = 0u; b < nc; b++) acc = acc + prod[(base + b) * 8u + c_lane];
#if FMT == FMT_Q4_1 || FMT == FMT_Q5_1
            if (c_lane == 0u) for (uint b = 0u; b < nc; b++) off = off + offp[base + b];
#elif BLOCK_ELEMS == 256 && FMT != FMT_Q6_K
            // k-quant minimums are subtracted: accumulate their negation (exact: -(a+b) = (-a)-b).
            if (c_lane == 0u) for (uint b = 0u; b < nc; b++) off = off - offp[base + b];
#endif
        }
        barrier();
    }
    uint me = gl_SubgroupInvocationID;
    float l1 = subgroupShuffle(acc, me + 1u), l2 = subgroupShuffle(acc, me + 2u), l3 = subgroupShuffle(acc, me + 3u);
    float l4 = subgroupShuffle(acc, me + 4u), l5 = subgroupShuffle(acc, me + 5u), l6 = subgroupShuffle(acc, me + 6u);
    float l7 = subgroupShuffle(acc, me + 7u);
    uint r = r0 + c_r;
    if (chain && c_lane == 0u && c_t < nt && r < pc.rows) {
        precise float s = reduce_lanes(acc, l1, l2, l3, l4, l5, l6, l7);
        precise float res = s + off;
        Floats(pc.out_).v[pc.out_off + (t0 + c_t) * pc.rows + r] = res;
    }
}
