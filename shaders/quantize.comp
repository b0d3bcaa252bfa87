#version 460
// variants: L=A|K
// QuantizeAct: rows of f32 into BlockQ8A (L_A) or BlockQ8K (L_K) words; one block per thread.
#include "common/base.glsl"
#include "common/exact.glsl"

#define L_A 0
#define L_K 1
#if L == L_A
#define BE 32u
#define BW 10u
#else
#define BE 256u
#define BW 73u
#endif

layout(local_size_x = 64) in;
layout(push_constant) uniform Push {
    uvec2 x;
    uvec2 q;
    uint x_off;
    uint q_off;
    uint rows;
    uint cols;
} pc;

void main() {
    uint nb = pc.cols / BE;
    uint g = gl_GlobalInvocationID.x;
    if (g >= pc.rows * nb) return;
    uint r = g / nb, b = g % nb;
    Floats x = Floats(pc.x);
    Words q = Words(pc.q);
    uint xo = pc.x_off + r * pc.cols + b * BE;
    float amax = 0.0;
    for (uint i = 0u; i < BE; i++) {
        float a = abs(x.v[xo + i]);
        amax = a > amax ? a : amax;
    }
    float d = amax > 0.0 ? div_rn(amax, 127.0) : 0.0;
    float id = amax > 0.0 ? div_rn(127.0, amax) : 0.0;
    uint base = pc.q_off + g * BW;
    q.v[base] = floatBitsToUint(d);
    int sum = 0, bsum = 0;
    uint word = 0u;
    for (uint i = 0u; i < BE; i++) {
        precise float p = x.v[xo + i] * id;
        int c = isnan(p) ? 0 : int(clamp(roundEven(p), -127.0, 127.0));
        sum += c;
        bsum += c;
        word |= (uint(c) & 0xFFu) << (8u * (i & 3u));
        if ((i & 3u) == 3u) {
#if L == L_A
            q.v[base + 2u + i / 4u] = word;
#else
            q.v[base + 1u + i / 4u] = word;
#endif
            word = 0u;
        }
#if L == L_K
        if ((i & 15u) == 15u) {
            uint j = i / 16u, wi = base + 65u + j / 2u;
            uint bits = uint(bsum) & 0xFFFFu;
            if ((j & 1u) == 0u) q.v[wi] = bits; else q.v[wi] = q.v[wi] | (bits << 16);
            bsum = 0;
        }
#endif
    }
#if L == L_A
    q.v[base + 1u] = uint(sum);
#endif
}
