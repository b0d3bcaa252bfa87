#version 460
// variants: FMT=Q4_0|Q4_1|Q5_0|Q5_1|Q8_0|Q4_K|Q5_K|Q6_K DOT=0|1 PRO=0|1|2
// MatMulQ8 for up to 16 tokens (decode, batched decode): the same sums as mm_q8, split for latency. Phase 1: every
// (row, block, lane) of the workgroup's rows is one item, spread over all threads and loaded in
// one wave (neighbouring threads read neighbouring bytes of a row); each item's integer lane sum
// becomes the reference's product d·lane (and the block's offset term) in shared memory.
// Phase 2: thread (row, token, lane) adds its lane's products in block order — the reference's
// chain of float additions — then lane 0 gathers the 8 lanes as mm_q8 does.
//
// PRO=1 and PRO=2 (one token) take the op before the matmul into a prologue, so the two need no
// barrier between them: every workgroup makes the quantized activations itself, in shared memory,
// from the inputs of that op, and one workgroup of one dispatch writes that op's outputs.
//   PRO=1, AddRmsNorm: x_out = x_in + rmsnorm(branch, post); out = rmsnorm(x_out, w); quantized.
//   PRO=2, GatedFfn's tail: act = gelu_tanh(gate)·up (or silu); quantized.
#include "common/base.glsl"
#include "common/exact.glsl"
#extension GL_KHR_shader_subgroup_basic : require
#extension GL_KHR_shader_subgroup_shuffle : require
#include "common/quant.glsl"
#if PRO != 0
#define PRO_MAX 2048u
shared float row[PRO_MAX];
shared uint sact[640];    // BlockQ8A words of PRO_MAX values (BlockQ8K needs fewer)
#define QSTORE(q, at, val) sact[at] = (val)
#define QROW PRO_MAX
#include "common/quantize.glsl"
#include "common/rownorm.glsl"
#define ACT(i) sact[i]
#else
#define ACT(i) a.v[i]
#endif

layout(local_size_x = 256) in;
layout(constant_id = 0) const uint TOKENS = 1;   // 1, 2, 4, 8 or 16
layout(constant_id = 1) const uint R = 16;       // rows per workgroup (R·TOKENS ≤ 32)
layout(constant_id = 2) const uint NBC = 20;     // blocks per chunk (R·TOKENS·NBC ≤ 512)

#if PRO == 1
layout(push_constant) uniform Push {
    uvec2 w;
    uvec2 q;          // the AddRmsNorm's quantized output (written by the writer)
    uvec2 out_;
    uvec2 x_in;
    uvec2 branch;
    uvec2 post;       // f32
    uvec2 nw;         // f32 norm weight
    uvec2 x_out;
    uvec2 nout;       // the normed row (f32)
    uint w_byte;
    uint q_off;
    uint out_off;
    uint rows;
    uint cols;
    uint row_bytes;
    uint x_in_off;
    uint br_off;
    uint x_out_off;
    uint nout_off;
    uint flags;       // 1 branch, 2 post, 4 BlockQ8K, 8 this dispatch writes the AddRmsNorm's outputs
    float eps;
} pc;
#elif PRO == 2
layout(push_constant) uniform Push {
    uvec2 w;
    uvec2 q;          // the GatedFfn's quantized output (written by the writer)
    uvec2 out_;
    uvec2 gate;
    uvec2 up;
    uvec2 act;        // the gate's result (f32)
    uint w_byte;
    uint q_off;
    uint out_off;
    uint rows;
    uint cols;
    uint row_bytes;
    uint gate_off;
    uint up_off;
    uint act_off;
    uint flags;       // 1 silu (else gelu_tanh), 4 BlockQ8K, 8 this dispatch writes the outputs
} pc;
#else
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
#endif

