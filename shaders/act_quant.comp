#version 460
// variants: L=A|K
// The activation quantizer (quantize_q8a / quantize_q8k) on 256 consecutive elements of a row per
// workgroup, one element per thread, optionally applying the MLP's gate first:
//   op 0: q = quantize(x)                       (QuantizeAct)
//   op 1: g = gelu_tanh(x)·up, written, q = quantize(g)   (GatedFfn's tail)
//   op 2: g = silu(x)·up, likewise
// The block's largest magnitude and its integer sums are order-free (max, integer adds), so the
// parallel form gives the reference's bits.
#include "common/base.glsl"
#include "common/exact.glsl"
#include "common/quantize.glsl"

#define L_A 0
#define L_K 1
#if L == L_A
#define BE 32u
#define BW 10u
#else
#define BE 256u
#define BW 73u
#endif

layout(local_size_x = 256) in;
layout(push_constant) uniform Push {
    uvec2 x;          // f32 input (the gate for ops 1, 2)
    uvec2 up;         // f32 up (ops 1, 2)
    uvec2 g;          // f32 output of the gate (ops 1, 2; may equal x)
    uvec2 q;          // quantized blocks
    uint x_off;
    uint up_off;
    uint g_off;
    uint q_off;
    uint cols;
    uint op;
} pc;


void main() {
    uint tid = gl_LocalInvocationID.x, r = gl_WorkGroupID.y;
    uint i = gl_WorkGroupID.x * 256u + tid;   // element in the row
    bool live = i < pc.cols;
    float v = 0.0;
    if (live) {
        float x = Floats(pc.x).v[pc.x_off + r * pc.cols + i];
        if (pc.op == 0u) {
            v = x;
        } else {
            float u = Floats(pc.up).v[pc.up_off + r * pc.cols + i];
            precise float gv = (pc.op == 1u ? gelu_ref(x) : silu_ref(x)) * u;
            v = gv;
            Floats(pc.g).v[pc.g_off + r * pc.cols + i] = gv;
        }
    }
    qv[tid] = v;
    barrier();
    uint nb = pc.cols / BE;
    uint live_len = min(256u, pc.cols - gl_WorkGroupID.x * 256u);
    quantize_seg(Words(pc.q), pc.q_off + (r * nb + gl_WorkGroupID.x * 256u / BE) * BW, live_len, BE == 256u);
}
