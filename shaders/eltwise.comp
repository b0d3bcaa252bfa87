#version 460
// Elementwise ops: 0 add (out = a + b), 1 out = gelu_tanh(a)·b, 2 out = silu(a)·b,
// 3 out = softcap(a) (cap). In place allowed: each element is read, then written, by one thread.
#include "common/base.glsl"
#include "common/exact.glsl"

layout(local_size_x = 256) in;
layout(push_constant) uniform Push {
    uvec2 out_;
    uvec2 a;
    uvec2 b;
    uint out_off;
    uint a_off;
    uint b_off;
    uint len;
    uint op;
    float cap;
} pc;

void main() {
    uint i = gl_GlobalInvocationID.x + gl_GlobalInvocationID.y * gl_NumWorkGroups.x * 256u;
    if (i >= pc.len) return;
    float x = Floats(pc.a).v[pc.a_off + i];
    precise float r;
    if (pc.op == 0u) {
        r = x + Floats(pc.b).v[pc.b_off + i];
    } else if (pc.op == 1u) {
        r = gelu_ref(x) * Floats(pc.b).v[pc.b_off + i];
    } else if (pc.op == 2u) {
        r = silu_ref(x) * Floats(pc.b).v[pc.b_off + i];
    } else {
        r = softcap_ref(x, pc.cap);
    }
    Floats(pc.out_).v[pc.out_off + i] = r;
}