#if PRO != 0
// The prologue: the quantized activations of the one token into `sact`; the writer (workgroup 0
// of the dispatch flagged so) stores the op's outputs.
void prologue() {
    uint tid = gl_LocalInvocationID.x, dim = pc.cols;
    bool writer = (pc.flags & 8u) != 0u && gl_WorkGroupID.x == 0u && gl_WorkGroupID.y == 0u;
    bool k = (pc.flags & 4u) != 0u;
#if PRO == 1
    Floats xi = Floats(pc.x_in);
    if ((pc.flags & 1u) != 0u) {
        Floats br = Floats(pc.branch);
        for (uint i = tid; i < dim; i += 256u) row[i] = br.v[pc.br_off + i];
        barrier();
        if ((pc.flags & 2u) != 0u) {
            float inv = row_rms_inv(dim, pc.eps);
            Floats pw = Floats(pc.post);
            for (uint i = tid; i < dim; i += 256u) {
                precise float b = row[i] * inv * pw.v[i];
                row[i] = b;
            }
        }
        for (uint i = tid; i < dim; i += 256u) {
            precise float s = xi.v[pc.x_in_off + i] + row[i];
            row[i] = s;
            if (writer) Floats(pc.x_out).v[pc.x_out_off + i] = s;
        }
    } else {
        for (uint i = tid; i < dim; i += 256u) {
            row[i] = xi.v[pc.x_in_off + i];
            if (writer) Floats(pc.x_out).v[pc.x_out_off + i] = row[i];
        }
    }
    barrier();
    float inv = row_rms_inv(dim, pc.eps);
    Floats nw = Floats(pc.nw);
    for (uint i = tid; i < dim; i += 256u) {
        precise float v = row[i] * inv * nw.v[i];
        row[i] = v;
        if (writer) Floats(pc.nout).v[pc.nout_off + i] = v;
    }
#else
    Floats g = Floats(pc.gate), u = Floats(pc.up);
    bool silu = (pc.flags & 1u) != 0u;
    for (uint i = tid; i < dim; i += 256u) {
        float x = g.v[pc.gate_off + i];
        precise float v = (silu ? silu_ref(x) : gelu_ref(x)) * u.v[pc.up_off + i];
        row[i] = v;
        if (writer) Floats(pc.act).v[pc.act_off + i] = v;
    }
#endif
    barrier();
    uint be = k ? 256u : 32u, bw = k ? 73u : 10u;
    quantize_row(Words(pc.q), 0u, dim, k);
    if (writer) {
        Words q = Words(pc.q);
        for (uint i = tid; i < dim / be * bw; i += 256u) q.v[pc.q_off + i] = sact[i];
    }
}
#endif

shared float prod[4096];   // [row][token][block][lane]
shared float offp[512];    // [row][token][block]

void main() {
    uint tid = gl_LocalInvocationID.x;
    uint r0 = gl_WorkGroupID.x * R;
    uint t0 = gl_WorkGroupID.y * TOKENS;
    uint nb = pc.cols / BLOCK_ELEMS;
    Words w = Words(pc.w);
#if PRO != 0
    prologue();
    uint nt = 1u, xa = 0u, x_stride = 0u;
#else
    Words a = Words(pc.x);
    uint nt = min(TOKENS, pc.n - t0);
    uint xa = pc.x_off + t0 * pc.x_stride, x_stride = pc.x_stride;
#endif
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
            // Out-of-range items load from a valid place and store nothing: the loads stay
            // unconditional, so the compiler can issue all of them before the first use.
            bool live = r < R && b < nc && r0 + r < pc.rows;
            r = min(r, R - 1u);
            b = min(b, nc - 1u);
            uint row = pc.w_byte + min(r0 + r, pc.rows - 1u) * pc.row_bytes;
#if BLOCK_ELEMS == 32
            uint codes;
            float dw, mw;
            block32(w, row + (b0 + b) * BLOCK_BYTES, k, codes, dw, mw);
            [[unroll]] for (uint t = 0u; t < TOKENS; t++) {
                uint blk = xa + min(t, nt - 1u) * x_stride + (b0 + b) * 10u;
                float da = uintBitsToFloat(ACT(blk));
                precise float d = dw * da;
                precise float pr = d * float(dot4(codes, ACT(blk + 2u + k)));
                if (live && t < nt) prod[((r * TOKENS + t) * NBC + b) * 8u + k] = pr;
#if FMT == FMT_Q4_1 || FMT == FMT_Q5_1
                int asum = int(ACT(blk + 1u));
                if (live && t < nt && k == 0u) {
                    precise float o = mw * (da * float(asum));
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
                uint blk = xa + min(t, nt - 1u) * x_stride + (b0 + b) * 73u;
                int l = 0;
                [[unroll]] for (uint c = 0u; c < 8u; c++) l += cs[c] * dot4(cw[c], ACT(blk + 1u + 8u * c + k));
                float da = uintBitsToFloat(ACT(blk));
                precise float d = dd.x * da;
                precise float pr = d * float(l);
                if (live && t < nt) prod[((r * TOKENS + t) * NBC + b) * 8u + k] = pr;
#if FMT != FMT_Q6_K
                // Σ_g mn[g]·(bsum[2g] + bsum[2g+1]) (superblock_mins, reading ACT): lane k takes
                // g = k, the block's 8 neighbouring invocations add theirs (integers: exact).
                uint pair = ACT(blk + 65u + k);
                int m = int(scale_min_k4(w, sb + 4u, k).y) * ((int(pair << 16) >> 16) + (int(pair) >> 16));
                m += subgroupShuffleXor(m, 1u);
                m += subgroupShuffleXor(m, 2u);
                m += subgroupShuffleXor(m, 4u);
                if (live && t < nt && k == 0u) {
                    precise float o = (dd.y * da) * float(m);
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
