#version 460
// Argmax per row: the largest argmax_key, first index on ties; order-free, so a tree reduction
// gives the reference's answer. The index is written as an f32 (exact below 2^24).
#include "common/base.glsl"
#include "common/exact.glsl"

layout(local_size_x = 256) in;
layout(push_constant) uniform Push {
    uvec2 out_;
    uvec2 x;
    uint out_off;
    uint x_off;
    uint cols;
} pc;

shared float sk[256];
shared uint si[256];

void main() {
    uint r = gl_WorkGroupID.x, tid = gl_LocalInvocationID.x;
    Floats x = Floats(pc.x);
    float best = uintBitsToFloat(0xFF800000u);
    uint bi = 0xFFFFFFFFu;
    for (uint j = tid; j < pc.cols; j += 256u) {
        float key = argmax_key(x.v[pc.x_off + r * pc.cols + j]);
        if (bi == 0xFFFFFFFFu || key > best) {
            best = key;
            bi = j;
        }
    }
    sk[tid] = best;
    si[tid] = bi;
    barrier();
    for (uint w = 128u; w > 0u; w >>= 1) {
        if (tid < w) {
            float ok = sk[tid + w];
            uint oi = si[tid + w];
            if (oi != 0xFFFFFFFFu && (si[tid] == 0xFFFFFFFFu || ok > sk[tid] || (ok == sk[tid] && oi < si[tid]))) {
                sk[tid] = ok;
                si[tid] = oi;
            }
        }
        barrier();
    }
    if (tid == 0u) Floats(pc.out_).v[pc.out_off + r] = float(si[0] == 0xFFFFFFFFu ? 0u : si[0]);
}
