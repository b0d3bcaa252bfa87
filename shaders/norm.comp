#version 460
// RmsNorm, and the fused AddRmsNorm: [x_out = x + rmsnorm(branch, post), or x + branch];
// out = rmsnorm(x_out, w); [out quantized to Q8A/Q8K blocks]. One workgroup per row; the row
// passes between threads through shared memory.
#include "common/base.glsl"
#include "common/exact.glsl"
#extension GL_KHR_shader_subgroup_basic : require
#extension GL_KHR_shader_subgroup_shuffle : require

#define MAX_DIM 6144u
shared float row[MAX_DIM];
#define QROW MAX_DIM
#include "common/quantize.glsl"
#define F_BRANCH 1u
#define F_POST 2u
#define F_QA 4u
#define F_QK 8u
#define F_SHARED 16u   // keep the row in shared memory (needed by the fused steps)

layout(local_size_x = 256) in;
layout(push_constant) uniform Push {
    uvec2 x;
    uvec2 branch;
    uvec2 out_;
    uvec2 w;          // f32 norm weight
    uvec2 post;       // f32 post-norm weight
    uvec2 q;          // quantized output blocks
    uvec2 x_out;      // the new residual (may be x)
    uint x_off;
    uint br_off;
    uint out_off;
    uint q_off;       // word offset of row 0's blocks
    uint x_out_off;
    uint dim;
    uint flags;
    float eps;
} pc;

shared float lanes[8];
shared float inv_s;


// 1/sqrt(mean(v²) + eps) of the row held in `row` (shared) or read from `src` (global),
// with the reference's 8-lane order; every thread gets the value.
float rms_inv_row(bool shared_row, Floats src, uint off) {
    uint tid = gl_LocalInvocationID.x;
    if (tid < 8u) {
        // Lane tid's chain over elements tid, tid + 8, …; eight at a time, loads first.
        precise float acc = 0.0;
        uint i = tid;
        for (; i + 56u < pc.dim; i += 64u) {
            float v[8];
            [[unroll]] for (uint u = 0u; u < 8u; u++) v[u] = shared_row ? row[i + 8u * u] : src.v[off + i + 8u * u];
            [[unroll]] for (uint u = 0u; u < 8u; u++) acc = acc + v[u] * v[u];
        }
        for (; i < pc.dim; i += 8u) {
            float v = shared_row ? row[i] : src.v[off + i];
            acc = acc + v * v;
        }
        lanes[tid] = acc;
    }
    barrier();
    if (tid == 0u) {
        precise float ss = reduce_lanes(lanes[0], lanes[1], lanes[2], lanes[3], lanes[4], lanes[5], lanes[6], lanes[7]);
        precise float ms = div_rn(ss, float(pc.dim));
        inv_s = div_rn(1.0, sqrt_rn(ms + pc.eps));
    }
    barrier();
    return inv_s;
}

void main() {
    uint r = gl_WorkGroupID.x, tid = gl_LocalInvocationID.x, dim = pc.dim;
    Floats x = Floats(pc.x), o = Floats(pc.out_), w = Floats(pc.w);
    uint xo = pc.x_off + r * dim, oo = pc.out_off + r * dim;
    bool sh = (pc.flags & F_SHARED) != 0u;
    if ((pc.flags & F_BRANCH) != 0u) {
        Floats br = Floats(pc.branch);
        uint bo = pc.br_off + r * dim;
        for (uint i = tid; i < dim; i += 256u) row[i] = br.v[bo + i];
        barrier();
        if ((pc.flags & F_POST) != 0u) {
            float inv = rms_inv_row(true, br, bo);
            Floats pw = Floats(pc.post);
            for (uint i = tid; i < dim; i += 256u) {
                precise float b = row[i] * inv * pw.v[i];
                row[i] = b;
            }
        }
        // x_out = x + branch
        Floats xw = Floats(pc.x_out);
        uint xwo = pc.x_out_off + r * dim;
        for (uint i = tid; i < dim; i += 256u) {
            precise float s = x.v[xo + i] + row[i];
            xw.v[xwo + i] = s;
            row[i] = s;
        }
        barrier();
    } else if (sh) {
        for (uint i = tid; i < dim; i += 256u) row[i] = x.v[xo + i];
        barrier();
    }
    float inv = rms_inv_row(sh, x, xo);
    for (uint i = tid; i < dim; i += 256u) {
        precise float v = (sh ? row[i] : x.v[xo + i]) * inv * w.v[i];
        if (sh) row[i] = v;
        o.v[oo + i] = v;
    }
    if ((pc.flags & (F_QA | F_QK)) == 0u) return;
    barrier();
    // Quantize the normed row.
    bool k = (pc.flags & F_QK) != 0u;
    uint be = k ? 256u : 32u, bw = k ? 73u : 10u;
    quantize_row(Words(pc.q), pc.q_off + r * (dim / be) * bw, dim, k);
}
