// quantize_q8a / quantize_q8k on up to 256 values a workgroup holds in shared `qv`, one value per
// invocation (workgroups of 256). Call from every invocation. NaN magnitudes are skipped by the
// largest-magnitude search, as f32::max does.

shared float qv[256];
shared float qa[256];
shared int qc[256];

// Where a block word goes: a buffer by default; an includer may define QSTORE to keep the blocks
// in shared memory instead.
#ifndef QSTORE
#define QSTORE(q, at, val) q.v[at] = (val)
#endif

// qv[0..len) (len a whole number of blocks) into the blocks at word `base` of `q`, block j at
// base + j·BW; `k`: BlockQ8K (256 values, 73 words) else BlockQ8A (32 values, 10 words).
// Each block's largest magnitude (a tree), then one code per invocation, then the packing and
// integer sums.
void quantize_seg(Words q, uint base, uint len, bool k) {
    uint tid = gl_LocalInvocationID.x;
    uint be = k ? 256u : 32u, bw = k ? 73u : 10u;
    uint nb = len / be;
    // Each block's largest magnitude as a tree (max is exact and order-free; NaN counts as 0,
    // which never wins, as in the reference's chain from 0). Magnitudes compare as their bits,
    // denormals included; the tree lives in qc, which is free until the codes.
    float a0 = abs(qv[tid]);
    qc[tid] = tid < len && !isnan(a0) ? int(floatBitsToUint(a0)) : 0;
    barrier();
    for (uint s = be / 2u; s > 0u; s >>= 1) {
        if ((tid % be) < s) qc[tid] = max(qc[tid], qc[tid + s]);
        barrier();
    }
    if (tid < nb) {
        float amax = intBitsToFloat(qc[tid * be]);
        qa[tid] = amax > 0.0 ? div_rn(127.0, amax) : 0.0;
        QSTORE(q, base + tid * bw, floatBitsToUint(amax > 0.0 ? div_rn(amax, 127.0) : 0.0));
    }
    barrier();
    bool live = tid < len;
    precise float p = (live ? qv[tid] : 0.0) * (live ? qa[tid / be] : 0.0);
    int c = isnan(p) ? 0 : int(clamp(roundEven(p), -127.0, 127.0));
    qc[tid] = live ? c : 0;
    barrier();
    uint lb = tid % be;
    if (live) {
        uint at = base + (tid / be) * bw;
        if ((lb & 3u) == 0u) {
            uint word = 0u;
            for (uint j = 0u; j < 4u; j++) word |= (uint(qc[tid + j]) & 0xFFu) << (8u * j);
            QSTORE(q, at + (k ? 1u : 2u) + lb / 4u, word);
        }
        if (!k && lb == 0u) {
            int sum = 0;
            for (uint j = 0u; j < 32u; j++) sum += qc[tid + j];
            QSTORE(q, at + 1u, uint(sum));
        }
        if (k && (lb & 31u) == 0u) {
            int s0 = 0, s1 = 0;
            for (uint j = 0u; j < 16u; j++) {
                s0 += qc[tid + j];
                s1 += qc[tid + 16u + j];
            }
            QSTORE(q, at + 65u + lb / 32u, (uint(s0) & 0xFFFFu) | (uint(s1) << 16));
        }
    }
    barrier();
}
