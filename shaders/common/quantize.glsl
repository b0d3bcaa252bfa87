// quantize_q8a / quantize_q8k on up to 256 values a workgroup holds in shared `qv`, one value per
// invocation (workgroups of 256): each block's largest magnitude by a tree (max is order-free,
// NaN ignored as f32::max does), its codes, then its integer sums. Call from every invocation.

shared float qv[256];
shared float qa[256];
shared int qc[256];

// qv[0..len) (len a whole number of blocks) into the blocks at word `base` of `q`, block j at
// base + j·BW; `k`: BlockQ8K (256 values, 73 words) else BlockQ8A (32 values, 10 words).
void quantize_seg(Words q, uint base, uint len, bool k) {
    uint tid = gl_LocalInvocationID.x;
    uint be = k ? 256u : 32u, bw = k ? 73u : 10u;
    uint lb = tid % be;
    bool live = tid < len;
    float v = live ? qv[tid] : 0.0;
    qa[tid] = abs(v);
    barrier();
    for (uint w = be / 2u; w > 0u; w >>= 1) {
        if (lb < w) qa[tid] = qa[tid + w] > qa[tid] ? qa[tid + w] : qa[tid];
        barrier();
    }
    float amax = qa[tid - lb];
    float id = amax > 0.0 ? div_rn(127.0, amax) : 0.0;
    precise float p = v * id;
    int c = isnan(p) ? 0 : int(clamp(roundEven(p), -127.0, 127.0));
    qc[tid] = live ? c : 0;
    barrier();
    if (live) {
        uint at = base + (tid / be) * bw;
        if (lb == 0u) q.v[at] = floatBitsToUint(amax > 0.0 ? div_rn(amax, 127.0) : 0.0);
        if ((lb & 3u) == 0u) {
            uint word = 0u;
            for (uint j = 0u; j < 4u; j++) word |= (uint(qc[tid + j]) & 0xFFu) << (8u * j);
            q.v[at + (k ? 1u : 2u) + lb / 4u] = word;
        }
        if (!k && lb == 0u) {
            int sum = 0;
            for (uint j = 0u; j < 32u; j++) sum += qc[tid + j];
            q.v[at + 1u] = uint(sum);
        }
        if (k && (lb & 31u) == 0u) {
            int s0 = 0, s1 = 0;
            for (uint j = 0u; j < 16u; j++) {
                s0 += qc[tid + j];
                s1 += qc[tid + 16u + j];
            }
            q.v[at + 65u + lb / 32u] = (uint(s0) & 0xFFFFu) | (uint(s1) << 16);
        }
    }
    barrier();
}
