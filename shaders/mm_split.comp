#version 460
// variants: FMT=Q4_0|Q4_1|Q5_0|Q5_1|Q8_0|Q4_K|Q5_K|Q6_K DOT=0|1 PRO=0|1|2|3|4|5|6
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
//
// PRO=3 and PRO=4 (one token) take the op after the matmul into a tail instead, run once by
// whichever workgroup of the group (this dispatch, or the gate and up dispatches together)
// finishes last, counted on a device counter; it reads the others' results through coherent
// loads. Each op then costs no dispatch and no barrier of its own, and is computed once.
//   PRO=3, AddRmsNorm whose branch is this matmul's output (the output projections).
//   PRO=4, GatedFfn's activation and quantization, per block of the quantized output: the last
//   workgroup of the gate and up rows of a block (one exact GELU or SiLU an invocation).
//   PRO=5, Qkv's epilogue per head (norm, RoPE, the caches, as qkv_post.comp): the last
//   workgroup of the head's rows.
//   PRO=6, the Argmax over this matmul's output (the LM head): each workgroup leaves its best
//   (key, index), the last reduces them (as argmax.comp's two stages).
#include "common/base.glsl"
#include "common/exact.glsl"
#extension GL_KHR_shader_subgroup_basic : require
#extension GL_KHR_shader_subgroup_shuffle : require
#include "common/quant.glsl"
#if PRO == 1 || PRO == 2
#define PRO_MAX 2048u
shared float row[PRO_MAX];
shared uint sact[640];    // BlockQ8A words of PRO_MAX values (BlockQ8K needs fewer)
#define QSTORE(q, at, val) sact[at] = (val)
#define QROW PRO_MAX
#include "common/quantize.glsl"
#include "common/rownorm.glsl"
#define ACT(i) sact[i]
#elif PRO == 5
#define MAX_HD 512u
shared float h[MAX_HD];
shared float lanes[8];
shared float inv_s;
#define ACT(i) a.v[i]
#elif PRO == 4
#include "common/quantize.glsl"
#define ACT(i) a.v[i]
#elif PRO == 6
shared float sk[256];
shared uint si[256];
#define ACT(i) a.v[i]
#elif PRO >= 3
#define PRO_MAX 2048u
shared float row[PRO_MAX];
#define QROW PRO_MAX
#include "common/quantize.glsl"
#include "common/rownorm.glsl"
#define ACT(i) a.v[i]
#else
#define ACT(i) a.v[i]
#endif

#if PRO >= 3
// Results of the group's other workgroups (written in this dispatch or its siblings) and the
// counter: past every cache that is not coherent across the device.
layout(buffer_reference, std430, buffer_reference_align = 4) coherent buffer CFloats { float v[]; };
layout(buffer_reference, std430, buffer_reference_align = 4) coherent buffer Counter { uint v[]; };
layout(buffer_reference, std430, buffer_reference_align = 4) coherent buffer CWords { uint v[]; };
shared bool s_last;
#endif

