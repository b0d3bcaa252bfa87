// RMSNorm's statistic over a row held in shared `row` (declared by the includer): the reference's
// rms_inv (8 lanes in element order, reduce_lanes, correctly rounded division and square root),
// computed by invocations 0..8 and handed to every invocation. Call from every invocation.

shared float rn_lanes[8];
shared float rn_inv;

float row_rms_inv(uint dim, float eps) {
    uint tid = gl_LocalInvocationID.x;
    if (tid < 8u) {
        precise float acc = 0.0;
        uint i = tid;
        // Runs of 32 of the lane's values loaded before their additions: the chain waits on
        // shared memory once a run (wide rows: the 27B's 5376 are 672 a lane).
        for (; i + 248u < dim; i += 256u) {
            float v[32];
            [[unroll]] for (uint u = 0u; u < 32u; u++) v[u] = row[i + 8u * u];
            [[unroll]] for (uint u = 0u; u < 32u; u++) acc = acc + v[u] * v[u];
        }
        for (; i + 56u < dim; i += 64u) {
            float v[8];
            [[unroll]] for (uint u = 0u; u < 8u; u++) v[u] = row[i + 8u * u];
            [[unroll]] for (uint u = 0u; u < 8u; u++) acc = acc + v[u] * v[u];
        }
        for (; i < dim; i += 8u) acc = acc + row[i] * row[i];
        rn_lanes[tid] = acc;
    }
    barrier();
    if (tid == 0u) {
        precise float ss = reduce_lanes(rn_lanes[0], rn_lanes[1], rn_lanes[2], rn_lanes[3], rn_lanes[4], rn_lanes[5],
                                        rn_lanes[6], rn_lanes[7]);
        precise float ms = div_rn(ss, float(dim));
        rn_inv = div_rn(1.0, sqrt_rn(ms + eps));
    }
    barrier();
    return rn_inv;
}
