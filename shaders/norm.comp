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
#define F_SHARED 16u   // (the row always passes through shared memory now)

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

#include "common/rownorm.glsl"

#define MAX_PER (MAX_DIM / 256u)

void main() {
    uint r = gl_WorkGroupID.x, tid = gl_LocalInvocationID.x, dim = pc.dim;
    uint per = (dim + 255u) / 256u;   // elements per invocation: tid + 256·j
    bool branch = (pc.flags & F_BRANCH) != 0u, post = (pc.flags & F_POST) != 0u;
    uint xo = pc.x_off + r * dim, oo = pc.out_off + r * dim, bo = pc.br_off + r * dim;
    // Every global read first, in one wave (the row's x and branch, both norm weights): the
    // stages below then wait on memory once, not once each.
    float xr[MAX_PER], wr[MAX_PER], br[MAX_PER], pr[MAX_PER];
    [[unroll]] for (uint j = 0u; j < MAX_PER; j++) {
        if (j < per) {
            uint i = min(tid + 256u * j, dim - 1u);
            xr[j] = Floats(pc.x).v[xo + i];
            wr[j] = Floats(pc.w).v[i];
            br[j] = branch ? Floats(pc.branch).v[bo + i] : 0.0;
            pr[j] = post ? Floats(pc.post).v[i] : 0.0;
        }
    }
    if (branch) {
        [[unroll]] for (uint j = 0u; j < MAX_PER; j++) {
            uint i = tid + 256u * j;
            if (j < per && i < dim) row[i] = br[j];
        }
        barrier();
        if (post) {
            float inv = row_rms_inv(pc.dim, pc.eps);
            [[unroll]] for (uint j = 0u; j < MAX_PER; j++) {
                uint i = tid + 256u * j;
                if (j < per && i < dim) {
                    precise float b = row[i] * inv * pr[j];
                    row[i] = b;
                }
            }
        }
        // x_out = x + branch
        Floats xw = Floats(pc.x_out);
        uint xwo = pc.x_out_off + r * dim;
        [[unroll]] for (uint j = 0u; j < MAX_PER; j++) {
            uint i = tid + 256u * j;
            if (j < per && i < dim) {
                precise float s = xr[j] + row[i];
                xw.v[xwo + i] = s;
                row[i] = s;
            }
        }
    } else {
        [[unroll]] for (uint j = 0u; j < MAX_PER; j++) {
            uint i = tid + 256u * j;
            if (j < per && i < dim) row[i] = xr[j];
        }
    }
    barrier();
    float inv = row_rms_inv(pc.dim, pc.eps);
    Floats o = Floats(pc.out_);
    [[unroll]] for (uint j = 0u; j < MAX_PER; j++) {
        uint i = tid + 256u * j;
        if (j < per && i < dim) {
            precise float v = row[i] * inv * wr[j];
            row[i] = v;
            o.v[oo + i] = v;
        }
    }
    if ((pc.flags & (F_QA | F_QK)) == 0u) return;
    barrier();
    // Quantize the normed row.
    bool k = (pc.flags & F_QK) != 0u;
    uint be = k ? 256u : 32u, bw = k ? 73u : 10u;
    quantize_row(Words(pc.q), pc.q_off + r * (dim / be) * bw, dim, k);
}