layout(local_size_x = 256) in;
layout(constant_id = 0) const uint TOKENS = 1;   // 1, 2, 4, 8 or 16
layout(constant_id = 1) const uint R = 16;       // rows per workgroup (R·TOKENS ≤ 32)
layout(constant_id = 2) const uint NBC = 20;     // blocks per chunk (R·TOKENS·NBC ≤ 512)
// PRO=5: the caches' elements, 0 f32, 1 f16 (common/kv.glsl).
layout(constant_id = 3) const uint KV16 = 0;

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
#elif PRO == 3
// Addresses carry their offsets (the push block stays within 128 bytes).
layout(push_constant) uniform Push {
    uvec2 w;
    uvec2 x;          // quantized input
    uvec2 out_;       // this matmul's output: the AddRmsNorm's branch
    uvec2 q;          // the AddRmsNorm's quantized output
    uvec2 x_in;
    uvec2 post;       // f32
    uvec2 nw;         // f32 norm weight
    uvec2 x_out;
    uvec2 nout;       // the normed row (f32)
    uvec2 ctr;        // the group's counter
    uint w_byte;
    uint rows;        // also the norm's dim
    uint cols;
    uint row_bytes;
    uint total;       // workgroups in the group
    uint flags;       // 2 post, 4 BlockQ8K
    float eps;
} pc;
#elif PRO == 4
layout(push_constant) uniform Push {
    uvec2 w;
    uvec2 x;          // quantized input
    uvec2 out_;       // this matmul's output (gate or up)
    uvec2 q;          // the GatedFfn's quantized output
    uvec2 gate;
    uvec2 up;
    uvec2 act;        // the gate's result (f32)
    uvec2 ctr;        // block 0's counter (the gate and up dispatches share them)
    uint w_byte;
    uint rows;
    uint cols;
    uint row_bytes;
    uint total;       // workgroups a block's rows span, gate's and up's
    uint flags;       // 1 silu (else gelu_tanh), 4 BlockQ8K
} pc;
#elif PRO == 5
// The weight's byte offset is folded into its address too (a multiple of 4).
layout(push_constant) uniform Push {
    uvec2 w;
    uvec2 x;          // quantized input
    uvec2 out_;       // this matmul's output (q, k or v)
    uvec2 q;
    uvec2 k;
    uvec2 v;
    uvec2 qn;         // f32 q-norm weight
    uvec2 kn;
    uvec2 kc;         // k cache (row 0)
    uvec2 vc;
    uvec2 step;
    uvec2 ctr;        // this dispatch's head 0 counter
    uint rows;
    uint cols;
    uint row_bytes;
    uint total;       // workgroups a head's rows span
    uint shape;       // heads | kv_heads << 8 | head_dim << 16
    uint flags_table; // qkv_post's flags | kind (0 q, 1 k, 2 v) << 6 | the RoPE table's word offset << 8
    float eps;
    uint ring;        // rows a slot of ring caches (position p at ring_row + p % ring); 0: linear
} pc;
#include "common/kv.glsl"
#define W_BYTE 0u
#elif PRO == 6
layout(push_constant) uniform Push {
    uvec2 w;
    uvec2 x;          // quantized input
    uvec2 out_;       // this matmul's output: the logits
    uvec2 part;       // (key bits, index) per workgroup
    uvec2 amax;       // the argmax, an f32 index
    uvec2 ctr;        // the dispatch's counter
    uint w_byte;
    uint rows;
    uint cols;
    uint row_bytes;
    uint total;       // workgroups
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

#ifndef W_BYTE
#define W_BYTE pc.w_byte
#endif

#if PRO == 1 || PRO == 2
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

#if PRO == 5
// Qkv's epilogue for one head of this dispatch's kind, exactly as qkv_post.comp's workgroup for
// it (the step layout of one row: row_seq at word 2, its span at 3). Every global load first.
void tail(uint head) {
    uint tid = gl_LocalInvocationID.x;
    uint heads = pc.shape & 0xFFu, kvh = (pc.shape >> 8) & 0xFFu, hd = pc.shape >> 16;
    uint flags = pc.flags_table & 0x3Fu, kind = (pc.flags_table >> 6) & 3u, table = pc.flags_table >> 8;
    uint half_ = hd / 2u, width = kind == 0u ? heads * hd : kvh * hd;
    CFloats x = CFloats(kind == 0u ? pc.q : (kind == 1u ? pc.k : pc.v));
    uint xo = head * hd;
    float x0 = x.v[xo + min(tid, hd - 1u)], x1 = x.v[xo + min(tid + 256u, hd - 1u)];
    bool norm = kind < 2u && (flags & (kind == 0u ? 1u : 2u)) != 0u;
    bool rope = kind < 2u && (flags & 4u) != 0u;
    Floats wn = Floats(kind == 0u ? pc.qn : pc.kn);
    float wn0 = norm ? wn.v[min(tid, hd - 1u)] : 0.0, wn1 = norm ? wn.v[min(tid + 256u, hd - 1u)] : 0.0;
    Words st = Words(pc.step);
    uint ti = table + min(tid, half_ - 1u) * 2u;
    float rc = rope ? uintBitsToFloat(st.v[ti]) : 0.0, rs = rope ? uintBitsToFloat(st.v[ti + 1u]) : 0.0;
    uint s = st.v[2u], sc = s == 0xFFFFFFFFu ? 0u : s;
    uint srow = st.v[3u + 5u * sc], cache_row = st.v[3u + 5u * sc + 2u], pos0 = st.v[3u + 5u * sc + 3u];
    uint ring_row = st.v[3u + 5u * sc + 4u];
    if (tid < hd) h[tid] = x0;
    if (tid + 256u < hd) h[tid + 256u] = x1;
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
            bool neox = (flags & 8u) != 0u;
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
    bool store = (kind == 1u && (flags & 16u) != 0u) || (kind == 2u && (flags & 32u) != 0u);
    if (!store || s == 0xFFFFFFFFu) return;
    uvec2 c = kind == 1u ? pc.kc : pc.vc;
    uint p = pos0 - srow;
    uint e0 = (pc.ring == 0u ? cache_row + p : ring_row + p % pc.ring) * width + head * hd;
    KV_STORE_ROW(c, 0u, e0, h, hd, tid)
}
#elif PRO == 6
// Keep the better of the current pair and (k, i): the largest key, the first index on ties.
void better(inout float bk, inout uint bi, float k, uint i) {
    if (i != 0xFFFFFFFFu && (bi == 0xFFFFFFFFu || k > bk || (k == bk && i < bi))) {
        bk = k;
        bi = i;
    }
}

// The workgroups' pairs, reduced in the last one.
void tail(uint seg) {
    uint tid = gl_LocalInvocationID.x;
    CWords part = CWords(pc.part);
    float bk = uintBitsToFloat(0xFF800000u);
    uint bi = 0xFFFFFFFFu;
    for (uint g = tid; g < pc.total; g += 256u) better(bk, bi, uintBitsToFloat(part.v[2u * g]), part.v[2u * g + 1u]);
    sk[tid] = bk;
    si[tid] = bi;
    barrier();
    for (uint w = 128u; w > 0u; w >>= 1) {
        if (tid < w) {
            float k = sk[tid];
            uint i = si[tid];
            better(k, i, sk[tid + w], si[tid + w]);
            sk[tid] = k;
            si[tid] = i;
        }
        barrier();
    }
    if (tid == 0u) Floats(pc.amax).v[0] = float(si[0] == 0xFFFFFFFFu ? 0u : si[0]);
}
#elif PRO == 4
// GatedFfn's activation and quantization for one block of the quantized output: one value an
// invocation, as act_quant.comp.
void tail(uint blk) {
    uint tid = gl_LocalInvocationID.x;
    bool k = (pc.flags & 4u) != 0u, silu = (pc.flags & 1u) != 0u;
    uint be = k ? 256u : 32u, bw = k ? 73u : 10u, i = blk * be + min(tid, be - 1u);
    float g = CFloats(pc.gate).v[i], u = CFloats(pc.up).v[i];
    precise float v = (silu ? silu_ref(g) : gelu_ref(g)) * u;
    if (tid < be) Floats(pc.act).v[i] = v;
    qv[tid] = tid < be ? v : 0.0;
    barrier();
    quantize_seg(Words(pc.q), blk * bw, be, k);
}
#elif PRO == 3
// The residual junction, in the last workgroup: its outputs from the finished matmul results.
// Every global load is issued first, in one wave (a tail adds its latency to the step's).
#define TPER (PRO_MAX / 256u)
void tail(uint seg) {
    uint tid = gl_LocalInvocationID.x, dim = pc.rows;
    bool k = (pc.flags & 4u) != 0u;
    CFloats br = CFloats(pc.out_);
    Floats xi = Floats(pc.x_in), xo = Floats(pc.x_out), pw = Floats(pc.post), nw = Floats(pc.nw), no = Floats(pc.nout);
    bool post = (pc.flags & 2u) != 0u;
    float brv[TPER], xv[TPER], pv[TPER], wv[TPER];
    [[unroll]] for (uint j = 0u; j < TPER; j++) {
        uint i = min(tid + 256u * j, dim - 1u);
        brv[j] = br.v[i];
        xv[j] = xi.v[i];
        pv[j] = post ? pw.v[i] : 0.0;
        wv[j] = nw.v[i];
    }
    [[unroll]] for (uint j = 0u; j < TPER; j++) {
        uint i = tid + 256u * j;
        if (i < dim) row[i] = brv[j];
    }
    barrier();
    if (post) {
        float inv = row_rms_inv(dim, pc.eps);
        [[unroll]] for (uint j = 0u; j < TPER; j++) {
            uint i = tid + 256u * j;
            if (i < dim) {
                precise float b = row[i] * inv * pv[j];
                row[i] = b;
            }
        }
    }
    [[unroll]] for (uint j = 0u; j < TPER; j++) {
        uint i = tid + 256u * j;
        if (i < dim) {
            precise float s = xv[j] + row[i];
            row[i] = s;
            xo.v[i] = s;
        }
    }
    barrier();
    float inv = row_rms_inv(dim, pc.eps);
    [[unroll]] for (uint j = 0u; j < TPER; j++) {
        uint i = tid + 256u * j;
        if (i < dim) {
            precise float v = row[i] * inv * wv[j];
            row[i] = v;
            no.v[i] = v;
        }
    }
    barrier();
    quantize_row(Words(pc.q), 0u, dim, k);
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
#if PRO == 1 || PRO == 2
    prologue();
    uint nt = 1u, xa = 0u, x_stride = 0u;
#elif PRO >= 3
    Words a = Words(pc.x);
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
            uint row = W_BYTE + min(r0 + r, pc.rows - 1u) * pc.row_bytes;
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
#if PRO == 6
        Floats(pc.out_).v[r] = res;
        sk[c_r] = argmax_key(res);
#elif PRO >= 3
        CFloats(pc.out_).v[r] = res;
#else
        Floats(pc.out_).v[pc.out_off + (t0 + c_t) * pc.rows + r] = res;
#endif
    }
#if PRO == 6
    // This workgroup's best row (its rows in order: the first of equal keys).
    barrier();
    if (tid == 0u) {
        float bk = uintBitsToFloat(0xFF800000u);
        uint bi = 0xFFFFFFFFu;
        for (uint j = 0u; j < R && r0 + j < pc.rows; j++) better(bk, bi, sk[j], r0 + j);
        CWords part = CWords(pc.part);
        part.v[2u * gl_WorkGroupID.x] = floatBitsToUint(bk);
        part.v[2u * gl_WorkGroupID.x + 1u] = bi;
    }
#endif
#if PRO >= 3
    // This workgroup's results are out; the group's last workgroup to finish runs the tail and
    // leaves the counter at zero for the next replay.
    // Per-segment tails (PRO 4: a block of the quantized output, 5: a head) count the
    // workgroups of the segment's rows (the rows of a workgroup never span two segments).
#if PRO == 4
    uint seg = r0 / (((pc.flags & 4u) != 0u) ? 256u : 32u);
#elif PRO == 5
    uint seg = r0 / (pc.shape >> 16);
#else
    uint seg = 0u;
#endif
    memoryBarrierBuffer();
    barrier();
    if (tid == 0u) {
        uint done = atomicAdd(Counter(pc.ctr).v[seg], 1u);
        s_last = done + 1u == pc.total;
    }
    barrier();
    if (!s_last) return;
    memoryBarrierBuffer();
    if (tid == 0u) Counter(pc.ctr).v[seg] = 0u;
    tail(seg);
#endif
}
