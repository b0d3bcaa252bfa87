#version 460
// variants: STAGE=1|2
// Argmax per row in two stages: stage 1 reduces each chunk of CHUNK columns of a row to its best
// (key, index) pair; stage 2 reduces a row's pairs and writes the index as an f32 (exact below
// 2^24). The order is the reference's: the largest argmax_key, the first index on ties — a
// choice that does not depend on how the reduction is grouped.
#include "common/base.glsl"
#include "common/exact.glsl"

#define CHUNK 4096u

layout(local_size_x = 256) in;
layout(push_constant) uniform Push {
    uvec2 out_;       // stage 2: f32 indices
    uvec2 x;          // stage 1: the values
    uvec2 part;       // (key bits, index) per (row, chunk)
    uint out_off;
    uint x_off;
    uint part_off;
    uint cols;
} pc;

shared float sk[256];
shared uint si[256];

// Keep the better of the current pair and (k, i).
void better(inout float bk, inout uint bi, float k, uint i) {
    if (i != 0xFFFFFFFFu && (bi == 0xFFFFFFFFu || k > bk || (k == bk && i < bi))) {
        bk = k;
        bi = i;
    }
}

void main() {
    uint tid = gl_LocalInvocationID.x, r = gl_WorkGroupID.y;
    uint chunks = (pc.cols + CHUNK - 1u) / CHUNK;
    float bk = uintBitsToFloat(0xFF800000u);
    uint bi = 0xFFFFFFFFu;
    Words part = Words(pc.part);
#if STAGE == 1
    uint c = gl_WorkGroupID.x;
    Floats x = Floats(pc.x);
    uint end = min(pc.cols, (c + 1u) * CHUNK);
    for (uint j = c * CHUNK + tid; j < end; j += 256u) better(bk, bi, argmax_key(x.v[pc.x_off + r * pc.cols + j]), j);
#else
    for (uint c = tid; c < chunks; c += 256u) {
        uint at = pc.part_off + 2u * (r * chunks + c);
        better(bk, bi, uintBitsToFloat(part.v[at]), part.v[at + 1u]);
    }
#endif
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
    if (tid != 0u) return;
#if STAGE == 1
    uint at = pc.part_off + 2u * (r * chunks + gl_WorkGroupID.x);
    part.v[at] = floatBitsToUint(sk[0]);
    part.v[at + 1u] = si[0];
#else
    Floats(pc.out_).v[pc.out_off + r] = float(si[0] == 0xFFFFFFFFu ? 0u : si[0]);
#endif
}
