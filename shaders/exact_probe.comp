#version 460
// exact.glsl's correctly rounded division and square root, on their own: for tests (each pair
// a[i], b[i] gives q[i] = a/b and r[i] = sqrt(a), compared with the host's IEEE operations) and,
// with `chain` > 0, for timing one invocation's dependent chain of `chain` divisions and roots
// (what a junction tail's statistic waits on).
#include "common/base.glsl"
#include "common/exact.glsl"

layout(local_size_x = 64) in;
layout(push_constant) uniform Push {
    uvec2 a;
    uvec2 b;
    uvec2 q;
    uvec2 r;
    uint n;
    uint chain;
} pc;

void main() {
    uint i = gl_GlobalInvocationID.x;
    Floats a = Floats(pc.a), b = Floats(pc.b), q = Floats(pc.q), r = Floats(pc.r);
    if (pc.chain > 0u) {
        if (i != 0u) return;
        // Each step's operands depend on the last result, as a statistic's chain does.
        float x = a.v[0], y = b.v[0];
        for (uint k = 0u; k < pc.chain; k++) {
            float d = div_rn(x, y);
            x = sqrt_rn(d + 1.5) + 0.25;
        }
        q.v[0] = x;
        return;
    }
    if (i >= pc.n) return;
    q.v[i] = div_rn(a.v[i], b.v[i]);
    r.v[i] = sqrt_rn(a.v[i]);
}
