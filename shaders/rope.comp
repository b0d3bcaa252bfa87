#version 460
// Rope in place: pair (a, b) of every head rotated by the (cos, sin) of its frequency at the
// row's position, both taken from the step's table (computed on the host by the reference's
// rope_cos_sin, so the transcendental functions are the reference's own).
#include "common/base.glsl"

layout(local_size_x = 128) in;
layout(push_constant) uniform Push {
    uvec2 x;
    uvec2 step;
    uint x_off;
    uint rows;
    uint heads;
    uint head_dim;
    uint table_off;   // word offset of (cos, sin) pairs, (rows, head_dim/2)
    uint neox;        // 1: pairs (i, i + d/2); 0: (2i, 2i + 1)
} pc;

void main() {
    uint half_ = pc.head_dim / 2u;
    uint i = gl_GlobalInvocationID.x, h = gl_WorkGroupID.y, t = gl_WorkGroupID.z;
    if (i >= half_ || h >= pc.heads || t >= pc.rows) return;
    Words tab = Words(pc.step);
    float c = uintBitsToFloat(tab.v[pc.table_off + (t * half_ + i) * 2u]);
    float s = uintBitsToFloat(tab.v[pc.table_off + (t * half_ + i) * 2u + 1u]);
    uint base = pc.x_off + (t * pc.heads + h) * pc.head_dim;
    uint ia = pc.neox != 0u ? i : 2u * i;
    uint ib = pc.neox != 0u ? i + half_ : 2u * i + 1u;
    Floats x = Floats(pc.x);
    float a = x.v[base + ia], b = x.v[base + ib];
    precise float ra = a * c - b * s;
    precise float rb = b * c + a * s;
    x.v[base + ia] = ra;
    x.v[base + ib] = rb;
}
